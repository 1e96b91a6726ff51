"""Evaluation on held-out comparisons: pair accuracy, loss, score statistics, and the pairs.

    result = evaluate(model, batches, strategy=strategy, judge="score", collect=True)
    result.metrics    # eval_accuracy, eval_loss, score_mean, ...  (reduced over every rank)
    result.pairs      # every response's judgement and every pair's gap, for the report

Scores are computed once per response; every ranked pair (better, worse) of a group is
then judged correct when r_better > r_worse (a tie in score counts as wrong). The report
(rankpm.engine.score.report) is made from the same pass, never from a second scoring.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from rankpm.engine.data.schema import Batch
from rankpm.engine.score.judges import judge as judge_batch
from rankpm.engine.score.report import PairData
from rankpm.kernels.ranked_loss import ranked_preference_loss


class Evaluation(NamedTuple):
    metrics: dict
    pairs: PairData | None  # with collect=True: every rank's pairs, gathered


@torch.no_grad()
def evaluate(model, batches, *, strategy=None, num_batches: int | None = None, judge: str = "score",
             filler: Batch | None = None, collect: bool = False) -> Evaluation:
    """Evaluate over this rank's batches; sums are reduced over every rank.

    ``strategy``: the run's (None: one process, on the model's device). ``num_batches``: when
    given, every rank runs exactly that many forward passes (the global maximum), repeating
    its last batch with zero weight (``filler`` when its share is empty), so that collective
    operations inside the forward (ZeRO-3 parameter gathers) stay in step across ranks.
    ``judge``: how responses are compared (rankpm.engine.score.judges): "score" (preference
    models), "binary" (P(GOOD), on label-expanded data) or "logprob" (imitation models).
    """
    param = next(model.parameters(), None)
    device = strategy.device if strategy is not None else param.device if param is not None else torch.device("cpu")
    autocast = strategy.autocast if strategy is not None else contextlib.nullcontext
    was_training = model.training
    model.eval()
    totals = torch.zeros(6, dtype=torch.float64, device=device)  # pairs, correct, loss, n, sum, sumsq
    pairs = PairData(judge=judge) if collect else None
    seen = 0
    last: Batch | None = None
    for batch in batches:
        last = batch.to(device)
        with autocast():
            judged = judge_batch(model, last, judge)
        totals += _totals(judged)
        if pairs is not None:
            pairs.add(judged, last)
        seen += 1
    if num_batches is not None:
        for _ in range(num_batches - seen):
            if last is None:  # a rank whose share is empty: any batch keeps it in step
                if filler is None:
                    raise RuntimeError(f"rank {strategy.rank} has no evaluation data to keep in step with")
                last = filler.to(device)
            with autocast():
                judge_batch(model, last, judge)  # collectives only; results unused
    model.train(was_training)
    if strategy is not None:
        totals = strategy.all_reduce(totals)
        if pairs is not None and strategy.world_size > 1:
            pairs = PairData.merge(strategy.gather_object(pairs))
    count, correct, loss, n, total, total_sq = totals.tolist()
    mean = total / max(n, 1)
    metrics = {
        "eval_pairs": int(count),
        "eval_accuracy": correct / count if count else float("nan"),
        "eval_loss": loss / count if count else float("nan"),
        "eval_sequences": int(n),
        "score_mean": mean,
        "score_std": math.sqrt(max(total_sq / max(n, 1) - mean * mean, 0.0)),
    }
    return Evaluation(metrics, pairs)


def _totals(judged) -> torch.Tensor:
    scores = judged.scores.float()
    result = ranked_preference_loss(scores, judged.ranks, judged.group_offsets, margin=judged.margin,
                                    reduction="pairs", impl="torch")
    count = result.pair_count.double()
    return torch.stack([count, result.accuracy.double() * count, result.loss.double() * count,
                        torch.tensor(float(scores.numel()), dtype=torch.float64, device=scores.device),
                        scores.double().sum(), scores.double().pow(2).sum()])


@torch.no_grad()
def evaluate_distill(model, cache_dir, *, strategy, pad_id: int, batch_texts: int = 64) -> dict:
    """The student's mean KL to the teacher on a held-out logit cache (over the cached k ids and
    the tail bucket; sampled caches: the cross-entropy to the drawn tokens), and its own next-token
    NLL on those texts. Ranks read alternate texts, every rank runs the global maximum of forward
    passes (repeats with zero weight) so ZeRO-3's gathers stay in step."""
    from rankpm.engine.data.text_batch import DistillStream
    from rankpm.engine.score.judges import forward

    stream = DistillStream(cache_dir, pad_id=pad_id, rank=strategy.rank, world_size=strategy.world_size,
                           shuffle=False, batch_texts=batch_texts, loop=False)
    most = int(strategy.all_reduce(torch.tensor(float(math.ceil(stream.num_groups / batch_texts)),
                                                device=strategy.device), op="max").item())
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=strategy.device)  # kl, tokens, nll, lm targets
    last, seen = None, 0
    for batch in stream:
        last = batch.to(strategy.device)
        with strategy.autocast():
            out = forward(model, last, distill=last.distill, lm_index=last.lm_index, lm_targets=last.lm_targets)
        totals += torch.stack([out.distill.double(), torch.tensor(float(last.distill.index.numel())).to(totals),
                               out.lm.double(), torch.tensor(float(last.lm_targets.numel())).to(totals)])
        seen += 1
    if last is None and seen < most:  # an empty share: any batch keeps this rank in step
        last = next(iter(DistillStream(cache_dir, pad_id=pad_id, shuffle=False, batch_texts=1, loop=False)))
        last = last.to(strategy.device)
    for _ in range(most - seen):
        with strategy.autocast():
            forward(model, last, distill=last.distill)  # collectives only; results unused
    model.train(was_training)
    kl, tokens, nll, targets = strategy.all_reduce(totals).tolist()
    return {"eval_kl": kl / max(tokens, 1), "eval_tokens": int(tokens), "eval_lm_nll": nll / max(targets, 1)}
