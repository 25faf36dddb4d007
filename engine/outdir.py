"""The output directory of a run: one writer at a time, and no mixing of runs.

A run holds `OUT/.starcast.lock` (an exclusive `flock`, released by the kernel when the process dies,
so a crashed run never blocks the next one) for its whole length; the file names the holder (pid,
host, start time) for the message another run gets. A new run refuses an `OUT` that already holds
files (other than a run manifest) unless it is a `--resume`, and a resume refuses an `OUT` whose
completion markers were made by another model, seed or S. On file systems without `flock` (some
Lustre mounts), the lock falls back to the pid in the file: a lock held by a live process on this
host, or by any process on another host, is respected.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import StarcastError
from .manifest import MANIFEST_NAME, MARKERS_DIR, RESULTS_DIR, RunIdentity, check_marker

LOCK_NAME = ".starcast.lock"


def prepare_out(out: Path, identity: RunIdentity, *, resume: bool) -> OutputLock:
    """Create `out` if needed and lock it; refuse a regular file, a directory in use by another run,
    a non-empty directory without `resume`, and results of another model/seed/S with it.
    Returns the held lock (release it with `close`, or use it as a context manager)."""
    if out.exists() and not out.is_dir():
        raise StarcastError(f"--out {out} exists and is not a directory; give a directory path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StarcastError(f"cannot create --out {out}: {exc.strerror or exc}") from exc
    lock = OutputLock(out)
    try:
        _check_contents(out, identity, resume)
    except BaseException:
        lock.close()
        raise
    return lock


def _check_contents(out: Path, identity: RunIdentity, resume: bool) -> None:
    # What a run that stopped before its first file leaves (a manifest, empty folders) holds no results.
    held = sorted(p.name for p in out.iterdir() if p.name not in (LOCK_NAME, MANIFEST_NAME)
                  and not (p.name in (RESULTS_DIR, MARKERS_DIR) and p.is_dir() and not any(p.iterdir())))
    if held and not resume:
        raise StarcastError(f"--out {out} is not empty (it holds {', '.join(held[:3])}"
                            f"{', ...' if len(held) > 3 else ''}); pass --resume (from Python, "
                            "resume=True) to continue the run that wrote it, or choose a new --out")
    for path in sorted((out / MARKERS_DIR).glob("*.done")):
        try:
            marker = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # an unreadable marker is never trusted: that input is redone
        check_marker(marker, identity, Path(marker.get("input", path.stem)))


class OutputLock:
    """An exclusive lock on an output directory, held until `close` (see the module docstring)."""

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME
        self._fd: int | None = None
        while self._fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise StarcastError(f"cannot create the lock file {self.path}: "
                                    f"{exc.strerror or exc}") from exc
            try:
                previous = _holder(fd)
                if not _try_flock(fd, previous, out):
                    os.close(fd)
                    continue  # the file was replaced under us: lock the new one
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        if previous:
            print(f"starcast: {out} was left locked by an earlier run ({_describe(previous)}) that did not "
                  f"finish; taking it over", file=sys.stderr)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(me) + "\n").encode(), 0)

    def close(self) -> None:
        """Release the lock and remove the lock file (a crash leaves it, unlocked: see `__init__`)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # a reader of a file unlinked under it sees no holder
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _try_flock(fd: int, previous: dict | None, out: Path) -> bool:
    """Lock `fd`; False if its file is no longer the one at the lock path (a holder removed it)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(out, previous) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        if previous and _alive(previous):  # no flock here: trust the pid in the file
            raise _in_use(out, previous) from None
    try:
        return os.fstat(fd).st_ino == os.stat(out / LOCK_NAME).st_ino
    except FileNotFoundError:
        return False


def _holder(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 4096, 0).decode()
        return json.loads(text) if text.strip() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell: respect it
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def _describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"


def _in_use(out: Path, holder: dict | None) -> StarcastError:
    return StarcastError(f"--out {out} is in use by another starcast run ({_describe(holder)}); wait for "
                         f"it to finish or choose another --out")
