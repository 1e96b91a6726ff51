"""Training objectives: model output + batch -> loss and the metrics the trainer logs.

    ranked     L_PM = mean over ranked pairs of softplus(r_worse - r_better + margin), the
               margin per group from the data, plus rating_margin * (rating_b - rating_w)
               per pair when the config sets it and the data has ratings
    binary     L_PM on label pairs (the data is binarized before tokenization; see
               rankpm.engine.data.transforms) - the loss is the ranked one with K = 2
    imitation  L_IL = -sum of log p(token) over the preferred response's tokens, averaged
               over preferred responses ("preferred": the best rank of its group)
    PM + LM    pm_weight * L_PM + lm_weight * L_LM, L_LM over the whole preferred sample
               (context, response and end-of-context token), mean per token by default

The objective says what the model must compute (``model_inputs``: LM targets for the
forward, so the LM head runs inside the module under ZeRO-3) and how a trained model
judges comparisons (``judge``: see rankpm.engine.score.judges).

Metrics are returned as tensors (sums, with their counts) so that accumulating them over
micro-batches and ranks needs no host sync until the trainer decides to log.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rankpm.engine.config import ObjectiveConfig
from rankpm.engine.data.schema import Batch
from rankpm.engine.score.judges import judge_for_objective, shifted_targets
from rankpm.engine.model.preference_model import IGNORE_INDEX, ModelOutput
from rankpm.kernels.ranked_loss import ranked_preference_loss


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # differentiable scalar
    # name -> (sum, count): the logged value is sum / count after reduction over
    # micro-batches and ranks.
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]]


def preferred_sequences(ranks: torch.Tensor, group_offsets: torch.Tensor) -> torch.Tensor:
    """(S,) bool: the sequence has the best (lowest) rank of its group (ties: all of them)."""
    sizes = group_offsets[1:] - group_offsets[:-1]
    group_of = torch.repeat_interleave(torch.arange(sizes.numel(), device=ranks.device), sizes)
    best = torch.full((sizes.numel(),), torch.iinfo(torch.int64).max, dtype=torch.int64, device=ranks.device)
    best = best.scatter_reduce(0, group_of, ranks.long(), reduce="amin")
    return ranks.long() == best[group_of]


def lm_targets(batch: Batch, *, response_only: bool) -> torch.Tensor:
    """Next-token targets of the preferred sequences, IGNORE_INDEX elsewhere: (S, T).

    response_only: only the response tokens are predicted (imitation learning); else
    every real token after the first (the whole preferred sample, PM + LM).
    """
    mask = batch.response_mask if response_only else batch.attention_mask.bool()
    keep = mask & preferred_sequences(batch.ranks, batch.group_offsets)[:, None]
    return shifted_targets(batch.input_ids, keep)


def lm_loss(token_logprobs: torch.Tensor, targets: torch.Tensor, reduction: str):
    """(loss, token count, sequence count) of the per-token target log-probs."""
    valid = targets != IGNORE_INDEX
    tokens = valid.sum().float()
    sequences = valid.any(dim=1).sum().float()
    total = -token_logprobs.sum()
    if reduction == "sum":  # summed over tokens, averaged over sequences
        return total / sequences.clamp(min=1), tokens, sequences
    return total / tokens.clamp(min=1), tokens, sequences


class RankedObjective:
    """Bradley-Terry over ranked pairs (binary: over label pairs), plus an optional LM term."""

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        self.judge = judge_for_objective(cfg.name)

    @property
    def needs_lm_head(self) -> bool:
        return self.cfg.lm_loss

    def model_inputs(self, batch: Batch) -> dict:
        return {"lm_targets": lm_targets(batch, response_only=False)} if self.cfg.lm_loss else {}

    def __call__(self, output: ModelOutput, batch: Batch) -> ObjectiveOutput:
        levels = batch.ratings * self.cfg.rating_margin if self.cfg.rating_margin else None
        result = ranked_preference_loss(
            output.scores, batch.ranks, batch.group_offsets, margin=batch.margin, margin_levels=levels,
            pairs=self.cfg.pairs, reduction=self.cfg.reduction, impl=self.cfg.kernel)
        pairs = result.pair_count.float()
        sums = {
            "loss": (result.loss.detach() * pairs, pairs),
            "pair_accuracy": (result.accuracy * pairs, pairs),
            "score_gap": (result.mean_gap * pairs, pairs),
        }
        loss = result.loss
        if self.cfg.lm_loss:
            if output.token_logprobs is None:
                raise ValueError("objective.lm_loss: the model output has no token log-probs; "
                                 "call the model with objective.model_inputs(batch)")
            reduction = "mean" if self.cfg.lm_reduction == "auto" else self.cfg.lm_reduction
            lm, tokens, _ = lm_loss(output.token_logprobs, self.model_inputs(batch)["lm_targets"], reduction)
            loss = self.cfg.pm_weight * result.loss + self.cfg.lm_weight * lm
            sums["pm_loss"] = sums.pop("loss")
            sums["loss"] = (loss.detach() * pairs, pairs)  # counted in pairs: pairs_seen stays pairs
            sums["lm_nll_per_token"] = (-output.token_logprobs.detach().sum(), tokens)
        return ObjectiveOutput(loss, sums)


class ImitationObjective:
    """Language modelling on the preferred response of each group, nothing else."""

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        self.judge = "logprob"

    @property
    def needs_lm_head(self) -> bool:
        return True

    def model_inputs(self, batch: Batch) -> dict:
        return {"lm_targets": lm_targets(batch, response_only=True)}

    def __call__(self, output: ModelOutput, batch: Batch) -> ObjectiveOutput:
        if output.token_logprobs is None:
            raise ValueError("imitation objective: the model output has no token log-probs; "
                             "call the model with objective.model_inputs(batch)")
        reduction = "sum" if self.cfg.lm_reduction == "auto" else self.cfg.lm_reduction
        loss, tokens, sequences = lm_loss(output.token_logprobs, self.model_inputs(batch)["lm_targets"], reduction)
        return ObjectiveOutput(loss, {
            # counted in preferred sequences (there are no pairs): pairs_seen counts them
            "loss": (loss.detach() * sequences, sequences),
            "lm_nll_per_token": (-output.token_logprobs.detach().sum(), tokens),
        })


def build_objective(cfg: ObjectiveConfig):
    if cfg.name in ("ranked", "binary"):
        return RankedObjective(cfg)
    if cfg.name == "imitation":
        return ImitationObjective(cfg)
    raise ValueError(f"objective.name: got {cfg.name!r}, expected 'ranked', 'binary' or 'imitation'")
