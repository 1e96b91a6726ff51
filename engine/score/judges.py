"""How a trained model judges comparison groups, one way per objective.

A judge maps (model, batch) to one judgement score per response, plus the group layout
those scores belong to; the better response should get the higher judgement.

    "score":   the preference-model score r(x)                       (ranked, PM + LM)
    "binary":  logit P(GOOD | x) = r(x + GOOD) - r(x + BAD), on label-expanded groups
               (rankpm.engine.data.transforms.label_expand: responses x1+GOOD, x1+BAD, ...)
    "logprob": mean per-token log-probability of the response tokens  (imitation learning)

Comparing P(GOOD) = sigmoid(logit) between responses is comparing logits (sigmoid is
increasing), and sigmoid(logit_i - logit_j) is what calibration reads.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from rankpm.engine.data.schema import Batch
from rankpm.engine.model.preference_model import IGNORE_INDEX

JUDGES = ("score", "binary", "logprob")


class Judged(NamedTuple):
    scores: torch.Tensor  # (S',) float32 judgement per response
    ranks: torch.Tensor  # (S',) int64
    group_offsets: torch.Tensor  # (G + 1,)
    margin: torch.Tensor  # (G,)


def judge_for_objective(name: str) -> str:
    return {"ranked": "score", "binary": "binary", "imitation": "logprob"}[name]


def shifted_targets(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """lm_targets[s, t] = input_ids[s, t + 1] where mask[s, t + 1], else IGNORE_INDEX: (S, T)."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = torch.where(mask[:, 1:].bool(), input_ids[:, 1:], IGNORE_INDEX)
    return targets


def judge(model, batch: Batch, kind: str) -> Judged:
    if kind == "score":
        scores = model(batch.input_ids, batch.attention_mask, batch.score_index).scores.float()
        return Judged(scores, batch.ranks, batch.group_offsets, batch.margin)
    if kind == "binary":
        scores = model(batch.input_ids, batch.attention_mask, batch.score_index).scores.float()
        return binary_logits(scores, batch.ranks, batch.group_offsets, batch.margin)
    if kind == "logprob":
        targets = shifted_targets(batch.input_ids, batch.response_mask)
        logprobs = model(batch.input_ids, batch.attention_mask, batch.score_index, lm_targets=targets).token_logprobs
        counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        return Judged(logprobs.sum(dim=1) / counts, batch.ranks, batch.group_offsets, batch.margin)
    raise ValueError(f"judge={kind!r}: expected one of {JUDGES}")


def binary_logits(scores, ranks, group_offsets, margin) -> Judged:
    """Label-expanded groups (2K responses: x+GOOD, x+BAD per response) -> K logits each."""
    if scores.numel() % 2 or bool((group_offsets % 2).any()):
        raise ValueError("binary judge: groups must be label-expanded (an even number of responses, "
                         "x+GOOD then x+BAD for each); prepare the evaluation data with transform=label_expand")
    return Judged(scores[0::2] - scores[1::2], ranks[0::2], group_offsets // 2, margin)
