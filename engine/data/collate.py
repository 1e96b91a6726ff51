"""Comparison groups -> Batch: rows of packed tokens, in one of three layouts.

    batch = collate(rows, pad_id, eoc_id, layout="shared", targets="sample")
    batch = collate_table(arrow_table, pad_id, eoc_id, layout="shared")    # the reader's path

``stacked`` gives every response its own row, ``context + response + [eoc]``, right-padded
(what every peer trains on); ``packed`` is the same sequences several to a row; ``shared``
gives every group one segment, ``context | r1 [eoc] | r2 [eoc] | ...``, the context once.
In ``shared`` and ``packed`` the units (groups, or sequences) are placed whole into rows by
first-fit decreasing, the rows as long as the longest unit, so padding only ends a row.

Token arrays stay numpy until the batch's tensors are made: no per-token Python objects.
The score position (the end-of-context token) and every LM target's position are recorded
from the lengths, never searched for in the ids, so they stay right when pad_id == eoc_id
or when a text happens to contain the end-of-context token.

LM targets (``targets``, see schema.TARGETS) list, for each next-token prediction, the flat
index of the predicting token and the token to predict: the sample (context[1:], the
response, the eoc) or the response of each preferred response, or every response's own
tokens. In ``shared`` the context's own targets are listed once per preferred response, and
the last context token predicts the first token of each response, so every loss equals
the stacked layout's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rankpm.engine.data.schema import LAYOUTS, TARGETS, Batch, Framing

END = Framing(suffix=(0,), read="end")  # one special token after each response (its id does not count here)


@dataclass
class Groups:
    """Token arrays of G groups: contexts[g] and responses[g][k], numpy int64 views."""

    contexts: list[np.ndarray]
    responses: list[list[np.ndarray]]
    ranks: list[list[int]]
    margin: list[float]
    ratings: list[list[float]]
    turns: list[int]
    ids: list[str]
    sources: list[str]


def groups_from_rows(rows: list[dict]) -> Groups:
    """Rows with the keys of SHARD_SCHEMA (id, source, turns, margin, ratings, ranks, context_ids, response_ids)."""
    for row in rows:
        if len(row["response_ids"]) != len(row["ranks"]):
            raise ValueError(f"collate: group {row['id']!r} has {len(row['response_ids'])} responses and "
                             f"{len(row['ranks'])} ranks")
    return Groups(
        contexts=[np.asarray(r["context_ids"], dtype=np.int64) for r in rows],
        responses=[[np.asarray(x, dtype=np.int64) for x in r["response_ids"]] for r in rows],
        ranks=[list(r["ranks"]) for r in rows],
        margin=[0.0 if r.get("margin") is None else float(r["margin"]) for r in rows],
        ratings=[list(r.get("ratings") or [0.0] * len(r["ranks"])) for r in rows],
        turns=[int(r.get("turns") or 1) for r in rows],
        ids=[r.get("id", "") for r in rows],
        sources=[r.get("source", "") for r in rows],
    )


def groups_from_table(table: pa.Table) -> Groups:
    """The same from an Arrow table of shard rows, through Arrow's flat buffers."""
    def lists(column) -> tuple[np.ndarray, np.ndarray]:  # (offsets, values) of a list column
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        return np.concatenate([[0], np.cumsum(lengths)]), pc.list_flatten(column)

    ctx_off, ctx_values = lists(table.column("context_ids").combine_chunks())
    ctx_values = ctx_values.to_numpy().astype(np.int64)
    k_off, inner = lists(table.column("response_ids").combine_chunks())
    r_off, r_values = lists(inner)
    r_values = r_values.to_numpy().astype(np.int64)
    rank_off, rank_values = lists(table.column("ranks").combine_chunks())
    rank_values = rank_values.to_numpy().tolist()
    ratings = table.column("ratings").to_pylist()
    G = table.num_rows
    responses = []
    for g in range(G):
        responses.append([r_values[r_off[k]:r_off[k + 1]] for k in range(k_off[g], k_off[g + 1])])
    return Groups(
        contexts=[ctx_values[ctx_off[g]:ctx_off[g + 1]] for g in range(G)],
        responses=responses,
        ranks=[rank_values[rank_off[g]:rank_off[g + 1]] for g in range(G)],
        margin=[0.0 if m is None else m for m in table.column("margin").to_pylist()],
        ratings=[r if r is not None else [0.0] * len(responses[g]) for g, r in enumerate(ratings)],
        turns=[int(t or 1) for t in table.column("turns").to_pylist()],
        ids=table.column("id").to_pylist(),
        sources=table.column("source").to_pylist(),
    )


