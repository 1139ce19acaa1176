"""Checks on the paths a command reads and writes, done before anything is loaded or written.

Each check raises :class:`ValueError` with one line that names the path and the fix, so
every command can refuse bad output paths the same way: an output that would replace or
sit inside one of its own inputs, a folder output over a regular file, a non-empty folder
without ``--overwrite``, an output under a file or in a read-only folder.  Also
:func:`check_safetensors`, which names a damaged ``.safetensors`` file.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from wadi.files import _concerns

__all__ = [
    "check_output_separate",
    "check_output_folder",
    "writing_output",
    "check_safetensors",
    "find_damaged_safetensors",
    "DamagedFileError",
]


class DamagedFileError(ValueError):
    """A file wadi reads is truncated or not the format its name says."""


def _real(path: str | os.PathLike) -> Path:
    """``path`` made absolute with every symlink resolved (works for paths that do not exist)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def check_output_separate(out: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """Refuse an ``out`` that is, contains or lies inside one of ``inputs``.

    Paths are compared after resolving symlinks, so ``--out`` cannot reach an input
    through a link either.  ``None`` and inputs that do not exist (hub ids) are skipped:
    writing ``out`` cannot destroy them.
    """
    target = _real(out)
    for source in inputs:
        if source is None or not Path(source).expanduser().exists():
            continue
        real = _real(source)
        if target == real:
            relation = "is"
        elif target in real.parents:
            relation = "contains"
        elif real in target.parents:
            relation = "lies inside"
        else:
            continue
        raise ValueError(
            f"output {out} {relation} the input {source}; writing it would destroy the input: "
            "choose an output path outside every input"
        )


def check_output_folder(out: str | os.PathLike, *, overwrite: bool, flag: str = "--out") -> Path:
    """Refuse a folder output that cannot be written, before any work is done.

    Refused: ``out`` is a regular file (a folder cannot replace it); ``out`` is a non-empty
    folder and ``overwrite`` is false; the nearest existing parent is a file or is not
    writable.  Returns ``out`` as a :class:`Path`.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ValueError(
                f"{flag} {out} is a file, and the output is a folder: remove the file or "
                f"choose another {flag}"
            )
        if any(out.iterdir()) and not overwrite:
            raise ValueError(
                f"{out} already exists and is not empty; pass --overwrite to replace it"
            )
    # the output is built beside ``out`` and renamed, so its parent must be writable
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot create {flag} {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {flag} {out}: {parent} is not writable")
    return out


_FIXES = {
    errno.ENOSPC: "the disk is full; free space or choose another output path",
    errno.EDQUOT: "the disk quota is used up; free space or choose another output path",
    errno.EACCES: "no permission to write there; choose a writable output path",
    errno.EPERM: "no permission to write there; choose a writable output path",
    errno.EROFS: "the file system is read-only; choose another output path",
    errno.ENOTDIR: "a parent of it is a file; choose another output path",
}


@contextlib.contextmanager
def writing_output(out: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``out`` (full disk, read-only) into one line naming it.

    Errors naming some other file (an input) pass through; one naming no file (``ENOSPC``
    from a write) is taken to be the output's.  Pair with an atomic write, so nothing
    partial is left either.
    """
    try:
        yield
    except OSError as err:
        names = [n for n in (err.filename, getattr(err, "filename2", None)) if n is not None]
        if names and not any(_concerns(n, Path(out)) for n in names):
            raise
        fix = _FIXES.get(err.errno, "check that it can be written, or choose another output path")
        reason = err.strerror or type(err).__name__
        raise ValueError(f"cannot write {out}: {reason}; {fix}") from err


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise :class:`DamagedFileError` naming ``path`` if its safetensors header is unreadable.

    Reads only the header (the file is memory-mapped, not loaded), which catches
    truncated files and files that are not safetensors at all.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            f.keys()
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - SafetensorError and friends: one line
        raise DamagedFileError(damaged_message(path, err)) from None


def damaged_message(path: str | os.PathLike, err: BaseException | None = None) -> str:
    """The one line for a damaged file: its path, what went wrong, what to do."""
    reason = str(err).strip().splitlines()[0] if err is not None and str(err).strip() else ""
    return (
        f"{path} is damaged (truncated or not a safetensors file"
        + (f": {reason}" if reason else "")
        + "); re-download, re-export or re-create it"
    )


def find_damaged_safetensors(root: str | os.PathLike) -> Path | None:
    """The first ``*.safetensors`` under ``root`` whose header cannot be read, or ``None``."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(root.rglob("*.safetensors"))
    for path in files:
        try:
            check_safetensors(path)
        except DamagedFileError:
            return path
    return None
