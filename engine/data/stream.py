"""Stream batches from a prepared folder: per-rank shares, bounded shuffle, exact resume.

    stream = ComparisonStream("data/train", rank=r, world_size=w, seed=0, batch_groups=16)
    batches = iter(stream)
    batch = next(batches)                 # a schema.Batch
    state = stream.state_dict()           # JSON-serialisable; after the last batch handed out
    stream2 = ComparisonStream("data/train", rank=r, world_size=w, seed=0, batch_groups=16)
    stream2.load_state_dict(state)        # continues with the very next group

Order and sharing: one global order per epoch, the same whatever the number of ranks.
Rows are numbered in shard order (manifest order) and cut into blocks of ``shuffle_buffer``
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
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

import pyarrow.compute as pc

from rankpm.engine.data.collate import collate_table, layout_tokens
from rankpm.engine.data.schema import LAYOUTS, SCHEMA_VERSION, SHARD_SCHEMA, TARGETS, Batch, Framing

STATE_VERSION = 1
MANIFEST = "manifest.json"
OPEN_SHARDS = 8  # memory-mapped shards kept open at once


class ReaderStateError(ValueError):
    pass


UNEVEN_BATCHES = ("token-budget batches (data.tokens_per_batch) advance the ranks unevenly, so their "
                  "positions cannot be mapped to another number of ranks")


class ComparisonStream:
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
        self.data_dir = Path(data_dir)
        self.manifest = _read_manifest(self.data_dir)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.shuffle_buffer, self.loop = shuffle, shuffle_buffer, loop
        self.batch_groups, self.tokens_per_batch = batch_groups, tokens_per_batch
        self.layout, self.targets = layout, targets
        self.framing = framing or Framing(suffix=(self.manifest["tokenizer"]["eoc_id"],), read="end")
        if self.framing.specials != self.manifest.get("specials", 1):  # max_length counted other framing tokens
            raise ValueError(f"{data_dir} was prepared for {self.manifest.get('specials', 1)} special token(s) per "
                             f"sequence, the reader frames each with {self.framing.specials}; prepare it for this "
                             f"model's reading")
        self.pad_id = self.manifest["tokenizer"]["pad_id"]
        self.eoc_id = self.manifest["tokenizer"]["eoc_id"]

        self._shard_rows = np.array([s["rows"] for s in self.manifest["shards"]], dtype=np.int64)
        self._shard_starts = np.concatenate([[0], np.cumsum(self._shard_rows)])
        self.total_groups = int(self._shard_starts[-1])
        # ranks alternate by whole micro-batches; one rank needs no interleave at all
        self.interleave = 1 if world_size == 1 else (interleave or (batch_groups if tokens_per_batch is None else 1))
        self.num_groups = self._share_size()  # this rank's groups in one pass over epoch 0
        if loop and self.num_groups == 0:
            raise ValueError(f"{self.data_dir}: rank {rank} of {world_size} has no groups to loop over "
                             f"(the data holds {self.total_groups})")
        self._tables: OrderedDict[int, pa.Table] = OrderedDict()
        self._layout_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._block_cache: tuple[tuple[int, int], np.ndarray] | None = None
        self._epoch, self._position = 0, 0  # the next group to hand out
        self._group_tokens: np.ndarray | None = None
        if tokens_per_batch is not None and self.total_groups:
            largest = int(self.group_tokens().max())
            if largest > tokens_per_batch:
                raise ValueError(f"data.tokens_per_batch={tokens_per_batch} is smaller than the largest group of "
                                 f"{self.data_dir} in the {layout} layout ({largest} tokens); set it to at least "
                                 f"{largest}")

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

    @property
    def epoch(self) -> int:
        return self._epoch

    # ----- state -----------------------------------------------------------------------

    def _identity(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "seed": self.seed, "shuffle": self.shuffle,
                "shuffle_buffer": self.shuffle_buffer, "interleave": self.interleave,
                "data": self.manifest["fingerprint"]}

    def state_dict(self) -> dict:
        """The position after the last batch handed out, with what it is only valid for."""
        return self._state(self._epoch, self._position)

    def _state(self, epoch: int, position: int) -> dict:
        return {"version": STATE_VERSION, **self._identity(), "epoch": epoch, "position": position,
                "batch_groups": self.batch_groups, "tokens_per_batch": self.tokens_per_batch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ReaderStateError(f"reader state version {state.get('version')!r}; this rankpm reads "
                                   f"version {STATE_VERSION}")
        here = self._identity()
        diffs = [f"{key}: {state.get(key)!r} in the state, {value!r} here"
                 for key, value in here.items() if state.get(key) != value]
        if diffs:
            raise ReaderStateError(f"reader state does not match this stream over {self.data_dir} "
                                   f"(rank {self.rank}): " + "; ".join(diffs))
        epoch, position = state["epoch"], state["position"]
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(position, int)
                and 0 <= position <= self.total_groups):
            raise ReaderStateError(f"reader state position (epoch {epoch!r}, position {position!r}) is out "
                                   f"of range for data of {self.total_groups} groups")
        if position == self.total_groups and self.total_groups > 0:
            epoch, position = epoch + 1, 0
        self._epoch, self._position = epoch, position

    def resume_from(self, states: list[dict]) -> str:
        """Continue where the ranks of another layout stopped (states: one per old rank, in
        rank order); return how their positions were mapped. ReaderStateError when they
        cannot be mapped without skipping or repeating a group."""
        world = len(states)
        if not states or [st.get("rank") for st in states] != list(range(world)) or \
                any(st.get("world_size") != world for st in states):
            raise ReaderStateError(f"reader states of ranks {[st.get('rank') for st in states]} do not make one "
                                   f"layout of {world} ranks")
        here = {k: v for k, v in self._identity().items() if k in ("seed", "shuffle", "shuffle_buffer", "data")}
        for st in states:
            if st.get("version") != STATE_VERSION:
                raise ReaderStateError(f"reader state version {st.get('version')!r}; this rankpm reads "
                                       f"version {STATE_VERSION}")
            diffs = [f"{k}: {st.get(k)!r} in the state, {v!r} here" for k, v in here.items() if st.get(k) != v]
            if diffs:
                raise ReaderStateError(f"reader state of rank {st['rank']} does not match this stream over "
                                       f"{self.data_dir}: " + "; ".join(diffs))
            if st.get("tokens_per_batch") is not None or self.tokens_per_batch is not None:
                raise ReaderStateError(UNEVEN_BATCHES)
        n, unit = self.total_groups, states[0]["interleave"]
        cursors = [st["epoch"] * n + st["position"] for st in states]  # global positions read up to
        frontier = max(cursors)
        for rank, cursor in enumerate(cursors):  # nothing of a rank's own left unread below the frontier
            u = cursor // unit
            upcoming = cursor if u % world == rank else (u + (rank - u) % world) * unit
            if upcoming < frontier:
                raise ReaderStateError(f"rank {rank} of {world} stopped at global position {cursor} with groups "
                                       f"of its own unread before {frontier}, where another rank stopped")
        self._epoch, self._position = divmod(frontier, n) if n else (0, 0)
        return (f"the {world} ranks had read every group before global position {frontier} (epoch "
                f"{self._epoch}, position {self._position}) and none after it; {self.world_size} ranks "
                f"continue from there")

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

    def _share_size(self) -> int:
        n, unit = self.total_groups, self.interleave
        mine = range(self.rank, -(-n // unit), self.world_size)
        return sum(min(unit, n - u * unit) for u in mine)

    def _walk(self, epoch: int, position: int, loop: bool) -> Iterator[tuple[int, tuple[int, int]]]:
        """(global row, cursor after it) for this rank's positions from (epoch, position) on."""
        n = self.total_groups
        if self.num_groups == 0:
            return
        while True:
            order, starts = self._layout(epoch)
            base = epoch * n
            b = int(np.searchsorted(starts, position, side="right")) - 1
            while b < len(order):
                lo, hi = max(position, int(starts[b])), int(starts[b + 1])
                spots = np.arange(lo, hi)
                spots = spots[((base + spots) // self.interleave) % self.world_size == self.rank]
                if len(spots):
                    rows = self._block(epoch, int(order[b]))[spots - int(starts[b])]
                    for spot, row in zip(spots.tolist(), rows.tolist()):
                        yield row, ((epoch + 1, 0) if spot + 1 == n else (epoch, spot + 1))
                position = hi
                b += 1
            if not loop:
                return
            epoch, position = epoch + 1, 0

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's block order and the position where each visited block starts."""
        if self._layout_cache is None or self._layout_cache[0] != epoch:
            n, size = self.total_groups, self.shuffle_buffer
            blocks = -(-n // size)
            order = np.arange(blocks)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(blocks)
            sizes = np.minimum(size, n - order * size)
            self._layout_cache = (epoch, order, np.concatenate([[0], np.cumsum(sizes)]))
        return self._layout_cache[1], self._layout_cache[2]

    def _block(self, epoch: int, block: int) -> np.ndarray:
        """Global row indices of a block, in this epoch's order within it."""
        key = (epoch if self.shuffle else 0, block)
        if self._block_cache is None or self._block_cache[0] != key:
            first = block * self.shuffle_buffer
            rows = np.arange(first, min(first + self.shuffle_buffer, self.total_groups))
            if self.shuffle:
                rows = np.random.default_rng([self.seed, epoch, 1 + block]).permutation(rows)
            self._block_cache = (key, rows)
        return self._block_cache[1]

    def _take(self, rows: np.ndarray) -> pa.Table:
        """Shard rows by global index, in the given order, as one table."""
        shard_of = np.searchsorted(self._shard_starts, rows, side="right") - 1
        parts, order = [], []
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]
            parts.append(self._table(int(shard)).take(pa.array(rows[where] - self._shard_starts[shard])))
            order.append(where)
        if len(parts) == 1:
            return parts[0]
        return pa.concat_tables(parts).take(pa.array(np.argsort(np.concatenate(order))))

    def _table(self, shard: int) -> pa.Table:
        if shard in self._tables:
            self._tables.move_to_end(shard)
            return self._tables[shard]
        entry = self.manifest["shards"][shard]
        path = self.data_dir / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard listed in {self.data_dir / MANIFEST} is missing")
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()  # zero-copy over the map
        if not table.schema.equals(SHARD_SCHEMA, check_metadata=False):
            raise ValueError(f"{path}: shard schema {table.schema} differs from SHARD_SCHEMA {SHARD_SCHEMA}")
        if table.num_rows != entry["rows"]:
            raise ValueError(f"{path}: holds {table.num_rows} rows, the manifest says {entry['rows']}")
        self._tables[shard] = table
        if len(self._tables) > OPEN_SHARDS:
            self._tables.popitem(last=False)
        return table


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
