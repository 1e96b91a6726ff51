"""Context distillation at small scale: a prompted LM distilled into itself without the prompt.

    rankpm experiment distill [--out experiments/results/distill] [--lm-steps 400] [--distill-steps 200]

The setting, made so that the prompt matters (the paper's: an HHH prompt changes what a
language model says next):
1. A small causal LM is pre-trained by the project (the one training loop, imitation
   objective) on generated dialogues (rankpm.engine.data.synthetic): a document that begins
   with the HHH prompt continues with the best-ranked reply of its group, a document without
   it with a reply drawn at random from the group (helpful, vague, rude or harmful alike).
2. Teacher = that LM with the prompt in front. ``rankpm cache-logits`` caches its top-k
   next-token log-probs (and, at about the same bytes a token, sampled tokens with counts)
   over unprompted dialogues (context + each reply of held-in groups).
3. Students = the same LM, no prompt, trained with ``objective.name: distill`` on each cache.

Measured, all on held-out data: the student's KL to the teacher over the cached ids and the
tail bucket during training (a held-out top-k cache), and at the end the full KL over the
whole vocabulary; how often each model prefers the better reply of held-out comparisons by
mean per-token log-prob (the teacher with the prompt, the others without); the alignment tax
as the LM's next-token NLL on plain held-out dialogues before and after.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from rankpm.engine.experiments.common import SIZES, plt, write_json

# The experiment's own prompt: short, so a byte-level model on a CPU reads it in every document
# (the packaged HHH prompt, engine/distill/hhh_prompt.txt, is ~13k bytes).
PROMPT = ("Below are conversations with an AI assistant that is helpful, honest and harmless: it "
          "answers what is asked, says when it is unsure, and refuses to help with harm.\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="experiments/results/distill")
    p.add_argument("--groups", type=int, default=2000, help="generated comparison groups for pre-training")
    p.add_argument("--distill-groups", type=int, default=600, help="groups whose dialogues the teacher caches")
    p.add_argument("--eval-groups", type=int, default=300)
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--lm-steps", type=int, default=400)
    p.add_argument("--distill-steps", type=int, default=200)
    p.add_argument("--lm-lr", type=float, default=2e-3)
    p.add_argument("--distill-lr-scale", type=float, default=0.25,
                   help="distillation LR as a fraction of pre-training's (the paper: 0.05)")
    p.add_argument("--k", type=int, default=8, help="top-k entries cached a token")
    p.add_argument("--samples", type=int, default=0,
                   help="tokens drawn a position in the sampled cache (0: the count at the top-k cache's bytes)")
    p.add_argument("--batch", type=int, default=16, help="documents (texts) a step")
    p.add_argument("--unprompted", choices=["any", "other"], default="any",
                   help="the reply of a document without the prompt: any of its group's, or any but the best")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)


def run(args) -> dict:
    from rankpm.engine.data.synthetic import generate

    out = Path(args.out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "prompt.txt").write_text(PROMPT)
    groups = _read(generate(data / "groups.jsonl", groups=args.groups, seed=args.seed))
    held_in = _read(generate(data / "distill_groups.jsonl", groups=args.distill_groups, seed=args.seed + 7))
    held_out = _read(generate(data / "eval_groups.jsonl", groups=args.eval_groups, seed=args.seed + 1_000_003))
    rng = random.Random(args.seed)
    _write(data / "lm_documents.jsonl", [doc for g in groups for doc in _documents(g, rng, args.unprompted)])
    _write(data / "lm_eval_documents.jsonl", [doc for g in held_out[:100]
                                              for doc in _documents(g, rng, args.unprompted)])
    _write(data / "eval_plain.jsonl", held_out)  # comparisons, no prompt
    _write(data / "eval_prompted.jsonl", [dict(g, prompt=PROMPT + g["prompt"]) for g in held_out])
    _write(data / "distill_texts.jsonl", _texts(held_in))
    _write(data / "eval_texts.jsonl", _texts(held_out))

    lm = _pretrain(args, out, data)
    caches = {"topk": _cache(args, out / "cache_topk", lm, data / "distill_texts.jsonl", mode="topk", k=args.k)}
    caches["eval"] = _cache(args, out / "cache_eval", lm, data / "eval_texts.jsonl", mode="topk", k=args.k)
    samples = args.samples or _samples_at_equal_bytes(caches["topk"])
    caches["sampled"] = _cache(args, out / "cache_sampled", lm, data / "distill_texts.jsonl", mode="sampled",
                               k=args.k, samples=samples)
    students = {mode: _distill(args, out / f"student_{mode}", lm, caches[mode], caches["eval"])
                for mode in ("topk", "sampled")}

    models = {"LM, no prompt (before)": (lm, False), "teacher: LM with the prompt": (lm, True),
              "student, top-k cache": (students["topk"]["model"], False),
              "student, sampled cache": (students["sampled"]["model"], False)}
    rows = []
    for name, (folder, prompted) in models.items():
        rows.append({"model": name, **_evaluate(folder, prompted, data, lm, caches["eval"])})
    result = {
        "prompt": PROMPT, "lm": json.loads((out / "lm" / "summary.json").read_text()),
        "caches": {m: _cache_summary(c) for m, c in caches.items()},
        "curves": {mode: [_before(lm, caches["eval"])] + _curve(out / f"student_{mode}") for mode in students},
        "rows": rows,
        "settings": {k: v for k, v in vars(args).items() if k not in ("run",)},
    }
    write_json(out / "results.json", result)
    _plot(out / "distill.png", result)
    _table(out / "results.md", result)
    return result


# ----- data ------------------------------------------------------------------------------------

def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _documents(group: dict, rng: random.Random, unprompted: str = "any") -> list[dict]:
    """The LM's two documents of a group, as imitation data (the 'chosen' reply is the one learned):
    with the prompt, the best reply; without it, a reply at random (any, or any but the best)."""
    best = group["ranks"].index(min(group["ranks"]))
    pool = [i for i, r in enumerate(group["ranks"]) if unprompted == "any" or r != group["ranks"][best]]
    other = rng.choice(pool)
    def pair(context, k):
        rest = [r for i, r in enumerate(group["responses"]) if i != k and r != group["responses"][k]]
        return {"prompt": context, "chosen": group["responses"][k], "rejected": rest[0] if rest else " -"}
    return [pair(PROMPT + group["prompt"], best), pair(group["prompt"], other)]


def _texts(groups: list[dict]) -> list[dict]:
    """Unprompted dialogues: the context with each of its replies (the student's plain text)."""
    return [{"text": g["prompt"] + r} for g in groups for r in g["responses"]]


# ----- stages ----------------------------------------------------------------------------------

def _pretrain(args, out: Path, data: Path) -> Path:
    from rankpm.engine.config import from_dict
    from rankpm.engine.train.loop import train

    folder = out / "lm"
    if not (folder / "summary.json").is_file():
        cfg = from_dict({
            "model": {"backbone": "gpt2", "preset": "tiny", "overrides": SIZES[args.size]},
            "data": {"train": [str(data / "lm_documents.jsonl")], "eval": [str(data / "lm_eval_documents.jsonl")],
                     "max_length": args.max_length, "batch_groups": args.batch},
            "objective": {"name": "imitation"},
            "train": {"out_dir": str(folder), "lr": args.lm_lr, "warmup_steps": 20, "max_steps": args.lm_steps,
                      "eval_every": 0, "save_every": 0, "log_every": 20, "seed": args.seed, "progress": False},
        })
        write_json(folder / "summary.json", train(cfg))
    return folder / "model"


def _cache(args, out: Path, teacher: Path, corpus: Path, *, mode: str, k: int, samples: int = 12) -> Path:
    from rankpm.engine.data.logit_shards import MANIFEST
    from rankpm.engine.distill.cache import cache_logits
    from rankpm.engine.distill.config import cache_config_from_dict

    if not (out / MANIFEST).is_file():
        cache_logits(cache_config_from_dict({
            "teacher": {"model": str(teacher)},
            "corpus": {"files": [str(corpus)], "kind": "text"},
            "distill": {"out_dir": str(out), "prompt": str(out.parent / "data" / "prompt.txt"), "mode": mode,
                        "k": k, "samples": samples, "batch_texts": 16, "seed": args.seed},
        }))
    return out


def _samples_at_equal_bytes(topk_cache: Path) -> int:
    """Draws a position whose sampled entries (2-byte id + 1-byte count a slot) take about the
    top-k cache's bytes a token (2-byte id + 2-byte log-prob a slot, plus the tail)."""
    manifest = json.loads((topk_cache / "manifest.json").read_text())
    return max(1, min(255, round((4 * manifest["k"] + 2) / 3)))


def _distill(args, out: Path, lm: Path, cache: Path, eval_cache: Path) -> dict:
    from rankpm.engine.config import from_dict
    from rankpm.engine.train.loop import train

    if not (out / "summary.json").is_file():
        cfg = from_dict({
            "model": {"init_from": str(lm)},
            "data": {"train": [str(cache)], "eval": [str(eval_cache)], "batch_groups": args.batch,
                     "eval_batch_groups": 64},
            "objective": {"name": "distill"},
            "train": {"out_dir": str(out), "lr": args.lm_lr * args.distill_lr_scale, "warmup_steps": 0,
                      "schedule": "linear", "min_lr_ratio": 0.0, "max_steps": args.distill_steps,
                      "eval_every": max(1, args.distill_steps // 8), "save_every": 0, "log_every": 10,
                      "seed": args.seed, "progress": False},
        })
        write_json(out / "summary.json", train(cfg))
    return json.loads((out / "summary.json").read_text())


# ----- measurements ----------------------------------------------------------------------------

def _evaluate(folder, prompted: bool, data: Path, lm: Path, eval_cache: Path) -> dict:
    """Comparison accuracy by mean log-prob; full-vocabulary KL to the teacher and own NLL on the
    held-out dialogues (for the teacher itself: its KL is 0 by definition, its NLL is with the prompt)."""
    from rankpm.engine.score.eval_folder import evaluate_model_folder

    comparisons = data / ("eval_prompted.jsonl" if prompted else "eval_plain.jsonl")
    metrics = evaluate_model_folder(folder, [str(comparisons)], judge="logprob")
    dense = _dense_against_teacher(Path(folder), lm, eval_cache, prompted)
    return {"comparison_accuracy": metrics["eval_accuracy"], "comparison_pairs": metrics["eval_pairs"], **dense}


def _dense_against_teacher(student: Path, teacher: Path, cache: Path, student_prompted: bool) -> dict:
    """Mean over the held-out texts' tokens of KL(teacher(prompt + text) || student(text)) over
    the whole vocabulary, and the student's NLL of each text's next token (prompted students read
    the prompt too)."""
    import torch

    from rankpm.engine.data.logit_shards import LogitStream
    from rankpm.engine.data.tokenizer import load_tokenizer
    from rankpm.engine.model.preference_model import PreferenceModel, tokenizer_dir

    tok = load_tokenizer(str(tokenizer_dir(teacher)))
    prompt = torch.tensor(tok.encode(PROMPT))
    t_model = PreferenceModel.load(teacher, with_lm_head=True).transformer.eval()
    s_model = PreferenceModel.load(student, with_lm_head=True).transformer.eval()
    kl_sum = nll_sum = 0.0
    tokens = targets = 0
    with torch.no_grad():
        for row in LogitStream(cache):
            ids = torch.as_tensor(row["input_ids"])
            n = len(ids)
            t_logp = torch.log_softmax(t_model(input_ids=torch.cat([prompt, ids])[None]).logits[0, -n:].double(), -1)
            s_in = torch.cat([prompt, ids]) if student_prompted else ids
            s_logp = torch.log_softmax(s_model(input_ids=s_in[None]).logits[0, -n:].double(), -1)
            kl_sum += float((t_logp.exp() * (t_logp - s_logp)).sum())
            nll_sum += float(-s_logp[:-1].gather(1, ids[1:, None]).sum())
            tokens, targets = tokens + n, targets + n - 1
    return {"full_kl_to_teacher": kl_sum / max(tokens, 1), "plain_text_nll": nll_sum / max(targets, 1)}


def _before(lm: Path, eval_cache: Path) -> dict:
    """The curves' step 0: the undistilled LM on the held-out cache, measured as training measures."""
    import torch

    from rankpm.engine.data.tokenizer import load_tokenizer
    from rankpm.engine.model.preference_model import PreferenceModel, tokenizer_dir
    from rankpm.engine.score.evaluate import evaluate_distill
    from rankpm.engine.train.strategy import LocalStrategy

    strategy = LocalStrategy(device=torch.device("cpu"))
    model = strategy.setup(PreferenceModel.load(lm, with_lm_head=True), None, None)
    metrics = evaluate_distill(model, eval_cache, strategy=strategy,
                               pad_id=load_tokenizer(str(tokenizer_dir(lm))).pad_id)
    return {"step": 0, "eval_kl": metrics["eval_kl"], "eval_lm_nll": metrics["eval_lm_nll"]}


def _cache_summary(cache: Path) -> dict:
    m = json.loads((cache / "manifest.json").read_text())
    return {k: m.get(k) for k in ("mode", "k", "samples", "rows", "tokens", "bytes_per_token")}


def _curve(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "eval_kl": r["eval_kl"], "eval_lm_nll": r["eval_lm_nll"]}
            for r in rows if r["kind"] == "eval"]


def _plot(path: Path, result: dict) -> None:
    pyplot = plt()
    fig, (a, b) = pyplot.subplots(1, 2, figsize=(11, 4))
    for mode, curve in result["curves"].items():
        a.plot([c["step"] for c in curve], [c["eval_kl"] for c in curve], marker="o",
               label=f"{mode} cache ({result['caches'][mode]['bytes_per_token']:.0f} B/token)")
    a.set_xlabel("distillation step")
    a.set_ylabel("held-out KL to the teacher (k + 1 categories)")
    a.set_title("The student's KL to the prompted teacher")
    a.legend()
    names = [r["model"] for r in result["rows"]]
    accuracy = [r["comparison_accuracy"] for r in result["rows"]]
    b.barh(names, accuracy, color="tab:blue")
    for y, value in enumerate(accuracy):
        b.text(value + 0.005, y, f"{value:.3f}", va="center")
    b.axvline(0.5, color="grey", ls=":")
    b.set_xlim(0.0, 1.0)
    b.set_xlabel("better reply preferred (held-out, mean log-prob)")
    b.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot.close(fig)


def _table(path: Path, result: dict) -> None:
    lines = ["| model | comparison accuracy | full KL to teacher (nats/token) | plain-text NLL (nats/token) |",
             "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['comparison_accuracy']:.3f} ({r['comparison_pairs']} pairs) | "
                     f"{r['full_kl_to_teacher']:.4f} | {r['plain_text_nll']:.4f} |")
    caches = "; ".join(f"{m}: {c['bytes_per_token']:.1f} B/token ({c['mode']}, k={c['k']}"
                       f"{', samples=' + str(c['samples']) if c['mode'] == 'sampled' else ''})"
                       for m, c in result["caches"].items())
    lm = result["lm"]
    lines += ["", f"Caches: {caches}.",
              f"LM pre-training: {lm['steps']} steps ({lm['train_seconds']:.0f} s)."]
    path.write_text("\n".join(lines) + "\n")
    if math.isnan(result["rows"][0]["comparison_accuracy"]):
        raise RuntimeError(f"{path}: no comparison pairs were evaluated")
