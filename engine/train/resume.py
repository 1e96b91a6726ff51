"""Resuming compares the checkpoint's config with the run's: a run must mean what its config says.

Settings that change what is trained (model, data, objective, tokenizer, batch size, seed,
optimiser and schedule) are refused with the differing keys, unless the run is told
``train.resume_with_changes`` (``--resume-with-changes``): then they are logged and
recorded. Settings of bookkeeping and placement (logging, evaluation and save intervals,
the evaluation data, the cluster) may change freely. A changed step count keeps the
checkpoint's schedule horizon, so the learning rate never jumps: steps beyond it run at
the schedule's floor.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from rankpm.engine.fingerprint import MismatchError

# Free to differ on resume: they decide where and how often, not what is trained.
FREE_KEYS = ("train.out_dir", "train.eval_every", "train.save_every", "train.keep_last", "train.log_every",
             "train.progress", "train.device", "train.resume_with_changes", "train.on_nonfinite",
             "data.eval", "data.eval_batch_groups", "model.gradient_checkpointing", "cluster.", "stages")
PATH_KEYS = ("model.backbone", "model.init_from", "data.train", "data.tokenizer")


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _same_path(value):
    """Paths compare by where they lead (a Ray run records them absolute)."""
    if isinstance(value, list):
        return [_same_path(v) for v in value]
    if isinstance(value, str) and Path(os.path.expanduser(value)).exists():
        return str(Path(os.path.expanduser(value)).resolve())
    return value


# The groups of one step are what is trained, not how ranks split them: 2 workers x 4 groups
# resume as 4 workers x 2 groups.
PER_STEP = "groups per step (data.batch_groups x cluster.workers x train.grad_accum)"


def _groups_per_step(flat: dict):
    parts = [flat.get(k) for k in ("data.batch_groups", "cluster.workers", "train.grad_accum")]
    return parts[0] * parts[1] * parts[2] if all(isinstance(x, int) for x in parts) else parts


def _defaults() -> dict:
    from rankpm.engine.config import RunConfig

    return _flatten(json.loads(json.dumps(RunConfig().to_dict())))


def run_changes(stored: dict, now: dict) -> dict[str, list]:
    """{dotted key: [in the checkpoint, now]} for every setting that changes what is trained."""
    a, b = _flatten(json.loads(json.dumps(stored))), _flatten(json.loads(json.dumps(now)))  # tuples as JSON has them
    for flat in (a, b):
        flat[PER_STEP] = _groups_per_step(flat)
        flat.pop("data.batch_groups", None)
        flat.pop("train.grad_accum", None)
    changes = {}
    defaults = _defaults()
    for key in sorted(set(a) | set(b)):
        if any(key == free or (free.endswith(".") and key.startswith(free)) for free in FREE_KEYS):
            continue
        old, new = a.get(key, "<absent>"), b.get(key, "<absent>")
        if old == "<absent>" and key in defaults and new == defaults[key]:
            continue  # a setting added since the checkpoint was written, left at its default: the same run
        same = _same_path(old) == _same_path(new) if key in PATH_KEYS else old == new
        if not same:
            changes[key] = [old, new]
    return changes


def check_resume(checkpoint: Path, stored_config: dict, now: dict, *, allowed: bool) -> dict[str, list]:
    """The changes between the checkpoint's config and the run's; MismatchError unless ``allowed``."""
    changes = run_changes(stored_config, now)
    if changes and not allowed:
        listed = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in changes.items())
        raise MismatchError(
            f"{checkpoint} was written under other settings ({listed}); resuming would train a run its config "
            f"does not describe. Resume with the same settings, start a new train.out_dir, or pass "
            f"--resume-with-changes (train.resume_with_changes=true) to continue under the new ones (recorded in "
            f"metrics.jsonl; a changed step count keeps the checkpoint's schedule horizon)")
    return changes
