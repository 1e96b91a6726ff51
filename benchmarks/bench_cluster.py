"""Training throughput: 1 process vs 1 and 2 Ray/DeepSpeed workers, ZeRO 0-3, one run.

    python benchmarks/bench_cluster.py [--steps 30] [--out benchmarks/cluster.json]

Same tiny model (GPT-2 shape, 4 layers, width 256: ~3.2M parameters), same data, same
per-rank micro-batch (8 groups) in every layout; each rank gets one CPU thread, so one
rank's compute is the same in every layout and the difference in step time is what the
distribution costs:
  - local   one process, LocalStrategy (no DeepSpeed, no process group): the baseline;
  - 1w z0   one Ray worker, DeepSpeed ZeRO-0 (DeepSpeed's own per-step cost, no peer);
  - 2w zS   two Ray workers, ZeRO stage S (twice the global batch per step).
Per-step overhead = step time(2w zS) - step time(local); the gloo all-reduce of one
gradient-sized fp32 buffer between the two workers is timed on its own as the floor.
Step time is the median over logged steps after the first 5 (warm-up excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from rankpm.engine.config import from_dict  # noqa: E402

MODEL = {"backbone": "gpt2", "preset": "base",
         "overrides": {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4}}
WARMUP = 5


def config(out_dir: Path, *, steps: int, workers: int, stage: int = 0, data: dict | None = None):
    data_section = {"max_length": 128, "batch_groups": 8, "shuffle_buffer": 64}
    data_section.update(data or {"synthetic": {"train_groups": 2000, "eval_groups": 16, "seed": 1}})
    return from_dict({
        "model": MODEL, "data": data_section,
        "train": {"out_dir": str(out_dir), "max_steps": steps, "log_every": 1, "progress": False,
                  "warmup_steps": 2, "save_every": 0},
        "cluster": {"workers": workers, "cpus_per_worker": 1, "zero_stage": stage},
    })


def step_times(out_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if r["kind"] == "train"]
    return [b - a for a, b in zip(times[WARMUP:], times[WARMUP + 1:])]


def pairs_per_step(out_dir: Path) -> float:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    seen = [r["pairs_seen"] for r in rows if r["kind"] == "train"]
    return (seen[-1] - seen[WARMUP]) / max(len(seen) - 1 - WARMUP, 1)


def allreduce_ms(config: dict) -> None:
    """Run on each of two Ray workers: median gloo all-reduce time of a gradient-sized buffer."""
    import torch.distributed as dist

    buffer = torch.zeros(config["numel"])
    for _ in range(3):
        dist.all_reduce(buffer)
    times = []
    for _ in range(20):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(buffer)
        times.append((time.perf_counter() - t0) * 1e3)
    if dist.get_rank() == 0:
        Path(config["out"]).write_text(json.dumps(statistics.median(times)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/cluster.json")
    args = parser.parse_args(argv)

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rankpm.cluster.launch import train_many_on_ray
    from rankpm.engine.train.loop import train

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="rankpm_bench_cluster_"))
    results = []
    t0 = time.perf_counter()
    local = train(config(root / "local", steps=args.steps, workers=1))
    data = {"train": [str(root / "local" / "data" / "train")], "eval": [str(root / "local" / "data" / "eval")]}
    from rankpm.engine.model.preference_model import PreferenceModel
    n_params = sum(p.numel() for p in PreferenceModel.load(root / "local" / "model").parameters())
    results.append(("local (1 process)", root / "local", 1))

    ray.init(num_cpus=max(os.cpu_count() or 2, 2) + 1, include_dashboard=False, log_to_driver=False)
    try:
        train_many_on_ray([config(root / "w1z0", steps=args.steps, workers=1, data=data)])
        results.append(("1 worker, ZeRO-0", root / "w1z0", 1))
        stages = (0, 1, 2, 3)
        train_many_on_ray([config(root / f"w2z{s}", steps=args.steps, workers=2, stage=s, data=data) for s in stages])
        results += [(f"2 workers, ZeRO-{s}", root / f"w2z{s}", 2) for s in stages]
        TorchTrainer(allreduce_ms, train_loop_config={"numel": n_params, "out": str(root / "allreduce.json")},
                             scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                             torch_config=TorchConfig(backend="gloo"),
                             run_config=RunConfig(storage_path=str(root / "ray"), name="allreduce")).fit()
        allreduce = json.loads((root / "allreduce.json").read_text())
    finally:
        ray.shutdown()

    base = statistics.median(step_times(root / "local"))
    table = []
    for name, out_dir, workers in results:
        step = statistics.median(step_times(out_dir))
        pairs = pairs_per_step(out_dir)
        table.append({"layout": name, "workers": workers, "step_ms": round(step * 1e3, 1),
                      "pairs_per_s": round(pairs / step, 1), "overhead_ms": round((step - base) * 1e3, 1),
                      "overhead_pct": round(100 * (step - base) / base, 1)})
    report = {"params": n_params, "steps": args.steps, "per_rank_micro_batch_groups": 8,
              "allreduce_ms_fp32_grad": round(allreduce, 2), "device": f"CPU ({os.cpu_count()} cores)",
              "torch": torch.__version__, "wall_s": round(time.perf_counter() - t0, 1), "layouts": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"model: {n_params / 1e6:.2f}M parameters; per-rank micro-batch 8 groups; {args.steps} steps "
          f"(median step after {WARMUP} warm-up); gloo all-reduce of the fp32 gradient: {allreduce:.2f} ms")
    print("| layout | step (ms) | pairs/s | overhead vs 1 process (ms/step) | overhead (%) |")
    print("|---|---:|---:|---:|---:|")
    for row in table:
        print(f"| {row['layout']} | {row['step_ms']} | {row['pairs_per_s']} | {row['overhead_ms']} | {row['overhead_pct']} |")
    del local
    return 0


if __name__ == "__main__":
    sys.exit(main())