def collate(rows: list[dict], pad_id: int, eoc_id: int, *, layout: str = "stacked", targets: str = "none",
            framing: Framing | None = None) -> Batch:
    if not rows:
        raise ValueError("collate: no rows")
    return build_batch(groups_from_rows(rows), pad_id, eoc_id, layout=layout, targets=targets, framing=framing)


def collate_table(table: pa.Table, pad_id: int, eoc_id: int, *, layout: str = "stacked",
                  targets: str = "none", framing: Framing | None = None) -> Batch:
    if table.num_rows == 0:
        raise ValueError("collate: no rows")
    return build_batch(groups_from_table(table), pad_id, eoc_id, layout=layout, targets=targets, framing=framing)


def unit_lengths(context_len: int, response_lens: list[int], layout: str, framing: Framing = END) -> list[int]:
    """Tokens of the units one group places into rows: its sequences, or itself when shared."""
    if layout == "shared":
        return [context_len + sum(n + framing.specials for n in response_lens)]
    return [context_len + n + framing.specials for n in response_lens]


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[tuple[int, int]]:
    """(row, offset) of each unit: longest first, each into the first row with room."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their order
    fill: list[int] = []
    place: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in order:
        row = next((r for r, used in enumerate(fill) if used + lengths[i] <= capacity), len(fill))
        if row == len(fill):
            fill.append(0)
        place[i] = (row, fill[row])
        fill[row] += lengths[i]
    return place


def build_batch(groups: Groups, pad_id: int, eoc_id: int, *, layout: str, targets: str,
                framing: Framing | None = None) -> Batch:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    if targets not in TARGETS:
        raise ValueError(f"targets={targets!r}: expected one of {TARGETS}")
    framing = framing or Framing(suffix=(eoc_id,), read="end")
    if layout == "shared" and (framing.prefix or framing.read != "end"):
        raise ValueError("the shared layout frames responses at their end only (read='end', no prefix)")
    if framing.read != "end" and targets != "none":
        raise ValueError(f"targets={targets!r}: LM targets need the end reading (a causal backbone)")
    prefix, suffix = np.asarray(framing.prefix, dtype=np.int64), np.asarray(framing.suffix, dtype=np.int64)
    a, z = len(prefix), len(suffix)
    G = len(groups.contexts)
    units: list[tuple[int, int | None]] = []  # (group, response or None for a whole shared group)
    lengths: list[int] = []
    for g in range(G):
        lens = unit_lengths(len(groups.contexts[g]), [len(r) for r in groups.responses[g]], layout, framing)
        units += [(g, None)] if layout == "shared" else [(g, k) for k in range(len(groups.responses[g]))]
        lengths += lens
    T = max(lengths)
    place = [(i, 0) for i in range(len(units))] if layout == "stacked" else first_fit_decreasing(lengths, T)
    R = 1 + max(row for row, _ in place)
    ids = np.full((R, T), pad_id, dtype=np.int64)
    pos = np.zeros((R, T), dtype=np.int64)
    seg = np.zeros((R, T), dtype=np.int32)
    part = np.zeros((R, T), dtype=np.int32)
    segments_in_row = np.zeros(R, dtype=np.int32)
    # flat positions of each response's pieces: (context, response, its last token, where it is read)
    where: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, int, int]] = {}
    for (g, k), (row, start) in zip(units, place):
        segments_in_row[row] += 1
        context = groups.contexts[g]
        m = len(context)
        base = row * T
        if k is None:  # a shared group: the context once, then each response and its eoc
            span = slice(start, start + m)
            ids[row, span], pos[row, span], seg[row, span] = context, np.arange(m), segments_in_row[row]
            ctx_flat = base + np.arange(start, start + m)
            at = start + m
            for j, response in enumerate(groups.responses[g]):
                n = len(response)
                span = slice(at, at + n + z)
                ids[row, at:at + n], ids[row, at + n:at + n + z] = response, suffix
                pos[row, span], seg[row, span], part[row, span] = np.arange(m, m + n + z), segments_in_row[row], j + 1
                last = base + at + n + z - 1
                where[(g, j)] = (ctx_flat, base + np.arange(at, at + n), last, last)
                at += n + z
        else:  # one sequence: prefix, context, response, suffix
            response = groups.responses[g][k]
            n = len(response)
            length = a + m + n + z
            ids[row, start:start + length] = np.concatenate([prefix, context, response, suffix])
            pos[row, start:start + length], seg[row, start:start + length] = np.arange(length), segments_in_row[row]
            body = start + a
            last = base + start + length - 1
            where[(g, k)] = (base + np.arange(body, body + m), base + np.arange(body + m, body + m + n), last,
                             base + start if framing.read == "first" else last)

    score_index, ranks, ratings, offsets = [], [], [], [0]
    for g in range(G):
        for k in range(len(groups.responses[g])):
            score_index.append(where[(g, k)][3])
        ranks += groups.ranks[g]
        ratings += groups.ratings[g]
        offsets.append(len(ranks))
    lm_index, lm_targets, lm_sequence = _lm_targets(groups, where, eoc_id, targets)
    return Batch(
        layout=layout,
        targets=targets,
        input_ids=torch.from_numpy(ids),
        position_ids=torch.from_numpy(pos),
        segment_ids=torch.from_numpy(seg),
        part_ids=torch.from_numpy(part),
        score_index=torch.tensor(score_index, dtype=torch.int64),
        group_offsets=torch.tensor(offsets, dtype=torch.int64),
        ranks=torch.tensor(ranks, dtype=torch.int64),
        margin=torch.tensor(groups.margin, dtype=torch.float32),
        ratings=torch.tensor(ratings, dtype=torch.float32),
        turns=torch.tensor(groups.turns, dtype=torch.int64),
        lm_index=torch.from_numpy(lm_index),
        lm_targets=torch.from_numpy(lm_targets),
        lm_sequence=torch.from_numpy(lm_sequence),
        lm_sequences=len(np.unique(lm_sequence)),
        num_tokens=int(sum(lengths)),
        ids=list(groups.ids),
        sources=list(groups.sources),
    )


def _lm_targets(groups: Groups, where: dict, eoc_id: int, targets: str):
    """(predicting flat index, target token, response number) of every next-token target asked for."""
    index, target, sequence = [], [], []
    s = 0
    for g in range(len(groups.contexts)):
        best = min(groups.ranks[g])
        for k, response in enumerate(groups.responses[g]):
            wanted = targets == "all_responses" or (targets in ("sample", "response") and groups.ranks[g][k] == best)
            if wanted:
                ctx_flat, resp_flat, _, _ = where[(g, k)]
                context = groups.contexts[g]
                # the token before each response token: the last context token, then the response's own
                # (the first response token has none without a context)
                if len(ctx_flat) and len(response):
                    before, after = np.concatenate([ctx_flat[-1:], resp_flat[:-1]]), response
                else:
                    before, after = resp_flat[:-1], response[1:]
                if targets == "sample":
                    last = resp_flat[-1:] if len(resp_flat) else ctx_flat[-1:]
                    before = np.concatenate([ctx_flat[:-1], before, last])
                    after = np.concatenate([context[1:], after, np.full(len(last), eoc_id)])
                index.append(before)
                target.append(after)
                sequence.append(np.full(len(before), s))
            s += 1
    if not index:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    return (np.concatenate(index).astype(np.int64), np.concatenate(target).astype(np.int64),
            np.concatenate(sequence).astype(np.int64))


def layout_tokens(context_lens: np.ndarray, response_lens: list[np.ndarray], layout: str,
                  framing: Framing = END) -> np.ndarray:
    """Real tokens each group takes in a layout (the token-budget measure)."""
    counts = np.array([len(r) for r in response_lens], dtype=np.int64)
    sums = np.array([int(r.sum()) for r in response_lens], dtype=np.int64) + counts * framing.specials
    return context_lens + sums if layout == "shared" else counts * context_lens + sums
