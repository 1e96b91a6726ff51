"""Training throughput on HH-shaped preference data: rankpm's layouts against TRL's RewardTrainer.

    python benchmarks/bench_training.py [--k 2 4] [--models llama gpt2 bert] [--steps 30]
                                        [--data hh_train.jsonl.gz] [--out benchmarks/training.json]

One command runs every variant, each in a process of its own (peak RSS is per process), on
the same prepared token ids, the same pairs per step, the same model shape (random init,
dropout off, fp32, no gradient checkpointing) and the same optimizer settings (AdamW,
lr 1e-3, betas (0.9, 0.95), weight decay 0.01, 5 warmup steps then linear decay, clip 1.0):

  stacked        rankpm, a padded row per response: how every peer lays out a batch
  shared         rankpm, a group's context once and its responses after it (causal models)
  packed         rankpm, sequences several to a row, no sharing (encoders)
  trl            TRL's RewardTrainer itself, when ``trl`` is installed (pip install -e ".[bench]"):
                 the same chosen/rejected token ids, in the order rankpm reads them, one
                 example per ranked pair (a K-way group gives its K(K-1)/2 pairs)

Data: the project's HH-shaped transcripts (``rankpm generate`` with earlier small-talk turns:
contexts of ~50-400 tokens, responses of ~0-120) with K = 2 (chosen/rejected) or K = 4
(ranked lists), or a user's HH-RLHF file (``--data``), prepared with a BPE tokenizer trained
on it and left truncation to ``--max-length``. Per variant: pairs/s and real tokens/s over
the steps after the warm-up, the padding fraction of its batches, peak RSS, and held-out pair
accuracy after the same pairs; and the ratio to TRL's pairs/s in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "llama": {"backbone": "llama", "overrides": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                                                 "num_key_value_heads": 4, "intermediate_size": 688}},
    "gpt2": {"backbone": "gpt2", "overrides": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                                               "n_inner": 688}},
    "bert": {"backbone": "bert", "overrides": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                                               "intermediate_size": 688}},
}
OPTIM = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01, warmup=5, clip=1.0)
WARMUP_STEPS = 3  # excluded from the timing


# ----- data -------------------------------------------------------------------------------

def prepare_data(root: Path, *, k: int, train_groups: int, eval_groups: int, max_length: int,
                 data: str | None) -> tuple[Path, Path]:
    from rankpm.engine.data.prepare import prepare
    from rankpm.engine.data.synthetic import generate

    if data is None:
        shape = dict(k_min=k, k_max=k, context_words=(40, 300), response_words=(0, 90))
        train = generate(root / f"hh_k{k}_train.jsonl", groups=train_groups, seed=1, **shape)
        held_out = generate(root / f"hh_k{k}_eval.jsonl", groups=eval_groups, seed=2, **shape)
        inputs = ([str(train)], [str(held_out)])
    else:  # a user's HH-RLHF file: its last eval_groups rows are held out
        inputs = split_user_file(root, data, eval_groups)
    train_dir, eval_dir = root / f"k{k}_train", root / f"k{k}_eval"
    prepare(inputs[0], train_dir, "bpe:4000", max_length=max_length, skip_bad=True)
    prepare(inputs[1], eval_dir, str(train_dir / "tokenizer"), max_length=max_length, skip_bad=True)
    return train_dir, eval_dir


def split_user_file(root: Path, data: str, eval_groups: int) -> tuple[list[str], list[str]]:
    from rankpm.engine.data.readers import iter_raw_rows

    rows = [row for _, row in iter_raw_rows(data) if isinstance(row, dict)]
    train, held_out = root / "user_train.jsonl", root / "user_eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:-eval_groups]))
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows[-eval_groups:]))
    return [str(train)], [str(held_out)]


def pair_rows(data_dir: Path, order: list[str] | None = None) -> list[dict]:
    """The chosen/rejected token ids of every ranked pair, as TRL takes them."""
    from rankpm.engine.data.stream import ComparisonStream

    stream = ComparisonStream(data_dir, shuffle=False, batch_groups=1, loop=False, layout="stacked")
    groups = {}
    for batch in stream:
        width = batch.input_ids.shape[1]  # stacked: row s is response s, up to its end-of-context token
        seqs = [batch.input_ids[s, :int(batch.score_index[s]) % width + 1].tolist() for s in range(batch.num_sequences)]
        ranks = batch.ranks.tolist()
        groups[batch.ids[0]] = [{"chosen_ids": seqs[i], "rejected_ids": seqs[j]}
                                for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]
    return [pair for gid in (order or list(groups)) for pair in groups[gid]]


# ----- variants (each in its own process) ---------------------------------------------------

def rankpm_config(args, variant: str, out: Path, steps: int):
    from rankpm.engine.config import from_dict

    model = MODELS[args.model]
    return from_dict({
        "model": {"backbone": model["backbone"], "preset": "small", "overrides": model["overrides"]},
        "data": {"train": [args.train_dir], "eval": [args.eval_dir], "tokenizer": f"{args.train_dir}/tokenizer",
                 "max_length": args.max_length, "batch_groups": args.groups_per_step, "layout": variant,
                 "shuffle_buffer": 4096, "eval_batch_groups": 16},
        "train": {"out_dir": str(out), "lr": OPTIM["lr"], "betas": list(OPTIM["betas"]),
                  "weight_decay": OPTIM["weight_decay"], "warmup_steps": OPTIM["warmup"], "schedule": "linear",
                  "min_lr_ratio": 0.0, "grad_clip": OPTIM["clip"], "max_steps": steps,
                  "progress": False, "seed": 0, "log_every": WARMUP_STEPS},
    })


def run_rankpm(args, variant: str) -> dict:
    from rankpm.engine.data.stream import ComparisonStream
    from rankpm.engine.train.loop import train

    out = Path(tempfile.mkdtemp(prefix=f"bench-{variant}-"))
    summary = train(rankpm_config(args, variant, out, args.steps))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train"]  # logged every WARMUP_STEPS steps
    before, last = steps[0], steps[-1]  # the timing starts after the warm-up steps
    elapsed = last["time"] - before["time"]
    layout = next(r["layout"] for r in rows if r["kind"] == "config")
    real = padded = 0  # the padding of the very batches trained on (the reader is deterministic)
    stream = ComparisonStream(args.train_dir, seed=0, shuffle_buffer=4096, batch_groups=args.groups_per_step,
                              layout=layout)
    for _, batch in zip(range(args.steps), stream):
        real, padded = real + batch.num_tokens, padded + batch.padded_tokens
    return {"variant": variant, "layout": layout, "pairs_per_s": (last["pairs_seen"] - before["pairs_seen"]) / elapsed,
            "tokens_per_s": (last["tokens_seen"] - before["tokens_seen"]) / elapsed, "padding": 1 - real / padded,
            "eval_accuracy": summary["eval_accuracy"], "pairs_trained": last["pairs_seen"]}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoConfig, AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from rankpm.engine.data.stream import ComparisonStream
    from rankpm.engine.data.tokenizer import load_tokenizer

    tok = load_tokenizer(f"{args.train_dir}/tokenizer")
    # the groups in the order rankpm's reader gives them, so both train on the same pairs in order
    stream = ComparisonStream(args.train_dir, seed=0, shuffle_buffer=4096, batch_groups=args.groups_per_step)
    order = [gid for _, batch in zip(range(args.steps), stream) for gid in batch.ids]
    pairs = pair_rows(Path(args.train_dir), order)
    pairs_per_step = len(pairs) // args.steps
    model_cfg = MODELS[args.model]
    config = AutoConfig.for_model(model_cfg["backbone"], vocab_size=tok.vocab_size, num_labels=1,
                                  pad_token_id=tok.pad_id, max_position_embeddings=args.max_length,
                                  **model_cfg["overrides"], **dropout_off(model_cfg["backbone"]))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            times.append(time.perf_counter())

    class InOrder(RewardTrainer):
        def _get_train_sampler(self, *_, **__):
            return SequentialSampler(self.train_dataset)

    out = tempfile.mkdtemp(prefix="bench-trl-")
    trl_args = RewardConfig(output_dir=out, per_device_train_batch_size=pairs_per_step, max_steps=args.steps,
                            learning_rate=OPTIM["lr"], adam_beta1=OPTIM["betas"][0], adam_beta2=OPTIM["betas"][1],
                            weight_decay=OPTIM["weight_decay"], warmup_steps=OPTIM["warmup"], lr_scheduler_type="linear",
                            max_grad_norm=OPTIM["clip"], logging_steps=10**6, save_strategy="no", report_to=[],
                            disable_dropout=True, max_length=None, use_cpu=not torch.cuda.is_available(),
                            dataloader_num_workers=0, seed=0, bf16=False, fp16=False)  # fp32, as rankpm
    trainer = InOrder(model=model, args=trl_args, train_dataset=Dataset.from_list(pairs[:pairs_per_step * args.steps]),
                      processing_class=tok.hf if hasattr(tok, "hf") else None, callbacks=[Clock()])
    trainer.train()
    elapsed = times[-1] - times[WARMUP_STEPS - 1]
    timed_pairs = pairs_per_step * (len(times) - WARMUP_STEPS)
    real = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs[:pairs_per_step * args.steps])
    padded = 0
    for s in range(args.steps):
        chunk = pairs[s * pairs_per_step:(s + 1) * pairs_per_step]
        padded += 2 * len(chunk) * max(max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in chunk)
    return {"variant": "trl", "layout": "stacked", "pairs_per_s": timed_pairs / elapsed,
            "tokens_per_s": real * (len(times) - WARMUP_STEPS) / args.steps / elapsed, "padding": 1 - real / padded,
            "eval_accuracy": trl_accuracy(model, Path(args.eval_dir), tok.pad_id), "pairs_trained": len(pairs)}


def dropout_off(backbone: str) -> dict:
    names = ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop",
             "attention_dropout")
    return {n: 0.0 for n in names if backbone != "llama" or n == "attention_dropout"}


def trl_accuracy(model, eval_dir: Path, pad_id: int) -> float:
    import torch

    model.eval()
    right = total = 0
    with torch.no_grad():
        for pair in pair_rows(eval_dir):
            seqs = [pair["chosen_ids"], pair["rejected_ids"]]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            chosen, rejected = model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
            right += chosen > rejected
            total += 1
    return right / total


# ----- driver -------------------------------------------------------------------------------

def child(args) -> None:
    result = run_trl(args) if args.variant == "trl" else run_rankpm(args, args.variant)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def variants_for(model: str, have_trl: bool) -> list[str]:
    ours = ["stacked", "packed"] if model == "bert" else ["stacked", "shared"]
    return ours + (["trl"] if have_trl else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, nargs="+", default=[2, 4])
    p.add_argument("--models", nargs="+", default=["llama"], choices=sorted(MODELS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--pairs-per-step", type=int, default=8, help="K = 2: groups per step; K = 4: rounded to groups")
    p.add_argument("--train-groups", type=int, default=1200)
    p.add_argument("--eval-groups", type=int, default=200)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--data", help="a user's HH-RLHF file (JSONL, .jsonl.gz) instead of the generated transcripts")
    p.add_argument("--out", default="benchmarks/training.json")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--train-dir", help=argparse.SUPPRESS)
    p.add_argument("--eval-dir", help=argparse.SUPPRESS)
    p.add_argument("--groups-per-step", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return child(args)
    try:
        import trl  # noqa: F401
        have_trl = True
    except ImportError:
        have_trl = False
        print("trl is not installed: no peer baseline (pip install -e '.[bench]')", file=sys.stderr)
    root = Path(tempfile.mkdtemp(prefix="bench-training-"))
    results = []
    for k in args.k:
        train_dir, eval_dir = prepare_data(root, k=k, train_groups=args.train_groups, eval_groups=args.eval_groups,
                                           max_length=args.max_length, data=args.data)
        groups = max(1, -(-args.pairs_per_step // (k * (k - 1) // 2)))  # K = 4: 2 groups, 12 pairs
        for model in args.models:
            for variant in variants_for(model, have_trl):
                cmd = [sys.executable, __file__, "--variant", variant, "--model", model, "--train-dir", str(train_dir),
                       "--eval-dir", str(eval_dir), "--groups-per-step", str(groups), "--steps", str(args.steps),
                       "--max-length", str(args.max_length)]
                done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
                line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(f"{variant} on {model}, K={k} failed:\n{done.stderr[-3000:]}")
                row = dict(json.loads(line[7:]), k=k, model=model, pairs_per_step=groups * k * (k - 1) // 2)
                results.append(row)
                print(json.dumps(row), flush=True)
    for row in results:
        peer = next((r for r in results if r["variant"] == "trl" and r["k"] == row["k"] and r["model"] == row["model"]),
                    None)
        row["vs_trl"] = row["pairs_per_s"] / peer["pairs_per_s"] if peer else None
    Path(args.out).write_text(json.dumps({"device": device(), "rows": results}, indent=2) + "\n")
    print(table(results))


def device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({os.cpu_count()} cores, torch {torch.__version__})"


def table(rows: list[dict]) -> str:
    lines = ["| model | K | variant | pairs/s | tokens/s | padding | peak RSS GiB | held-out acc | vs TRL |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['vs_trl']:.2f}x" if r["vs_trl"] else "-"
        lines.append(f"| {r['model']} | {r['k']} | {r['variant']} | {r['pairs_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['padding']:.2f} | {r['peak_rss_gib']:.2f} | {r['eval_accuracy']:.3f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
