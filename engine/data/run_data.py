"""Resolve a run's data: generate synthetic groups and prepare raw inputs into Arrow shards.

Rank 0 does the work into OUT_DIR/data/; the other ranks wait, then read the same folders
(a shared filesystem across nodes is assumed, as for checkpoints). A folder already
prepared (it holds manifest.json) is used as it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rankpm.engine.config import RunConfig

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class RunData:
    train_dir: Path
    eval_dir: Path | None
    tokenizer_dir: Path  # the tokenizer the shards were made with


def resolve_run_data(cfg: RunConfig, strategy) -> RunData:
    data_root = Path(cfg.train.out_dir) / "data"
    if strategy.is_main:
        _materialize(cfg, data_root)
    strategy.barrier()
    train_dir = _prepared_dir(cfg.data.train, data_root / "train", synthetic=cfg.data.synthetic is not None)
    eval_dir = None
    if cfg.data.eval or cfg.data.synthetic is not None:
        eval_dir = _prepared_dir(cfg.data.eval, data_root / "eval", synthetic=cfg.data.synthetic is not None)
    return RunData(train_dir, eval_dir, train_dir / "tokenizer")


def _prepared_dir(inputs: list[str], default: Path, *, synthetic: bool) -> Path:
    if not synthetic and len(inputs) == 1 and (Path(inputs[0]) / MANIFEST).is_file():
        return Path(inputs[0])
    return default


def _materialize(cfg: RunConfig, data_root: Path) -> None:
    from rankpm.engine.data.prepare import prepare
    from rankpm.engine.data.synthetic import generate

    d = cfg.data
    train_inputs, eval_inputs = list(d.train), list(d.eval)
    if d.synthetic is not None:
        s = d.synthetic
        train_file, eval_file = data_root / "synthetic_train.jsonl", data_root / "synthetic_eval.jsonl"
        data_root.mkdir(parents=True, exist_ok=True)
        if not (data_root / "train" / MANIFEST).is_file():
            generate(train_file, groups=s.train_groups, seed=s.seed, k_min=s.k_min, k_max=s.k_max)
        if not (data_root / "eval" / MANIFEST).is_file():
            # a different seed: held-out groups, never the training ones
            generate(eval_file, groups=s.eval_groups, seed=s.seed + 1_000_003, k_min=s.k_min, k_max=s.k_max)
        train_inputs, eval_inputs = [str(train_file)], [str(eval_file)]

    (train_inputs, train_skipped), (eval_inputs, eval_skipped) = _transform(cfg, data_root, train_inputs,
                                                                            eval_inputs)
    options = dict(max_length=d.max_length, truncation=d.truncation, skip_bad=d.skip_bad, seed=cfg.train.seed)
    train_dir = _prepared_dir(train_inputs, data_root / "train", synthetic=False)
    if not (train_dir / MANIFEST).is_file():
        prepare(train_inputs, train_dir, d.tokenizer, skipped_before=train_skipped, **options)
    if eval_inputs:
        eval_dir = _prepared_dir(eval_inputs, data_root / "eval", synthetic=False)
        if not (eval_dir / MANIFEST).is_file():
            # the evaluation shards use exactly the training tokenizer
            prepare(eval_inputs, eval_dir, str(train_dir / "tokenizer"), skipped_before=eval_skipped, **options)


def _transform(cfg: RunConfig, data_root: Path, train_inputs: list[str], eval_inputs: list[str]):
    """Text-level pair transforms the objective needs (binary: binarize / label-expand).

    Per split: (inputs to prepare, rows the transform skipped as bad, for the manifest).
    """
    from rankpm.engine.data.transforms import Labels, run_transforms, transform_files

    train_t, eval_t = run_transforms(cfg.objective) if cfg.data.transform != "none" else ("none", "none")
    labels = Labels(cfg.objective.labels.good, cfg.objective.labels.bad)
    out = []
    for split, inputs, name in (("train", train_inputs, train_t), ("eval", eval_inputs, eval_t)):
        skipped: list[dict] = []
        if name != "none" and inputs and not (data_root / split / MANIFEST).is_file():
            target = data_root / f"{split}_{name}.jsonl"
            inputs = [str(transform_files(inputs, target, name, labels, cfg.objective.pairs,
                                          skip_bad=cfg.data.skip_bad, skipped=skipped))]
        out.append((inputs, skipped))
    return out
