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


@dataclass(frozen=True)
class Framing:
    """The special tokens around each sequence, and which of its positions is read."""

    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    read: str = "end"  # "end": the last suffix token; "first": the first prefix token

    @property
    def specials(self) -> int:
        return len(self.prefix) + len(self.suffix)


LAYOUTS = ("stacked", "shared", "packed")
# What the LM targets of a batch cover: none; the preferred sequences' whole sample (PM + LM);
# their responses only (imitation learning); every sequence's response (the log-prob judge).
TARGETS = ("none", "sample", "response", "all_responses")


@dataclass
class Batch:
    """G comparison groups (S = sum K_g responses) laid out in R rows of T tokens.

    Layouts (rankpm.engine.data.collate):
      stacked  one row per response: context + response + [eoc], as every peer trains;
      shared   one segment per group: context, then each response + [eoc] after it; each
               response sees the context and itself only, its positions continue from the
               context's end, so its score equals the stacked one (causal backbones);
      packed   one segment per response, as stacked, several per row (encoders).
    Groups are packed whole into rows no longer than the longest group; rows end in padding
    (segment 0). The attention mask is the model's to build from segment_ids and part_ids.
    Scores are read at ``score_index`` (flat, into R * T), recorded here and never inferred
    from padding.
    """

    layout: str
    targets: str  # which LM targets lm_* hold (TARGETS)
    input_ids: torch.Tensor  # (R, T) int64, pad_id after a row's last token
    position_ids: torch.Tensor  # (R, T) int64, positions as each sequence sees them
    segment_ids: torch.Tensor  # (R, T) int32, 0 on padding; tokens attend within their segment only
    part_ids: torch.Tensor  # (R, T) int32, 0: context; k + 1: response k with its eoc (sees part 0 and k + 1)
    score_index: torch.Tensor  # (S,) int64, flat index of each response's end-of-context token
    group_offsets: torch.Tensor  # (G + 1,) int64, responses of group g: [off[g], off[g+1])
    ranks: torch.Tensor  # (S,) int64, lower is better
    margin: torch.Tensor  # (G,) float32, 0 where the input gave none
    ratings: torch.Tensor  # (S,) float32, 0 where the input gave none
    turns: torch.Tensor  # (G,) int64
    # next-token targets (``TARGETS``): the flat index of the predicting token, the token to
    # predict, and the response it belongs to; counts known on the host, so no sync
    lm_index: torch.Tensor  # (L,) int64
    lm_targets: torch.Tensor  # (L,) int64
    lm_sequence: torch.Tensor  # (L,) int64
    lm_sequences: int = 0  # responses with at least one target
    num_tokens: int = 0  # real tokens (a shared context counted once)
    ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    reader_state: dict | None = None  # the reader's position after this batch (exact resume)

    @property
    def num_groups(self) -> int:
        return self.group_offsets.numel() - 1

    @property
    def num_sequences(self) -> int:
        return self.score_index.numel()

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        moved = {name: value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
                 for name, value in self.__dict__.items()}
        return Batch(**moved)

    def pin_memory(self) -> "Batch":
        return Batch(**{name: value.pin_memory() if isinstance(value, torch.Tensor) else value
                        for name, value in self.__dict__.items()})
