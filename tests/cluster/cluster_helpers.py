"""Shared pieces for the cluster tests: a tiny run config and its metrics."""
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from rankpm.engine.config import from_dict  # noqa: E402

# A few hundred thousand parameters: 2 layers, width 32, byte tokenizer.
TINY_MODEL = {"backbone": "gpt2", "preset": "tiny",
              "overrides": {"hidden_size": 32, "num_attention_heads": 2, "n_inner": 64}}


def tiny_config(out_dir, *, data=None, cluster=None, **train):
    """A run of a few steps on 8 groups per global step (4 per rank with 2 workers)."""
    data_section = {"max_length": 96, "batch_groups": 4, "shuffle_buffer": 16, "eval_batch_groups": 16}
    if data is None:
        data_section["synthetic"] = {"train_groups": 64, "eval_groups": 24, "seed": 5, "k_min": 2, "k_max": 2}
    else:
        data_section.update(data)
    return from_dict({
        "model": TINY_MODEL,
        "data": data_section,
        "objective": {"reduction": "pairs", "kernel": "torch"},
        "train": {"out_dir": str(out_dir), "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "progress": False,
                  "max_steps": 6, "save_every": 3, "keep_last": 2, **train},
        "cluster": {"workers": 2, "cpus_per_worker": 1, **(cluster or {})},
    })


def train_rows(out_dir):
    """The last logged train row of each step (a resumed run logs some steps twice)."""
    rows = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train":
            rows[row["step"]] = row
    return rows
