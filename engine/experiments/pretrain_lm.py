"""Experiment stage: pre-train the project's own small causal LM on generated text.

    rankpm experiment pretrain-lm --out experiments/results/lm [--sizes xs tiny s] [--steps 300]

The text is the project's generated data: HH-style dialogues (synthetic_pmp "finetune",
1-2 turns) and forum questions and answers ("pretrain"), each context followed by ONE of
its responses drawn at random, not by quality - a language model of the text, good and
bad answers alike, as a pre-trained LM has seen both. No labels, ranks or GOOD/BAD strings.
A group needs two different responses, so each text's second response is the empty one,
which costs one token (the end-of-context token) and is never a target.

Training is the engine's one loop with the LM term alone: objective ranked with
``lm_loss: true, pm_weight: 0``, i.e. next-token cross-entropy over the whole sample
(context, response, end-of-context token), mean per token; no loss reaches the score head.

Each size writes OUT/runs/SIZE/model: a rankpm model folder with its LM head (config.json and
model.safetensors of a GPT2LMHeadModel, which transformers' AutoModelForCausalLM loads as
it is; score_head.pt, rankpm_model.json, tokenizer/ with the byte tokenizer), usable as
``model.init_from`` of any run (``rankpm train``) and as ``--backbone lm`` of the
experiments. OUT/runs/SIZE/lm.json holds the held-out perplexity per token (a token is a byte),
computed by transformers on the saved folder, over held-out text of the same mixture.
"""
from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from rankpm.engine.data.schema import ComparisonGroup
from rankpm.engine.data.synthetic_pmp import generate_groups, write_jsonl
from rankpm.engine.experiments.common import SIZES, parameter_count, run_config, write_json

RESULT = "lm.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="experiments/results/lm")
    p.add_argument("--sizes", nargs="+", default=["xs", "tiny", "s"], choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per size")
    p.add_argument("--groups-per-step", type=int, default=16, help="texts per step (each a context and a response)")
    p.add_argument("--train-groups", type=int, default=8000, help="generated texts, half dialogues, half forum")
    p.add_argument("--eval-groups", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-length", type=int, default=256,
                   help="also the model's position limit: later runs on it use at most this")
    p.add_argument("--backbone", default="gpt2", help="a causal transformers model type (gpt2, llama, ...)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)


def defaults() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([])


def lm_text(count: int, seed: int) -> list[ComparisonGroup]:
    """``count`` texts as groups (context, [a response drawn at random from the group's, ""]); a drawn
    empty response is left out (nothing to tell apart from the filler)."""
    rng = random.Random(f"rankpm-lm-text-{seed}")
    half = count // 2
    groups = generate_groups("finetune", count - half, seed) + generate_groups("pretrain", half, seed)
    rng.shuffle(groups)
    out = []
    for g in groups:
        response = g.responses[rng.randrange(len(g.responses))]
        if not response:
            continue
        out.append(ComparisonGroup(id=f"lm-{g.id}", context=g.context, responses=[response, ""],
                                   ranks=[0, 1], source=g.source, turns=g.turns))
    return out


def pretrain(size: str, out: Path, args: argparse.Namespace) -> dict:
    """Pre-train one size into out/runs/size/ (a finished run there is reused); its lm.json row."""
    folder = out / "runs" / size
    data = out / "data"
    train_file = data / f"train_{args.train_groups}_{args.seed}.jsonl"
    eval_file = data / f"eval_{args.eval_groups}_{args.seed}.jsonl"
    if not train_file.is_file():
        write_jsonl(lm_text(args.train_groups, args.seed), train_file)
    eval_groups = lm_text(args.eval_groups, args.seed + 1_000)
    if not eval_file.is_file():
        write_jsonl(eval_groups, eval_file)
    raw = {
        "model": {"backbone": args.backbone, "preset": "tiny", "overrides": SIZES[size]},
        "data": {"train": [str(train_file)], "eval": [str(eval_file)], "tokenizer": "bytes",
                 "max_length": args.max_length, "batch_groups": args.groups_per_step, "shuffle_buffer": 1024},
        "objective": {"name": "ranked", "lm_loss": True, "pm_weight": 0.0, "lm_weight": 1.0},
        "train": {"out_dir": str(folder), "lr": args.lr, "max_steps": args.steps, "warmup_steps": 20,
                  "log_every": 50, "progress": False, "seed": args.seed, "device": args.device},
    }
    summary, _ = run_config(raw)
    model_dir = Path(summary["model"])
    nll = heldout_nll(model_dir, eval_groups, device=args.device)
    row = {"size": size, **parameter_count(model_dir), "steps": args.steps, "texts_seen": args.steps * args.groups_per_step,
           "heldout_nll_per_token": round(nll, 4), "heldout_perplexity": round(math.exp(nll), 3),
           "heldout_texts": len(eval_groups), "wall_seconds": summary["wall_seconds"], "model": str(model_dir)}
    write_json(folder / RESULT, row)
    print(f"pretrain-lm: {size:>5} held-out perplexity {row['heldout_perplexity']:.3f} per byte "
          f"({row['non_embedding_parameters']} non-embedding params, {summary['wall_seconds']} s)", flush=True)
    return row


def ensure(out: Path, size: str, *, steps: int | None = None) -> Path:
    """OUT/runs/SIZE/model, pre-trained with the default settings first when it is not there."""
    model_dir = out / "runs" / size / "model"
    if not (out / "runs" / size / RESULT).is_file():
        args = defaults()
        if steps is not None:
            args.steps = steps
        pretrain(size, out, args)
    return model_dir


def heldout_nll(model_dir: Path, groups: list[ComparisonGroup], *, device: str = "auto", batch: int = 32) -> float:
    """Mean next-token NLL (nats per token) of context + first response + end-of-context over
    the held-out texts, by transformers' own causal LM on the saved folder (a check, independent
    of rankpm's fused kernels, that the folder is the LM that was trained)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rankpm.engine.data.tokenizer import load_tokenizer
    from rankpm.engine.model.preference_model import _quiet_transformers
    from rankpm.engine.train.loop import resolve_device

    tokenizer = load_tokenizer(model_dir / "tokenizer")
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    model = model.to(resolve_device(device)).eval()
    limit = model.config.max_position_embeddings
    total, count = 0.0, 0
    for start in range(0, len(groups), batch):
        ids = [(tokenizer.encode(g.context + g.responses[0]) + [tokenizer.eoc_id])[-limit:]
               for g in groups[start:start + batch]]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device)).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                labels[:, 1:].flatten().to(model.device), reduction="sum",
                                                ignore_index=-100)
        total += nll.item()
        count += int((labels[:, 1:] != -100).sum())
    return total / count


def run(args) -> dict:
    out = Path(args.out)
    rows = [pretrain(size, out, args) for size in args.sizes]
    result = {"experiment": "pretrain-lm", "settings": {k: v for k, v in vars(args).items() if k != "run"},
              "rows": rows}
    write_json(out / "results.json", result)
    lines = [f"Held-out perplexity per token (byte) on {args.eval_groups} generated texts; {args.steps} steps of "
             f"{args.groups_per_step} texts.", "",
             "| size | non-embedding params | held-out NLL/token | perplexity | seconds |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['size']} | {r['non_embedding_parameters']:,} | {r['heldout_nll_per_token']:.4f} | "
              f"{r['heldout_perplexity']:.3f} | {r['wall_seconds']} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return result
