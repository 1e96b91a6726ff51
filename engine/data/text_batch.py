"""Texts with cached teacher distributions, packed into rows: the batches of context distillation.

    stream = DistillStream("runs/logits", rank=r, world_size=w, seed=0, batch_texts=32)
    for batch in stream:                      # a TextBatch, batch.reader_state for checkpoints
        out = forward(model, batch, distill=batch.distill)

Each text is one segment (causal within itself), several per row (first fit decreasing, no
text split), positions restarting at 0 per text, as the student reads a text alone. Every
position of a text carries the teacher's distribution of the token after it (the logit
cache's alignment, rankpm.engine.data.logit_shards): ``distill.index`` is its flat position
in the rows, ``distill.ids`` / ``logprobs`` / ``tail`` / ``counts`` the cached entries. The
optional LM term predicts each text's next tokens (positions 0..T-2).

The fields the model's forward reads have the names of a comparison Batch (the packed layout,
no scores), so the one training loop runs either.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np
import torch

from rankpm.engine.data.collate import first_fit_decreasing


class DistillTargets(NamedTuple):
    index: torch.Tensor  # (N,) int64, flat position in R * T of each distilled token
    ids: torch.Tensor  # (N, k) int64 (sampled: -100 marks an empty slot)
    logprobs: torch.Tensor | None  # (N, k) float32, top-k mode
    tail: torch.Tensor | None  # (N,) float32 log tail mass, top-k mode
    counts: torch.Tensor | None  # (N, k) float32, sampled mode
    mode: str  # "topk" or "sampled"

    def to(self, device, non_blocking: bool = True) -> "DistillTargets":
        return DistillTargets(*(v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
                                for v in self))

    def pin_memory(self) -> "DistillTargets":
        return DistillTargets(*(v.pin_memory() if isinstance(v, torch.Tensor) else v for v in self))


@dataclass
class TextBatch:
    input_ids: torch.Tensor  # (R, T) int64, pad_id after a row's last token
    position_ids: torch.Tensor  # (R, T) int64, 0.. within each text
    segment_ids: torch.Tensor  # (R, T) int32, 0 on padding
    part_ids: torch.Tensor  # (R, T) int32, 1 on every text token (one part: no context)
    score_index: torch.Tensor  # (0,) int64: nothing is scored
    distill: DistillTargets
    lm_index: torch.Tensor  # (L,) int64 flat positions predicting the text's next token
    lm_targets: torch.Tensor  # (L,) int64
    num_tokens: int = 0
    ids: list[str] = field(default_factory=list)  # "row N" of the corpus, for messages
    reader_state: dict | None = None
    layout: str = "packed"
    lm_sequences: int = 0

    @property
    def num_groups(self) -> int:  # texts: what the loop counts as groups
        return len(self.ids)

    def to(self, device, non_blocking: bool = True) -> "TextBatch":
        return TextBatch(**{k: v.to(device, non_blocking=non_blocking) if isinstance(v, (torch.Tensor, DistillTargets))
                            else v for k, v in self.__dict__.items()})

    def pin_memory(self) -> "TextBatch":
        return TextBatch(**{k: v.pin_memory() if isinstance(v, (torch.Tensor, DistillTargets)) else v
                            for k, v in self.__dict__.items()})


def collate_texts(rows: list[dict], pad_id: int, mode: str) -> TextBatch:
    """Rows of a LogitStream -> one TextBatch."""
    if not rows:
        raise ValueError("collate_texts: no rows")
    lengths = [len(r["input_ids"]) for r in rows]
    place = first_fit_decreasing(lengths, max(lengths))
    R, T = 1 + max(row for row, _ in place), max(lengths)
    ids = np.full((R, T), pad_id, dtype=np.int64)
    pos = np.zeros((R, T), dtype=np.int64)
    seg = np.zeros((R, T), dtype=np.int32)
    in_row = np.zeros(R, dtype=np.int32)
    index, lm_index, lm_targets = [], [], []
    for r, (row, start), n in zip(rows, place, lengths):
        in_row[row] += 1
        ids[row, start:start + n] = r["input_ids"]
        pos[row, start:start + n] = np.arange(n)
        seg[row, start:start + n] = in_row[row]
        flat = row * T + start + np.arange(n)
        index.append(flat)
        lm_index.append(flat[:-1])
        lm_targets.append(np.asarray(r["input_ids"][1:], dtype=np.int64))
    cat = np.concatenate
    if mode == "topk":
        logprobs = torch.from_numpy(cat([r["logprobs"] for r in rows]).astype(np.float32))
        tail = torch.from_numpy(cat([r["tail_logmass"] for r in rows]).astype(np.float32))
        counts = None
    else:
        logprobs = tail = None
        counts = torch.from_numpy(cat([r["counts"] for r in rows]).astype(np.float32))
    distill = DistillTargets(torch.from_numpy(cat(index)), torch.from_numpy(cat([r["ids"] for r in rows])).long(),
                             logprobs, tail, counts, mode)
    return TextBatch(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(seg),
                     torch.from_numpy((seg > 0).astype(np.int32)), torch.zeros(0, dtype=torch.int64), distill,
                     torch.from_numpy(cat(lm_index)), torch.from_numpy(cat(lm_targets)),
                     num_tokens=int(sum(lengths)), ids=[f"row {r['row']}" for r in rows],
                     lm_sequences=sum(n > 1 for n in lengths))


class DistillStream:
    """Batches of ``batch_texts`` texts from a logit cache, resumable exactly (the reader's state
    after a batch's last text rides on the batch). The reader's state_dict / load_state_dict /
    resume_from are the logit reader's own."""

    def __init__(self, path, *, pad_id: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1024, batch_texts: int = 32, loop: bool = True,
                 interleave: int = 1):
        from rankpm.engine.data.logit_shards import LogitStream

        if batch_texts < 1:
            raise ValueError(f"batch_texts={batch_texts}: expected >= 1")
        self.reader = LogitStream(path, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
                                  shuffle_buffer=shuffle_buffer, loop=loop, interleave=interleave)
        self.manifest = self.reader.manifest
        self.pad_id, self.batch_texts = pad_id, batch_texts

    @property
    def num_groups(self) -> int:  # texts in this rank's share of one pass
        return self.reader.num_rows

    def state_dict(self) -> dict:
        return self.reader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state)

    def resume_from(self, states: list[dict]) -> str:
        return self.reader.resume_from(states)

    def __iter__(self) -> Iterator[TextBatch]:
        rows: list[dict] = []
        for row in self.reader:
            rows.append(row)
            if len(rows) == self.batch_texts:
                yield self._emit(rows)
                rows = []
        if rows:
            yield self._emit(rows)

    def _emit(self, rows: list[dict]) -> TextBatch:
        batch = collate_texts(rows, self.pad_id, self.manifest["mode"])
        batch.reader_state = rows[-1]["reader_state"]
        return batch
