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

JUDGES = ("score", "binary", "logprob")


class Judged(NamedTuple):
    scores: torch.Tensor  # (S',) float32 judgement per response
    ranks: torch.Tensor  # (S',) int64
    group_offsets: torch.Tensor  # (G + 1,)
    margin: torch.Tensor  # (G,)


def judge_for_objective(name: str) -> str:
    return {"ranked": "score", "binary": "binary", "imitation": "logprob", "distill": "logprob"}[name]


def batch_targets(kind: str) -> str:
    """The LM targets a judge needs its batches to carry (rankpm.engine.data.schema.TARGETS)."""
    return "all_responses" if kind == "logprob" else "none"


def forward(model, batch: Batch, **lm):
    """The model on a batch, in the batch's layout."""
    return model(batch.input_ids, batch.position_ids, batch.segment_ids, batch.part_ids, batch.score_index,
                 layout=batch.layout, **lm)


def judge(model, batch: Batch, kind: str) -> Judged:
    if kind == "score":
        return Judged(forward(model, batch).scores.float(), batch.ranks, batch.group_offsets, batch.margin)
    if kind == "binary":
        return binary_logits(forward(model, batch).scores.float(), batch.ranks, batch.group_offsets, batch.margin)
    if kind == "logprob":
        if batch.targets != "all_responses":
            raise ValueError("logprob judge: the batch carries no response targets; build it with "
                             "targets='all_responses'")
        logprobs = forward(model, batch, lm_index=batch.lm_index, lm_targets=batch.lm_targets, lm_reduction="none").lm
        S = batch.num_sequences
        totals = logprobs.new_zeros(S).index_add_(0, batch.lm_sequence, logprobs)
        counts = logprobs.new_zeros(S).index_add_(0, batch.lm_sequence, torch.ones_like(logprobs))
        return Judged(totals / counts.clamp(min=1), batch.ranks, batch.group_offsets, batch.margin)
    raise ValueError(f"judge={kind!r}: expected one of {JUDGES}")


def binary_logits(scores, ranks, group_offsets, margin) -> Judged:
    """Label-expanded groups (2K responses: x+GOOD, x+BAD per response) -> K logits each."""
    if scores.numel() % 2 or bool((group_offsets % 2).any()):
        raise ValueError("binary judge: groups must be label-expanded (an even number of responses, "
                         "x+GOOD then x+BAD for each); prepare the evaluation data with transform=label_expand")
    return Judged(scores[0::2] - scores[1::2], ranks[0::2], group_offsets // 2, margin)
