"""The ``wadi`` command line: one sub-command per part of the library.

Each part registers its own sub-commands (``register(subparsers)`` in its
``cli`` module) and imports heavy libraries only when its command runs, so
``wadi --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module that holds ``register(subparsers)``, in the order shown by --help
COMMAND_MODULES = (
    "wadi.distill.cli",  # distill
    "wadi.data.cli",  # embed
    "wadi.backbones.cli",  # export, generate
    "wadi.toy.cli",  # demo, ablate, toy
    "wadi.analysis.cli",  # analyze
    "wadi.eval.cli",  # eval
    "wadi.lorad.cli",  # adapter-info
)


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from wadi import __version__

    parser = argparse.ArgumentParser(
        prog="wadi",
        description="One-step distillation of text-to-image diffusion models with LoRaD.",
    )
    parser.add_argument("--version", action="version", version=f"wadi {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except (UserError, FileNotFoundError, ValueError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"wadi {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"wadi {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
