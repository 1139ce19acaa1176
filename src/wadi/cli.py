"""The ``wadi`` command line: one sub-command per part of the library.

Each part registers its own sub-commands (``register(subparsers)`` in its
``cli`` module) and imports heavy libraries only when its command runs, so
``wadi --help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from pathlib import Path

# module that holds ``register(subparsers)``, in the order shown by --help
COMMAND_MODULES = (
    "wadi.distill.cli",  # distill
    "wadi.finetune.cli",  # finetune
    "wadi.data.cli",  # embed
    "wadi.backbones.cli",  # export, generate
    "wadi.toy.cli",  # demo, ablate, toy
    "wadi.analysis.cli",  # analyze
    "wadi.eval.cli",  # eval
    "wadi.lorad.cli",  # adapter-info
    "wadi.serve.cli",  # serve
    "wadi.relation.cli",  # invert-relation
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
        if not _module_file_exists(name):
            continue  # e.g. adapter-info before wadi.lorad.cli exists
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                continue
            raise
        module.register(subparsers)
    _add_debug_flags(parser)
    return parser


def _module_file_exists(name: str) -> bool:
    """Whether ``wadi.x.cli`` has a source file, found without importing ``wadi.x``.

    Importing a missing ``wadi.x.cli`` would import the package ``wadi.x`` first, and
    with it torch, which ``wadi --help`` must not load.
    """
    import wadi

    *parents, leaf = name.split(".")[1:]
    return any(
        Path(root, *parents, f"{leaf}.py").is_file()
        or Path(root, *parents, leaf, "__init__.py").is_file()
        for root in wadi.__path__
    )


def _add_debug_flags(parser: argparse.ArgumentParser) -> None:
    """Give every (sub-)sub-command a ``--debug`` flag, so any error can show its traceback."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if "--debug" not in sub._option_string_actions:
                    sub.add_argument("--debug", action="store_true", help="show tracebacks")
                _add_debug_flags(sub)


def _describe(err: BaseException) -> str:
    """One line for an error: wadi's own message, or an OSError's reason and path."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        text = f"{err.filename}: {err.strerror}"
        if getattr(err, "filename2", None):
            text += f" (-> {err.filename2})"
        if err.errno == errno.ENOSPC:
            text += "; free some space or choose another output path"
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            text += "; choose a writable output path"
        return text
    if type(err).__name__ == "SafetensorError":
        return f"a .safetensors file is damaged ({err}); re-download, re-export or re-create it"
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(err).__name__


def _is_user_facing(err: BaseException) -> bool:
    """Errors printed as one line: bad input, files that are missing, damaged or unwritable."""
    return isinstance(err, (UserError, OSError, ValueError)) or (
        type(err).__name__ == "SafetensorError"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from wadi._quiet import quiet_libraries

    quiet_libraries()
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print(f"wadi {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if getattr(args, "debug", False) or not _is_user_facing(err):
            raise
        print(f"wadi {args.command}: error: {_describe(err)}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
