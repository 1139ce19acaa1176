"""The small student ``wadi serve`` shows by default: a LoRaD adapter on the shipped digits teacher.

It ships in ``wadi/toy/assets/student`` (an adapter folder, about 450 KB: the rotation
factors only, the teacher's weights are not repeated) and was made by::

    wadi demo --out demo-output                      # make demo: 420 steps, ~8.5 min on 2 cores
    python -m wadi.serve.student demo-output/run/final src/wadi/toy/assets/student

The second command writes the run's EMA student (the weights ``wadi demo`` exports and
measures) as a standard adapter folder, plus ``wadi_student.json`` with the run's
``alpha_bar_T`` so the page samples exactly the distilled generator.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from wadi.toy import ASSETS, TEACHER_DIR

STUDENT_DIR = ASSETS / "student"
INFO_NAME = "wadi_student.json"

__all__ = ["STUDENT_DIR", "INFO_NAME", "write_student_adapter", "student_info"]


def write_student_adapter(
    final_dir: str | os.PathLike, out: str | os.PathLike, *, ema: bool = True
) -> Path:
    """Write the LoRaD student of a run's ``final/`` (its EMA by default) as an adapter folder.

    The EMA holds the same tensors as the adapter (``<module>.lorad_A/B``), so the folder
    is ``final/student_adapter`` with the EMA's values; ``wadi_student.json`` records the
    teacher, the generator's ``alpha_bar_T`` and the source.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from wadi.files import write_text
    from wadi.lorad.io import CONFIG_NAME, WEIGHTS_NAME, require_role

    final_dir, out = Path(final_dir), Path(out)
    adapter = final_dir / "student_adapter"
    summary = final_dir / "summary.json"
    if not (adapter / CONFIG_NAME).is_file() or not summary.is_file():
        raise ValueError(
            f"{final_dir} is not the final/ folder of a LoRaD run (needs student_adapter/ and "
            "summary.json); give OUTPUT/final of wadi distill or wadi demo"
        )
    require_role(adapter, "student")
    source = final_dir / ("ema.safetensors" if ema else "student.safetensors")
    if not source.is_file():
        raise ValueError(f"{source} not found; the run had no EMA (ema_decay): pass ema=False")
    state = load_file(str(source))
    with safe_open(str(adapter / WEIGHTS_NAME), framework="pt") as f:
        expected, metadata = set(f.keys()), f.metadata()
    if set(state) != expected:
        raise ValueError(f"{source} does not hold the tensors of {adapter}; is it the same run?")
    info = json.loads(summary.read_text())
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS_NAME), metadata)
    write_text(out / CONFIG_NAME, (adapter / CONFIG_NAME).read_text())
    record = {
        "teacher": "wadi/toy/assets/teacher",
        "alpha_bar_T": info.get("alpha_bar_T"),
        "timesteps": info.get("timesteps") or [999],
        "weights": "ema" if ema else "student",
        "made_by": "wadi demo, then python -m wadi.serve.student RUN/final OUT",
    }
    write_text(out / INFO_NAME, json.dumps(record, indent=2) + "\n")
    return out


def student_info(folder: str | os.PathLike = STUDENT_DIR) -> dict:
    """``wadi_student.json`` of a student adapter folder ({} when it has none)."""
    path = Path(folder) / INFO_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-create the student") from None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m wadi.serve.student RUN/final OUT_DIR", file=sys.stderr)
        return 2
    out = write_student_adapter(args[0], args[1])
    print(f"student adapter for {TEACHER_DIR.name} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
