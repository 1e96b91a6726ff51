"""Fused LM-head cross-entropy: forward + backward throughput (tokens/s, TFLOP/s counted
as 6 N H V) and peak extra memory, side by side with the naive full-logits version,
torch.compile of it, and (on CUDA, when installed) liger-kernel's fused linear CE.

    pytest benchmarks/bench_linear_cross_entropy.py --benchmark-json=benchmarks/lce.json
"""
import pytest
import torch
import torch.nn.functional as F

from harness import CUDA, DEVICE, device_ms, matmul_tflops, peak_extra_bytes, record, sync
from rankpm.kernels.linear_cross_entropy import linear_cross_entropy

N, H, V = (8192, 4096, 128256) if CUDA else (2048, 512, 32000)
DTYPE = torch.bfloat16 if CUDA else torch.float32


def naive_full_logits(hidden, weight, targets):
    """Materialise (N, V) logits in the input dtype, then cross-entropy in fp32."""
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.float(), targets, ignore_index=-100)


def _liger():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t)
    except Exception:  # noqa: BLE001
        try:
            from liger_kernel.ops.fused_linear_cross_entropy import (
                LigerFusedLinearCrossEntropyFunction)

            return lambda h, w, t: LigerFusedLinearCrossEntropyFunction.apply(h, w, t)[0]
        except Exception:  # noqa: BLE001
            return None


VARIANTS = {
    "fused": lambda h, w, t: linear_cross_entropy(h, w, t),
    "naive_full_logits": naive_full_logits,
    "naive_compiled": torch.compile(naive_full_logits, dynamic=False),
    "liger": _liger(),
}


def make_inputs():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(N, H, device=DEVICE, dtype=DTYPE, generator=g)
    weight = (torch.randn(V, H, device=DEVICE, generator=g) / H ** 0.5).to(DTYPE)
    targets = torch.randint(0, V, (N,), device=DEVICE, generator=g)
    targets[::17] = -100
    return hidden, weight, targets


def test_lce_matmul_floor(benchmark):
    tf = matmul_tflops()
    benchmark.pedantic(lambda: None, rounds=1)
    record(benchmark, kernel="floor", variant="matmul", matmul_TFLOPs=tf)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lce_fwd_bwd(benchmark, variant):
    fn = VARIANTS[variant]
    if fn is None:
        pytest.skip("liger-kernel is not installed")
    if variant == "liger" and not CUDA:
        pytest.skip("liger-kernel needs CUDA")
    hidden, weight, targets = make_inputs()
    h = hidden.requires_grad_()
    w = weight.requires_grad_()

    def step():
        h.grad, w.grad = None, None
        loss = fn(h, w, targets)
        loss.backward()
        return loss

    step()
    sync()
    benchmark.pedantic(lambda: (step(), sync()), rounds=10 if CUDA else 3, warmup_rounds=1)
    flops = 6 * N * H * V
    info = dict(kernel="linear_cross_entropy", variant=variant, N=N, H=H, V=V,
                dtype=str(DTYPE).replace("torch.", ""), work_items=N, unit="tokens",
                flops=flops, logits_bytes=N * V * hidden.element_size())
    h.grad, w.grad = None, None
    info["peak_extra_bytes"] = peak_extra_bytes(step) - (h.numel() + w.numel()) * h.element_size()
    if CUDA:
        info["device_ms"] = device_ms(step, warmup=2, rep=200)
    record(benchmark, **info)


def test_lce_accuracy(benchmark):
    """Max relative gradient error of the fused kernel against an fp32 (fp64 on CPU)
    full-logits reference on the same inputs."""
    hidden, weight, targets = make_inputs()
    ref_dtype = torch.float32 if CUDA else torch.float64
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    hr = hidden.to(ref_dtype).requires_grad_()
    wr = weight.to(ref_dtype).requires_grad_()
    ref = F.cross_entropy(hr @ wr.t(), targets)
    ref.backward()
    torch.backends.cuda.matmul.allow_tf32 = prev
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets)
    loss.backward()

    def rel(a, b):
        return ((a.to(b.dtype) - b).norm() / b.norm()).item()

    benchmark.pedantic(lambda: None, rounds=1)
    record(benchmark, kernel="linear_cross_entropy", variant="accuracy",
           loss_rel_err=abs(loss.item() - ref.item()) / abs(ref.item()),
           grad_hidden_rel_err=rel(h.grad, hr.grad), grad_weight_rel_err=rel(w.grad, wr.grad))


