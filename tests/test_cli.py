"""The top-level ``wadi`` command: torch-free --help, --debug everywhere, one-line errors."""

import argparse
import errno
import logging
import subprocess
import sys

import pytest

import wadi.cli
from wadi.cli import build_parser, main


def _subcommands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subcommands(sub, (*prefix, name))


def test_help_does_not_import_torch():
    code = "import sys; from wadi.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert result.stdout.strip() == "False", result.stderr


def test_every_subcommand_takes_debug():
    names = dict(_subcommands(build_parser()))
    assert {("export",), ("generate",), ("embed",), ("distill",)} <= set(names)
    missing = [
        " ".join(n) for n, sub in names.items() if "--debug" not in sub._option_string_actions
    ]
    assert missing == []


def _fake_command(monkeypatch, error):
    """Make ``wadi fake`` a command that raises ``error``."""

    def build():
        parser = argparse.ArgumentParser(prog="wadi")
        sub = parser.add_subparsers(dest="command")
        p = sub.add_parser("fake")
        p.add_argument("--debug", action="store_true")

        def run(args):
            raise error

        p.set_defaults(func=run)
        return parser

    monkeypatch.setattr(wadi.cli, "build_parser", build)


def _safetensor_error():
    from safetensors import SafetensorError

    return SafetensorError("Error while deserializing header: MetadataIncompleteBuffer")


@pytest.mark.parametrize(
    "error,expected",
    [
        (
            IsADirectoryError(errno.EISDIR, "Is a directory", "/data/out"),
            "/data/out: Is a directory",
        ),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"), "/f/x: Not a directory"),
        (PermissionError(errno.EACCES, "Permission denied", "/ro/x"), "choose a writable"),
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (OSError(errno.ENOSPC, "No space left on device", "/d/o"), "free some space"),
        ("safetensors", "a .safetensors file is damaged"),
        (ValueError("first line\nsecond line"), "first line; second line"),
    ],
)
def test_errors_are_one_line_without_debug(monkeypatch, capsys, error, expected):
    if error == "safetensors":
        error = _safetensor_error()
    _fake_command(monkeypatch, error)
    assert main(["fake"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wadi fake: error: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(type(error)):
        main(["fake", "--debug"])


def test_bugs_still_show_their_traceback(monkeypatch):
    _fake_command(monkeypatch, RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["fake"])


def test_commands_run_with_library_chatter_silenced(monkeypatch):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.enable_progress_bar()
    transformers_logging.enable_progress_bar()
    _fake_command(monkeypatch, ValueError("x"))
    try:
        main(["fake"])
        assert not diffusers_logging.is_progress_bar_enabled()
        assert not transformers_logging.is_progress_bar_enabled()
        logger = logging.getLogger("transformers.utils.import_utils")
        notice = logger.makeRecord(
            logger.name, logging.WARNING, __file__, 1,
            "`CLIPImageProcessor` requires torchvision (not installed); falling back", (), None,
        )  # fmt: skip
        other = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "other", (), None)
        assert not logger.filter(notice) and logger.filter(other)
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def test_wadi_progress_bars_stay(monkeypatch):
    """quiet_libraries leaves tqdm itself alone: wadi's own bars still draw."""
    from tqdm.auto import tqdm

    _fake_command(monkeypatch, ValueError("x"))
    main(["fake"])
    bar = tqdm(total=1, disable=False)
    assert not bar.disable
    bar.close()
