"""Bad input: one error type that names the file, the row and the field.

Readers and ``prepare`` raise ``DataError``; with ``skip_bad`` the same information is
recorded as a ``SkippedRow`` in the manifest instead, so nothing is dropped silently.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Where:
    """A row's origin. ``line`` is 1-based for JSON Lines; for Parquet it is the row index."""

    file: str
    line: int
    unit: str = "line"  # "line" (JSON Lines) or "row" (Parquet)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.unit == "line" else f"{self.file}: row {self.line}"


class DataError(ValueError):
    """Bad input row. ``str(err)`` reads ``FILE:LINE: field 'FIELD': REASON``."""

    def __init__(self, where: Where, field: str, reason: str):
        self.where, self.field, self.reason = where, field, reason
        super().__init__(f"{where}: field {field!r}: {reason}")

    @property
    def file(self) -> str:
        return self.where.file

    @property
    def line(self) -> int:
        return self.where.line

    def as_skipped(self) -> dict:
        return asdict(SkippedRow(self.where.file, self.where.line, self.field, self.reason))


@dataclass(frozen=True)
class SkippedRow:
    file: str
    line: int
    field: str
    reason: str
