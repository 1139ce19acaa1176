"""``wadi serve``: a local page that generates one-step images as you type."""

from __future__ import annotations

import argparse

DEFAULT_PORT = 7860  # Gradio's, the port diffusers demos use


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number 0-65535, got {text}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535 (0: any free port), got {text}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="a local web page that generates one-step images as you type",
        description=(
            "Start a local web page with a prompt box: the student generates as you type (one "
            "step), with its time per image, a seed and, on request, the teacher's multi-step "
            "image and time beside it. Default: the digits student shipped with wadi on its "
            "teacher. Works offline; binds 127.0.0.1 unless --host says otherwise."
        ),
    )
    p.add_argument(
        "--pipeline",
        metavar="DIR",
        help="exported student folder (wadi export, or a run's final/pipeline); default: the "
        "shipped digits student",
    )
    p.add_argument(
        "--teacher",
        metavar="DIR",
        help="teacher folder for the side-by-side comparison (default: the one the export "
        "names, when it exists)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"port ({DEFAULT_PORT}; 0: a free one)"
    )
    p.add_argument(
        "--teacher-steps", type=int, default=25, help="teacher DDIM steps for the comparison (25)"
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="teacher CFG scale (1.5 for the digits teacher, else 3.0)",
    )
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for the digits student, else torch's)",
    )
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # should anything look
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local

    import torch

    from wadi.devices import resolve_device

    from .app import make_server, url_of
    from .engine import Engine

    device = resolve_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    elif args.pipeline is None and str(device) == "cpu":
        # the 1M-parameter digits model, one image a call: extra threads only add overhead
        # (2 threads on a busy 2-core machine: 18x slower than 1)
        torch.set_num_threads(1)
    engine = Engine(
        args.pipeline,
        args.teacher,
        teacher_steps=args.teacher_steps,
        guidance=args.guidance,
        device=device,
    )
    server = make_server(engine, args.host, args.port, verbose=args.verbose)
    image = engine.generate("", 0)  # warm-up: the first call pays for lazy set-up
    note = "" if args.host in ("127.0.0.1", "localhost", "::1") else " (reachable from the network)"
    print(f"wadi serve: {engine.student_name}, {image.ms:.0f} ms for the first image")
    if engine.teacher is None:
        print("wadi serve: no teacher for the comparison (give --teacher DIR)")
    print(f"wadi serve: open {url_of(server)}{note}; Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
