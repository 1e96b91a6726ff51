"""Ranked preference loss: forward + backward throughput (groups/s) and peak memory.

Side by side in one run: the Triton kernel (CUDA), the plain-PyTorch reference,
torch.compile of the reference, and the naive formulation common trainers use (expand
every group into chosen/rejected pairs, stack them, -logsigmoid of the differences,
metrics as separate ops).

    pytest benchmarks/bench_ranked_loss.py --benchmark-json=benchmarks/ranked.json
"""
import time

import pytest
import torch
import torch.nn.functional as F

from harness import (CUDA, DEVICE, copy_bandwidth_gbs, device_ms, empty_launch_us,
                     peak_extra_bytes, record, sync)
from rankpm.kernels.ranked_loss import ranked_preference_loss, ranked_preference_loss_reference

G, K = (65_536, 8) if CUDA else (4_096, 8)


def make_batch(G=G, K=K, dtype=torch.float32):
    S = G * K
    scores = torch.randn(S, device=DEVICE, dtype=dtype)
    ranks = torch.stack([torch.randperm(K) for _ in range(256)]).repeat(G // 256 + 1, 1)[:G]
    ranks = ranks.flatten().to(DEVICE)
    offsets = torch.arange(0, S + 1, K, device=DEVICE, dtype=torch.long)
    return scores, ranks, offsets


def naive_ranked_loss(scores, ranks, offsets, margin=None, weights=None, **_):
    """Expand to chosen/rejected pairs, stack, -logsigmoid: what pairwise trainers do."""
    sizes = offsets[1:] - offsets[:-1]
    kmax = int(sizes.max())
    col = torch.arange(kmax, device=scores.device)
    valid = col[None, :] < sizes[:, None]
    idx = (offsets[:-1, None] + col[None, :]).clamp(max=scores.numel() - 1)
    q = ranks[idx]
    better = valid[:, :, None] & valid[:, None, :] & (q[:, :, None] < q[:, None, :])
    g, i, j = better.nonzero(as_tuple=True)  # host sync, dynamic shape
    chosen, rejected = scores[idx[g, i]], scores[idx[g, j]]
    pair = torch.stack([chosen, rejected], dim=1)
    loss = -F.logsigmoid(pair[:, 0] - pair[:, 1]).mean()
    acc = (pair[:, 0] > pair[:, 1]).float().mean()
    gap = (pair[:, 0] - pair[:, 1]).mean()
    return loss, torch.tensor(float(chosen.numel())), acc, gap


def host_ms(step, n=200):
    """Wall time per eager step, back to back with one sync at the end: the rate a
    training loop sees when the host, not the GPU, is the bottleneck."""
    for _ in range(5):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - t0) / n * 1e3


compiled_reference = torch.compile(ranked_preference_loss_reference, dynamic=False)

VARIANTS = {
    "triton": lambda *a: ranked_preference_loss(*a, impl="triton"),
    "reference": lambda *a: ranked_preference_loss_reference(*a),
    "reference_compiled": lambda *a: compiled_reference(*a),
    "naive_pairs": lambda *a: naive_ranked_loss(*a),
}


@pytest.mark.parametrize("what", ["copy", "empty_launch"])
def test_ranked_floor(benchmark, what):
    """The floor: an empty launch plus the bytes at measured copy bandwidth."""
    if what == "copy":
        gbs = copy_bandwidth_gbs()
        benchmark.pedantic(lambda: None, rounds=1)
        record(benchmark, kernel="floor", variant="copy", copy_GBps=gbs)
    else:
        us = empty_launch_us()
        benchmark.pedantic(lambda: None, rounds=1)
        record(benchmark, kernel="floor", variant="empty_launch", empty_launch_us=us)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ranked_loss_fwd_bwd(benchmark, variant):
    if variant == "triton" and not CUDA:
        pytest.skip("Triton kernel needs CUDA (the interpreter is not a benchmark)")
    scores, ranks, offsets = make_batch()
    x = scores.detach().requires_grad_()
    fn = VARIANTS[variant]

    def step():
        x.grad = None
        out = fn(x, ranks, offsets)
        out[0].backward()
        return out

    step(); step()  # compile / warm up
    sync()
    benchmark.pedantic(lambda: (step(), sync()), rounds=20 if CUDA else 5, warmup_rounds=1)
    S = G * K
    # bytes the Triton pair moves: forward reads scores, ranks, offsets and writes the
    # gradient (fp32, group factor folded in); backward reads it and writes grad
    nbytes = S * (x.element_size() + ranks.element_size() + 4) + (G + 1) * 8 \
        + S * (4 + x.element_size())
    info = dict(kernel="ranked_loss", variant=variant, G=G, K=K, dtype="float32",
                work_items=G, unit="groups", bytes=nbytes,
                peak_extra_bytes=peak_extra_bytes(step))
    if CUDA:
        info["device_ms"] = device_ms(step)
        info["host_ms"] = host_ms(step)
    if CUDA and variant == "triton":  # a failed capture would poison the RNG for later tests
        try:
            import triton.testing
            info["graph_ms"] = float(triton.testing.do_bench_cudagraph(step, rep=100,
                                                                        return_mode="median"))
        except Exception as e:  # noqa: BLE001 - some variants cannot be captured
            info["graph_ms"] = None
            info["graph_error"] = type(e).__name__
    record(benchmark, **info)


