"""What made an artefact, and the comparison that refuses a mismatch by name.

Every artefact another step consumes (prepared shards, model folders, checkpoints)
records what made it; the consumer compares that record with what it was about to use.

    require_same("tokenizer", "model folder runs/a/model", a, "prepared data data/eval", b)
    -> MismatchError: tokenizer differs between model folder runs/a/model and prepared data
       data/eval: vocab_size: 264 vs 4000; fingerprint: 5f1c.. vs 09ab..
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


class MismatchError(ValueError):
    """Two pieces of state that must agree do not; the message names both sides."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_identity(path: str | Path) -> dict:
    """An input file by content: its name, size and hash (an edited file is another file)."""
    path = Path(path)
    return {"file": os.path.basename(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def tokenizer_key(identity: dict) -> dict:
    """The parts of a tokenizer identity that decide its token ids (not where it was loaded from)."""
    return {k: v for k, v in identity.items() if k != "source"}


def differences(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as 'key: A vs B' (long values shortened)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += differences(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += differences(x, y, f"{prefix.rstrip('.')}[{i}].")
        return out
    return [] if a == b else [f"{prefix.rstrip('.') or 'value'}: {_short(a)} vs {_short(b)}"]


def require_same(what: str, a_name: str, a, b_name: str, b) -> None:
    diffs = differences(a, b)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise MismatchError(f"{what} differs between {a_name} and {b_name}: {shown}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + "..." + text[-12:]
