"""Experiment: does preference-model pre-training (PMP) make fine-tuning sample-efficient?

    rankpm experiment pmp --out experiments/results/pmp [--sizes 64 256 1024 0] [--seeds 0 1]
    rankpm experiment pmp --backbone lm ...       # from the project's pre-trained LM (--model-size)
    rankpm experiment pmp --backbone minilm ...   # from the pre-trained MiniLM-L6 encoder
    rankpm experiment pmp --pretrain-data se.jsonl --finetune-data hh_train.jsonl.gz --eval-data hh_test.jsonl.gz

Stage 1 (PMP, run once per variant and seed) trains on the large, cheap, noisier "forum"
source (synthetic_pmp "pretrain", or the files of --pretrain-data, e.g. StackExchange
answers scored as the paper did) with PM + LM loss (PM loss alone on an encoder, which has
no LM head), either ranked or binarized (the paper's binary PMP). Stage 2 fine-tunes on n
comparisons of the small "hhh" set (or of --finetune-data; the first n of a seeded
shuffle, so smaller sets lie inside larger ones) with the ranked PM loss, starting from the
PMP model (model.init_from) or from the backbone itself ("none"). Every fine-tuned model
is evaluated on the same held-out groups. Every seed draws new generated data and a new
initialisation (a pre-trained backbone keeps its weights; its order of data changes).
Writes results.json (every run), results.md (mean and min-max over seeds) and
accuracy_vs_comparisons.png.
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
from pathlib import Path

from rankpm.engine.data.synthetic_pmp import generate_groups, write_jsonl
from rankpm.engine.experiments.common import (SIZES, add_backbone_arguments, default_lr, plt, resolve_backbone,
                                              run_config, write_json)

ARMS = ("none", "ranked", "binary")  # which PMP precedes fine-tuning
LABELS = {"none": "no PMP", "ranked": "ranked PMP", "binary": "binary PMP"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="experiments/results/pmp")
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 256, 1024, 0],
                   help="fine-tuning comparisons per run; 0 means all of the fine-tuning groups")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one full experiment per seed")
    p.add_argument("--model-size", default="tiny", choices=sorted(SIZES),
                   help="with --backbone gpt2 (from scratch) or lm; a pre-trained folder has its own size")
    p.add_argument("--pretrain-groups", type=int, default=6000)
    p.add_argument("--pretrain-steps", type=int, default=250)
    p.add_argument("--finetune-groups", type=int, default=2000)
    p.add_argument("--eval-groups", type=int, default=300)
    p.add_argument("--finetune-epochs", type=float, default=2.0)
    p.add_argument("--min-finetune-steps", type=int, default=30)
    p.add_argument("--max-finetune-steps", type=int, default=150)
    p.add_argument("--sequences-per-step", type=int, default=48)
    p.add_argument("--lr", type=float, default=None,
                   help="PMP learning rate and the no-PMP arm's; default: 2e-3 from scratch, 1e-3 on the "
                        "pre-trained LM, 1e-4 on a pre-trained folder/minilm")
    p.add_argument("--finetune-lr-scale", type=float, default=0.5,
                   help="fine-tuning lr after PMP, relative to --lr (the no-PMP arm uses --lr)")
    p.add_argument("--max-length", type=int, default=192)
    add_backbone_arguments(p)
    p.add_argument("--pretrain-data", nargs="+", default=None, metavar="FILE",
                   help="your own PMP comparisons (e.g. StackExchange answers: question/answers with pm_score, "
                        "or score and accepted) instead of the generated forum data")
    p.add_argument("--finetune-data", nargs="+", default=None, metavar="FILE",
                   help="your own fine-tuning comparisons (e.g. HH-RLHF transcripts); needs --eval-data")
    p.add_argument("--eval-data", nargs="+", default=None, metavar="FILE", help="held-out comparison files")
    p.add_argument("--skip-bad", action="store_true", help="count and list bad rows of your files instead of stopping")
    p.add_argument("--device", default="auto")


def _base(args, out_dir: Path, model: dict, tokenizer: str, seed: int) -> dict:
    return {"model": model,
            "data": {"tokenizer": tokenizer, "max_length": args.max_length, "shuffle_buffer": 512,
                     "skip_bad": args.skip_bad},
            "train": {"out_dir": str(out_dir), "warmup_steps": 10, "log_every": 25, "progress": False,
                      "seed": seed, "device": args.device}}


def _finetune_groups(args, seed: int) -> list:
    """The fine-tuning pool in a seeded order: generated, or the user's files (their good rows)."""
    if not args.finetune_data:
        return generate_groups("finetune", args.finetune_groups, seed)
    from rankpm.engine.data.readers import read_groups

    groups = list(read_groups(args.finetune_data, skip_bad=args.skip_bad))
    random.Random(f"rankpm-pmp-finetune-{seed}").shuffle(groups)
    return groups


