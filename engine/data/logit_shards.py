"""Logit shards: the teacher's cached next-token distributions, and the reader a trainer uses.

    manifest = open_logit_cache("runs/logits")            # validated manifest.json
    require_student(manifest, tokenizer.identity(), vocab_size=model_vocab)  # refuses a mismatch
    for row in LogitStream("runs/logits", rank=r, world_size=w, seed=0, shuffle=True):
        row["input_ids"]     # (T,) int64: the text's token ids, WITHOUT the prompt
        row["ids"]           # (T, k) int64: vocabulary ids
        row["logprobs"]      # (T, k) float32, descending (mode "topk")
        row["tail_logmass"]  # (T,) float32: log of the mass outside the k ids, -inf when k = V ("topk")
        row["counts"]        # (T, k) int64: how often each id was drawn ("sampled"; padding: count 0, id -100)
        row["row"]           # int: the text's number in the corpus (0-based over all corpus files)
        row["reader_state"]  # the stream's position after this row (state_dict()), for checkpoints

Alignment: entry t is the teacher's distribution of the token that FOLLOWS text token t,
given prompt + text[:t+1], i.e. it lines up with a student's output at position t when the
student reads the text alone (its logits at t predict input_ids[t + 1]). The last entry
(t = T - 1) predicts the token after the text. In "sampled" mode, ids holds the distinct
tokens drawn at t (at most n of them) and counts how often each was drawn; counts sum to n
at every position; unused slots hold id -100 (kernels.distill_loss's ignore_index: an empty
slot) and count 0. Texts longer than the teacher's context after the prompt were cut from
the left: their first ``manifest["truncation"]`` tokens are gone from input_ids too.

Storage (per row of a shard; T tokens, k entries a token), about 4 bytes a cached entry:
``ids`` uint16 (T*k) plus, only when the vocabulary exceeds 65,536, ``ids_hi``: the bits
an id needs beyond 16 (1 for up to 131,072 ids), bit-packed, ceil(T*k*bits/8) bytes;
``logprobs`` fp16 or bf16 (uint16 bits), or in "int8" mode a uint8 code per entry with the
position's (max, min) log-prob in fp16 (``logprob_range``, T*2), decoded linearly;
``tail_logmass`` fp16 (T); ``input_ids`` as the ids; ``counts`` uint8 in sampled mode.
At k = 50 in fp16: 50 * (2 + 2) + 2 + 2 = 204 bytes a token (211 for V = 128,256).

The reader is the comparison shards' reader (shard_reader.ShardReader): the same global
order, rank shares, shuffle and exact, versioned position; only the row schema differs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from rankpm.engine.data.shard_reader import ShardReader
from rankpm.engine.fingerprint import require_same, tokenizer_key

LOGIT_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KIND = "rankpm-logit-cache"
MODES = ("topk", "sampled")
LOGPROB_DTYPES = ("fp16", "bf16", "int8")
EMPTY_ID = -100  # a sampled row's unused slot (kernels.distill_loss ignore_index)


def logit_schema(mode: str, logprobs: str, vocab_size: int) -> pa.Schema:
    """The Arrow schema of a cache's rows, fixed by its mode, log-prob storage and vocabulary."""
    if mode not in MODES or logprobs not in LOGPROB_DTYPES:
        raise ValueError(f"mode={mode!r}, logprobs={logprobs!r}: expected one of {MODES} and {LOGPROB_DTYPES}")
    wide = high_bits(vocab_size) > 0
    fields = [("row", pa.int64()), ("source", pa.string()), ("truncated", pa.int32()),
              ("input_ids", pa.list_(pa.uint16()))]
    fields += [("input_ids_hi", pa.list_(pa.uint8()))] if wide else []
    fields += [("ids", pa.list_(pa.uint16()))]
    fields += [("ids_hi", pa.list_(pa.uint8()))] if wide else []
    if mode == "sampled":
        fields += [("counts", pa.list_(pa.uint8()))]
    else:
        stored = {"fp16": pa.float16(), "bf16": pa.uint16(), "int8": pa.uint8()}[logprobs]
        fields += [("logprobs", pa.list_(stored))]
        fields += [("logprob_range", pa.list_(pa.float16()))] if logprobs == "int8" else []
        fields += [("tail_logmass", pa.list_(pa.float16()))]
    return pa.schema(fields, metadata={"rankpm_logit_schema_version": str(LOGIT_SCHEMA_VERSION)})


# ----- encoding (the writer) and decoding (the reader) of one row ----------------------------

def high_bits(vocab_size: int) -> int:
    """Bits an id needs beyond its low 16: 0 up to 65,536 ids, 1 up to 131,072 (Llama 3's 128,256), ..."""
    return max(0, (vocab_size - 1).bit_length() - 16)


