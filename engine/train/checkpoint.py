"""Training checkpoints: versioned, written atomically, every file checked on load.

Layout (OUT_DIR/checkpoints/):
    step_00000100/           one complete checkpoint
        model/               the consolidated model (written first: non-finite weights stop here)
        training_state...    whatever the strategy writes (model, optimizer, scheduler)
        reader_rank{r}.json  each rank's data-reader position
        rng_rank{r}.pt       each rank's RNG states
        trainer.json         step, world size, config, counters, version
        index.json           every other file with its size and hash: written last
    latest                   the name of the newest complete checkpoint

Every rank writes into one temporary folder whose name (unique to the saving process)
rank 0 chose; rank 0 indexes it, renames it into place and only then points ``latest`` at
it, so a crash while saving leaves the previous checkpoint as the latest usable one, and a
failed save removes its temporary folder. The last ``keep_last`` checkpoints are kept.

``latest_checkpoint`` validates what it returns against the index (sizes, and hashes:
whole files up to FULL_HASH_BYTES, the first and last MiB beyond, where a full hash would
cost a second per GB on every save and load; truncation, the common damage, always shows
in the size). A checkpoint that fails, or a ``latest`` that names nothing, falls back to
the newest intact checkpoint with a warning that names the bad one.

A checkpoint resumes with another number of ranks when the strategy can load its state
that way (``strategy.resize_refusal``: DeepSpeed ZeRO-0 can) and the readers' positions
map exactly (ComparisonStream.resume_from); a rank with no RNG state of its own starts
its RNG from ``fresh_seed``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from rankpm.engine.io import (WriteError, atomic_write_json, atomic_write_text, is_write_failure,
                              remove_stale_temporaries, temporary_sibling, write_failed)

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2  # 2: index.json, the model folder written first
INDEX = "index.json"
TRAINER = "trainer.json"
FULL_HASH_BYTES = 256 << 20
_EDGE = 1 << 20


class CheckpointError(RuntimeError):
    pass


def checkpoints_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when every indexed file is intact."""
    index_file = path / INDEX
    if not path.is_dir():
        return "missing"
    if not index_file.is_file():
        return f"incomplete (no {INDEX})"
    try:
        index = json.loads(index_file.read_text())
    except ValueError as err:
        return f"{index_file} is unreadable ({err})"
    if index.get("version") != CHECKPOINT_VERSION:
        return f"written by checkpoint version {index.get('version')}, this rankpm reads version {CHECKPOINT_VERSION}"
    for name, want in index["files"].items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != want["bytes"]:
            return f"{file} holds {size} bytes, the index says {want['bytes']} (truncated?)"
        if _digest(file, size) != want["sha256"]:
            return f"{file} does not match its hash in {INDEX} (corrupt)"
    return None


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest intact checkpoint (``latest`` names it, unless a crash came between the two)."""
    root = checkpoints_root(out_dir)
    pointer = root / "latest"
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True) if root.is_dir() else []
    bad = [(named, "missing")] if named is not None and named not in steps else []
    for path in steps:  # newest first: a save renamed into place is complete, pointer or not
        problem = checkpoint_problem(path)
        if problem is None:
            for unusable, why in bad:
                log.warning("checkpoint %s is unusable (%s); resuming from %s instead", unusable, why, path.name)
            return path
        bad.append((path, problem))
    if bad:
        raise CheckpointError(f"no usable checkpoint in {root}: " +
                              "; ".join(f"{p.name}: {why}" for p, why in bad) +
                              f"; move {root} away to start the run afresh")
    return None


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / TRAINER).read_text())


def save_checkpoint(strategy, out_dir: str | Path, *, step: int, trainer_state: dict,
                    reader_state: dict, keep_last: int, export=None) -> Path:
    """``export(folder)``, called on every rank (it may be a collective), writes the
    consolidated model into the checkpoint, so that any checkpoint can be evaluated; it
    raises on non-finite weights, before anything else of the checkpoint is written."""
    root = checkpoints_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = Path(strategy.broadcast_object(str(temporary_sibling(final)) if strategy.is_main else None))
    if strategy.is_main:
        tmp.mkdir(parents=True)
    strategy.barrier()
    try:
        if export is not None:
            export(tmp / "model")
        strategy.save(tmp)
        atomic_write_json(tmp / f"reader_rank{strategy.rank}.json", reader_state)
        torch.save(_rng_state(), tmp / f"rng_rank{strategy.rank}.pt")
        strategy.barrier()
        if strategy.is_main:
            meta = dict(trainer_state, version=CHECKPOINT_VERSION, step=step, world_size=strategy.world_size)
            atomic_write_json(tmp / TRAINER, meta)
            atomic_write_json(tmp / INDEX, {"version": CHECKPOINT_VERSION, "files": _index(tmp)})
            if final.exists():  # a rerun of the same step replaces it
                shutil.rmtree(final)
            tmp.rename(final)
            atomic_write_text(root / "latest", final.name + "\n")
            _prune(root, keep_last)
    except BaseException as err:
        if strategy.is_main:  # never a half-written temporary left behind (a full disk, a bad weight)
            shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(err):  # named after the checkpoint, not the temporary it was written in
            cause = err.__cause__ if isinstance(err, WriteError) and err.__cause__ is not None else err
            raise write_failed(final, cause, "the partial checkpoint was removed and the previous one is intact") \
                from cause
        raise
    strategy.barrier()
    return final


def remove_unfinished(out_dir: str | Path) -> None:
    """Temporary checkpoint folders of a run that died while saving (the caller holds the run lock)."""
    for path in remove_stale_temporaries(checkpoints_root(out_dir), all_stale=True):
        log.info("removed %s, left by a save that did not finish", path)


def load_checkpoint(strategy, path: str | Path, *, fresh_seed: int = 0) -> tuple[dict, list[dict]]:
    """Restore strategy state and this rank's RNG; return (trainer_state, the reader state
    of every rank that wrote the checkpoint, in rank order)."""
    path = Path(path)
    meta = read_trainer_state(path)
    written = meta["world_size"]
    if written != strategy.world_size:
        reason = strategy.resize_refusal(path)
        if reason:
            raise CheckpointError(f"{path}: written by {written} data-parallel ranks, resuming with "
                                  f"{strategy.world_size}: {reason}")
    strategy.load(path)
    readers = [json.loads((path / f"reader_rank{r}.json").read_text()) for r in range(written)]
    rng = path / f"rng_rank{strategy.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    else:  # a rank the checkpoint's layout did not have
        seed_everything(fresh_seed)
    return meta, readers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _index(folder: Path) -> dict:
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != INDEX):
        size = file.stat().st_size
        files[str(file.relative_to(folder))] = {"bytes": size, "sha256": _digest(file, size)}
    return files


def _digest(file: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            digest.update(f.read(_EDGE))
    return digest.hexdigest()


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob("step_*") if (p / INDEX).is_file())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
