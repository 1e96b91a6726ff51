"""How long a run is and how its learning rate moves: steps from epochs, the optimizer, the schedule.

``epochs`` means epochs: a step that would take more groups than the training data holds
is refused, and the run reports how many passes over the data its steps make.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rankpm.engine.config import ConfigError, RunConfig


@dataclass(frozen=True)
class StepPlan:
    total_steps: int
    groups_per_step: int | None  # None with token-budget batches (groups per step vary)
    epochs: float | None  # passes over the training data the steps make, when known


def plan_steps(cfg: RunConfig, train_groups: int, world_size: int) -> StepPlan:
    """max_steps, or the steps that cover ``epochs`` passes at batch_groups per micro-batch."""
    t, d = cfg.train, cfg.data
    if d.tokens_per_batch is not None:
        if t.max_steps is None:
            raise ConfigError("train.max_steps: required with data.tokens_per_batch (token-budget batches hold a varying "
                              "number of groups, so train.epochs cannot be turned into steps)")
        return StepPlan(t.max_steps, None, None)
    per_step = d.batch_groups * world_size * t.grad_accum
    if per_step > train_groups:
        raise ConfigError(f"data.batch_groups: one step takes {per_step} groups ({d.batch_groups} groups x "
                          f"{world_size} ranks x train.grad_accum {t.grad_accum}), more than the {train_groups} "
                          f"the training data holds: every step would pass over the data more than once; lower "
                          f"data.batch_groups or train.grad_accum")
    total = t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * train_groups / per_step))
    return StepPlan(total, per_step, total * per_step / train_groups)


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)  # no decay on biases and norms
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas)


def build_scheduler(optimizer, cfg: RunConfig, horizon: int):
    """Linear warmup, then cosine (or linear) decay to lr * min_lr_ratio at ``horizon`` steps,
    flat after it."""
    warmup, floor, shape = cfg.train.warmup_steps, cfg.train.min_lr_ratio, cfg.train.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, horizon - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1 - progress
        return floor + (1 - floor) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
