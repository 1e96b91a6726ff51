"""Training checkpoints: versioned, written atomically, checked on load.

Layout (OUT_DIR/checkpoints/):
    step_00000100/           one complete checkpoint
        training_state...    whatever the strategy writes (model, optimizer, scheduler)
        trainer.json         step, world size, config, metrics, version
        reader_rank{r}.json  each rank's data-reader position
        rng_rank{r}.pt       each rank's RNG states
    latest                   the name of the newest complete checkpoint

Every rank writes into a hidden temporary folder; rank 0 renames it into place and only
then points ``latest`` at it, so a crash while saving leaves the previous checkpoint as
the latest usable one. The last ``keep_last`` checkpoints are kept.

A checkpoint resumes with another number of ranks when the strategy can load its state
that way (``strategy.resize_refusal``: DeepSpeed ZeRO-0 can) and the readers' positions
map exactly (ComparisonStream.resume_from); a rank with no RNG state of its own starts
its RNG from ``fresh_seed``.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from rankpm.engine.io import atomic_write_json, atomic_write_text

CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def checkpoints_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    root = checkpoints_root(out_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "trainer.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def save_checkpoint(strategy, out_dir: str | Path, *, step: int, trainer_state: dict,
                    reader_state: dict, keep_last: int, export=None) -> Path:
    """``export(folder)``, called on every rank (it may be a collective), writes the
    consolidated model into the checkpoint, so that any checkpoint can be evaluated."""
    root = checkpoints_root(out_dir)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if strategy.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    strategy.barrier()
    strategy.save(tmp)
    if export is not None:
        export(tmp / "model")
    atomic_write_json(tmp / f"reader_rank{strategy.rank}.json", reader_state)
    torch.save(_rng_state(), tmp / f"rng_rank{strategy.rank}.pt")
    strategy.barrier()
    if strategy.is_main:
        meta = dict(trainer_state, version=CHECKPOINT_VERSION, step=step, world_size=strategy.world_size)
        atomic_write_json(tmp / "trainer.json", meta)
        if final.exists():  # a rerun of the same step replaces it
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_text(root / "latest", name + "\n")
        _prune(root, keep_last)
    strategy.barrier()
    return final


def load_checkpoint(strategy, path: str | Path, *, fresh_seed: int = 0) -> tuple[dict, list[dict]]:
    """Restore strategy state and this rank's RNG; return (trainer_state, the reader state
    of every rank that wrote the checkpoint, in rank order)."""
    path = Path(path)
    meta = json.loads((path / "trainer.json").read_text())
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')}, "
                              f"this rankpm reads version {CHECKPOINT_VERSION}")
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


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob("step_*") if (p / "trainer.json").is_file())
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
