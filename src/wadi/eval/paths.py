"""Checks on output locations, made before any work starts.

An evaluation can run for hours; finding only at the end that its folder is a file or
read-only would throw the work away.  Each check raises one ``ValueError`` naming the
path and the fix, which the command line prints as one line.  Unlike
:func:`wadi.paths.check_output_folder` (``os.access``), writability is probed by creating
a file, which also catches root on a read-only share and ACLs; a later write error
still goes through :func:`wadi.paths.writing_output`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["check_output_dir", "check_output_file"]


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_folder(folder: Path, shown: Path, flag: str) -> None:
    """Refuse ``shown`` when ``folder`` (its folder to be) is a file or cannot be written."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(
            f"{flag} {shown}: {folder} is an existing file, not a folder; pass another path"
        )
    ancestor = _existing_ancestor(folder)
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {shown}: {ancestor} is a file, not a folder; pass another path")
    try:  # os.access is not enough: root, read-only mounts and ACLs all fool it
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".wadi-write-probe-")
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(
            f"cannot write {flag} {shown}: {ancestor} is not writable ({reason}); "
            f"choose a writable {flag}"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_output_dir(path: str | os.PathLike, flag: str = "--output-dir") -> Path:
    """``path`` as a folder wadi may create or fill: refused when it, or the nearest
    existing path above it, is a file, or when that folder is not writable."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is an existing file, not a folder; pass a folder path")
    _check_folder(path, path, flag)
    return path


def check_output_file(path: str | os.PathLike, flag: str = "--output") -> Path:
    """``path`` as a file wadi may write: not a folder, and its folder can be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(
            f"{flag} {path} is a folder; pass a file path, e.g. {path / 'scores.json'}"
        )
    _check_folder(path.parent, path, flag)
    return path
