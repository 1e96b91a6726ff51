"""Top-k log-probability cache step: the streamed implementations against the full-logits
reference and a float64 ground truth on fresh random inputs.

Tolerances come from the reference's own error: the reference run on the same low-precision
inputs (it computes in fp32) is compared with the float64 ground truth, and the streamed
result may err by at most a few times that (plus a floor for fp32 rounding).

Under TRITON_INTERPRET=1 the Triton cases use small shapes (tl.topk's sorting network costs
about 0.1 s a call in the interpreter) and fp32 only (the interpreter's bf16 is unreliable);
on a GPU they run every shape.
"""
import math

import pytest
import torch

from rankpm.kernels.topk_logits import topk_logprobs, topk_logprobs_reference

from kernel_impls import DEVICE, HAS_TRITON, IMPLS

INTERPRETED = DEVICE == "cpu"

# (N, H, V, k, chunk_size): chunk 8 of 37 tokens -> 128-column blocks, which do not divide
# V = 1000 (the "weird" shape); k = 1 and k = V; chunk 2 of 6 -> blocks 128, 128, 44.
CASES = [
    (37, 48, 1000, 50, 8),
    (37, 48, 1000, 50, None),
    (13, 24, 500, 12, 4),
    (6, 16, 300, 5, 2),
    (5, 16, 64, 1, None),
    (5, 16, 64, 64, None),
]
SLOW_UNDER_INTERPRETER = {(37, 48, 1000, 50, 8), (37, 48, 1000, 50, None), (13, 24, 500, 12, 4)}


def make_inputs(N, H, V, with_bias=True, scale=3.0):
    hidden = torch.randn(N, H, dtype=torch.float64, device=DEVICE)
    weight = torch.randn(V, H, dtype=torch.float64, device=DEVICE) / math.sqrt(H) * scale
    bias = torch.randn(V, dtype=torch.float64, device=DEVICE) if with_bias else None
    return hidden, weight, bias


def cast(tensors, dtype):
    return [t.to(dtype) if t is not None else None for t in tensors]


def truth_logprobs(hidden, weight, bias):
    """(N, V) float64 log-softmax of the (already rounded) inputs."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    return torch.log_softmax(logits, dim=-1)


def tolerance(inputs, k, dtype):
    """A few times the reference's own max error on these inputs, at least fp32 rounding."""
    if dtype == torch.float64:
        return 1e-10
    ref = topk_logprobs_reference(*cast(inputs, dtype), k=k)
    truth = truth_logprobs(*cast(cast(inputs, dtype), torch.float64))
    err = (truth.gather(1, ref.ids) - ref.logprobs.double()).abs().max().item()
    return max(4 * err, 2e-5)


def check_against_truth(out, truth, k, tol):
    """out is a valid top k of truth: the right values (as a multiset: ties may swap ids),
    each id carrying its own value, no id twice, sorted, and the tail of exactly those ids."""
    N = truth.shape[0]
    assert out.logprobs.shape == (N, k) and out.ids.shape == (N, k)
    assert out.tail_logmass.shape == (N,)
    assert out.ids.dtype == torch.int64 and not out.logprobs.requires_grad
    assert (out.logprobs[:, :-1] >= out.logprobs[:, 1:]).all()
    want, _ = truth.topk(k, dim=1)
    torch.testing.assert_close(out.logprobs.double(), want, rtol=0, atol=tol)
    torch.testing.assert_close(truth.gather(1, out.ids), out.logprobs.double(), rtol=0, atol=tol)
    assert (out.ids.sort(dim=1).values.diff(dim=1) > 0).all()
    tail = torch.logsumexp(truth.scatter(1, out.ids, float("-inf")), dim=1)
    torch.testing.assert_close(out.tail_logmass.double(), tail, rtol=tol, atol=tol)


def impl_dtypes():
    triton_mark = IMPLS[1].marks
    pairs = [pytest.param("torch", dt, id=f"torch-{name}")
             for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"),
                              (torch.float64, "fp64"))]
    pairs.append(pytest.param("triton", torch.float32, id="triton-fp32", marks=triton_mark))
    if DEVICE == "cuda":
        pairs.append(pytest.param("triton", torch.bfloat16, id="triton-bf16", marks=triton_mark))
    return pairs


