"""Arrow IPC shards of bounded size, and streaming length statistics.

A shard is an Arrow IPC *file* (random access, memory-mappable) with SHARD_SCHEMA, written
in record batches of at most ``batch_rows`` rows. A shard is closed before it would pass
``max_bytes`` (the bytes written so far, plus an estimate of the pending rows, their
batch header and the footer) or ``max_rows``; a row larger than the limit by itself gets
a shard of its own.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa

from rankpm.engine.data.schema import SHARD_SCHEMA
from rankpm.engine.fingerprint import file_sha256

SHARD_PATTERN = "shard_{:05d}.arrow"
BATCH_HEADER_BYTES = 1024  # an IPC record-batch message header, with room
FOOTER_BYTES = 4096  # the schema and the file footer


def estimate_row_bytes(row: dict) -> int:
    """Arrow bytes of one row, roughly: int32 tokens, int32 list offsets, the strings."""
    tokens = len(row["context_ids"]) + sum(len(r) for r in row["response_ids"]) + len(row["ranks"])
    offsets = 4 * (4 + len(row["response_ids"]))
    return 4 * tokens + offsets + len(row["id"].encode()) + len(row["source"].encode()) + 16


class ShardWriter:
    def __init__(self, directory: str | Path, *, max_bytes: int, max_rows: int | None = None,
                 batch_rows: int = 256):
        if max_bytes <= 0 or (max_rows is not None and max_rows <= 0):
            raise ValueError(f"shard limits must be positive: max_bytes={max_bytes}, max_rows={max_rows}")
        self.directory = Path(directory)
        self.max_bytes, self.max_rows, self.batch_rows = max_bytes, max_rows, batch_rows
        self.shards: list[dict] = []
        self._sink = self._writer = None
        self._pending: list[dict] = []
        self._pending_bytes = 0
        self._rows = 0

    def add(self, row: dict) -> None:
        size = estimate_row_bytes(row)
        if self._writer is not None and self._rows > 0:
            full_rows = self.max_rows is not None and self._rows >= self.max_rows
            # what is written + the pending rows + their batch header + the footer still to come
            reserve = BATCH_HEADER_BYTES + FOOTER_BYTES + 32 * self._batches
            full_bytes = self._sink.tell() + self._pending_bytes + size + reserve > self.max_bytes
            if full_rows or full_bytes:
                self._close_shard()
        if self._writer is None:
            self._open_shard()
        self._pending.append(row)
        self._pending_bytes += size
        self._rows += 1
        if len(self._pending) >= self.batch_rows:
            self._flush()

    def close(self) -> list[dict]:
        """Finish the last shard; return [{file, rows, bytes, sha256}] for the manifest."""
        if self._writer is not None:
            self._close_shard()
        return self.shards

    def _open_shard(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        self._sink = pa.OSFile(str(self.directory / name), "wb")
        self._writer = pa.ipc.new_file(self._sink, SHARD_SCHEMA)
        self._name, self._rows, self._batches = name, 0, 0

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_batch(pa.RecordBatch.from_pylist(self._pending, schema=SHARD_SCHEMA))
            self._pending, self._pending_bytes = [], 0
            self._batches += 1

    def _close_shard(self) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()
        path = self.directory / self._name
        self.shards.append({"file": self._name, "rows": self._rows, "bytes": path.stat().st_size,
                            "sha256": file_sha256(path)})
        self._sink = self._writer = None


class LengthStats:
    """Mean, p50, p95 and max of integer lengths, from a histogram (memory: distinct lengths)."""

    def __init__(self):
        self.counts: Counter[int] = Counter()

    def add(self, length: int) -> None:
        self.counts[length] += 1

    def summary(self) -> dict:
        n = sum(self.counts.values())
        if n == 0:
            return {"count": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
        ordered = sorted(self.counts.items())
        return {"count": n, "mean": round(sum(k * c for k, c in ordered) / n, 3),
                "p50": _quantile(ordered, n, 0.50), "p95": _quantile(ordered, n, 0.95), "max": ordered[-1][0]}


def _quantile(ordered: list[tuple[int, int]], n: int, q: float) -> int:
    """Nearest-rank quantile: the smallest length with at least q * n values at or below it."""
    need, seen = q * n, 0
    for length, count in ordered:
        seen += count
        if seen >= need:
            return length
    return ordered[-1][0]
