"""The training loop. One copy: cluster/ runs it on every rank with a DeepSpeed strategy.

    summary = train(load_config("configs/quickstart.yaml"))

Step-based: a step is ``grad_accum`` micro-batches on every rank. The reader loops over
epochs, so no rank runs out of batches before the others. Resuming from
OUT_DIR/checkpoints/latest restores weights, optimizer, scheduler, RNG and the reader's
exact position, so a resumed run sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from rankpm.engine.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, seed_everything
from rankpm.engine.config import RunConfig
from rankpm.engine.data.stream import ComparisonStream
from rankpm.engine.data.tokenizer import load_tokenizer
from rankpm.engine.score.evaluate import evaluate
from rankpm.engine.train.metrics import MetricsLog
from rankpm.engine.model.preference_model import PreferenceModel
from rankpm.engine.train.objectives import build_objective
from rankpm.engine.data.run_data import resolve_run_data
from rankpm.engine.train.strategy import LocalStrategy

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def local_strategy(cfg: RunConfig) -> LocalStrategy:
    t = cfg.train
    return LocalStrategy(device=resolve_device(t.device), grad_accum=t.grad_accum,
                         grad_clip=t.grad_clip, precision=t.precision)


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)  # no decay on biases and norms
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas)


def build_scheduler(optimizer, cfg: RunConfig, total_steps: int):
    warmup, floor = cfg.train.warmup_steps, cfg.train.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def count_steps(cfg: RunConfig, train_groups: int, world_size: int) -> int:
    """max_steps, or the steps that cover ``epochs`` passes at batch_groups per micro-batch."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    per_step = cfg.data.batch_groups * world_size * cfg.train.grad_accum
    return max(1, math.ceil(cfg.train.epochs * train_groups / per_step))


