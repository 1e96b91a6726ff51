"""Top-k log-probability cache step (the context-distillation teacher pass): time and peak
extra memory of the vocabulary-streamed pass against full logits + log_softmax +
torch.topk, side by side, the streamed result's error against a float64 (CPU) / fp32
(CUDA) reference, and the bytes per cached token of the cache layouts.

    MALLOC_MMAP_THRESHOLD_=65536 pytest benchmarks/bench_topk_logits.py \
        --benchmark-json=benchmarks/cpu_topk.json

Sizes: N=2048, H=512, V=32000, k=50 fp32 on CPU; N=8192, H=4096, V=128256 bf16 on CUDA.
On CPU the peak is read from the resident set. With glibc's default, freed blocks under
32 MB stay in the heap and later runs reuse them without raising the resident set (or
touch fresh pages beside them), so a blocked pass read from near zero to about twice its
true peak, run to run; a fixed mmap threshold hands every block of 64 KB or more back on
free and the reading is the live peak (the torch profiler's allocator events agree to
within 0.3 MB). It costs each variant its page faults, the blocked one relatively more
(many mid-sized allocations).
"""
import math
import os
import statistics
import time

import pytest
import torch

from harness import CUDA, DEVICE, device_ms, matmul_tflops, peak_extra_bytes, record, sync
from rankpm.kernels.topk_logits import topk_logprobs, topk_logprobs_reference

SIZES = {"cpu": (2048, 512, 32000, 50, torch.float32),
         "cuda": (8192, 4096, 128256, 50, torch.bfloat16)}
N, H, V, K, DTYPE = SIZES["cuda" if CUDA else "cpu"]

VARIANTS = {
    "fused": lambda h, w: topk_logprobs(h, w, k=K),
    "full_logits": lambda h, w: topk_logprobs_reference(h, w, k=K),
}


def make_inputs(n=N):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(n, H, device=DEVICE, dtype=DTYPE, generator=g)
    weight = (torch.randn(V, H, device=DEVICE, generator=g) / H ** 0.5 * 2).to(DTYPE)
    return hidden, weight


def once_ms(fn):
    """(wall, process CPU) ms of one synchronised call, for the interleaved ratios below."""
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def interleaved_summary(pairs):
    """Ratios fused / full-logits from alternating runs: per pair (median), best of each
    (min: the run least disturbed by other load), and in process CPU time, which a busy
    shared host inflates less than wall time."""
    fused, full = zip(*pairs)
    return dict(pairs_wall_cpu_ms=pairs,
                median_ratio=statistics.median(a[0] / b[0] for a, b in pairs),
                best_ratio=min(a[0] for a in fused) / min(b[0] for b in full),
                best_fused_ms=min(a[0] for a in fused), best_full_ms=min(b[0] for b in full),
                cpu_ratio=statistics.median(a[1] / b[1] for a, b in pairs))


def test_topk_matmul_floor(benchmark):
    tf = matmul_tflops()
    benchmark.pedantic(lambda: None, rounds=1)
    record(benchmark, kernel="floor", variant="matmul", matmul_TFLOPs=tf)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_topk_cache_step(benchmark, variant):
    hidden, weight = make_inputs()
    fn = VARIANTS[variant]
    fn(hidden, weight)
    sync()
    info = dict(kernel="topk_logprobs", variant=variant, N=N, H=H, V=V, k=K,
                dtype=str(DTYPE).replace("torch.", ""), work_items=N, unit="tokens",
                flops=2 * N * H * V, logits_bytes=N * V * 4)
    info["peak_extra_bytes"] = peak_extra_bytes(lambda: fn(hidden, weight))
    benchmark.pedantic(lambda: (fn(hidden, weight), sync()), rounds=10 if CUDA else 3,
                       warmup_rounds=1)
    if CUDA:
        info["device_ms"] = device_ms(lambda: fn(hidden, weight), warmup=2, rep=50)
    info["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    record(benchmark, **info)


def test_topk_interleaved_ratio(benchmark):
    """fused / full-logits time, the two run alternately (pairs of one run each): on a
    shared host the load drifts between pytest-benchmark's back-to-back tests, and the
    per-pair ratio cancels most of it."""
    hidden, weight = make_inputs()
    pairs = [(once_ms(lambda: VARIANTS["fused"](hidden, weight)),
              once_ms(lambda: VARIANTS["full_logits"](hidden, weight)))
             for _ in range(5)]
    benchmark.pedantic(lambda: None, rounds=1)
    record(benchmark, kernel="topk_logprobs", variant="interleaved",
           **interleaved_summary(pairs))


def test_topk_accuracy(benchmark):
    """Max error of the streamed log-probs and tail against the reference in fp64 (CPU) or
    fp32 (CUDA) on the same inputs (the first 512 tokens), and how often the ids agree."""
    hidden, weight = make_inputs(512)
    ref_dtype = torch.float32 if CUDA else torch.float64
    ref = topk_logprobs_reference(hidden.to(ref_dtype), weight.to(ref_dtype), k=K)
    out = topk_logprobs(hidden, weight, k=K)
    finite = torch.isfinite(ref.tail_logmass)
    benchmark.pedantic(lambda: None, rounds=1)
    record(benchmark, kernel="topk_logprobs", variant="accuracy",
           logprob_max_abs_err=(out.logprobs.double() - ref.logprobs.double()).abs().max().item(),
           tail_max_abs_err=(out.tail_logmass.double() - ref.tail_logmass.double())[finite]
           .abs().max().item(),
           id_agreement=(out.ids == ref.ids).double().mean().item())


def cache_bytes_per_token(k, vocab):
    """Bytes a cached token takes: k log-probs, k ids and one tail log-mass (fp16)."""
    id_bits = 16 if vocab <= 1 << 16 else math.ceil(math.log2(vocab))
    return {
        "fp16_logprobs_int32_ids": k * (2 + 4) + 2,
        "fp16_logprobs_packed_ids": k * 2 + math.ceil(k * id_bits / 8) + 2,
        "id_bits": id_bits,
        "full_fp16_distribution": vocab * 2,
    }


def test_cache_bytes_per_token(benchmark):
    """Computed, not measured: k = 50 at this V and at the 32k / 128k vocabularies."""
    benchmark.pedantic(lambda: None, rounds=1)
    info = {}
    for vocab in sorted({V, 32000, 128256}):
        for key, value in cache_bytes_per_token(K, vocab).items():
            info[f"V{vocab}_{key}"] = value
    record(benchmark, kernel="topk_logprobs", variant="cache_layout", k=K, **info)
