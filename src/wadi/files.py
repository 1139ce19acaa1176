"""Atomic writes: every file and folder wadi produces appears complete or not at all.

A crash, a full disk or a bad input midway leaves the previous good file in place and no
half-written one beside it.  One place for the pattern (temporary name in the same folder,
then ``os.replace``), used by adapters, images, reports, checkpoints and pipelines.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_file", "atomic_directory", "write_text", "write_json"]


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it goes.

    The temporary name keeps ``path``'s suffix, so writers that infer the format from the
    name (PIL, matplotlib) work unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data, *, sort_keys: bool = False) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically (non-JSON values via ``str``)."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys, default=str, ensure_ascii=False)
    return write_text(path, text + "\n")


class atomic_directory:
    """Context manager: build a folder under a temporary name, rename it into place on success.

    An existing ``target`` is replaced only after the new folder is complete;
    on an error the temporary folder is removed and ``target`` is untouched.
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(
            tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".tmp")
        )
        self.tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
