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
    distill    context distillation from a logit cache: L_KL = mean over the texts' tokens of
               KL(teacher || student) over the cached k ids and one tail bucket (sampled
               caches: the cross-entropy to the drawn tokens), distill_weight * L_KL, plus
               lm_weight * L_LM on the texts' own next tokens when lm_loss is set

The objective says which LM targets its batches carry (``targets``, made when the batch is
built), what the model must compute (``model_inputs``: the targets for the forward, so the
LM head runs inside the module under ZeRO-3) and how a trained model judges comparisons
(``judge``: see rankpm.engine.score.judges).

Metrics are returned as tensors (sums, with their counts) so that accumulating them over
micro-batches and ranks needs no host sync until the trainer decides to log.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rankpm.engine.config import ObjectiveConfig
from rankpm.engine.data.schema import Batch
from rankpm.engine.model.preference_model import ModelOutput
from rankpm.engine.score.judges import judge_for_objective
from rankpm.kernels.ranked_loss import ranked_preference_loss


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # differentiable scalar
    # name -> (sum, count): the logged value is sum / count after reduction over
    # micro-batches and ranks.
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]]


def lm_loss(nll_sum: torch.Tensor, batch: Batch, reduction: str) -> torch.Tensor:
    """The LM term from the summed NLL of the batch's targets; the counts are the batch's own
    (known when it was built, so no sync): per sequence ("sum") or per token ("mean")."""
    if reduction == "sum":  # summed over tokens, averaged over sequences
        return nll_sum / max(batch.lm_sequences, 1)
    return nll_sum / max(batch.lm_targets.numel(), 1)


class RankedObjective:
    """Bradley-Terry over ranked pairs (binary: over label pairs), plus an optional LM term."""

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        self.judge = judge_for_objective(cfg.name)
        self.targets = "sample" if cfg.lm_loss else "none"  # what the batches carry

    @property
    def needs_lm_head(self) -> bool:
        return self.cfg.lm_loss

    def model_inputs(self, batch: Batch) -> dict:
        return {"lm_index": batch.lm_index, "lm_targets": batch.lm_targets} if self.cfg.lm_loss else {}

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
            if output.lm is None:
                raise ValueError("objective.lm_loss: the model output has no LM term; "
                                 "call the model with objective.model_inputs(batch)")
            reduction = "mean" if self.cfg.lm_reduction == "auto" else self.cfg.lm_reduction
            lm = lm_loss(output.lm, batch, reduction)
            loss = self.cfg.pm_weight * result.loss + self.cfg.lm_weight * lm
            sums["pm_loss"] = sums.pop("loss")
            sums["loss"] = (loss.detach() * pairs, pairs)  # counted in pairs: pairs_seen stays pairs
            sums["lm_nll_per_token"] = (output.lm.detach(), torch.tensor(float(batch.lm_targets.numel())))
        return ObjectiveOutput(loss, sums)


class ImitationObjective:
    """Language modelling on the preferred response of each group, nothing else."""

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        self.judge = "logprob"
        self.targets = "response"

    @property
    def needs_lm_head(self) -> bool:
        return True

    def model_inputs(self, batch: Batch) -> dict:
        return {"lm_index": batch.lm_index, "lm_targets": batch.lm_targets}

    def __call__(self, output: ModelOutput, batch: Batch) -> ObjectiveOutput:
        if output.lm is None:
            raise ValueError("imitation objective: the model output has no LM term; "
                             "call the model with objective.model_inputs(batch)")
        reduction = "sum" if self.cfg.lm_reduction == "auto" else self.cfg.lm_reduction
        loss = lm_loss(output.lm, batch, reduction)
        sequences = torch.tensor(float(batch.lm_sequences))
        return ObjectiveOutput(loss, {
            # counted in preferred sequences (there are no pairs): pairs_seen counts them
            "loss": (loss.detach() * sequences, sequences),
            "lm_nll_per_token": (output.lm.detach(), torch.tensor(float(batch.lm_targets.numel()))),
        })


class DistillObjective:
    """The student's KL to a cached teacher on plain texts (rankpm.engine.data.text_batch)."""

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        self.judge = "logprob"  # a language model compares responses by their mean log-prob
        self.targets = "none"

    @property
    def needs_lm_head(self) -> bool:
        return True

    def model_inputs(self, batch) -> dict:
        lm = {"lm_index": batch.lm_index, "lm_targets": batch.lm_targets} if self.cfg.lm_loss else {}
        return {"distill": batch.distill, **lm}

    def __call__(self, output: ModelOutput, batch) -> ObjectiveOutput:
        if output.distill is None:
            raise ValueError("distill objective: the model output has no distillation term; "
                             "call the model with objective.model_inputs(batch)")
        tokens = float(batch.distill.index.numel())  # known on the host: no sync
        loss = self.cfg.distill_weight * output.distill / max(tokens, 1.0)
        lm_sums = {}
        if self.cfg.lm_loss:
            reduction = "sum" if self.cfg.lm_reduction == "sum" else "mean"
            loss = loss + self.cfg.lm_weight * lm_loss(output.lm, batch, reduction)
            lm_sums = {"lm_nll_per_token": (output.lm.detach(), torch.tensor(float(batch.lm_targets.numel())))}
        count = torch.tensor(tokens)
        # counted in distilled tokens (there are no pairs): pairs_seen counts them
        return ObjectiveOutput(loss, {"loss": (loss.detach() * count, count),
                                      "kl": (output.distill.detach(), count), **lm_sums})


def build_objective(cfg: ObjectiveConfig):
    if cfg.name in ("ranked", "binary"):
        return RankedObjective(cfg)
    if cfg.name == "imitation":
        return ImitationObjective(cfg)
    if cfg.name == "distill":
        return DistillObjective(cfg)
    raise ValueError(f"objective.name: got {cfg.name!r}, expected 'ranked', 'binary', 'imitation' or 'distill'")
