"""Resolve a run's data: generate synthetic groups and prepare raw inputs into Arrow shards.

Rank 0 does the work into OUT_DIR/data/; the other ranks wait, then read the same folders
(a shared filesystem across nodes is assumed, as for checkpoints).

A folder the run prepared is reused only when its manifest's ``request`` (the inputs'
content hashes, the tokenizer, every prepare and transform setting, the schema version)
equals what the run asks for now; otherwise it is prepared again and the log says what
changed. When a checkpoint was trained on it (``keep_prepared``), a change is refused
instead: the reader's position means nothing in other data.

A prepared folder given by the user (data.train: [folder]) is checked against the run's
settings (tokenizer, max_length, truncation) and refused on a mismatch, naming both.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from rankpm.engine.config import RunConfig
from rankpm.engine.fingerprint import MismatchError, differences, require_same, tokenizer_key
from rankpm.engine.model.reading import run_reading, specials_for

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class RunData:
    train_dir: Path
    eval_dir: Path | None
    tokenizer_dir: Path  # the tokenizer the shards were made with


def resolve_run_data(cfg: RunConfig, strategy, *, keep_prepared: bool = False) -> RunData:
    if cfg.objective.name == "distill":
        return resolve_distill_data(cfg, strategy)
    data_root = Path(cfg.train.out_dir) / "data"
    if strategy.is_main:
        _materialize(cfg, data_root, keep_prepared)
    strategy.barrier()
    train_dir = user_prepared(cfg.data.train, synthetic=cfg.data.synthetic is not None) or data_root / "train"
    eval_dir = None
    if cfg.data.eval or cfg.data.synthetic is not None:
        eval_dir = user_prepared(cfg.data.eval, synthetic=cfg.data.synthetic is not None) or data_root / "eval"
    return RunData(train_dir, eval_dir, train_dir / "tokenizer")


def resolve_distill_data(cfg: RunConfig, strategy) -> RunData:
    """Context distillation reads logit caches as they are (train, and a held-out one for
    evaluation, made by the same teacher and prompt, in any mode); the student's tokenizer (data.tokenizer)
    is saved beside the run, and compared with the cache's once the model is built."""
    from rankpm.engine.data.logit_shards import open_logit_cache
    from rankpm.engine.data.tokenizer import load_tokenizer

    train_dir = Path(cfg.data.train[0])
    train = open_logit_cache(train_dir)
    eval_dir = Path(cfg.data.eval[0]) if cfg.data.eval else None
    if eval_dir is not None:
        held_out = open_logit_cache(eval_dir)
        def made_by(manifest: dict) -> dict:  # what shaped the entries, not where files were
            keys = ("teacher", "tokenizer", "vocab_size", "prompt")  # mode and k may differ: KL is per entry
            return {k: {a: b for a, b in v.items() if a != "source"} if isinstance(v, dict) else v
                    for k, v in ((k, manifest.get(k)) for k in keys)}

        require_same("the teacher's cache settings", f"training cache {train_dir}", made_by(train),
                     f"evaluation cache {eval_dir}", made_by(held_out))
    tokenizer_dir = Path(cfg.train.out_dir) / "data" / "tokenizer"
    if strategy.is_main:
        load_tokenizer(cfg.data.tokenizer).save(tokenizer_dir)
    strategy.barrier()
    return RunData(train_dir, eval_dir, tokenizer_dir)


def user_prepared(inputs: list[str], *, synthetic: bool) -> Path | None:
    """The prepared folder a split names itself, if it does (else the run prepares one)."""
    if not synthetic and len(inputs) == 1 and (Path(inputs[0]) / MANIFEST).is_file():
        return Path(inputs[0])
    return None


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _materialize(cfg: RunConfig, data_root: Path, keep_prepared: bool) -> None:
    from rankpm.engine.data.synthetic import generate

    d = cfg.data
    train_inputs, eval_inputs = list(d.train), list(d.eval)
    if d.synthetic is not None:  # deterministic and cheap: written anew, then compared by content
        s = d.synthetic
        train_inputs = [str(generate(data_root / "synthetic_train.jsonl", groups=s.train_groups, seed=s.seed,
                                     k_min=s.k_min, k_max=s.k_max))]
        # a different seed: held-out groups, never the training ones
        eval_inputs = [str(generate(data_root / "synthetic_eval.jsonl", groups=s.eval_groups, seed=s.seed + 1_000_003,
                                    k_min=s.k_min, k_max=s.k_max))]

    train_t, eval_t = _transforms(cfg)
    given = user_prepared(train_inputs, synthetic=False)
    if given is not None:
        train_dir = given
        check_prepared_train(cfg, given, read_manifest(given))
    else:
        train_dir = data_root / "train"
        _ensure_prepared(cfg, train_dir, train_inputs, d.tokenizer, train_t, keep_prepared)
    tokenizer = read_manifest(train_dir)["tokenizer"]
    if not eval_inputs:
        return
    given = user_prepared(eval_inputs, synthetic=False)
    if given is not None:
        check_prepared_eval(cfg, given, read_manifest(given), tokenizer, train_dir)
    else:  # the evaluation shards use exactly the training tokenizer
        _ensure_prepared(cfg, data_root / "eval", eval_inputs, str(train_dir / "tokenizer"), eval_t, keep_prepared)


