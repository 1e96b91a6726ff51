"""Block-size sweep for the fused linear CE (CUDA): fwd+bwd time and extra memory.

    python benchmarks/sweep_lce.py

Each block size is given through ``chunk_size`` (tokens per block = logits elements / V),
so the sweep changes no module state.
"""
import torch

from bench_linear_cross_entropy import H, N, V, make_inputs
from harness import device_ms, peak_extra_bytes
from rankpm.kernels.linear_cross_entropy import linear_cross_entropy
from rankpm.kernels.vocab_blocks import out_dtype_matmul

hidden, weight, targets = make_inputs()
h, w = hidden.requires_grad_(), weight.requires_grad_()

for budget in (1 << 23, 1 << 24, 3 << 23):
    chunk = max(1, budget // V)

    def step():
        h.grad, w.grad = None, None
        linear_cross_entropy(h, w, targets, chunk_size=chunk).backward()

    step()
    ms = device_ms(step, warmup=2, rep=200)
    mem = peak_extra_bytes(step) - (h.numel() + w.numel()) * 2
    print(f"block elements {budget:>9d} ({chunk} tokens): {ms:.2f} ms, {6 * N * H * V / ms / 1e9:.0f} TFLOP/s, "
          f"extra {mem / 2**20:.0f} MB (logits/8 = {N * V * 2 / 8 / 2**20:.0f} MB), "
          f"fp32 out of bf16 operands: {out_dtype_matmul(h, torch.float32)}")
