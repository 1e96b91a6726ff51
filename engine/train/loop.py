"""The training loop. One copy: cluster/ runs it on every rank with a DeepSpeed strategy.

    summary = train(load_config("configs/quickstart.yaml"))

Step-based: a step is ``grad_accum`` micro-batches on every rank. The reader loops over
epochs, so no rank runs out of batches before the others. Resuming from the newest
intact checkpoint restores weights, optimizer, scheduler, RNG, the reader's exact position
and the run's counters, so a resumed run sees the same batches as an uninterrupted one and
logs every step once; it must be the same run (rankpm.engine.train.resume).

Everything that can be checked before step 1 is: the folder (one run at a time), the
data against the checkpoint and the model, the evaluation data, the step plan. A step
whose loss or gradient norm is not finite never reaches the weights: the run stops,
naming the step, its groups and the last good checkpoint (or skips it when asked). The
final checkpoint is written before the final evaluation, so a failing evaluation loses
no training; the rerun then only evaluates.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from rankpm.engine.config import ConfigError, RunConfig
from rankpm.engine.data.prefetch import Prefetcher
from rankpm.engine.data.run_data import read_manifest, resolve_run_data
from rankpm.engine.data.stream import ComparisonStream
from rankpm.engine.data.tokenizer import load_tokenizer
from rankpm.engine.model.attention import choose_layout
from rankpm.engine.model.preference_model import PreferenceModel
from rankpm.engine.model.reading import framing_for, run_reading
from rankpm.engine.score.evaluate import evaluate_distill, evaluate
from rankpm.engine.score.judges import batch_targets, forward
from rankpm.engine.train.checkpoint import (latest_checkpoint, load_checkpoint, read_trainer_state, remove_unfinished,
                                            save_checkpoint, seed_everything)
from rankpm.engine.train.metrics import MetricsLog, Window
from rankpm.engine.train.objectives import build_objective
from rankpm.engine.train.resume import check_resume
from rankpm.engine.io import atomic_write_json, ensure_folder
from rankpm.engine.train.run_lock import run_lock
from rankpm.engine.train.schedule import build_optimizer, build_scheduler, plan_steps
from rankpm.engine.train.strategy import LocalStrategy

log = logging.getLogger(__name__)

EVAL_PAIRS = "eval_pairs.json"  # the final evaluation's pairs, which the report is made from


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm was not finite; the weights were not updated."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def local_strategy(cfg: RunConfig) -> LocalStrategy:
    t = cfg.train
    return LocalStrategy(device=resolve_device(t.device), grad_accum=t.grad_accum,
                         grad_clip=t.grad_clip, precision=t.precision)


def train(cfg: RunConfig, strategy=None, *, on_record=None) -> dict:
    """Train (or resume) the run in ``cfg.train.out_dir``; return the final summary.

    ``strategy`` defaults to one local process, which holds the folder's run lock; cluster/
    passes a DeepSpeed strategy (its driver holds the lock). ``on_record`` receives every
    metrics row on the main rank (the cluster forwards them to the driver).
    """
    if strategy is None:
        with run_lock(cfg.train.out_dir):
            return _train(cfg, local_strategy(cfg), on_record)
    return _train(cfg, strategy, on_record)


def _train(cfg: RunConfig, strategy, on_record) -> dict:
    out_dir = Path(cfg.train.out_dir)
    if strategy.is_main:
        ensure_folder(out_dir)
        remove_unfinished(out_dir)
    strategy.barrier()
    checkpoint = latest_checkpoint(out_dir)
    resume_state = read_trainer_state(checkpoint) if checkpoint is not None else None
    changes = {}
    if resume_state is not None:
        changes = check_resume(checkpoint, resume_state["config"], cfg.to_dict(),
                               allowed=cfg.train.resume_with_changes)
    data = resolve_run_data(cfg, strategy, keep_prepared=checkpoint is not None)
    tokenizer = load_tokenizer(str(data.tokenizer_dir))
    objective = build_objective(cfg.objective)

    distill = cfg.objective.name == "distill"
    train_groups = data_units(data.train_dir, distill)  # comparison groups, or texts
    plan = plan_steps(cfg, train_groups, strategy.world_size)
    if data.eval_dir is not None and data_units(data.eval_dir, distill) == 0:
        raise ConfigError(f"data.eval: {data.eval_dir} holds nothing to evaluate on")
    total_steps = plan.total_steps
    # a changed step count (allowed by resume_with_changes) keeps the schedule the run began with
    horizon = resume_state.get("schedule_steps", total_steps) if resume_state else total_steps

    seed_everything(cfg.train.seed)  # the same initial weights on every rank
    reading = run_reading(cfg.model)
    framing = framing_for(reading, tokenizer)
    model = PreferenceModel.build(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                                  eoc_id=tokenizer.eoc_id, max_length=cfg.data.max_length,
                                  with_lm_head=objective.needs_lm_head, tokenizer=tokenizer.identity(),
                                  reading=reading)
    if distill:
        from rankpm.engine.data.logit_shards import require_student
        from rankpm.engine.data.text_batch import DistillStream

        if not model.causal:
            raise ConfigError(f"objective.name='distill': the student must be a causal language model; "
                              f"{type(model.transformer).__name__} attends both ways")
        require_student(read_manifest(data.train_dir), tokenizer.identity(), model.lm_head.out_features)
        layout = "packed"  # each text its own segment
        stream = DistillStream(data.train_dir, pad_id=tokenizer.pad_id, rank=strategy.rank,
                               world_size=strategy.world_size, seed=cfg.train.seed,
                               shuffle_buffer=cfg.data.shuffle_buffer, batch_texts=cfg.data.batch_groups, loop=True)
        if strategy.is_main:
            log.info("distilling from %s: %d texts, %s cache (k=%d), %d texts a micro-batch", data.train_dir,
                     train_groups, stream.manifest["mode"], stream.manifest["k"], cfg.data.batch_groups)
    else:
        layout, why = choose_layout(cfg.data.layout, model.causal, model.attention_implementation)
        if strategy.is_main:
            log.info("batch layout %s: %s; scores read at %s", layout, why,
                     "the end-of-context token" if reading == "end" else "the first token, through the pooler")
        stream = ComparisonStream(data.train_dir, rank=strategy.rank, world_size=strategy.world_size,
                                  seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                                  batch_groups=cfg.data.batch_groups, tokens_per_batch=cfg.data.tokens_per_batch,
                                  loop=True, layout=layout, targets=objective.targets, framing=framing)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, horizon)
    model = strategy.setup(model, optimizer, scheduler)

    counters = {"pairs_seen": 0, "tokens_seen": 0, "groups_seen": 0, "skipped_steps": 0}
    step, resumed = 0, {}
    rank_seed = cfg.train.seed + 7919 * strategy.rank  # per-rank dropout streams
    if checkpoint is not None:
        trainer_state, readers = load_checkpoint(strategy, checkpoint, fresh_seed=rank_seed)
        step = trainer_state["step"]
        counters = {k: trainer_state[k] for k in counters}
        resumed = {"checkpoint": str(checkpoint), "step": step, "ranks_before": len(readers)}
        how = ""
        if len(readers) == strategy.world_size:
            stream.load_state_dict(readers[strategy.rank])
        else:
            resumed["reader_mapping"] = stream.resume_from(readers)
            how = f" with {strategy.world_size} ranks instead of {len(readers)}: {resumed['reader_mapping']}"
        if changes:
            resumed["changes"] = changes
            if strategy.is_main:
                log.warning("resuming %s under changed settings (train.resume_with_changes): %s", checkpoint,
                            "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        if strategy.is_main:
            log.info("resumed from %s at step %d%s", checkpoint, step, how)
    else:
        seed_everything(rank_seed)

    metrics = MetricsLog(out_dir, enabled=strategy.is_main, total_steps=total_steps, progress=cfg.train.progress,
                         initial_step=step, on_record=on_record,
                         keep_rows=resume_state.get("metrics_rows") if resume_state else 0)
    if strategy.is_main:
        if plan.epochs is not None and cfg.train.max_steps is not None:
            log.info("train.max_steps=%d makes %.2f passes over the %d training groups", total_steps, plan.epochs,
                     train_groups)
        metrics.record("config", step, {"config": cfg.to_dict(), "total_steps": total_steps,
                                        "schedule_steps": horizon, "planned_epochs": plan.epochs,
                                        "world_size": strategy.world_size, "train_groups": train_groups,
                                        "layout": layout, "reading": reading,
                                        **({"resumed": resumed} if resumed else {})})

    def run_eval(collect: bool = False) -> dict:
        """The evaluation metrics; with ``collect``, the pairs too, written to OUT_DIR/eval_pairs.json
        for the report (made from this pass, not from scoring the set again)."""
        if data.eval_dir is None:
            return {}
        if distill:
            return evaluate_distill(model, data.eval_dir, strategy=strategy, pad_id=tokenizer.pad_id,
                                    batch_texts=cfg.data.eval_batch_groups)
        # ranks alternate group by group (evaluation needs no layout parity, only coverage)
        eval_stream = ComparisonStream(data.eval_dir, rank=strategy.rank, world_size=strategy.world_size,
                                       shuffle=False, batch_groups=cfg.data.eval_batch_groups, loop=False,
                                       interleave=1, layout=layout, targets=batch_targets(objective.judge),
                                       framing=framing)
        local = torch.tensor(float(math.ceil(eval_stream.num_groups / cfg.data.eval_batch_groups)),
                             device=strategy.device)
        most = int(strategy.all_reduce(local, op="max").item())
        filler = None
        if eval_stream.num_groups == 0:  # more ranks than evaluation groups
            filler = next(iter(ComparisonStream(data.eval_dir, shuffle=False, batch_groups=1, loop=False,
                                                layout=layout, targets=batch_targets(objective.judge),
                                                framing=framing)))
        result = evaluate(model, eval_stream, strategy=strategy, num_batches=most, judge=objective.judge,
                          filler=filler, collect=collect)
        if collect and strategy.is_main:
            atomic_write_json(out_dir / EVAL_PAIRS, result.pairs.to_dict())
        return result.metrics

    window = Window(strategy.device)
    window_start, skips_logged = time.perf_counter(), counters["skipped_steps"]

    def log_window(step: int) -> None:
        """Reduce the window over the ranks into one train row; the counters stay exact."""
        nonlocal window_start, skips_logged
        flushed = window.flush(strategy)
        if flushed is None:  # every step since the last row was skipped: say so all the same
            if counters["skipped_steps"] > skips_logged:
                metrics.record("train", step, {"lr": strategy.current_lr(), "pairs_seen": counters["pairs_seen"],
                                               "skipped_steps": counters["skipped_steps"]})
                skips_logged = counters["skipped_steps"]
            return
        row, pairs, tokens, groups = flushed
        elapsed = time.perf_counter() - window_start
        counters["pairs_seen"] += pairs
        counters["tokens_seen"] += tokens
        counters["groups_seen"] += groups
        row.update(lr=strategy.current_lr(), pairs_per_s=pairs / elapsed, tokens_per_s=tokens / elapsed,
                   pairs_seen=counters["pairs_seen"], tokens_seen=counters["tokens_seen"],
                   skipped_steps=counters["skipped_steps"])
        if strategy.last_grad_norm is not None:
            row["grad_norm"] = float(strategy.last_grad_norm)
        metrics.record("train", step, row)
        window_start, skips_logged = time.perf_counter(), counters["skipped_steps"]

    def save(step: int, last: dict) -> Path:
        log_window(step)  # the counters a checkpoint stores include every step before it

        def export(folder: Path) -> None:
            export_model(strategy, folder, tokenizer_dir=data.tokenizer_dir, cfg=cfg, eval_metrics=last)

        return save_checkpoint(strategy, out_dir, step=step, keep_last=cfg.train.keep_last,
                               reader_state=reader_state, export=export,
                               trainer_state={**counters, "config": cfg.to_dict(), "metrics": last,
                                              "schedule_steps": horizon, "metrics_rows": metrics.rows})

    # the position saved is the one after the last batch trained on, not the reader's (it reads ahead)
    reader_state = stream.state_dict()
    batches = Prefetcher(iter(stream), depth=cfg.data.prefetch, pin=strategy.device.type == "cuda") \
        if cfg.data.prefetch else iter(stream)
    start_pairs, train_start = counters["pairs_seen"], time.perf_counter()
    last_eval: dict = resume_state.get("metrics", {}) if resume_state else {}
    try:
        model.train()
        while step < total_steps:
            nonfinite = torch.zeros((), dtype=torch.bool, device=strategy.device)
            step_ids: list[str] = []
            for micro in range(cfg.train.grad_accum):
                batch = next(batches)
                reader_state = batch.reader_state
                batch = batch.to(strategy.device)
                step_ids += batch.ids
                with strategy.autocast():
                    output = forward(model, batch, **objective.model_inputs(batch))
                    result = objective(output, batch)
                nonfinite |= ~torch.isfinite(result.loss.detach())
                strategy.backward(result.loss)
                window.add(result.sums, batch.num_tokens, batch.num_groups)
                outcome = strategy.step(nonfinite if micro == cfg.train.grad_accum - 1 else None)
            step += 1
            updated = outcome == "updated"
            window.end_step(updated)
            if not updated:
                counters["skipped_steps"] += 1
                if cfg.train.on_nonfinite == "stop" or outcome == "nonfinite":
                    metrics.close()
                    raise NonFiniteError(_nonfinite_message(step, outcome, strategy.rank, step_ids, out_dir))
                if strategy.is_main:
                    log.warning("step %d skipped: its loss or gradient norm is not finite (train.on_nonfinite=skip); "
                                "groups: %s", step, ", ".join(step_ids[:10]))
            metrics.advance()

            if step % cfg.train.log_every == 0 or step == total_steps:
                log_window(step)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
                last_eval = run_eval()
                metrics.record("eval", step, last_eval)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
                save(step, last_eval)

    finally:
        _close(batches)
    train_seconds = time.perf_counter() - train_start
    log_window(step)
    # the final checkpoint before the final evaluation: an evaluation that fails loses no training
    done = checkpoint is not None and resume_state["step"] == step
    checkpoint_path = checkpoint if done else save(step, last_eval)
    last_eval = run_eval(collect=True)
    if last_eval:
        metrics.record("eval", step, last_eval)
    model_dir = out_dir / "model"
    export_model(strategy, model_dir, tokenizer_dir=data.tokenizer_dir, cfg=cfg, eval_metrics=last_eval)
    metrics.close()
    return {
        **last_eval,
        "steps": step,
        "checkpoint": str(checkpoint_path),
        "model": str(model_dir),
        # a distillation run counts distilled tokens where others count pairs (its metrics rows too)
        "distilled_tokens_per_second" if distill else "pairs_per_second":
            (counters["pairs_seen"] - start_pairs) / train_seconds if train_seconds > 0 else 0.0,
        "train_seconds": round(train_seconds, 2),
        "world_size": strategy.world_size,
        "epochs": round(counters["groups_seen"] / train_groups, 4),
        "skipped_steps": counters["skipped_steps"],
    }


def data_units(folder: Path, distill: bool) -> int:
    """What a split holds: comparison groups, or a logit cache's texts."""
    manifest = read_manifest(folder)
    return manifest["rows"] if distill else manifest["counts"]["groups"]


