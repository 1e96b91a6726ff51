"""Configuration of ``rankpm cache-logits``: the teacher, the corpus, and how its logits are cached.

    cfg = load_cache_config("configs/cache_logits.yaml", ["distill.k=20", "distill.out_dir=runs/logits"])

A file of its own, apart from ``rankpm train``'s run config (which it leaves unchanged), read by
the same machinery (rankpm.engine.config): every key checked, errors naming the dotted key,
YAML errors with line:column.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rankpm.engine.config import build_config, read_raw_config


@dataclass(frozen=True)
class TeacherConfig:
    # A local causal-LM folder (transformers, with an LM head), a rankpm model folder saved with
    # an LM head, or a transformers model type ("gpt2", "llama", ...) built with random init.
    model: str = "gpt2"
    preset: Literal["tiny", "small", "base"] = "tiny"  # sizes for a config-built teacher
    overrides: dict = field(default_factory=dict)  # extra transformers config keys (config-built)
    # The tokenizer of a config-built teacher ("bytes" or a local tokenizer folder); a folder
    # teacher uses its own.
    tokenizer: str = "bytes"
    # Positions of a config-built teacher (prompt + text); a folder teacher: its own limit.
    max_length: int = 16384
    seed: int = 0  # random init of a config-built teacher
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"  # "auto": cuda when available, else cpu


@dataclass(frozen=True)
class CorpusConfig:
    # JSON Lines / Parquet files. kind "text": rows {"text": ...}; "responses": comparison files
    # (any format `rankpm prepare` reads), each response one text; "dialogues": comparison
    # files, each context + response one text (an HH transcript is one).
    files: list[str] = field(default_factory=list)
    kind: Literal["text", "responses", "dialogues"] = "text"


@dataclass(frozen=True)
class DistillConfig:
    out_dir: str = "runs/logits"
    prompt: str = "hhh"  # "hhh": the packaged HHH prompt; "none": no prompt; else a text file
    mode: Literal["topk", "sampled"] = "topk"
    k: int = 50  # top-k: log-probs kept per token
    samples: int = 12  # sampled: tokens drawn per position (unique ids stored with counts)
    logprobs: Literal["fp16", "bf16", "int8"] = "fp16"  # storage of the top-k log-probs
    batch_texts: int = 8  # texts per teacher forward
    rows_per_shard: int = 256  # texts per shard: the unit of resume
    seed: int = 0  # sampled mode: draws are seeded per (seed, row)
    reuse_prompt_cache: bool = True  # the prompt's keys/values computed once per worker
    workers: int = 1  # Ray workers (--workers)


@dataclass(frozen=True)
class CacheLogitsConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


RANGES = [
    ("teacher.max_length", lambda x: x >= 2, "an integer >= 2"),
    ("teacher.seed", lambda x: x >= 0, "an integer >= 0"),
    ("distill.k", lambda x: x >= 1, "an integer >= 1 (and at most the vocabulary)"),
    ("distill.samples", lambda x: 1 <= x <= 255, "an integer in [1, 255]"),
    ("distill.batch_texts", lambda x: x >= 1, "an integer >= 1"),
    ("distill.rows_per_shard", lambda x: x >= 1, "an integer >= 1"),
    ("distill.seed", lambda x: x >= 0, "an integer >= 0"),
    ("distill.workers", lambda x: x >= 1, "an integer >= 1"),
]


def load_cache_config(path: str | Path | None = None, overrides: list[str] = ()) -> CacheLogitsConfig:
    return cache_config_from_dict(read_raw_config(path, overrides))


def cache_config_from_dict(raw: dict) -> CacheLogitsConfig:
    from rankpm.engine.config import ConfigError

    cfg = build_config(CacheLogitsConfig, raw, RANGES)
    if not cfg.corpus.files:
        raise ConfigError("corpus.files: empty; give the JSON Lines or Parquet files to cache")
    return cfg
