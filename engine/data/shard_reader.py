"""The resumable reader under every kind of Arrow shard: row order, rank shares, exact position.

A folder of shards has a manifest listing them in order (``{"file", "rows"}`` each) and a
``fingerprint`` of what made them. ``ShardReader`` knows nothing of what a row holds: the
comparison stream (stream.py) batches comparison groups from it, the logit stream
(logit_shards.py) hands out cached teacher distributions, both through the same walk.

Order and sharing: one global order per epoch, the same whatever the number of ranks.
Rows are numbered in shard order (manifest order) and cut into blocks of ``shuffle_buffer``
consecutive rows; epoch e visits the blocks in an order drawn from (seed, e) and each
block's rows in an order drawn from (seed, e, block) (with ``shuffle=False``: in order).
Positions in this order run on across epochs (q = e * N + p); rank r of w takes the
positions whose unit ``q // interleave`` satisfies ``unit % w == r``. Only one block's
order is held in memory; shards are memory-mapped, a few at a time. The whole state is a
cursor (epoch, position) in the global order, saved with what it is valid for (ranks,
seed, shuffle, the data's fingerprint) and refused, naming what differs, anywhere else.
``resume_from`` continues from the states of a run with another number of ranks where
those leave every position before some global position F read and none after it.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

STATE_VERSION = 1
OPEN_SHARDS = 8  # memory-mapped shards kept open at once


class ReaderStateError(ValueError):
    pass


class ShardReader:
    """Position and rank split over the rows of the shards a manifest lists.

    ``row_name`` is what a row is called in messages ("groups", "texts"); ``manifest_path``
    is named when a shard is missing or differs from its entry.
    """

    row_name = "rows"  # plural; messages use it as is and without its "s"

    def __init__(self, data_dir: str | Path, manifest: dict, schema: pa.Schema, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1024,
                 loop: bool = True, interleave: int = 1, manifest_name: str = "manifest.json"):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer={shuffle_buffer}: expected a positive integer")
        self.data_dir, self.manifest, self.schema = Path(data_dir), manifest, schema
        self.manifest_path = self.data_dir / manifest_name
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.shuffle_buffer, self.loop = shuffle, shuffle_buffer, loop
        self._shard_rows = np.array([s["rows"] for s in manifest["shards"]], dtype=np.int64)
        self._shard_starts = np.concatenate([[0], np.cumsum(self._shard_rows)])
        self.total_rows = int(self._shard_starts[-1])
        self.interleave = 1 if world_size == 1 else interleave  # one rank needs no interleave at all
        self.num_rows = self._share_size()  # this rank's rows in one pass over an epoch
        if loop and self.num_rows == 0:
            raise ValueError(f"{self.data_dir}: rank {rank} of {world_size} has no {self.row_name} to loop over "
                             f"(the data holds {self.total_rows})")
        self._tables: OrderedDict[int, pa.Table] = OrderedDict()
        self._layout_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._block_cache: tuple[tuple[int, int], np.ndarray] | None = None
        self._epoch, self._position = 0, 0  # the next row to hand out

    @property
    def epoch(self) -> int:
        return self._epoch

    # ----- state -----------------------------------------------------------------------

    def _identity(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "seed": self.seed, "shuffle": self.shuffle,
                "shuffle_buffer": self.shuffle_buffer, "interleave": self.interleave,
                "data": self.manifest["fingerprint"]}

    def _state_extra(self) -> dict:
        """What a row schema's reader adds to its state (how it batches)."""
        return {}

    def _check_mappable(self, state: dict) -> None:
        """Raise ReaderStateError when ``state`` cannot be mapped to another number of ranks."""

    def state_dict(self) -> dict:
        """The position after the last row handed out, with what it is only valid for."""
        return self._state(self._epoch, self._position)

    def _state(self, epoch: int, position: int) -> dict:
        return {"version": STATE_VERSION, **self._identity(), "epoch": epoch, "position": position,
                **self._state_extra()}

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
                and 0 <= position <= self.total_rows):
            raise ReaderStateError(f"reader state position (epoch {epoch!r}, position {position!r}) is out "
                                   f"of range for data of {self.total_rows} {self.row_name}")
        if position == self.total_rows and self.total_rows > 0:
            epoch, position = epoch + 1, 0
        self._epoch, self._position = epoch, position

    def resume_from(self, states: list[dict]) -> str:
        """Continue where the ranks of another layout stopped (states: one per old rank, in
        rank order); return how their positions were mapped. ReaderStateError when they
        cannot be mapped without skipping or repeating a row."""
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
            self._check_mappable(st)
        n, unit = self.total_rows, states[0]["interleave"]
        cursors = [st["epoch"] * n + st["position"] for st in states]  # global positions read up to
        frontier = max(cursors)
        for rank, cursor in enumerate(cursors):  # nothing of a rank's own left unread below the frontier
            u = cursor // unit
            upcoming = cursor if u % world == rank else (u + (rank - u) % world) * unit
            if upcoming < frontier:
                raise ReaderStateError(f"rank {rank} of {world} stopped at global position {cursor} with "
                                       f"{self.row_name} of its own unread before {frontier}, where another "
                                       f"rank stopped")
        self._epoch, self._position = divmod(frontier, n) if n else (0, 0)
        return (f"the {world} ranks had read every {self.row_name.rstrip('s')} before global position {frontier} (epoch "
                f"{self._epoch}, position {self._position}) and none after it; {self.world_size} ranks "
                f"continue from there")

    # ----- the walk --------------------------------------------------------------------

    def _share_size(self) -> int:
        n, unit = self.total_rows, self.interleave
        mine = range(self.rank, -(-n // unit), self.world_size)
        return sum(min(unit, n - u * unit) for u in mine)

    def _walk(self, epoch: int, position: int, loop: bool) -> Iterator[tuple[int, tuple[int, int]]]:
        """(global row, cursor after it) for this rank's positions from (epoch, position) on."""
        n = self.total_rows
        if self.num_rows == 0:
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
            n, size = self.total_rows, self.shuffle_buffer
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
            rows = np.arange(first, min(first + self.shuffle_buffer, self.total_rows))
            if self.shuffle:
                rows = np.random.default_rng([self.seed, epoch, 1 + block]).permutation(rows)
            self._block_cache = (key, rows)
        return self._block_cache[1]

    # ----- shard rows ------------------------------------------------------------------

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
            raise FileNotFoundError(f"{path}: shard listed in {self.manifest_path} is missing")
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()  # zero-copy over the map
        if not table.schema.equals(self.schema, check_metadata=False):
            raise ValueError(f"{path}: shard schema {table.schema} differs from the expected {self.schema}")
        if table.num_rows != entry["rows"]:
            raise ValueError(f"{path}: holds {table.num_rows} rows, the manifest says {entry['rows']}")
        self._tables[shard] = table
        if len(self._tables) > OPEN_SHARDS:
            self._tables.popitem(last=False)
        return table