@pytest.mark.parametrize("impl, dtype", impl_dtypes())
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64_ground_truth(impl, dtype, case, with_bias):
    if impl == "triton" and INTERPRETED and case in SLOW_UNDER_INTERPRETER:
        pytest.skip("a minute under the Triton interpreter; runs on a GPU")
    N, H, V, k, chunk = case
    inputs = make_inputs(N, H, V, with_bias)
    out = topk_logprobs(*cast(inputs, dtype), k=k, impl=impl, chunk_size=chunk)
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.logprobs.dtype == want_dtype and out.tail_logmass.dtype == want_dtype
    truth = truth_logprobs(*cast(cast(inputs, dtype), torch.float64))
    check_against_truth(out, truth, k, tolerance(inputs, k, dtype))
    if k == V:
        assert torch.isneginf(out.tail_logmass).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_return_a_valid_top_k(impl):
    """Equal rows of W and equal biases make exactly equal logits: three tied at the top
    (ids 250-252) and 41 tied just below (ids 100-140, across the block edge at 128), so
    the cut at k = 5 falls inside a tie. Any choice among tied ids is right, each id once,
    with its own value."""
    N, H, V, k = 6, 16, 300, 5
    hidden, weight, bias = make_inputs(N, H, V)
    weight[250:253], bias[250:253] = weight[3], 30.0
    weight[100:141], bias[100:141] = weight[3], 29.0
    inputs = cast((hidden, weight, bias), torch.float32)
    out = topk_logprobs(*inputs, k=k, impl=impl, chunk_size=2)
    assert (out.ids[:, :3] >= 250).all()
    assert ((out.ids[:, 3:] >= 100) & (out.ids[:, 3:] <= 140)).all()
    check_against_truth(out, truth_logprobs(*inputs), k, 2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_tail_mass_near_zero_stays_exact(impl):
    """One logit 120 above the rest: the tail (about V e^-120) is far below fp32's 1 - sum
    resolution, yet tail_logmass matches float64 to fp32 relative precision (no -inf)."""
    N, H, V, k = 6, 16, 300, 5
    hidden, weight, bias = make_inputs(N, H, V)
    bias[17] += 120.0
    out = topk_logprobs(*cast((hidden, weight, bias), torch.float32), k=k, impl=impl,
                        chunk_size=2)
    truth = truth_logprobs(*cast((hidden, weight, bias), torch.float32))
    assert (out.ids[:, 0] == 17).all()
    assert torch.isfinite(out.tail_logmass).all() and (out.tail_logmass < -100).all()
    check_against_truth(out, truth, k, 2e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="triton imported before TRITON_INTERPRET=1")
def test_triton_matches_torch():
    """An unaligned shape: 7 tokens, chunk 2 -> blocks of 128, 128, 77 columns; k = 6."""
    hidden, weight, bias = cast(make_inputs(7, 16, 333), torch.float32)
    a = topk_logprobs(hidden, weight, bias, k=6, impl="torch", chunk_size=2)
    b = topk_logprobs(hidden, weight, bias, k=6, impl="triton", chunk_size=2)
    assert torch.equal(a.ids, b.ids)  # random logits: no ties to order differently
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.tail_logmass, b.tail_logmass, rtol=0, atol=1e-6)


def test_outputs_carry_no_gradient():
    hidden, weight, bias = [t.float().requires_grad_() for t in make_inputs(5, 16, 64)]
    out = topk_logprobs(hidden, weight, bias, k=3, impl="torch")
    assert not any(t.requires_grad for t in out)


def test_bad_arguments_name_the_value():
    h, w = torch.zeros(3, 4), torch.zeros(10, 4)
    with pytest.raises(ValueError, match=r"k=0: expected 1 <= k <= V=10"):
        topk_logprobs(h, w, k=0)
    with pytest.raises(ValueError, match=r"k=11: expected 1 <= k <= V=10"):
        topk_logprobs(h, w, k=11)
    with pytest.raises(ValueError, match=r"k=11: expected 1 <= k <= V=10"):
        topk_logprobs_reference(h, w, k=11)
    with pytest.raises(ValueError, match="impl='cuda'"):
        topk_logprobs(h, w, k=2, impl="cuda")
    with pytest.raises(ValueError, match="chunk_size=0"):
        topk_logprobs(h, w, k=2, chunk_size=0)
    with pytest.raises(ValueError, match="weight"):
        topk_logprobs(h, torch.zeros(10, 3), k=2)
    with pytest.raises(ValueError, match="float64"):
        topk_logprobs(h.double(), w.double(), k=2, impl="triton")
