"""Shard rows -> Batch: each sequence is context + response + [eoc], right-padded.

The score position (the end-of-context token) is recorded from the lengths, never
searched for in the ids, so it stays right when pad_id == eoc_id or when a text happens
to contain the end-of-context token.
"""
from __future__ import annotations

import torch

from rankpm.engine.data.schema import Batch


def collate(rows: list[dict], pad_id: int, eoc_id: int) -> Batch:
    """Rows with keys of SHARD_SCHEMA (id, source, turns, margin, ratings, ranks, context_ids, response_ids)."""
    if not rows:
        raise ValueError("collate: no rows")
    sequences, spans, ranks, offsets, ratings = [], [], [], [0], []
    for row in rows:
        context = list(row["context_ids"])
        if len(row["response_ids"]) != len(row["ranks"]):
            raise ValueError(f"collate: group {row['id']!r} has {len(row['response_ids'])} responses and "
                             f"{len(row['ranks'])} ranks")
        for response, rank in zip(row["response_ids"], row["ranks"]):
            sequences.append(context + list(response) + [eoc_id])
            spans.append((len(context), len(context) + len(response)))
            ranks.append(rank)
        ratings.extend(row.get("ratings") or [0.0] * len(row["ranks"]))
        offsets.append(len(sequences))
    S, T = len(sequences), max(len(s) for s in sequences)
    input_ids = torch.full((S, T), pad_id, dtype=torch.int64)  # (S, T)
    attention_mask = torch.zeros((S, T), dtype=torch.int64)
    response_mask = torch.zeros((S, T), dtype=torch.bool)
    for s, (seq, (start, end)) in enumerate(zip(sequences, spans)):
        input_ids[s, :len(seq)] = torch.tensor(seq, dtype=torch.int64)
        attention_mask[s, :len(seq)] = 1
        response_mask[s, start:end] = True
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        score_index=torch.tensor([len(seq) - 1 for seq in sequences], dtype=torch.int64),  # (S,)
        response_mask=response_mask,
        group_offsets=torch.tensor(offsets, dtype=torch.int64),  # (G + 1,)
        ranks=torch.tensor(ranks, dtype=torch.int64),
        margin=torch.tensor([0.0 if r.get("margin") is None else r["margin"] for r in rows], dtype=torch.float32),
        ratings=torch.tensor(ratings, dtype=torch.float32),
        turns=torch.tensor([int(r.get("turns") or 1) for r in rows], dtype=torch.int64),
        ids=[r.get("id", "") for r in rows],
        sources=[r.get("source", "") for r in rows],
    )


def padded_tokens(rows: list[dict]) -> int:
    """S * T of the batch these rows would make (the token-budget measure)."""
    sequences = sum(len(r["response_ids"]) for r in rows)
    longest = max(len(r["context_ids"]) + len(resp) + 1 for r in rows for resp in r["response_ids"])
    return sequences * longest
