"""Atomic file and folder writes: a crash mid-write never leaves a half-written result.

Temporaries are siblings of their target named ``.NAME.tmp-PID-TOKEN@HOST``: unique per
process, and recognisable afterwards, so that the temporaries a killed process left behind
are removed by the next writer of the same target (``remove_stale_temporaries``).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
from pathlib import Path

from rankpm.engine.config import ConfigError

_KINDS = ("tmp", "old")


class WriteError(OSError):
    """Writing a result failed (a full disk, a quota, a file-size limit); what was half-written is gone."""


def is_write_failure(err: BaseException) -> bool:
    """An error of the storage underneath, whichever writer met it (torch.save reports a short write
    as a RuntimeError from its zip writer, safetensors as a SafetensorError)."""
    text = str(err)
    return (isinstance(err, OSError) or type(err).__name__ == "SafetensorError"
            or (isinstance(err, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text)))


def write_failed(target: str | Path, err: BaseException, what: str = "the partial folder was removed") -> WriteError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return WriteError(f"writing {target} failed ({first}); {what}. If the disk is full, free space and rerun")


def temporary_sibling(target: str | Path, kind: str = "tmp") -> Path:
    target = Path(target)
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}@{socket.gethostname()}")


def _owner(name: str) -> tuple[str, str, int] | None:
    """(target name, host, pid) of a temporary's name; None for any other name."""
    base, at, host = name.rpartition("@")
    if not at or not base.startswith("."):
        return None
    stem, _, token = base.rpartition("-")
    stem, _, pid = stem.rpartition("-")
    target, _, kind = stem.rpartition(".")
    if kind not in _KINDS or not pid.isdigit() or len(token) != 8 or not target:
        return None
    return target[1:], host, int(pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | Path, target: str | None = None, *, all_stale: bool = False) -> list[Path]:
    """Remove temporaries in ``folder`` (of ``target`` only, when given) whose process is gone:
    on this host and no longer running, or any at all with ``all_stale`` (the caller holds the
    folder's run lock, so nobody else writes there). Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    here, removed = socket.gethostname(), []
    for entry in folder.iterdir():
        owner = _owner(entry.name)
        if owner is None or (target is not None and owner[0] != target):
            continue
        _, host, pid = owner
        if all_stale or (host == here and pid != os.getpid() and not pid_alive(pid)):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def ensure_folder(out_dir: str | Path, key: str = "train.out_dir") -> Path:
    """A folder to write into, created if needed; a file in its place or no permission is a
    ConfigError that names ``key`` (the setting or option that gave the path)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{key}: {out_dir} exists and is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{key}: {out_dir} cannot be a folder (a file stands in its path)") from None
    except PermissionError:
        raise ConfigError(f"{key}: {out_dir} cannot be created: permission denied") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {out_dir} is not writable")
    return out_dir


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary sibling folder; on success it replaces ``target`` by rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, target.name)
    tmp = temporary_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            old = temporary_sibling(target, "old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(err) and not isinstance(err, WriteError):
            raise write_failed(target, err) from err
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