def _close(batches) -> None:
    if isinstance(batches, Prefetcher):
        batches.close()


def _nonfinite_message(step: int, outcome: str, rank: int, ids: list[str], out_dir: Path) -> str:
    try:
        last = latest_checkpoint(out_dir)
    except Exception as err:  # an unreadable checkpoint must not hide the training error
        last = f"unreadable ({err})"
    updated = ("the weights were not updated" if outcome == "skipped" else
               "DeepSpeed cannot drop a step's gradients, so the run stops here")
    shown = ", ".join(ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
    return (f"step {step}: the loss or the gradient norm is not finite; {updated}. Groups of this step on rank "
            f"{rank}: {shown}. Last good checkpoint: {last or 'none'}; rerun to resume from it (lower train.lr, "
            f"or set train.on_nonfinite=skip to drop such steps)")


def export_model(strategy, model_dir: Path, *, tokenizer_dir: Path, cfg: RunConfig, eval_metrics: dict) -> None:
    """Consolidated weights (whatever the ZeRO stage) as a self-contained model folder; weights
    that are not finite are never written."""
    state = strategy.export_state_dict()  # collective under ZeRO-3: every rank calls it
    bad = []
    if strategy.is_main:
        bad = [name for name, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    bad = strategy.broadcast_object(bad)
    if bad:
        raise NonFiniteError(f"refusing to write {model_dir}: weights are not finite ({', '.join(bad[:5])}"
                             f"{' ...' if len(bad) > 5 else ''})")
    if strategy.is_main:
        model = strategy.unwrapped_model()
        extra = {"config": cfg.to_dict(),
                 "score_stats": {k: eval_metrics[k] for k in ("score_mean", "score_std") if k in eval_metrics}}
        export = PreferenceModel(type(model.transformer)(model.transformer.config), has_lm_head=model.has_lm_head,
                                 reading=model.reading)
        export.load_state_dict(state)
        export.save(model_dir, extra=extra, tokenizer_dir=tokenizer_dir)
    strategy.barrier()
