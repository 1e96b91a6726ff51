"""Where a training step's time goes: torch.profiler over whole steps of the training loop.

    python benchmarks/profile_step.py TRAIN_DIR EVAL_DIR [--layout shared] [--steps 8] [--top 15]

TRAIN_DIR/EVAL_DIR: prepared HH-shaped data (bench_training.py leaves them in its temporary
folder). The run is the benchmark's Llama shape at 8 groups per step; the profile covers
the last ``--steps`` steps after two warm-up steps (the loop's own Python, the reader and
collate included, not only the model), and prints the top entries by self CPU time and
the share of the step that is model compute (matmuls, attention, elementwise) and what is
not. Runs against whichever rankpm is importable (an older checkout through PYTHONPATH).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_training import MODELS, OPTIM  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("train_dir")
    p.add_argument("eval_dir")
    p.add_argument("--layout", default=None, help="stacked | shared | packed (absent in an older rankpm)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()

    from rankpm.engine.config import from_dict
    from rankpm.engine.train.loop import train

    data = {"train": [args.train_dir], "tokenizer": f"{args.train_dir}/tokenizer", "max_length": 256,
            "batch_groups": 8, "shuffle_buffer": 4096}
    if args.layout:
        data["layout"] = args.layout
    model = MODELS["llama"]
    cfg = from_dict({
        "model": {"backbone": "llama", "preset": "small", "overrides": model["overrides"]},
        "data": data,
        "train": {"out_dir": tempfile.mkdtemp(prefix="profile-"), "lr": OPTIM["lr"], "max_steps": 2 + args.steps,
                  "log_every": 1, "progress": False, "warmup_steps": 2},
    })
    state: dict = {}

    def on_record(row: dict) -> None:  # start at the end of step 2, stop at the last step
        if row["kind"] != "train":
            return
        if row["step"] == 2:
            state["prof"] = profile(activities=[ProfilerActivity.CPU])
            state["prof"].__enter__()
            state["start"] = time.perf_counter()
        elif row["step"] == 2 + args.steps:
            state["wall"] = time.perf_counter() - state["start"]
            state["prof"].__exit__(None, None, None)

    train(cfg, on_record=on_record)
    prof, wall = state["prof"], state["wall"]
    events = prof.key_averages()
    total_ms = wall * 1e3 / args.steps
    print(f"{total_ms:.0f} ms per step (wall, {args.steps} steps)")
    compute = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1e3 / args.steps
    print(f"aten ops (model compute, optimizer, loss): {compute:.0f} ms per step; the rest, {total_ms - compute:.0f} ms: "
          f"Python, the reader, collate, logging")
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    print("| op | self CPU ms per step | calls per step |")
    print("|---|---:|---:|")
    for e in rows:
        print(f"| {e.key[:60]} | {e.self_cpu_time_total / 1e3 / args.steps:.1f} | {e.count / args.steps:.0f} |")
    print(json.dumps({"ms_per_step": total_ms, "aten_ms_per_step": compute}))


if __name__ == "__main__":
    main()
