"""The logit-cache writer (rankpm cache-logits) end to end: text tokens per second with the
prompt's keys/values computed once and reused, against running prompt + text for every batch,
side by side in one run; bytes per cached token at k = 50 read from the written shards; the
KL error of the fp16, bf16 and 8-bit log-prob storage.

    MALLOC_MMAP_THRESHOLD_=65536 pytest benchmarks/bench_cache_logits.py \
        --benchmark-json=/tmp/bench_cache.json

Setup: rankpm's HHH prompt, a byte-level BPE of 4,000 tokens trained on the prompt and the
corpus, a config-built GPT-2 teacher ("small": 4 layers, width 128, random init), 48
HH-shaped dialogues from ``rankpm generate --text`` lengthened to 60-120 words, batches of
8 texts, top-50 in fp16. Each timed call is a whole ``cache_logits`` into a fresh folder:
reading and checking the corpus, loading and hashing the teacher, the passes, the shards,
the manifest.
"""
import json
import time

import numpy as np
import pytest
import torch

from harness import record
from rankpm.engine.data.logit_shards import LogitStream, decode_logprobs, encode_logprobs
from rankpm.engine.data.synthetic import generate_text
from rankpm.engine.data.tokenizer import train_bpe
from rankpm.engine.distill.cache import cache_logits
from rankpm.engine.distill.config import cache_config_from_dict
from rankpm.engine.distill.prompt import default_prompt
from rankpm.kernels.topk_logits import topk_logprobs

TEXTS, BATCH, K = 48, 8, 50


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    corpus = generate_text(root / "corpus.jsonl", rows=TEXTS, seed=0, context_words=(60, 120))
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    train_bpe([default_prompt()] + texts, 4000).save(root / "tokenizer")
    return root, corpus


def config(root, corpus, out, **distill):
    return cache_config_from_dict({
        "teacher": {"model": "gpt2", "preset": "small", "tokenizer": str(root / "tokenizer"), "max_length": 4096,
                    **distill.pop("teacher", {})},
        "corpus": {"files": [str(corpus)], "kind": "text"},
        "distill": {"out_dir": str(root / out), "k": K, "batch_texts": BATCH, "rows_per_shard": 64, **distill},
    })


def run_once(root, corpus, name, **distill):
    out = f"{name}-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    manifest = cache_logits(config(root, corpus, out, **distill))
    return time.perf_counter() - t0, manifest, root / out


@pytest.mark.parametrize("reuse", [True, False], ids=["prompt_kv_reused", "prompt_run_per_batch"])
def test_cache_writer_tokens_per_second(benchmark, setup, reuse):
    root, corpus = setup
    seconds = []

    def run():
        elapsed, manifest, _ = run_once(root, corpus, "writer", reuse_prompt_cache=reuse)
        seconds.append(elapsed)
        return manifest

    manifest = benchmark.pedantic(run, rounds=2, iterations=1)
    best = min(seconds)
    record(benchmark, kernel="cache_logits", variant="reuse" if reuse else "no_reuse", texts=TEXTS,
           text_tokens=manifest["tokens"], prompt_tokens=manifest["prompt"]["tokens"], k=K, batch_texts=BATCH,
           best_s=best, tokens_per_s=manifest["tokens"] / best, seconds=seconds)


@pytest.mark.parametrize("vocab", [None, 128256], ids=["bpe_vocab", "V128256"])
def test_bytes_per_cached_token_at_k50(benchmark, setup, vocab):
    """Read from the shards: the files' bytes, and the Arrow buffers alone (no file framing).
    The BPE's own vocabulary (under 65,536: 16-bit ids), and a head of 128,256 (17-bit ids)."""
    root, corpus = setup
    teacher = {"preset": "tiny"} if vocab is None else {"preset": "tiny", "overrides": {"vocab_size": vocab}}
    _, manifest, out = benchmark.pedantic(lambda: run_once(root, corpus, f"bytes{vocab}", teacher=teacher),
                                          rounds=1, iterations=1)
    import pyarrow as pa
    buffers = sum(pa.ipc.open_file(pa.memory_map(str(out / s["file"]), "r")).read_all().nbytes
                  for s in manifest["shards"])
    per_token = {name: sum(pa.ipc.open_file(pa.memory_map(str(out / s["file"]), "r")).read_all()
                           .column(name).nbytes for s in manifest["shards"]) / manifest["tokens"]
                 for name in ("ids", "logprobs", "tail_logmass", "input_ids")}
    record(benchmark, kernel="cache_logits", variant=f"bytes_V{manifest['vocab_size']}", vocab=manifest["vocab_size"], k=K,
           tokens=manifest["tokens"], file_bytes_per_token=manifest["bytes_per_token"],
           buffer_bytes_per_token=buffers / manifest["tokens"],
           buffer_bytes_per_entry=buffers / manifest["tokens"] / K, columns_bytes_per_token=per_token,
           dtypes=manifest["dtypes"])
    assert buffers / manifest["tokens"] / K <= 4.3


@pytest.mark.parametrize("scale", [2.0, 6.0], ids=["logit_std_2", "logit_std_6"])
def test_logprob_storage_kl_error(benchmark, scale):
    """KL(p || p_hat) over the k + 1 categories (the top 50 and the tail), p from fp32 top-k log-probs of synthetic logits (N = 2,048, H = 512, V = 32,000),
    p_hat decoded from each storage and renormalised; nats per token."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 2048, 512, 32000
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5 * scale
    out = benchmark.pedantic(lambda: topk_logprobs(hidden, weight, k=K), rounds=1, iterations=1)
    lp, tail = out.logprobs.double().numpy(), out.tail_logmass.double().numpy()
    p = np.concatenate([np.exp(lp), np.exp(tail)[:, None]], axis=1)
    info = {"top1_prob_mean": float(p[:, 0].mean()), "tail_mass_mean": float(p[:, -1].mean())}
    for dtype in ("fp16", "bf16", "int8"):
        stored = encode_logprobs(lp.astype(np.float32), dtype)
        lp_hat = decode_logprobs(stored["logprobs"], stored.get("logprob_range"), dtype, K).astype(np.float64)
        tail_hat = tail.astype(np.float16).astype(np.float64)  # the tail is stored in fp16 in every mode
        q = np.concatenate([np.exp(lp_hat), np.exp(tail_hat)[:, None]], axis=1)
        q /= q.sum(axis=1, keepdims=True)
        kl = (p * (np.log(p) - np.log(q))).sum(axis=1)
        info[f"{dtype}_kl_mean"], info[f"{dtype}_kl_max"] = float(kl.mean()), float(kl.max())
    record(benchmark, kernel="cache_logits", variant=f"kl_scale{scale}", N=N, V=V, k=K, **info)


def test_reader_rows_per_second(benchmark, setup):
    root, corpus = setup
    _, manifest, out = run_once(root, corpus, "reader", teacher={"preset": "tiny"})
    count = benchmark.pedantic(lambda: sum(1 for _ in LogitStream(out)), rounds=3, iterations=1)
    record(benchmark, kernel="logit_stream", variant="one_pass", rows=count, tokens=manifest["tokens"],
           rows_per_s=count / benchmark.stats.stats.min)
