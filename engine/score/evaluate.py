"""Evaluation on held-out comparisons: pair accuracy, loss, score statistics.

Scores are computed once per sequence; every ranked pair (better, worse) of a group is
then judged correct when r_better > r_worse (a tie in score counts as wrong).
"""
from __future__ import annotations

import math

import torch

from rankpm.engine.data.schema import Batch
from rankpm.engine.score.judges import judge as judge_batch
from rankpm.kernels.ranked_loss import ranked_preference_loss


@torch.no_grad()
def evaluate(model, batches, *, strategy, num_batches: int | None = None, judge: str = "score",
             filler: Batch | None = None) -> dict:
    """Evaluate over this rank's batches; sums are reduced over every rank.

    ``num_batches``: when given, every rank runs exactly that many forward passes (the
    global maximum), repeating its last batch with zero weight (``filler`` when its share is
    empty), so that collective operations inside the forward (ZeRO-3 parameter gathers)
    stay in step across ranks.
    ``judge``: how responses are compared (rankpm.engine.score.judges): "score" (preference
    models), "binary" (P(GOOD), on label-expanded data) or "logprob" (imitation models).
    """
    model.eval()
    device = strategy.device
    totals = torch.zeros(6, dtype=torch.float64, device=device)  # pairs, correct, loss, n, sum, sumsq
    seen = 0
    last: Batch | None = None
    for batch in batches:
        last = batch.to(device)
        totals += _batch_totals(model, last, strategy, judge)
        seen += 1
    if num_batches is not None:
        for _ in range(num_batches - seen):
            if last is None:  # a rank whose share is empty: any batch keeps it in step
                if filler is None:
                    raise RuntimeError(f"rank {strategy.rank} has no evaluation data to keep in step with")
                last = filler.to(device)
            _batch_totals(model, last, strategy, judge)  # collectives only; results unused
    model.train()
    pairs, correct, loss, n, total, total_sq = strategy.all_reduce(totals).tolist()
    mean = total / max(n, 1)
    return {
        "eval_pairs": int(pairs),
        "eval_accuracy": correct / pairs if pairs else float("nan"),
        "eval_loss": loss / pairs if pairs else float("nan"),
        "eval_sequences": int(n),
        "score_mean": mean,
        "score_std": math.sqrt(max(total_sq / max(n, 1) - mean * mean, 0.0)),
    }


def _batch_totals(model, batch: Batch, strategy, judge: str = "score") -> torch.Tensor:
    with strategy.autocast():
        judged = judge_batch(model, batch, judge)
    scores = judged.scores.float()
    result = ranked_preference_loss(scores, judged.ranks, judged.group_offsets, margin=judged.margin,
                                    reduction="pairs", impl="torch")
    pairs = result.pair_count.double()
    return torch.stack([pairs, result.accuracy.double() * pairs, result.loss.double() * pairs,
                        torch.tensor(float(scores.numel()), dtype=torch.float64, device=scores.device),
                        scores.double().sum(), scores.double().pow(2).sum()])
