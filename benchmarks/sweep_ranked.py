"""Tile sweep for the ranked-loss kernel (CUDA): fwd+bwd time under CUDA-graph replay.

    python benchmarks/sweep_ranked.py
"""
import itertools

import torch
import triton.testing

import rankpm.kernels.ranked_loss as rl
from bench_ranked_loss import G, K, make_batch

scores, ranks, offsets = make_batch()
x = scores.detach().requires_grad_()
ranks32 = ranks.to(torch.int32)


def step(r):
    x.grad = None
    rl.ranked_preference_loss(x, r, offsets, impl="triton").loss.backward()


rows = []
for gpp, bk, nw in itertools.product([8, 16, 32, 64], [8], [1, 2, 4, 8]):
    rl.GROUPS_PER_PROG, rl.BLOCK_K, rl.NUM_WARPS = gpp, bk, nw
    for name, r in (("int64", ranks), ("int32", ranks32)):
        step(r)
        ms = triton.testing.do_bench_cudagraph(lambda: step(r), rep=50, return_mode="median")
        rows.append((ms, gpp, bk, nw, name))
        print(f"GROUPS_PER_PROG={gpp:3d} BLOCK_K={bk} num_warps={nw} ranks={name}: {ms * 1e3:.1f} us")
print("best:", sorted(rows)[:3])
