"""Read comparison files (JSON Lines, gzipped or not, or Parquet) as ComparisonGroups, streaming.

    for group in read_groups(["hh_train.jsonl", "ranked.parquet"], skip_bad=True, skipped=bad):
        ...

The format of each row is detected from its fields (rankpm.engine.data.formats). A bad
row raises DataError naming file, line (1-based; the row index for Parquet) and field;
with ``skip_bad`` it is appended to ``skipped`` as {file, line, field, reason} instead
(logged as a warning when no list is given). Blank lines of a JSON Lines file hold no
row and are passed over. Ids default to ``"<file stem>:<line>"``.

A labelled response (prompt/response/label) is a bad row here unless the caller asks for
``labelled=True``: only the binary objective's transforms can make a pair of it.
"""
from __future__ import annotations

import codecs
import gzip
import json
import logging
import zlib
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from rankpm.engine.data.errors import DataError, Where
from rankpm.engine.data.formats import parse_row
from rankpm.engine.data.schema import ComparisonGroup, LabelledResponse

log = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")
NOT_A_PAIR = ("a single labelled response forms a pair only once label strings are appended: train on it "
              "with objective.name=binary (data.transform=auto makes x+GOOD > x+BAD, or the reverse)")


def iter_raw_rows(path: str | Path) -> Iterator[tuple[Where, object]]:
    """(where, row) for every row of a file; an undecodable row comes as a DataError value."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such input file")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        yield from _parquet_rows(path)
    else:
        yield from _jsonl_rows(path)


def _jsonl_rows(path: Path) -> Iterator[tuple[Where, object]]:
    compressed = path.suffix.lower() == ".gz"  # HH-RLHF ships as train.jsonl.gz
    lineno = 0
    try:
        with (gzip.open if compressed else open)(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                yield from _jsonl_row(path, lineno, raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        # not a row to skip: everything after this point of the file is lost
        raise DataError(Where(str(path), lineno + 1), "<gzip>",
                        f"truncated or corrupt gzip file ({err}); download or copy it again") from None


def _jsonl_row(path: Path, lineno: int, raw: bytes) -> Iterator[tuple[Where, object]]:
    where = Where(str(path), lineno)
    if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # written by many Windows tools
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        yield where, DataError(where, "<json>", f"not UTF-8 ({err.reason} at byte {err.start})")
        return
    if not text.strip():
        return
    try:
        yield where, json.loads(text)
    except json.JSONDecodeError as err:
        hint = " (a JSON array file? write one object per line)" if text.lstrip().startswith("[") else ""
        yield where, DataError(where, "<json>", f"invalid JSON: {err.msg} at column {err.colno}{hint}")


def _parquet_rows(path: Path) -> Iterator[tuple[Where, object]]:
    import pyarrow.parquet as pq

    index = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield Where(str(path), index, unit="row"), row
                index += 1
    except (pa.ArrowException, OSError) as err:
        raise DataError(Where(str(path), index, unit="row"), "<parquet>",
                        f"unreadable Parquet ({err}); is the file complete?") from None


def iter_groups(paths, *, skip_bad: bool = False, skipped: list | None = None,
                labelled: bool = False) -> Iterator[tuple[Where, str, ComparisonGroup | LabelledResponse]]:
    """(where, format, group) for every good row of every file, in order."""
    for path in paths:
        stem = Path(path).stem
        for where, row in iter_raw_rows(path):
            try:
                if isinstance(row, DataError):
                    raise row
                fmt, group = parse_row(row, where, default_id=f"{stem}:{where.line}")
                if isinstance(group, LabelledResponse) and not labelled:
                    raise DataError(where, "label", NOT_A_PAIR)
            except DataError as err:
                if not skip_bad:
                    raise
                if skipped is not None:
                    skipped.append(err.as_skipped())
                else:  # no list to report it in: say it here rather than drop it silently
                    log.warning("skipped bad row: %s", err)
                continue
            yield where, fmt, group


def read_groups(paths, *, skip_bad: bool = False, skipped: list | None = None,
                labelled: bool = False) -> Iterator[ComparisonGroup | LabelledResponse]:
    """The groups of every file, in order (see ``iter_groups``)."""
    for _, _, group in iter_groups(paths, skip_bad=skip_bad, skipped=skipped, labelled=labelled):
        yield group