def _check_files(args) -> None:
    if bool(args.finetune_data) != bool(args.eval_data):
        raise ValueError("--finetune-data and --eval-data: give both (fine-tuning and held-out comparisons) or "
                         "neither (the generated data)")
    for path in (args.pretrain_data or []) + (args.finetune_data or []) + (args.eval_data or []):
        if not Path(path).is_file():
            raise FileNotFoundError(f"--pretrain-data/--finetune-data/--eval-data: {path} is not a file")


def run_seed(args, backbone, seed: int, out: Path) -> tuple[list[dict], list[dict]]:
    """One whole experiment (PMP variants, then every fine-tuning size and arm) for one seed."""
    data = out / "data"
    lr = default_lr(backbone, args.lr)
    # a generated forum question whose answers are all one text compares nothing: left out
    forum = [g for g in generate_groups("pretrain", args.pretrain_groups, seed) if len(set(g.responses)) > 1]
    pretrain = [str(write_jsonl(forum, data / "pretrain.jsonl"))] if not args.pretrain_data else list(args.pretrain_data)
    finetune_all = _finetune_groups(args, seed)
    eval_files = list(args.eval_data) if args.eval_data else \
        [str(write_jsonl(generate_groups("finetune", args.eval_groups, seed + 1), data / "eval.jsonl"))]
    fresh_model, tokenizer = backbone.model(args.model_size), backbone.tokenizer(args.model_size)

    pmp_models, pmp_rows = {}, []
    for arm in (a for a in args.arms if a != "none"):
        raw = _base(args, out / "runs" / f"pmp-{arm}", fresh_model, tokenizer, seed)
        raw["data"].update(train=pretrain, eval=eval_files,
                           batch_groups=max(1, round(args.sequences_per_step / (2 if arm == "binary" else 3))))
        raw["objective"] = {"name": arm, "lm_loss": not backbone.encoder}  # an encoder has no LM head
        raw["train"].update(lr=lr, max_steps=args.pretrain_steps)
        summary, section = run_config(raw)
        pmp_models[arm] = str(Path(raw["train"]["out_dir"]) / "model")
        pmp_rows.append({"seed": seed, "pmp": arm, "accuracy_on_finetune_eval_before_finetuning": section["accuracy"],
                         "judge": section["judge"], "wall_seconds": summary["wall_seconds"]})
        print(f"pmp: seed {seed} {arm} PMP done, zero-shot accuracy on the fine-tuning eval set "
              f"{section['accuracy']:.4f} ({section['judge']} judge), {summary['wall_seconds']} s", flush=True)

    rows = []
    for n in args.sizes:
        n = min(n, len(finetune_all)) or len(finetune_all)
        train_file = write_jsonl(finetune_all[:n], data / f"finetune_{n}.jsonl")
        batch_groups = max(1, round(args.sequences_per_step / 3))
        steps = min(args.max_finetune_steps,
                    max(args.min_finetune_steps, math.ceil(args.finetune_epochs * n / batch_groups)))
        for arm in args.arms:
            model = fresh_model if arm == "none" else {"init_from": pmp_models[arm]}
            raw = _base(args, out / "runs" / f"ft-{n}-{arm}", model, tokenizer, seed)
            raw["data"].update(train=[str(train_file)], eval=eval_files, batch_groups=batch_groups)
            if arm != "none":
                raw["data"]["tokenizer"] = str(Path(pmp_models[arm]) / "tokenizer")
            raw["objective"] = {"name": "ranked"}
            raw["train"].update(lr=lr * (1.0 if arm == "none" else args.finetune_lr_scale), max_steps=steps)
            summary, section = run_config(raw)
            rows.append({"seed": seed, "comparisons": n, "pmp": arm, "steps": steps, "accuracy": section["accuracy"],
                         "ece": (section["calibration"] or {}).get("ece"), "pairs": section["pairs"],
                         "wall_seconds": summary["wall_seconds"]})
            print(f"pmp: seed {seed} fine-tune n={n:>5} after {arm:>6} PMP: accuracy {section['accuracy']:.4f} "
                  f"({steps} steps, {summary['wall_seconds']} s)", flush=True)
    return pmp_rows, rows