def split_ids(ids: np.ndarray, bits: int) -> dict:
    """int ids -> {"lo": uint16 low halves, "hi": the ``bits`` high bits of each, bit-packed (uint8), or None}."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    hi = None
    if bits:
        planes = ((ids[:, None] >> (16 + np.arange(bits))) & 1).astype(np.uint8)  # (n, bits)
        hi = np.packbits(planes.reshape(-1))
    return {"lo": (ids & 0xFFFF).astype(np.uint16), "hi": hi}


def join_ids(lo: np.ndarray, hi: np.ndarray | None, bits: int) -> np.ndarray:
    ids = lo.astype(np.int64)
    if bits:
        planes = np.unpackbits(hi, count=len(ids) * bits).reshape(len(ids), bits).astype(np.int64)
        ids |= (planes << (16 + np.arange(bits))).sum(axis=1)
    return ids


def encode_logprobs(logprobs: np.ndarray, dtype: str) -> dict:
    """(T, k) float32 log-probs, descending -> the stored columns (flattened)."""
    lp = np.asarray(logprobs, dtype=np.float32)
    if dtype == "fp16":
        return {"logprobs": lp.astype(np.float16).reshape(-1)}
    if dtype == "bf16":  # the upper half of the fp32 bits, rounded to nearest even
        bits = lp.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return {"logprobs": rounded.astype(np.uint16).reshape(-1)}
    hi = lp[:, :1].astype(np.float16).astype(np.float32)
    lo = lp[:, -1:].astype(np.float16).astype(np.float32)
    span = np.where(hi > lo, hi - lo, 1.0)
    codes = np.clip(np.rint((lp - lo) / span * 255.0), 0, 255).astype(np.uint8)
    return {"logprobs": codes.reshape(-1),
            "logprob_range": np.concatenate([hi, lo], axis=1).astype(np.float16).reshape(-1)}


def decode_logprobs(stored: np.ndarray, value_range: np.ndarray | None, dtype: str, k: int) -> np.ndarray:
    if dtype == "fp16":
        return stored.astype(np.float32).reshape(-1, k)
    if dtype == "bf16":
        return (stored.astype(np.uint32) << 16).view(np.float32).reshape(-1, k)
    bounds = value_range.astype(np.float32).reshape(-1, 2)
    hi, lo = bounds[:, :1], bounds[:, 1:]
    return lo + stored.astype(np.float32).reshape(-1, k) / 255.0 * (hi - lo)


def decode_row(table: pa.Table, i: int, manifest: dict) -> dict:
    """Row i of a shard table as the arrays the module docstring lists."""
    k, mode, dtype = manifest["k"], manifest["mode"], manifest["logprobs_dtype"]
    bits = high_bits(manifest["vocab_size"])

    def col(name):
        return table.column(name)[i].values.to_numpy(zero_copy_only=False) if name in table.column_names else None

    out = {"row": table.column("row")[i].as_py(),
           "input_ids": join_ids(col("input_ids"), col("input_ids_hi"), bits),
           "ids": join_ids(col("ids"), col("ids_hi"), bits).reshape(-1, k)}
    if mode == "sampled":
        counts = col("counts").astype(np.int64).reshape(-1, k)
        out["ids"][counts == 0] = EMPTY_ID
        out["counts"] = counts
    else:
        out["logprobs"] = decode_logprobs(col("logprobs"), col("logprob_range"), dtype, k)
        out["tail_logmass"] = col("tail_logmass").astype(np.float32)
    return out


# ----- the reader ------------------------------------------------------------------------------

def open_logit_cache(path: str | Path) -> dict:
    """The manifest of a finished logit cache, checked: its kind, schema version, and that its
    shards add up to its rows. FileNotFoundError for a folder without one (not a cache, or a run
    that has not finished: rerun ``rankpm cache-logits`` with the same config to complete it)."""
    folder = Path(path)
    file = folder / MANIFEST
    if not file.is_file():
        hint = " (an unfinished run? rerun rankpm cache-logits with the same config)" if folder.is_dir() else ""
        raise FileNotFoundError(f"{folder}: not a logit cache (no {MANIFEST}){hint}")
    manifest = json.loads(file.read_text())
    if manifest.get("kind") != KIND:
        raise ValueError(f"{file}: not a logit cache manifest (kind {manifest.get('kind')!r}, expected {KIND!r})")
    if manifest.get("schema_version") != LOGIT_SCHEMA_VERSION:
        raise ValueError(f"{file}: logit schema version {manifest.get('schema_version')!r}, this rankpm reads "
                         f"version {LOGIT_SCHEMA_VERSION}; cache the logits again")
    for key in ("mode", "k", "vocab_size", "tokenizer", "prompt", "teacher", "logprobs_dtype", "rows", "tokens",
                "shards", "fingerprint"):
        if key not in manifest:
            raise ValueError(f"{file}: field {key!r} missing")
    listed = sum(s["rows"] for s in manifest["shards"])
    if listed != manifest["rows"]:
        raise ValueError(f"{file}: shards list {listed} rows but rows is {manifest['rows']}")
    return manifest


def require_student(manifest: dict, tokenizer_identity: dict, vocab_size: int) -> None:
    """Refuse a student whose tokenizer or vocabulary differs from the cache's teacher (MismatchError
    naming what differs): its ids would name other tokens."""
    require_same("the tokenizer", "the logit cache", tokenizer_key(manifest["tokenizer"]),
                 "the student", tokenizer_key(tokenizer_identity))
    require_same("the vocabulary size", "the logit cache", manifest["vocab_size"], "the student", vocab_size)


class LogitStream(ShardReader):
    """One text row at a time from a logit cache (see the module docstring), resumable exactly:
    ``state_dict()`` / ``load_state_dict()`` / ``resume_from()`` as for comparison shards.
    ``loop=False`` (the default) reads one pass; ``interleave`` rows at a time go to each rank."""

    row_name = "texts"

    def __init__(self, path: str | Path, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = False, shuffle_buffer: int = 1024, loop: bool = False, interleave: int = 1):
        manifest = open_logit_cache(path)
        schema = logit_schema(manifest["mode"], manifest["logprobs_dtype"], manifest["vocab_size"])
        super().__init__(path, manifest, schema, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
                         shuffle_buffer=shuffle_buffer, loop=loop, interleave=interleave)

    def __iter__(self) -> Iterator[dict]:
        for index, after in self._walk(self._epoch, self._position, self.loop):
            shard = int(np.searchsorted(self._shard_starts, index, side="right")) - 1
            row = decode_row(self._table(shard), index - int(self._shard_starts[shard]), self.manifest)
            self._epoch, self._position = after
            row["reader_state"] = self._state(*after)
            yield row
