"""``wadi analyze``: norm-vs-direction analysis of a teacher/student pair (method.md section 5)."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Compare a teacher and a student layer by layer: for every Linear and Conv2d
weight, per output neuron, the norm change |‖w_s‖-‖w_t‖|/‖w_t‖ and the
direction change 1-cos(w_s, w_t); the SVD energy of the residual W_s-W_t.
Writes report.json, layers.csv and PNG plots into --out. Each side is a
diffusers model folder, a pipeline folder (its unet/ or transformer/ is
used), or a .safetensors file; --student-adapter applies a wadi LoRaD
adapter on top (on the teacher when STUDENT is left out).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="norm vs direction change of a teacher/student pair, SVD energy, swap test",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("teacher", metavar="TEACHER", help="teacher model folder or .safetensors")
    p.add_argument(
        "student",
        metavar="STUDENT",
        nargs="?",
        help="student model folder or .safetensors (default: TEACHER, with --student-adapter)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--student-adapter", metavar="DIR", help="wadi LoRaD adapter on the student")
    p.add_argument("--teacher-adapter", metavar="DIR", help="wadi LoRaD adapter on the teacher")
    p.add_argument("--variant", metavar="NAME", help="weights variant of both folders, e.g. fp16")
    p.add_argument(
        "--energy-fraction",
        type=float,
        default=0.3,
        metavar="F",
        help="report the residual's cumulative SVD energy at this fraction of full rank (0.3)",
    )
    p.add_argument(
        "--energy-target",
        type=float,
        default=0.9,
        metavar="E",
        help="report the smallest rank holding this fraction of the energy (0.9)",
    )
    p.add_argument("--no-svd", action="store_true", help="skip the residual SVD (faster)")
    p.add_argument(
        "--linear-only", action="store_true", help="only Linear (2-D) weights, no Conv2d"
    )
    p.add_argument("--include", metavar="REGEX", help="only layers whose weight name matches")
    p.add_argument("--exclude", metavar="REGEX", help="leave out layers whose weight name matches")
    p.add_argument(
        "--swap",
        action="append",
        choices=("norm", "direction"),
        default=[],
        help="also write the student with the teacher's norms (norm) or directions (direction) "
        "to DIR/swap-<kind> in the student's format; may be given twice",
    )
    p.add_argument("--no-plots", action="store_true", help="write report.json and layers.csv only")
    p.add_argument("--device", default="cpu", help="device for the per-layer math (cpu, cuda)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def swap_target(out: Path, kind: str, layout) -> Path:
    """Where ``--swap kind`` writes: ``DIR/swap-<kind>`` (a folder) or ``DIR/swap-<kind>.safetensors``."""
    return out / (f"swap-{kind}.safetensors" if layout.kind == "file" else f"swap-{kind}")


def run(args) -> int:
    import sys

    from wadi.cli import UserError
    from wadi.files import check_writable, output_errors

    from .report import analyze, summary_table, write_report
    from .sources import open_source

    if args.student is None and args.student_adapter is None:
        raise UserError("give STUDENT, or --student-adapter DIR to apply an adapter on TEACHER")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA device here; use --device cpu")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; give a folder path")
    student_path = args.student if args.student is not None else args.teacher
    created = not out.exists()
    try:
        with (
            open_source(args.teacher, args.teacher_adapter, variant=args.variant) as teacher,
            open_source(student_path, args.student_adapter, variant=args.variant) as student,
        ):
            swaps = {
                kind: swap_target(out, kind, student.layout) for kind in dict.fromkeys(args.swap)
            }
            check_writable(out)  # a read-only or misplaced --out fails now, not after the work
            with output_errors(out):
                report = analyze(
                    teacher,
                    student,
                    energy_fraction=args.energy_fraction,
                    energy_target=args.energy_target,
                    svd=not args.no_svd,
                    include=args.include,
                    exclude=args.exclude,
                    linear_only=args.linear_only,
                    swaps=swaps,
                    device=args.device,
                    progress=not args.quiet,
                )
                written = write_report(report, out, plots=not args.no_plots)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed first run leaves no empty --out behind
        raise
    print(f"teacher: {report.teacher}")
    print(f"student: {report.student}")
    print(summary_table(report))
    print(
        "(percent; dir = 1 - cos, angle = arccos(cos) in rad x 100; dir/norm and angle/norm = "
        "all-layer mean over mean norm change)"
    )
    for path in written:
        print(f"wrote {path}")
    for kind, path in report.swaps.items():
        print(
            f"wrote {path} (student with the teacher's {'norms' if kind == 'norm' else 'directions'})"
        )
    sys.stdout.flush()
    return 0
