"""The run folder: who may write it (a lock), whether it may be used (another run, a file,
a read-only place), and how to continue it.

Policy, in one place so the training loop only calls it:

* One process tree per run folder.  The main process holds ``OUTPUT/.wadi.lock``
  (pid and host, created atomically with ``O_EXCL``) for the run's lifetime; a second run
  into the same folder is refused in one line naming the holder.  A lock left by a dead
  process on this host (a SIGKILL, a power cut) is reclaimed with a message.
* A folder holding another run is refused unless resuming or overwriting; a resumption
  with a different recipe is refused (``DistillConfig.differences``).
* Problems writing the folder (read-only, full disk, a file where a folder should be)
  become one line naming the path.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from . import checkpoint as ckpt
from .config import DistillConfig

LOCK_NAME = ".wadi.lock"

#: write errors that are about the place, not about wadi: reported in one line
PLACE_ERRORS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
)


def warn(message: str) -> None:
    print(f"wadi distill: {message}", file=sys.stderr, flush=True)


# -- lock ------------------------------------------------------------------------------------------


class RunLock:
    """``OUTPUT/.wadi.lock`` held by this process while a run writes ``OUTPUT``."""

    def __init__(self, output_dir: str | Path, log: Callable[[str], None] = warn):
        self.out = Path(output_dir)
        self.path = self.out / LOCK_NAME
        self.log = log
        self.held = False
        self.created: list[Path] = []  # folders this lock made (removed again if left empty)

    def acquire(self) -> RunLock:
        check_location(self.out)
        missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise place_error(err, self.out) from None
        self.created = missing  # innermost first
        try:
            for _ in range(3):
                if self._create():
                    self.held = True
                    return self
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile: try again
                if not self._stale(holder):
                    raise ValueError(
                        f"{self.out} is in use by another wadi run (pid {holder.get('pid')} on "
                        f"{holder.get('host')}); wait for it, or if no run is using it delete "
                        f"{self.path}"
                    )
                self.log(
                    f"reclaiming {self.path} left by pid {holder['pid']}, which is no longer running"
                )
                self.path.unlink(missing_ok=True)
            raise ValueError(f"could not take {self.path}; another run keeps taking it")
        except BaseException:
            self._remove_created()
            raise

    def _create(self) -> bool:
        """Create the lock file atomically; False if it exists."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise place_error(err, self.out) from None
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), "host": socket.gethostname()}, fh)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as err:
            self.path.unlink(missing_ok=True)
            raise place_error(err, self.out) from None
        return True

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            holder = None
        if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
            raise ValueError(
                f"{self.path} is not a wadi lock file; if no run is using {self.out} delete it"
            )
        return holder

    @staticmethod
    def _stale(holder: dict) -> bool:
        """Whether the holder is a process of this host that no longer runs."""
        if holder.get("host") != socket.gethostname():
            return False  # cannot tell for another machine
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return False

    def release(self) -> None:
        if self.held:
            try:
                holder = json.loads(self.path.read_text())
                if holder.get("pid") == os.getpid():
                    self.path.unlink()
            except (OSError, ValueError):
                pass
            self.held = False

    def release_after_failure(self) -> None:
        """Release, and remove the folders this lock created if nothing else is in them."""
        self.release()
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                break

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.release()
        else:
            self.release_after_failure()


# -- where the run may go ----------------------------------------------------------------------


def check_location(out: Path) -> None:
    """One line if ``out`` cannot be a run folder: a file, below a file, or read-only."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file, not a folder; choose another --output-dir")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(
            f"cannot create --output-dir {out}: {existing} is a file; choose another --output-dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"cannot write to {existing} (read-only or no permission); choose another --output-dir"
        )


def place_error(err: OSError, out: Path) -> Exception:
    """A one-line ValueError for errors writing the run folder (full disk, read-only);
    any other error (say, an unreadable input) comes back as it is."""
    if err.errno not in PLACE_ERRORS:
        return err
    where = err.filename or out
    try:
        where_abs, out_abs = os.path.abspath(where), os.path.abspath(out)
        inside = os.path.commonpath([where_abs, out_abs]) == out_abs
    except (TypeError, ValueError):
        inside = False
    if not inside:
        return err
    reason = err.strerror or os.strerror(err.errno)
    hint = (
        "free some space, then continue with --resume latest"
        if err.errno in (errno.ENOSPC, errno.EDQUOT)
        else "choose a writable --output-dir"
    )
    return ValueError(f"cannot write {where}: {reason}; {hint}")


def prepare_output_dir(
    config: DistillConfig,
    resume: str | None,
    overwrite: bool,
    warn: Callable[[str], None] | None = None,
) -> Path | None:
    """Refuse to mix runs: returns the checkpoint to resume from (or None).

    The lock file does not count as content; ``warn`` reports damaged checkpoints skipped.
    """
    out = Path(config.output_dir)
    check_location(out)
    existing = out / "config.yaml"
    if resume:
        if existing.is_file():
            previous = type(config).load(existing)
            diffs = previous.differences(config)
            if diffs:
                raise ValueError(
                    f"{out} holds a run with a different config ({', '.join(diffs)}); resume it with its own "
                    "config, or choose another --output-dir"
                )
        return ckpt.resolve_resume(out, resume, warn)
    if existing.is_file() and not overwrite:
        previous = type(config).load(existing)
        diffs = previous.differences(config)
        what = f"a run with a different config ({', '.join(diffs)})" if diffs else "a run"
        raise ValueError(
            f"{out} already holds {what}; pass --resume latest to continue it or --overwrite to replace it"
        )
    content = [p for p in out.iterdir() if p.name != LOCK_NAME] if out.is_dir() else []
    if content and not existing.is_file() and not overwrite:
        raise ValueError(
            f"{out} exists, is not empty and is not a wadi run; choose another --output-dir"
        )
    return None


def clear_run(out: Path) -> None:
    """Remove what a previous run wrote (for ``--overwrite``), nothing else."""
    for name in ("checkpoints", "final", "samples", "logs", "config.yaml"):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def resume_command(out: str | Path) -> str:
    """The command that continues the run in ``out`` from its newest complete checkpoint."""
    return f"wadi distill --output-dir {shlex.quote(os.path.abspath(out))} --resume latest"
