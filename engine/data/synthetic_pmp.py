"""Synthetic data for the paper's experiments: graded rankings and a cheap pre-training source.

Built on the engine's HHH generator (rankpm.engine.data.synthetic, reused, not changed):

* ``finetune``: its HHH groups (helpful / honest / harmless sources, 1-2 turns, K
  responses ranked by a *graded* quality: answers +3, hedges +3, "not sure" +1, tone
  +1/-2, closing +0.5, ...). Graded rankings carry what a good/bad label cannot: which of
  two acceptable answers is better.
* ``pretrain`` ("forum"): a large, cheap, noisier source in a different format - a forum
  question ``"Question: ...\\nAnswer:"`` with no dialogue - whose answers are drawn from the
  same response model (so what it teaches can transfer) but ranked by a noisy vote count
  (quality + N(0, ``vote_noise``) rounded), and a fraction ``flip`` of groups has its votes
  shuffled entirely (spam, brigading).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from rankpm.engine.data import synthetic
from rankpm.engine.data.schema import ComparisonGroup


def _as_group(row: dict) -> ComparisonGroup:
    return ComparisonGroup(id=row["id"], context=row["prompt"], responses=row["responses"], ranks=row["ranks"],
                           source=row["source"], turns=row["turns"])


def pretrain_group(rng: random.Random, i: int, k: int, *, flip: float, vote_noise: float) -> ComparisonGroup:
    kind = rng.choice(["helpful", "honest", "harmless"])
    if kind == "helpful":
        topic = rng.choice(synthetic.TASKS); question = f"how do i {topic[0]}"
    elif kind == "honest":
        topic = rng.choice(synthetic.FACTS); question = f"what is {topic[0]}"
    else:
        topic = None; question = f"how can i {rng.choice(synthetic.HARMS)}"
    responses, votes = [], []
    for _ in range(k):
        text, quality = synthetic._response(rng, kind, topic)
        responses.append(text); votes.append(round(quality + rng.gauss(0.0, vote_noise)))
    if rng.random() < flip:
        rng.shuffle(votes)
    if len(set(votes)) == 1:  # no pair otherwise
        votes[-1] -= 1
    return ComparisonGroup(id=f"forum-{i}", context=f"Question: {question}?\nAnswer:", responses=responses,
                           ranks=synthetic.dense_ranks(votes), source="forum", turns=1)


def generate_groups(kind: str, groups: int, seed: int, *, k_min: int = 2, k_max: int = 4,
                    flip: float = 0.2, vote_noise: float = 1.5) -> list[ComparisonGroup]:
    """``groups`` comparison groups of the ``finetune`` or ``pretrain`` distribution; deterministic."""
    if kind not in ("finetune", "pretrain"):
        raise ValueError(f"kind={kind!r}: expected 'finetune' or 'pretrain'")
    rng = random.Random(f"rankpm-pmp-{kind}-{seed}")
    if kind == "finetune":
        return [_as_group(synthetic.make_group(rng, i, rng.randint(k_min, k_max))) for i in range(groups)]
    return [pretrain_group(rng, i, rng.randint(k_min, k_max), flip=flip, vote_noise=vote_noise)
            for i in range(groups)]


def write_jsonl(groups, path: str | Path) -> Path:
    """Ranked-list JSONL rows {id, context, responses, ranks, source, turns[, margin, ratings]}, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for g in groups:
            row = {"id": g.id, "context": g.context, "responses": g.responses, "ranks": g.ranks,
                   "source": g.source, "turns": g.turns}
            if g.margin is not None:
                row["margin"] = g.margin
            if g.ratings is not None:
                row["ratings"] = g.ratings
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path