def _transforms(cfg: RunConfig) -> tuple[dict, dict]:
    """The text-level pair transforms of each split (binary: binarize / label-expand)."""
    from rankpm.engine.data.transforms import run_transforms

    names = run_transforms(cfg.objective) if cfg.data.transform != "none" else ("none", "none")
    o = cfg.objective
    return tuple({"name": n} if n == "none" else {"name": n, "labels": [o.labels.good, o.labels.bad],
                                                   "pairs": o.pairs} for n in names)


def _ensure_prepared(cfg: RunConfig, folder: Path, inputs: list[str], tokenizer: str, transform: dict,
                     keep_prepared: bool) -> None:
    from rankpm.engine.data.prepare import prepare, prepare_request

    d = cfg.data
    specials = specials_for(run_reading(cfg.model))
    request = prepare_request(inputs, tokenizer, max_length=d.max_length, truncation=d.truncation,
                              skip_bad=d.skip_bad, transform=transform, specials=specials)
    manifest = read_manifest(folder)
    if manifest is not None:
        if manifest.get("request") == request:
            return
        changed = differences(manifest.get("request", {}), request) or ["(a folder from an older rankpm)"]
        if keep_prepared:
            raise MismatchError(
                f"{folder} holds the data the run's checkpoint was trained on, but the run now asks for other data "
                f"({'; '.join(changed[:4])}); resume with the same data and settings, or start a new "
                f"train.out_dir (model.init_from={Path(cfg.train.out_dir) / 'model'} continues from its weights)")
        log.info("%s was prepared for other data or settings (%s); preparing it again", folder, "; ".join(changed[:4]))
    skipped: list[dict] = []
    if transform["name"] != "none":
        from rankpm.engine.data.transforms import Labels, transform_files
        target = folder.parent / f"{folder.name}_{transform['name']}.jsonl"
        inputs = [str(transform_files(inputs, target, transform["name"], Labels(*transform["labels"]),
                                      transform["pairs"], skip_bad=d.skip_bad, skipped=skipped))]
    prepare(inputs, folder, tokenizer, max_length=d.max_length, truncation=d.truncation, skip_bad=d.skip_bad,
            seed=cfg.train.seed, skipped_before=skipped, request=request, specials=specials)


def check_prepared_train(cfg: RunConfig, folder: Path, manifest: dict) -> None:
    """A prepared training folder must have been made with the run's tokenizer and length policy."""
    from rankpm.engine.data.prepare import tokenizer_request

    d = cfg.data
    run = {"max_length": d.max_length, "truncation": d.truncation,
           "special tokens per sequence": specials_for(run_reading(cfg.model))}
    made = {"max_length": manifest["max_length"], "truncation": manifest["truncation"]["policy"],
            "special tokens per sequence": manifest.get("specials", 1)}
    require_same("the length policy", f"the run's data settings (data.max_length, data.truncation, model.reading)", run,
                 f"prepared folder {folder}", made)
    wanted = tokenizer_request(d.tokenizer)
    have = tokenizer_key(manifest["tokenizer"])
    if "trained" in wanted:  # bpe:<N> is trained on the inputs: its kind and size must agree
        wanted, have = {"kind": "bpe", "vocab_size": int(d.tokenizer[4:])}, {k: have.get(k) for k in ("kind", "vocab_size")}
    if wanted != have:
        raise MismatchError(f"the tokenizer differs between data.tokenizer={d.tokenizer!r} and prepared folder "
                            f"{folder}: {'; '.join(differences(wanted, have)[:4])}; set "
                            f"data.tokenizer={folder / 'tokenizer'} to train with the tokenizer the data was made with")


def check_prepared_eval(cfg: RunConfig, folder: Path, manifest: dict, tokenizer: dict, train_dir: Path) -> None:
    """Evaluation data must share the training tokenizer and fit the model's positions."""
    require_same("the special tokens per sequence", "the run's model.reading",
                 {"specials": specials_for(run_reading(cfg.model))}, f"evaluation data {folder}",
                 {"specials": manifest.get("specials", 1)})
    require_same("the tokenizer", f"training data {train_dir}", tokenizer_key(tokenizer),
                 f"evaluation data {folder}", tokenizer_key(manifest["tokenizer"]))
    if manifest["max_length"] > cfg.data.max_length:
        raise MismatchError(f"evaluation data {folder} was prepared with max_length={manifest['max_length']}, longer "
                            f"than the run's data.max_length={cfg.data.max_length}; prepare it again with "
                            f"--max-length {cfg.data.max_length}")
