"""The texts a teacher is run over, numbered, each with where it came from.

    for row, where, field, text in iter_texts(["corpus.jsonl"], "text"):
        ...

kind "text": JSON Lines / Parquet rows ``{"text": "..."}``, one text a row.
kind "responses": comparison files in any format ``rankpm prepare`` reads; each response
is one text (a group of K responses gives K rows, in order).
kind "dialogues": the same files; each context + response is one text (so an HH-RLHF
transcript pair gives its chosen and its rejected dialogue).

Rows are numbered from 0 over all files in order: ``row`` is the number the logit shards
keep. Bad input raises DataError naming file, line and field: a row that is not an object,
a text that is not a string, an empty or whitespace-only text. ``scan_texts`` reads the
whole corpus once before anything is written, so a bad row stops the run with nothing
written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from rankpm.engine.data.errors import DataError, Where
from rankpm.engine.data.formats import parse_row, response_field
from rankpm.engine.data.readers import iter_raw_rows
from rankpm.engine.data.schema import LabelledResponse

KINDS = ("text", "responses", "dialogues")


def iter_texts(files: list[str], kind: str) -> Iterator[tuple[int, Where, str, str]]:
    """(row, where, field, text) for every text of every file, in order."""
    if kind not in KINDS:
        raise ValueError(f"corpus.kind={kind!r}: expected one of {KINDS}")
    row = 0
    for path in files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"corpus.files: {path}: no such file")
        for where, raw in iter_raw_rows(path):
            if isinstance(raw, DataError):
                raise raw
            for field, text in _texts_of(raw, where, kind, default_id=f"{Path(path).stem}:{where.line}"):
                _check_text(text, where, field)
                yield row, where, field, text
                row += 1


def scan_texts(files: list[str], kind: str) -> int:
    """Read and check every text (nothing is kept); the number of texts."""
    count = 0
    for count, _ in enumerate(iter_texts(files, kind), start=1):
        pass
    return count


def _texts_of(raw, where: Where, kind: str, default_id: str) -> list[tuple[str, str]]:
    if kind == "text":
        if not isinstance(raw, dict):
            raise DataError(where, "<row>", f"expected a JSON object with a 'text' field, got {type(raw).__name__}")
        if "text" not in raw:
            raise DataError(where, "text", f"missing (the row has {sorted(raw)}); corpus.kind='text' reads "
                                           f"{{\"text\": ...}} rows, 'responses' or 'dialogues' comparison rows")
        return [("text", raw["text"])]
    fmt, group = parse_row(raw, where, default_id=default_id)
    responses = [group.response] if isinstance(group, LabelledResponse) else group.responses
    out = []
    for k, response in enumerate(responses):
        out.append((response_field(fmt, k), response if kind == "responses" else group.context + response))
    return out


def _check_text(text, where: Where, field: str) -> None:
    if not isinstance(text, str):
        raise DataError(where, field, f"expected a string of text, got {type(text).__name__} {_short(text)}")
    if not text.strip():
        raise DataError(where, field, "empty or whitespace-only text: there are no tokens to cache")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
