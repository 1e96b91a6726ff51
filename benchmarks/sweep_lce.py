"""Block-size sweep for the fused linear CE (CUDA): fwd+bwd time and extra memory.

    python benchmarks/sweep_lce.py
"""
import torch

import rankpm.kernels.linear_cross_entropy as lce
from bench_linear_cross_entropy import H, N, V, make_inputs
from harness import device_ms, peak_extra_bytes

hidden, weight, targets = make_inputs()
h, w = hidden.requires_grad_(), weight.requires_grad_()


def step():
    h.grad, w.grad = None, None
    lce.linear_cross_entropy(h, w, targets).backward()


for budget in (1 << 23, 1 << 24, 3 << 23):
    lce._BLOCK_ELEMENTS["cuda"] = budget
    step()
    ms = device_ms(step, warmup=2, rep=200)
    mem = peak_extra_bytes(step) - (h.numel() + w.numel()) * 2
    print(f"block elements {budget:>9d}: {ms:.2f} ms, {6 * N * H * V / ms / 1e9:.0f} TFLOP/s, "
          f"extra {mem / 2**20:.0f} MB (logits/8 = {N * V * 2 / 8 / 2**20:.0f} MB), "
          f"out_dtype paths {lce._OUT_DTYPE_OK}")