def run(args) -> dict:
    _check_files(args)
    out = Path(args.out)
    backbone = resolve_backbone(args)
    pmp_rows, rows = [], []
    for seed in args.seeds:
        # one seed keeps the folder layout of a single run; several get a folder each
        folder = out if len(args.seeds) == 1 else out / f"seed{seed}"
        more_pmp, more = run_seed(args, backbone, seed, folder)
        pmp_rows += more_pmp
        rows += more
        # written after every seed: a long sweep stopped part-way keeps the seeds it finished
        result = {"experiment": "pmp", "backbone": backbone.kind,
                  "settings": {k: v for k, v in vars(args).items() if k != "run"},
                  "seeds_done": args.seeds[:args.seeds.index(seed) + 1],
                  "pmp": pmp_rows, "rows": rows, "summary": summarize(rows)}
        write_json(out / "results.json", result)
        _table(out / "results.md", result, args)
        _plot(out / "accuracy_vs_comparisons.png", result["summary"], args.backbone)
    return result


def summarize(rows: list[dict]) -> list[dict]:
    """Per (comparisons, arm): mean, min, max and standard deviation of the accuracy over seeds."""
    cells: dict[tuple[int, str], list[float]] = {}
    for r in rows:
        cells.setdefault((r["comparisons"], r["pmp"]), []).append(r["accuracy"])
    return [{"comparisons": n, "pmp": arm, "seeds": len(acc), "mean": statistics.fmean(acc), "min": min(acc),
             "max": max(acc), "std": statistics.stdev(acc) if len(acc) > 1 else 0.0}
            for (n, arm), acc in sorted(cells.items(), key=lambda kv: (kv[0][0], ARMS.index(kv[0][1])))]


def _table(path: Path, result: dict, args) -> None:
    summary = result["summary"]
    sizes = sorted({r["comparisons"] for r in summary})
    arms = [a for a in ARMS if any(r["pmp"] == a for r in summary)]
    cell = {(r["comparisons"], r["pmp"]): r for r in summary}
    seeds = ", ".join(str(s) for s in result["seeds_done"])
    data = "the files of --eval-data" if args.eval_data else f"{args.eval_groups} synthetic graded 'hhh' groups"
    pre = "the files of --pretrain-data" if args.pretrain_data else f"{args.pretrain_groups} noisy 'forum' groups"

    def fmt(r: dict) -> str:
        return f"{r['mean']:.4f}" + (f" ({r['min']:.3f}-{r['max']:.3f})" if r["seeds"] > 1 else "")

    lines = [f"Held-out pair accuracy on {data} after fine-tuning on n comparisons; backbone {args.backbone}; "
             f"PMP = {args.pretrain_steps} steps on {pre}. Mean over seeds {seeds} (min-max).", "",
             "| fine-tuning comparisons | " + " | ".join(LABELS[a] for a in arms) + " |",
             "|---:|" + "---:|" * len(arms)]
    for n in sizes:
        lines.append(f"| {n} | " + " | ".join(fmt(cell[(n, a)]) if (n, a) in cell else "-" for a in arms) + " |")
    if result["pmp"]:
        lines += ["", "| seed | PMP | accuracy on the fine-tuning eval set before fine-tuning | judge |",
                  "|---:|---|---:|---|"]
        lines += [f"| {r['seed']} | {r['pmp']} | {r['accuracy_on_finetune_eval_before_finetuning']:.4f} | "
                  f"{r['judge']} |" for r in result["pmp"]]
    path.write_text("\n".join(lines) + "\n")


def _plot(path: Path, summary: list[dict], backbone: str) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(5.5, 4))
    for arm in ARMS:
        mine = sorted((r for r in summary if r["pmp"] == arm), key=lambda r: r["comparisons"])
        if mine:
            x, y = [r["comparisons"] for r in mine], [r["mean"] for r in mine]
            err = [[r["mean"] - r["min"] for r in mine], [r["max"] - r["mean"] for r in mine]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=LABELS[arm])
    ax.set_xscale("log")
    ax.set_xlabel("fine-tuning comparisons")
    ax.set_ylabel("held-out pair accuracy (mean, min-max over seeds)")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_title(f"Fine-tuning with and without PMP, backbone {Path(backbone).name}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
