"""Stream batches from a prepared folder: per-rank shares, bounded shuffle, exact resume.

    stream = ComparisonStream("data/train", rank=r, world_size=w, seed=0, batch_groups=16)
    batches = iter(stream)
    batch = next(batches)                 # a schema.Batch
    state = stream.state_dict()           # JSON-serialisable; after the last batch handed out
    stream2 = ComparisonStream("data/train", rank=r, world_size=w, seed=0, batch_groups=16)
    stream2.load_state_dict(state)        # continues with the very next group

Order, rank shares and the exact position come from the shard reader every row schema
shares (rankpm.engine.data.shard_reader.ShardReader); this module adds comparison groups
and their batches. Order and sharing: one global order per epoch, the same whatever the
number of ranks. Rows are numbered in shard order (manifest order) and cut into blocks of ``shuffle_buffer``
consecutive rows; epoch e visits the blocks in an order drawn from (seed, e) and each
block's rows in an order drawn from (seed, e, block). Positions in this order run on
across epochs (q = e * N + p); rank r of w takes the positions whose unit ``q // interleave``
satisfies ``unit % w == r``. With ``interleave = batch_groups`` (the default when batching
by group count), micro-batch m of rank r in a step is exactly micro-batch ``m * w + r`` of
one rank with w times the accumulation: one worker with accumulation 2 and two workers
with accumulation 1 see the same groups in the same micro-batches. Only one block is held
in memory (the rank's part of it); shards are memory-mapped. The reader's whole state is
a cursor (epoch, position) in the global order: a resumed run neither skips nor repeats
a group. ``resume_from`` continues from the states of a run with another number of ranks:
where those cursors leave every position before some global position F read and none
after it, every new rank starts at F (batching by group count always leaves them so).

Batching: ``batch_groups`` groups per batch, or with ``tokens_per_batch`` as many whole
groups as fit the budget, counted in the real tokens the groups take in the batch's layout
(a shared context once); a budget below the largest group is refused at once. A batch is
built from the shard rows of its groups in one Arrow ``take`` and laid out without
per-token Python objects (rankpm.engine.data.collate); it carries the reader's position
after it (``Batch.reader_state``), so a consumer that reads ahead (the loop's prefetch
thread) still saves exactly what it trained on. ``loop=True`` streams forever, epoch after
epoch, batches running on across epoch ends (so data-parallel ranks never run dry at
different times); ``loop=False`` is one pass to the end of the current epoch, the last
batch possibly smaller.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.compute as pc

from rankpm.engine.data.collate import collate_table, layout_tokens
from rankpm.engine.data.schema import LAYOUTS, SCHEMA_VERSION, SHARD_SCHEMA, TARGETS, Batch, Framing
from rankpm.engine.data.shard_reader import STATE_VERSION, ReaderStateError, ShardReader

__all__ = ["ComparisonStream", "ReaderStateError", "STATE_VERSION", "UNEVEN_BATCHES", "MANIFEST"]

MANIFEST = "manifest.json"


UNEVEN_BATCHES = ("token-budget batches (data.tokens_per_batch) advance the ranks unevenly, so their "
                  "positions cannot be mapped to another number of ranks")


class ComparisonStream(ShardReader):
    row_name = "groups"

    def __init__(self, data_dir: str | Path, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1024, batch_groups: int = 8,
                 tokens_per_batch: int | None = None, loop: bool = True, interleave: int | None = None,
                 layout: str = "stacked", targets: str = "none", framing: Framing | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
        for name, value in (("shuffle_buffer", shuffle_buffer), ("batch_groups", batch_groups)):
            if value < 1:
                raise ValueError(f"{name}={value}: expected a positive integer")
        if tokens_per_batch is not None and tokens_per_batch < 1:
            raise ValueError(f"tokens_per_batch={tokens_per_batch}: expected a positive integer or None")
        if layout not in LAYOUTS or targets not in TARGETS:
            raise ValueError(f"layout={layout!r}, targets={targets!r}: expected one of {LAYOUTS} and {TARGETS}")
        self.batch_groups, self.tokens_per_batch = batch_groups, tokens_per_batch
        self.layout, self.targets = layout, targets
        # ranks alternate by whole micro-batches
        unit = interleave or (batch_groups if tokens_per_batch is None else 1)
        super().__init__(data_dir, _read_manifest(Path(data_dir)), SHARD_SCHEMA, rank=rank, world_size=world_size,
                         seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer, loop=loop, interleave=unit)
        self.framing = framing or Framing(suffix=(self.manifest["tokenizer"]["eoc_id"],), read="end")
        if self.framing.specials != self.manifest.get("specials", 1):  # max_length counted other framing tokens
            raise ValueError(f"{data_dir} was prepared for {self.manifest.get('specials', 1)} special token(s) per "
                             f"sequence, the reader frames each with {self.framing.specials}; prepare it for this "
                             f"model's reading")
        self.pad_id = self.manifest["tokenizer"]["pad_id"]
        self.eoc_id = self.manifest["tokenizer"]["eoc_id"]
        self._group_tokens: np.ndarray | None = None
        if tokens_per_batch is not None and self.total_groups:
            largest = int(self.group_tokens().max())
            if largest > tokens_per_batch:
                raise ValueError(f"data.tokens_per_batch={tokens_per_batch} is smaller than the largest group of "
                                 f"{self.data_dir} in the {layout} layout ({largest} tokens); set it to at least "
                                 f"{largest}")

    @property
    def total_groups(self) -> int:
        return self.total_rows

    @property
    def num_groups(self) -> int:
        """This rank's groups in one pass over an epoch."""
        return self.num_rows

    def group_tokens(self) -> np.ndarray:
        """Real tokens each group (global row) takes in this stream's layout; from the shards'
        length columns, vectorised."""
        if self._group_tokens is None:
            parts = []
            for shard in range(len(self.manifest["shards"])):
                table = self._table(shard)
                ctx = pc.list_value_length(table.column("context_ids")).to_numpy(zero_copy_only=False)
                responses = table.column("response_ids").combine_chunks()
                k = pc.list_value_length(responses).to_numpy(zero_copy_only=False)
                inner = pc.list_value_length(pc.list_flatten(responses)).to_numpy(zero_copy_only=False)
                per_group = np.split(inner, np.cumsum(k)[:-1]) if len(k) else []
                parts.append(layout_tokens(ctx.astype(np.int64), per_group, self.layout, self.framing))
            self._group_tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return self._group_tokens

    # ----- state -----------------------------------------------------------------------

    def _state_extra(self) -> dict:
        return {"batch_groups": self.batch_groups, "tokens_per_batch": self.tokens_per_batch}

    def _check_mappable(self, state: dict) -> None:
        if state.get("tokens_per_batch") is not None or self.tokens_per_batch is not None:
            raise ReaderStateError(UNEVEN_BATCHES)

    # ----- batches ---------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        picked, after, tokens = [], None, 0
        for index, cursor in self._walk(self._epoch, self._position, self.loop):
            if self.tokens_per_batch is None:
                picked.append(index)
                after = cursor
                if len(picked) == self.batch_groups:
                    yield self._emit(picked, after)
                    picked = []
                continue
            size = int(self.group_tokens()[index])
            if picked and tokens + size > self.tokens_per_batch:
                yield self._emit(picked, after)
                picked, tokens = [], 0
            picked.append(index)
            after, tokens = cursor, tokens + size
        if picked:
            yield self._emit(picked, after)

    def _emit(self, rows: list[int], after: tuple[int, int]) -> Batch:
        self._epoch, self._position = after  # state_dict() now points past these rows
        batch = collate_table(self._take(np.asarray(rows, dtype=np.int64)), self.pad_id, self.eoc_id,
                              layout=self.layout, targets=self.targets, framing=self.framing)
        batch.reader_state = self._state(*after)
        return batch


def _read_manifest(data_dir: Path) -> dict:
    path = data_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir}: not a prepared folder (no {MANIFEST}); run `rankpm prepare` first")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema version {manifest.get('schema_version')!r}, this rankpm reads "
                         f"version {SCHEMA_VERSION}; prepare the data again")
    listed = sum(s["rows"] for s in manifest["shards"])
    if listed != manifest["counts"]["groups"]:
        raise ValueError(f"{path}: shards list {listed} rows but counts.groups is {manifest['counts']['groups']}")
    return manifest
