"""The data contract: comparison groups as text, as tokenized Arrow rows, and as batches.

A comparison group is one context with K >= 2 responses and a rank for each
(lower rank = better; equal ranks are ties and form no pair).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import torch

SCHEMA_VERSION = 2  # 2: per-response ratings

# Special tokens every rankpm tokenizer carries (added when a loaded tokenizer lacks them).
END_OF_CONTEXT = "<|endofcontext|>"
PAD = "<|pad|>"


@dataclass
class ComparisonGroup:
    """One context and K ranked responses, as text (what the readers produce)."""

    id: str
    context: str
    responses: list[str]
    ranks: list[int]
    margin: float | None = None
    source: str = ""
    turns: int = 1  # dialogue turns in the context (Human/Assistant exchanges)
    ratings: list[float] | None = None  # higher is better; per-pair margins from their gaps


@dataclass
class LabelledResponse:
    """One response judged good or bad on its own. It is no comparison until label strings
    are appended: the binary objective's transforms make it x+GOOD > x+BAD (or the reverse)."""

    id: str
    context: str
    response: str
    good: bool
    source: str = ""
    turns: int = 1


# One row of a tokenized shard. Token lists already respect the length policy chosen
# at prepare time: len(context_ids) + len(response_ids[k]) + 1 <= max_length.
SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("turns", pa.int32()),
        ("margin", pa.float32()),  # null when the input gave none
        ("ratings", pa.list_(pa.float32())),  # null when the input gave none
        ("ranks", pa.list_(pa.int32())),
        ("context_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.list_(pa.int32()))),
    ],
    metadata={"rankpm_schema_version": str(SCHEMA_VERSION)},
)


@dataclass
class Batch:
    """G comparison groups flattened to S = sum(K_g) sequences.

    Sequence s is ``context + response + [end_of_context]``, right-padded with pad_id.
    The score is read at ``score_index[s]``, recorded here when the batch is built and
    never inferred from padding.
    """

    input_ids: torch.Tensor  # (S, T) int64
    attention_mask: torch.Tensor  # (S, T) int64, 1 on real tokens
    score_index: torch.Tensor  # (S,) int64, position of the end-of-context token
    response_mask: torch.Tensor  # (S, T) bool, True on response tokens only
    group_offsets: torch.Tensor  # (G + 1,) int64, sequences of group g: [off[g], off[g+1])
    ranks: torch.Tensor  # (S,) int64, lower is better
    margin: torch.Tensor  # (G,) float32, 0 where the input gave none
    ratings: torch.Tensor  # (S,) float32, 0 where the input gave none
    turns: torch.Tensor  # (G,) int64
    ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    @property
    def num_groups(self) -> int:
        return self.group_offsets.numel() - 1

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> "Batch":
        moved = {
            name: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for name, value in self.__dict__.items()
        }
        return Batch(**moved)
