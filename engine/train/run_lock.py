"""One run per folder: an exclusive lock on OUT_DIR for as long as a run uses it.

    with run_lock("runs/quickstart"):
        ...                                  # a second process on the folder is refused at once

The lock is an flock on OUT_DIR/.rankpm.lock, which the kernel releases when its process
ends however it ends, so a crash leaves no stale lock behind; the file's contents (pid,
host, start time, command) only name the holder in the refusal. The lock is re-entrant
within a process (a staged run locks its root, then each stage's folder; a single run
locks the same folder twice). On a filesystem without locks the file alone decides: a
holder on this host whose process is gone is stale and is taken over.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from rankpm.engine.io import ensure_folder, pid_alive

log = logging.getLogger(__name__)

LOCK_FILE = ".rankpm.lock"
_held: dict[str, list] = {}  # resolved folder -> [fd, depth]: this process's locks


class RunLockError(RuntimeError):
    """Another process runs in the folder."""


@contextlib.contextmanager
def run_lock(out_dir: str | Path):
    out_dir = ensure_folder(out_dir)
    key = str(out_dir.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield out_dir
        finally:
            _held[key][1] -= 1
        return
    path = out_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    _held[key] = [fd, 1]
    try:
        yield out_dir
    finally:
        del _held[key]
        os.ftruncate(fd, 0)  # a file without a holder: nothing stale to read later
        os.close(fd)  # releases the flock


def _acquire(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        raise RunLockError(_refusal(path, _holder(fd))) from None
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    holder = _holder(fd)  # no locks on this filesystem: the file alone decides
    if holder and (holder.get("host") != socket.gethostname() or pid_alive(int(holder.get("pid", 0)))):
        raise RunLockError(_refusal(path, holder))
    if holder:
        log.warning("%s: taking over a stale lock of pid %s (no longer running)", path, holder.get("pid"))


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


def _refusal(path: Path, holder: dict) -> str:
    who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
           f"({holder.get('command')})") if holder else "another process"
    return (f"{path.parent} is in use by {who}; a folder holds one run at a time: wait for it to end, or give "
            f"this run another train.out_dir")