def train(cfg: RunConfig, strategy=None, *, on_record=None) -> dict:
    """Train (or resume) the run in ``cfg.train.out_dir``; return the final summary.

    ``strategy`` defaults to one local process; cluster/ passes a DeepSpeed strategy.
    ``on_record`` receives every metrics row on the main rank (the cluster forwards them
    to the driver).
    """
    strategy = strategy or local_strategy(cfg)
    out_dir = Path(cfg.train.out_dir)
    checkpoint = latest_checkpoint(out_dir)
    data = resolve_run_data(cfg, strategy, keep_prepared=checkpoint is not None)
    tokenizer = load_tokenizer(str(data.tokenizer_dir))
    objective = build_objective(cfg.objective)

    seed_everything(cfg.train.seed)  # the same initial weights on every rank
    model = PreferenceModel.build(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                                  eoc_id=tokenizer.eoc_id, max_length=cfg.data.max_length,
                                  with_lm_head=objective.needs_lm_head, tokenizer=tokenizer.identity())
    stream = ComparisonStream(data.train_dir, rank=strategy.rank, world_size=strategy.world_size,
                              seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                              batch_groups=cfg.data.batch_groups, max_tokens=cfg.data.max_tokens, loop=True)
    total_groups = stream.manifest["counts"]["groups"]
    total_steps = count_steps(cfg, total_groups, strategy.world_size)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model = strategy.setup(model, optimizer, scheduler)

    step, pairs_seen, tokens_seen = 0, 0, 0
    resumed: dict = {}
    rank_seed = cfg.train.seed + 7919 * strategy.rank  # per-rank dropout streams
    if checkpoint is not None:
        trainer_state, readers = load_checkpoint(strategy, checkpoint, fresh_seed=rank_seed)
        step, pairs_seen, tokens_seen = (trainer_state["step"], trainer_state["pairs_seen"],
                                         trainer_state["tokens_seen"])
        resumed = {"checkpoint": str(checkpoint), "step": step, "ranks_before": len(readers)}
        how = ""
        if len(readers) == strategy.world_size:
            stream.load_state_dict(readers[strategy.rank])
        else:
            resumed["reader_mapping"] = stream.resume_from(readers)
            how = f" with {strategy.world_size} ranks instead of {len(readers)}: {resumed['reader_mapping']}"
        if strategy.is_main:
            log.info("resumed from %s at step %d%s", checkpoint, step, how)
    else:
        seed_everything(rank_seed)

    metrics = MetricsLog(out_dir, enabled=strategy.is_main, total_steps=total_steps,
                         progress=cfg.train.progress, initial_step=step, on_record=on_record)
    if strategy.is_main:
        metrics.record("config", step, {"config": cfg.to_dict(), "total_steps": total_steps,
                                        "world_size": strategy.world_size,
                                        "train_groups": total_groups, **({"resumed": resumed} if resumed else {})})

    def run_eval() -> dict:
        if data.eval_dir is None:
            return {}
        # ranks alternate group by group (evaluation needs no layout parity, only coverage)
        eval_stream = ComparisonStream(data.eval_dir, rank=strategy.rank, world_size=strategy.world_size,
                                       shuffle=False, batch_groups=cfg.data.eval_batch_groups, loop=False,
                                       interleave=1)
        local = torch.tensor(float(math.ceil(eval_stream.num_groups / cfg.data.eval_batch_groups)),
                             device=strategy.device)
        most = int(strategy.all_reduce(local, op="max").item())
        filler = None
        if eval_stream.num_groups == 0:  # more ranks than evaluation groups
            filler = next(iter(ComparisonStream(data.eval_dir, shuffle=False, batch_groups=1, loop=False)))
        return evaluate(model, eval_stream, strategy=strategy, num_batches=most, judge=objective.judge,
                        filler=filler)

    def save(step: int, last: dict) -> Path:
        def export(folder: Path) -> None:
            export_model(strategy, folder, tokenizer_dir=data.tokenizer_dir, cfg=cfg, eval_metrics=last)

        return save_checkpoint(strategy, out_dir, step=step, keep_last=cfg.train.keep_last,
                               reader_state=stream.state_dict(), export=export,
                               trainer_state={"pairs_seen": pairs_seen, "tokens_seen": tokens_seen,
                                              "config": cfg.to_dict(), "metrics": last})

    batches = iter(stream)
    window: dict[str, list] = {}
    window_start, train_start, start_pairs = time.perf_counter(), time.perf_counter(), pairs_seen
    last_eval: dict = {}
    model.train()
    while step < total_steps:
        for _ in range(cfg.train.grad_accum):
            batch = next(batches).to(strategy.device)
            with strategy.autocast():
                output = model(batch.input_ids, batch.attention_mask, batch.score_index,
                               **objective.model_inputs(batch))
                result = objective(output, batch)
            strategy.backward(result.loss)
            strategy.step()
            for name, (total, count) in result.sums.items():
                acc = window.setdefault(name, [torch.zeros((), device=strategy.device),
                                               torch.zeros((), device=strategy.device)])
                acc[0] += total.detach().float()
                acc[1] += count.detach().float()
            tokens = window.setdefault("_tokens", [torch.zeros((), device=strategy.device), None])
            tokens[0] += batch.attention_mask.sum()
        step += 1
        metrics.advance()

        if step % cfg.train.log_every == 0 or step == total_steps:
            names = sorted(k for k in window if not k.startswith("_"))
            packed = torch.stack([window[n][i] for n in names for i in (0, 1)] + [window["_tokens"][0]])
            packed = strategy.all_reduce(packed).tolist()  # the only host sync of a step
            elapsed = time.perf_counter() - window_start
            row = {n: packed[2 * i] / max(packed[2 * i + 1], 1.0) for i, n in enumerate(names)}
            window_pairs, window_tokens = int(packed[names.index("loss") * 2 + 1]), int(packed[-1])
            pairs_seen += window_pairs
            tokens_seen += window_tokens
            row.update(lr=strategy.current_lr(), pairs_per_s=window_pairs / elapsed,
                       tokens_per_s=window_tokens / elapsed, pairs_seen=pairs_seen)
            if strategy.last_grad_norm is not None:
                row["grad_norm"] = float(strategy.last_grad_norm)
            metrics.record("train", step, row)
            window, window_start = {}, time.perf_counter()

        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
            last_eval = run_eval()
            metrics.record("eval", step, last_eval)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
            save(step, last_eval)

    train_seconds = time.perf_counter() - train_start
    last_eval = run_eval()
    if last_eval:
        metrics.record("eval", step, last_eval)
    checkpoint_path = save(step, last_eval)
    model_dir = out_dir / "model"
    export_model(strategy, model_dir, tokenizer_dir=data.tokenizer_dir, cfg=cfg, eval_metrics=last_eval)
    metrics.close()
    summary = {
        **{k: v for k, v in last_eval.items()},
        "steps": step,
        "checkpoint": str(checkpoint_path),
        "model": str(model_dir),
        "pairs_per_second": (pairs_seen - start_pairs) / train_seconds if train_seconds > 0 else 0.0,
        "train_seconds": round(train_seconds, 2),
        "world_size": strategy.world_size,
    }
    return summary


def export_model(strategy, model_dir: Path, *, tokenizer_dir: Path, cfg: RunConfig, eval_metrics: dict) -> None:
    """Consolidated weights (whatever the ZeRO stage) as a self-contained model folder."""
    state = strategy.export_state_dict()  # collective under ZeRO-3: every rank calls it
    if strategy.is_main:
        model = strategy.unwrapped_model()
        extra = {"config": cfg.to_dict(),
                 "score_stats": {k: eval_metrics[k] for k in ("score_mean", "score_std") if k in eval_metrics}}
        export = PreferenceModel(type(model.transformer)(model.transformer.config), has_lm_head=model.has_lm_head)
        export.load_state_dict(state)
        export.save(model_dir, extra=extra, tokenizer_dir=tokenizer_dir)
    strategy.barrier()
