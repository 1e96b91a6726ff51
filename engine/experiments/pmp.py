"""Experiment: does preference-model pre-training (PMP) make fine-tuning sample-efficient?

    rankpm experiment pmp --out experiments/results/pmp [--sizes 64 256 1024 0]

Stage 1 (PMP, run once per variant) trains on the large, cheap, noisier "forum" source
(synthetic_pmp "pretrain") with PM + LM loss, either ranked or binarized (the paper's
binary PMP). Stage 2 fine-tunes on n comparisons of the small "hhh" set (ranked PM loss),
starting from the PMP model (model.init_from) or from scratch. Every fine-tuned model is
evaluated on the same held-out "hhh" groups. Writes results.json, results.md and
accuracy_vs_comparisons.png.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from rankpm.engine.data.synthetic_pmp import generate_groups, write_jsonl
from rankpm.engine.experiments.common import SIZES, plt, run_config, write_json

ARMS = ("none", "ranked", "binary")  # which PMP precedes fine-tuning


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="experiments/results/pmp")
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 256, 1024, 0],
                   help="fine-tuning comparisons per run; 0 means all of --finetune-groups")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--model-size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--pretrain-groups", type=int, default=6000)
    p.add_argument("--pretrain-steps", type=int, default=250)
    p.add_argument("--finetune-groups", type=int, default=2000)
    p.add_argument("--eval-groups", type=int, default=300)
    p.add_argument("--finetune-epochs", type=float, default=2.0)
    p.add_argument("--min-finetune-steps", type=int, default=30)
    p.add_argument("--max-finetune-steps", type=int, default=150)
    p.add_argument("--sequences-per-step", type=int, default=48)
    p.add_argument("--lr", type=float, default=2e-3, help="PMP learning rate")
    p.add_argument("--finetune-lr-scale", type=float, default=0.5,
                   help="fine-tuning lr relative to --lr (from-scratch runs use --lr)")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--backbone", default="gpt2")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)


def _base(args, out_dir: Path, model: dict) -> dict:
    return {"model": model,
            "data": {"tokenizer": "bytes", "max_length": args.max_length, "shuffle_buffer": 512},
            "train": {"out_dir": str(out_dir), "warmup_steps": 10, "log_every": 25, "progress": False,
                      "seed": args.seed, "device": args.device}}


def run(args) -> dict:
    out = Path(args.out)
    data = out / "data"
    pretrain = write_jsonl(generate_groups("pretrain", args.pretrain_groups, args.seed), data / "pretrain.jsonl")
    finetune_all = generate_groups("finetune", args.finetune_groups, args.seed)
    eval_file = write_jsonl(generate_groups("finetune", args.eval_groups, args.seed + 1), data / "eval.jsonl")
    fresh_model = {"backbone": args.backbone, "preset": "tiny", "overrides": SIZES[args.model_size]}

    pmp_models, pmp_rows = {}, []
    for arm in (a for a in args.arms if a != "none"):
        raw = _base(args, out / "runs" / f"pmp-{arm}", fresh_model)
        raw["data"].update(train=[str(pretrain)], eval=[str(eval_file)],
                           batch_groups=max(1, round(args.sequences_per_step / (2 if arm == "binary" else 3))))
        raw["objective"] = {"name": arm, "lm_loss": True}
        raw["train"].update(lr=args.lr, max_steps=args.pretrain_steps)
        summary, section = run_config(raw)
        pmp_models[arm] = str(Path(raw["train"]["out_dir"]) / "model")
        pmp_rows.append({"pmp": arm, "accuracy_on_finetune_eval_before_finetuning": section["accuracy"],
                         "judge": section["judge"], "wall_seconds": summary["wall_seconds"]})
        print(f"pmp: {arm} PMP done, zero-shot accuracy on the fine-tuning eval set "
              f"{section['accuracy']:.4f} ({section['judge']} judge), {summary['wall_seconds']} s", flush=True)

    rows = []
    for n in args.sizes:
        n = n or len(finetune_all)
        train_file = write_jsonl(finetune_all[:n], data / f"finetune_{n}.jsonl")
        batch_groups = max(1, round(args.sequences_per_step / 3))
        steps = min(args.max_finetune_steps,
                    max(args.min_finetune_steps, math.ceil(args.finetune_epochs * n / batch_groups)))
        for arm in args.arms:
            model = fresh_model if arm == "none" else {"init_from": pmp_models[arm]}
            raw = _base(args, out / "runs" / f"ft-{n}-{arm}", model)
            raw["data"].update(train=[str(train_file)], eval=[str(eval_file)], batch_groups=batch_groups)
            if arm != "none":
                raw["data"]["tokenizer"] = str(Path(pmp_models[arm]) / "tokenizer")
            raw["objective"] = {"name": "ranked"}
            raw["train"].update(lr=args.lr * (1.0 if arm == "none" else args.finetune_lr_scale), max_steps=steps)
            summary, section = run_config(raw)
            rows.append({"comparisons": n, "pmp": arm, "steps": steps, "accuracy": section["accuracy"],
                         "ece": (section["calibration"] or {}).get("ece"), "pairs": section["pairs"],
                         "wall_seconds": summary["wall_seconds"]})
            print(f"pmp: fine-tune n={n:>5} after {arm:>6} PMP: accuracy {section['accuracy']:.4f} "
                  f"({steps} steps, {summary['wall_seconds']} s)", flush=True)
    result = {"experiment": "pmp", "settings": {k: v for k, v in vars(args).items() if k != "run"},
              "pmp": pmp_rows, "rows": rows}
    write_json(out / "results.json", result)
    _table(out / "results.md", result, args)
    _plot(out / "accuracy_vs_comparisons.png", rows)
    return result


def _table(path: Path, result: dict, args) -> None:
    rows = result["rows"]
    sizes = sorted({r["comparisons"] for r in rows})
    arms = [a for a in ARMS if any(r["pmp"] == a for r in rows)]
    cell = {(r["comparisons"], r["pmp"]): r for r in rows}
    lines = [f"Held-out pair accuracy on {args.eval_groups} synthetic graded 'hhh' groups after fine-tuning on n "
             f"comparisons; PMP = {args.pretrain_steps} steps on {args.pretrain_groups} noisy 'forum' groups "
             f"(PM + LM loss).", "",
             "| fine-tuning comparisons | " + " | ".join(f"PMP: {a}" for a in arms) + " |",
             "|---:|" + "---:|" * len(arms)]
    for n in sizes:
        lines.append(f"| {n} | " + " | ".join(f"{cell[(n, a)]['accuracy']:.4f}" if (n, a) in cell else "-"
                                           for a in arms) + " |")
    if result["pmp"]:
        lines += ["", "| PMP | accuracy on the fine-tuning eval set before fine-tuning | judge |", "|---|---:|---|"]
        lines += [f"| {r['pmp']} | {r['accuracy_on_finetune_eval_before_finetuning']:.4f} | {r['judge']} |"
                  for r in result["pmp"]]
    path.write_text("\n".join(lines) + "\n")


def _plot(path: Path, rows: list[dict]) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(5.5, 4))
    labels = {"none": "no PMP", "ranked": "ranked PMP", "binary": "binary PMP"}
    for arm in ARMS:
        mine = sorted((r for r in rows if r["pmp"] == arm), key=lambda r: r["comparisons"])
        if mine:
            ax.plot([r["comparisons"] for r in mine], [r["accuracy"] for r in mine], marker="o", label=labels[arm])
    ax.set_xscale("log")
    ax.set_xlabel("fine-tuning comparisons")
    ax.set_ylabel("held-out pair accuracy")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_title("Fine-tuning sample efficiency with and without PMP", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
