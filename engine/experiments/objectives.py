"""Experiment: ranked PM vs binary discrimination vs imitation learning across model sizes.

    rankpm experiment objectives --out experiments/results/objectives [--sizes xs tiny s] [--steps 120]
    rankpm experiment objectives --backbone lm ...          # from the project's pre-trained LM of each size
    rankpm experiment objectives --backbone minilm --objectives ranked binary --frozen-too ...
    rankpm experiment objectives --data train.jsonl.gz --eval-data test.jsonl.gz ...   # your comparisons

All three objectives train on the same graded comparison groups (synthetic_pmp
"finetune", or the files of --data) for the same number of optimizer steps on the same
number of sequences per step, and are evaluated on the same held-out groups, each with
its own judge: PM score, P(GOOD), mean per-token log-probability. ``--frozen-too`` adds
runs of the score-based objectives on a frozen backbone (only the score head trains).
Imitation learning needs a causal LM, so an encoder backbone (minilm) runs without it.
Writes results.json, results.md and accuracy_vs_params.png into the output folder.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rankpm.engine.data.synthetic_pmp import generate_groups, write_jsonl
from rankpm.engine.experiments.common import (SIZES, add_backbone_arguments, add_data_arguments, default_lr,
                                              parameter_count, plt, resolve_backbone, run_config, user_files,
                                              write_json)

OBJECTIVES = ("ranked", "binary", "imitation")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="experiments/results/objectives")
    p.add_argument("--sizes", nargs="+", default=["xxs", "xs", "tiny"], choices=sorted(SIZES))
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    p.add_argument("--train-groups", type=int, default=1500)
    p.add_argument("--eval-groups", type=int, default=300)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    p.add_argument("--sequences-per-step", type=int, default=48)
    p.add_argument("--lr", type=float, default=None,
                   help="default: 2e-3 from scratch, 1e-3 on the pre-trained LM, 1e-4 on a pre-trained folder/minilm")
    p.add_argument("--frozen-too", action="store_true",
                   help="also train ranked/binary on a frozen backbone (model.freeze_backbone: the score head only)")
    p.add_argument("--frozen-lr", type=float, default=1e-3, help="learning rate of the frozen-backbone runs")
    p.add_argument("--max-length", type=int, default=192)
    add_backbone_arguments(p)
    add_data_arguments(p, eval_help="held-out comparison files (with --data)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> dict:
    out = Path(args.out)
    backbone = resolve_backbone(args)
    objectives = list(args.objectives)
    if backbone.encoder and "imitation" in objectives:
        raise ValueError(f"--objectives imitation: --backbone {args.backbone} is an encoder (it attends both ways); "
                         f"imitation learning needs a causal LM; leave imitation out")
    sizes = args.sizes if backbone.sized else [backbone.kind]
    train_files, eval_files = user_files(args)
    if not train_files:
        train_files = [str(write_jsonl(generate_groups("finetune", args.train_groups, args.seed),
                                       out / "data" / "train.jsonl"))]
        eval_files = [str(write_jsonl(generate_groups("finetune", args.eval_groups, args.seed + 1),
                                      out / "data" / "eval.jsonl"))]
    lr = default_lr(backbone, args.lr)
    mean_k = 3.0  # K is uniform on 2..4 in the synthetic data
    variants = [(o, False) for o in objectives] + \
        [(o, True) for o in objectives if args.frozen_too and o != "imitation"]
    rows = []
    for size in sizes:
        for objective, frozen in variants:
            # the same sequences per step: a binarized group has 2 sequences
            groups = max(1, round(args.sequences_per_step / (2 if objective == "binary" else mean_k)))
            name = f"{backbone.label(size)}-{objective}{'-frozen' if frozen else ''}"
            raw = {
                "model": backbone.model(size, **({"freeze_backbone": True} if frozen else {})),
                "data": {"train": train_files, "eval": eval_files, "tokenizer": backbone.tokenizer(size),
                         "max_length": args.max_length, "batch_groups": groups, "shuffle_buffer": 512,
                         "skip_bad": args.skip_bad},
                "objective": {"name": objective},
                "train": {"out_dir": str(out / "runs" / name), "lr": args.frozen_lr if frozen else lr,
                          "max_steps": args.steps, "warmup_steps": 10, "log_every": 25, "progress": False,
                          "seed": args.seed, "device": args.device},
            }
            summary, section = run_config(raw)
            model_dir = Path(raw["train"]["out_dir"]) / "model"
            params = parameter_count(model_dir)
            reading = json.loads((model_dir / "rankpm_model.json").read_text()).get("reading")
            rows.append({"size": backbone.label(size), "backbone": backbone.kind, "objective": objective,
                         "frozen_backbone": frozen, "reading": reading, "judge": section["judge"],
                         "accuracy": section["accuracy"], "pairs": section["pairs"],
                         "ece": (section["calibration"] or {}).get("ece"),
                         "by_turns": {t: v["accuracy"] for t, v in section["by_turns"].items()},
                         "wall_seconds": summary["wall_seconds"], **params})
            print(f"objectives: {backbone.label(size):>6} {objective:>9}{' (frozen)' if frozen else ''}  accuracy "
                  f"{section['accuracy']:.4f}  ({params['non_embedding_parameters']} non-embedding params, "
                  f"{summary['wall_seconds']} s)", flush=True)
    result = {"experiment": "objectives", "settings": {k: v for k, v in vars(args).items() if k != "run"},
              "rows": rows}
    write_json(out / "results.json", result)
    _table(out / "results.md", rows, args)
    _plot(out / "accuracy_vs_params.png", rows, args.backbone)
    return result


def _table(path: Path, rows: list[dict], args) -> None:
    data = f"the files of --eval-data" if args.data else f"{args.eval_groups} synthetic graded groups"
    lines = [f"Held-out pair accuracy on {data}; backbone {args.backbone}; {args.steps} steps of "
             f"{args.sequences_per_step} sequences each.", "",
             "| size | non-embedding params | objective | backbone weights | judge | pair accuracy | ECE | seconds |",
             "|---|---:|---|---|---|---:|---:|---:|"]
    for r in rows:
        ece = f"{r['ece']:.3f}" if r["ece"] is not None else "-"
        trained = "frozen" if r.get("frozen_backbone") else "trained"
        lines.append(f"| {r['size']} | {r['non_embedding_parameters']:,} | {r['objective']} | {trained} | "
                     f"{r['judge']} | {r['accuracy']:.4f} | {ece} | {r['wall_seconds']} |")
    path.write_text("\n".join(lines) + "\n")


def _plot(path: Path, rows: list[dict], backbone: str) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(5.5, 4))
    for objective in OBJECTIVES:
        for frozen in (False, True):
            mine = sorted((r for r in rows if r["objective"] == objective and r.get("frozen_backbone", False) == frozen),
                          key=lambda r: r["non_embedding_parameters"])
            if mine:
                ax.plot([r["non_embedding_parameters"] for r in mine], [r["accuracy"] for r in mine],
                        marker="s" if frozen else "o", linestyle="--" if frozen else "-",
                        label=f"{objective} (frozen backbone)" if frozen else objective)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("held-out pair accuracy")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_title(f"Objectives vs model size, backbone {Path(backbone).name}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
