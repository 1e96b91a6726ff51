"""Training objectives: model output + batch -> loss and the metrics the trainer logs.

Metrics are returned as tensors (sums, with their counts) so that accumulating them over
micro-batches and ranks needs no host sync until the trainer decides to log.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rankpm.engine.config import ObjectiveConfig
from rankpm.engine.data.schema import Batch
from rankpm.engine.model import ModelOutput
from rankpm.kernels.ranked_loss import ranked_preference_loss


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # differentiable scalar
    # name -> (sum, count): the logged value is sum / count after reduction over
    # micro-batches and ranks.
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]]


class RankedObjective:
    """Bradley-Terry over all ranked pairs (or adjacent pairs) of each comparison group."""

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg

    @property
    def needs_lm_head(self) -> bool:
        return False

    def __call__(self, output: ModelOutput, batch: Batch) -> ObjectiveOutput:
        result = ranked_preference_loss(
            output.scores, batch.ranks, batch.group_offsets, margin=batch.margin,
            pairs=self.cfg.pairs, reduction=self.cfg.reduction, impl=self.cfg.kernel)
        pairs = result.pair_count.float()
        return ObjectiveOutput(result.loss, {
            "loss": (result.loss.detach() * pairs, pairs),
            "pair_accuracy": (result.accuracy * pairs, pairs),
            "score_gap": (result.mean_gap * pairs, pairs),
        })


def build_objective(cfg: ObjectiveConfig):
    if cfg.name == "ranked":
        return RankedObjective(cfg)
    raise ValueError(f"objective.name: got {cfg.name!r}, expected 'ranked'")
