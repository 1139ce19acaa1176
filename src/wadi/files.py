"""Atomic writes: every file and folder wadi produces appears complete or not at all.

A crash, a full disk or a bad input midway leaves the previous good file in place and no
half-written one beside it.  One place for the pattern (temporary name in the same folder,
fsync, then ``os.replace``, then fsync of the folder), used by adapters, images, reports,
checkpoints and pipelines.  What it publishes is ordinary: files at least 0644 and folders
at least 0755, never the private modes ``mkstemp``/``mkdtemp`` start with.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_file",
    "atomic_directory",
    "atomic_files",
    "write_text",
    "write_json",
    "copy_file",
    "temp_dir_beside",
    "replace_directory",
    "publish",
    "fsync_file",
    "fsync_dir",
    "output_error",
    "output_errors",
    "check_writable",
]

FILE_MODE = 0o644  # what a published file has at least
DIR_MODE = 0o755  # what a published folder has at least


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to the disk (so a power loss cannot leave it empty)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to the disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. Windows: folders cannot be opened; renames there are durable enough
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the data files are synced already
    finally:
        os.close(fd)


def _widen(path: Path, mode: int) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return
    current = stat.S_IMODE(st.st_mode)
    if current | mode != current:
        os.chmod(path, current | mode)


def publish(path: str | os.PathLike) -> None:
    """Make a finished file or folder tree ordinary and durable before it is renamed into place.

    Files get at least 0644 and folders at least 0755 (nothing is made stricter); every file
    and folder is fsynced.  Symbolic links are left as they are and not followed.
    """
    path = Path(path)
    if path.is_symlink():
        return
    if not path.is_dir():
        _widen(path, FILE_MODE)
        fsync_file(path)
        return
    for root, dirs, files in os.walk(path):
        for name in files:
            f = Path(root, name)
            if not f.is_symlink():
                _widen(f, FILE_MODE)
                fsync_file(f)
        for name in dirs:
            _widen(Path(root, name), DIR_MODE)
        fsync_dir(root)
    _widen(path, DIR_MODE)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a file's bytes and times to ``dst``: a new file, never a hard link to ``src``.

    Editing the copy can never change the original (a hard link would share one inode).
    """
    shutil.copy2(src, dst, follow_symlinks=True)
    _widen(Path(dst), FILE_MODE)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it goes.

    The temporary name keeps ``path``'s suffix, so writers that infer the format from the
    name (PIL, matplotlib) work unchanged.  The file is fsynced before the rename and the
    folder after it, so ``path`` is never an empty or half-written file, even after a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        publish(tmp)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
        fsync_dir(path.parent)
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


def temp_dir_beside(target: str | os.PathLike) -> Path:
    """A new empty folder (0755) next to ``target``, to be renamed onto it when complete."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    tmp.chmod(DIR_MODE)  # mkdtemp makes it private; the result is an ordinary folder
    return tmp


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_directory(tmp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Publish the finished folder ``tmp`` as ``target`` (same parent), replacing an old one.

    The old ``target`` is moved aside first and removed only after the new one is in place.
    """
    tmp, target = Path(tmp), Path(target)
    publish(tmp)
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        _remove(old)
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        _remove(old)
    return target


class atomic_directory:
    """Context manager: build a folder under a temporary name, rename it into place on success.

    An existing ``target`` folder is replaced only after the new folder is complete (every
    file fsynced, modes 0644/0755); on an error the temporary folder is removed and ``target``
    is untouched.  A ``target`` that is an existing file is refused (it is never replaced).
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)

    def __enter__(self) -> Path:
        if self.target.exists() and not self.target.is_dir():
            raise ValueError(
                f"{self.target} exists and is not a folder; remove it or choose another path"
            )
        self.tmp = temp_dir_beside(self.target)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            replace_directory(self.tmp, self.target)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder inside ``folder``; on success its files all move into ``folder``.

    For outputs that belong together (a report and its table and plots): they are written
    in full first, then renamed into place one by one (renames need no disk space), so an
    error while writing any of them leaves every older file in ``folder`` as it was.  Only
    top-level files are moved; other files already in ``folder`` are left alone.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=folder, prefix=".wadi-staging.", suffix=".tmp"))
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir())
        for name in names:
            publish(stage / name)
        for name in names:
            os.replace(stage / name, folder / name)
        fsync_dir(folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and parents) and write and remove a probe file in it, so a command
    fails on a read-only or misplaced output before its work, not after it."""
    folder = Path(folder)
    with output_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".wadi-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    return folder


_FIXES = {
    errno.ENOSPC: "the disk is full; free space there or choose another location",
    errno.EACCES: "no permission to write there; choose a folder you can write to",
    errno.EPERM: "no permission to write there; choose a folder you can write to",
    errno.EROFS: "the file system is read-only; choose another location",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
}
if hasattr(errno, "EDQUOT"):
    _FIXES[errno.EDQUOT] = "the disk quota is used up; free space or choose another location"


def _file_in_the_way(path: Path) -> Path | None:
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            return p
    return None


def output_error(path: str | os.PathLike, err: OSError) -> ValueError:
    """One line for an ``OSError`` while writing the output ``path``: what failed and the fix.

    Commands raise it (``raise output_error(out, err) from err``) so the CLI prints it as
    ``wadi <cmd>: error: ...`` instead of a traceback.
    """
    path = Path(path)
    blocker = _file_in_the_way(path)
    if err.errno in (errno.ENOTDIR, errno.EEXIST) and blocker is not None:
        fix = f"{blocker} is a file, not a folder; remove it or choose another location"
    elif err.errno in _FIXES:
        fix = _FIXES[err.errno]
    else:
        fix = "check that the location exists and can be written, or choose another one"
    reason = err.strerror or type(err).__name__
    return ValueError(f"cannot write {path}: {reason}; {fix}")


def _concerns(filename, path: Path) -> bool:
    """Whether an error's file name is ``path``, lies inside it, is one of its temporary
    siblings (``.<name>.*``) or one of its parents (a folder that could not be made)."""
    if filename is None:
        return True
    name = Path(os.path.abspath(os.fsdecode(filename)))
    path = Path(os.path.abspath(path))
    return (
        name == path
        or name.is_relative_to(path)
        or path.is_relative_to(name)
        or (name.parent == path.parent and name.name.startswith(f".{path.name}."))
    )


@contextlib.contextmanager
def output_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` from writing ``path`` (or inside it) into :func:`output_error`.

    Errors that name another file (a missing input, say) pass through unchanged, and so do
    those with no ``errno``: wadi's own checks raised them with a message of their own (a
    teacher folder not found), the operating system did not. One from the system with no
    file name (``ENOSPC`` from a write) is taken to be the output's.
    """
    try:
        yield
    except OSError as err:
        if err.errno is None:
            raise
        names = [n for n in (err.filename, getattr(err, "filename2", None)) if n is not None]
        if names and not any(_concerns(n, Path(path)) for n in names):
            raise
        raise output_error(path, err) from err
