"""Experiment: ranked PM vs binary discrimination vs imitation learning across model sizes.

    rankpm experiment objectives --out experiments/results/objectives [--sizes xs tiny s] [--steps 120]

All three objectives train on the same graded comparison groups (synthetic_pmp
"finetune") for the same number of optimizer steps on the same number of sequences per
step, and are evaluated on the same held-out groups, each with its own judge: PM score,
P(GOOD), mean per-token log-probability. Writes results.json, results.md and
accuracy_vs_params.png into the output folder.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rankpm.engine.data.synthetic_pmp import generate_groups, write_jsonl
from rankpm.engine.experiments.common import SIZES, parameter_count, plt, run_config, write_json

OBJECTIVES = ("ranked", "binary", "imitation")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="experiments/results/objectives")
    p.add_argument("--sizes", nargs="+", default=["xxs", "xs", "tiny"], choices=sorted(SIZES))
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    p.add_argument("--train-groups", type=int, default=1500)
    p.add_argument("--eval-groups", type=int, default=300)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    p.add_argument("--sequences-per-step", type=int, default=48)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--backbone", default="gpt2")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> dict:
    out = Path(args.out)
    train_file = write_jsonl(generate_groups("finetune", args.train_groups, args.seed), out / "data" / "train.jsonl")
    eval_file = write_jsonl(generate_groups("finetune", args.eval_groups, args.seed + 1), out / "data" / "eval.jsonl")
    mean_k = 3.0  # K is uniform on 2..4
    rows = []
    for size in args.sizes:
        for objective in args.objectives:
            # the same sequences per step: a binarized group has 2 sequences
            groups = max(1, round(args.sequences_per_step / (2 if objective == "binary" else mean_k)))
            raw = {
                "model": {"backbone": args.backbone, "preset": "tiny", "overrides": SIZES[size]},
                "data": {"train": [str(train_file)], "eval": [str(eval_file)], "tokenizer": "bytes",
                         "max_length": args.max_length, "batch_groups": groups, "shuffle_buffer": 512},
                "objective": {"name": objective},
                "train": {"out_dir": str(out / "runs" / f"{size}-{objective}"), "lr": args.lr,
                          "max_steps": args.steps, "warmup_steps": 10, "log_every": 25, "progress": False,
                          "seed": args.seed, "device": args.device},
            }
            summary, section = run_config(raw)
            params = parameter_count(Path(raw["train"]["out_dir"]) / "model")
            rows.append({"size": size, "objective": objective, "judge": section["judge"],
                         "accuracy": section["accuracy"], "pairs": section["pairs"],
                         "ece": (section["calibration"] or {}).get("ece"),
                         "by_turns": {t: v["accuracy"] for t, v in section["by_turns"].items()},
                         "wall_seconds": summary["wall_seconds"], **params})
            print(f"objectives: {size:>5} {objective:>9}  accuracy {section['accuracy']:.4f}  "
                  f"({params['non_embedding_parameters']} non-embedding params, {summary['wall_seconds']} s)",
                  flush=True)
    result = {"experiment": "objectives", "settings": {k: v for k, v in vars(args).items() if k != "run"},
              "rows": rows}
    write_json(out / "results.json", result)
    _table(out / "results.md", rows, args)
    _plot(out / "accuracy_vs_params.png", rows)
    return result


def _table(path: Path, rows: list[dict], args) -> None:
    lines = [f"Held-out pair accuracy on {args.eval_groups} synthetic graded groups; {args.steps} steps of "
             f"{args.sequences_per_step} sequences each.", "",
             "| size | non-embedding params | objective | judge | pair accuracy | ECE | seconds |",
             "|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        ece = f"{r['ece']:.3f}" if r["ece"] is not None else "-"
        lines.append(f"| {r['size']} | {r['non_embedding_parameters']:,} | {r['objective']} | {r['judge']} | "
                     f"{r['accuracy']:.4f} | {ece} | {r['wall_seconds']} |")
    path.write_text("\n".join(lines) + "\n")


def _plot(path: Path, rows: list[dict]) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(5.5, 4))
    for objective in OBJECTIVES:
        mine = sorted((r for r in rows if r["objective"] == objective), key=lambda r: r["non_embedding_parameters"])
        if mine:
            ax.plot([r["non_embedding_parameters"] for r in mine], [r["accuracy"] for r in mine],
                    marker="o", label=objective)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("held-out pair accuracy")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_title("Objectives vs model size (synthetic, CPU)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
