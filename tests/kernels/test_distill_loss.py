"""Cached-teacher distillation loss: the fused implementations against the float64
full-logits reference (loss and the gradients of hidden, weight and bias) on fresh random
inputs, in both modes, plus hand-worked cases and the edges of the cache format.

Tolerances come from the reference's own error: the reference run on the same rounded
inputs in their own dtype is compared with the float64 ground truth, and the fused result
may err by at most a few times that (with a floor at fp32 rounding).

Under TRITON_INTERPRET=1 the Triton cases run fp32 (the interpreter's bf16 is unreliable)
and skip the largest shape (minutes there); on a GPU they run everything.
"""
import math

import pytest
import torch

from rankpm.kernels.distill_loss import distill_loss, distill_loss_reference
from rankpm.kernels.linear_cross_entropy import linear_cross_entropy_naive
from rankpm.kernels.topk_logits import topk_logprobs_reference

from kernel_impls import DEVICE, HAS_TRITON, IMPLS

INTERPRETED = DEVICE == "cpu"
IGNORE = -100

# (N, H, V, k, chunk_size): the unaligned shapes run several token blocks (chunk tokens)
# and vocabulary blocks of 128 columns that do not divide V (chunk * V / N -> 128). The
# edge-case tests use 11 x 16 x 300, k = 8, chunk 2: blocks of 2 tokens or 128, 128, 44 columns.
SHAPES = [(37, 48, 1000, 50, 8), (19, 32, 700, 20, 4), (5, 16, 64, 3, None)]
SLOW_UNDER_INTERPRETER = {(37, 48, 1000, 50, 8)}


def impl_dtypes():
    mark = IMPLS[1].marks
    pairs = [pytest.param("torch", torch.float32, id="torch-fp32"),
             pytest.param("torch", torch.bfloat16, id="torch-bf16"),
             pytest.param("triton", torch.float32, id="triton-fp32", marks=mark)]
    if DEVICE == "cuda":
        pairs.append(pytest.param("triton", torch.bfloat16, id="triton-bf16", marks=mark))
    return pairs


def make_student(N, H, V, with_bias=True):
    hidden = torch.randn(N, H, dtype=torch.float64, device=DEVICE)
    weight = torch.randn(V, H, dtype=torch.float64, device=DEVICE) / math.sqrt(H) * 3
    bias = torch.randn(V, dtype=torch.float64, device=DEVICE) if with_bias else None
    return hidden, weight, bias


def topk_cache(hidden, weight, k, ignore_frac=0.2):
    """A teacher near the student (its head perturbed) cached the way the teacher pass does."""
    teacher = weight + 0.5 * torch.randn_like(weight)
    cache = topk_logprobs_reference(hidden, teacher, k=k)
    ids = cache.ids.clone()
    ids[torch.rand(ids.shape[0], device=DEVICE) < ignore_frac, 0] = IGNORE  # padding rows
    return ids, cache.logprobs, cache.tail_logmass


def sampled_cache(hidden, weight, k, draws=40, ignore_frac=0.2):
    """Tokens drawn from the teacher, stored as unique ids with counts, padded with IGNORE."""
    teacher = weight + 0.5 * torch.randn_like(weight)
    probs = torch.softmax(hidden @ teacher.t(), dim=-1)
    N = hidden.shape[0]
    ids = torch.full((N, k), IGNORE, dtype=torch.int64, device=DEVICE)
    counts = torch.zeros(N, k, dtype=torch.int64, device=DEVICE)
    for i in range(N):
        uniq, cnt = torch.multinomial(probs[i], draws, replacement=True).unique(return_counts=True)
        order = cnt.argsort(descending=True)[:k]
        ids[i, :order.numel()], counts[i, :order.numel()] = uniq[order], cnt[order]
    ids[torch.rand(N, device=DEVICE) < ignore_frac, 0] = IGNORE
    return ids, counts


def run(fn, student, cache, mode, dtype, reduction, grad_out=None, **kw):
    """Loss and the gradients of (hidden, weight, bias) for a loss-shaped grad_output."""
    leaves = [t.to(dtype).detach().requires_grad_() if t is not None else None for t in student]
    if mode == "topk":
        ids, logprobs, tail = cache
        loss = fn(leaves[0], leaves[1], ids, logprobs, tail, leaves[2], reduction=reduction, **kw)
    else:
        ids, counts = cache
        loss = fn(leaves[0], leaves[1], ids, None, None, leaves[2], mode="sampled",
                  counts=counts, reduction=reduction, **kw)
    if grad_out is None:
        grad_out = torch.rand(loss.shape, dtype=torch.float64, device=loss.device) + 0.5
    (loss * grad_out.to(loss.dtype)).sum().backward()
    return loss.detach(), [t.grad if t is not None else None for t in leaves], grad_out


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def rounded(student, dtype):
    return [t.to(dtype).double() if t is not None else None for t in student]


def tolerances(student, cache, mode, dtype, reduction, truth, go):
    """A few times the reference's own error in this dtype (loss, each gradient); floor 1e-5."""
    loss, grads, _ = run(distill_loss_reference, rounded(student, dtype), cache, mode, dtype,
                         reduction, grad_out=go)
    errs = [rel_err(loss, truth[0])]
    errs += [rel_err(g, t) for g, t in zip(grads, truth[1]) if t is not None]
    return [max(4 * e, 1e-5) for e in errs]


def check(impl, dtype, student, cache, mode, reduction, chunk_size=None):
    truth_loss, truth_grads, go = run(distill_loss_reference, rounded(student, dtype), cache,
                                      mode, torch.float64, reduction)
    tols = tolerances(student, cache, mode, dtype, reduction, (truth_loss, truth_grads), go)
    loss, grads, _ = run(distill_loss, student, cache, mode, dtype, reduction, grad_out=go,
                         impl=impl, chunk_size=chunk_size)
    assert loss.shape == truth_loss.shape and loss.dtype == torch.float32
    assert rel_err(loss, truth_loss) < tols[0]
    got = [g for g in grads if g is not None]
    for g, t, tol in zip(got, [t for t in truth_grads if t is not None], tols[1:]):
        assert g.dtype == dtype
        assert rel_err(g, t) < tol


@pytest.mark.parametrize("impl, dtype", impl_dtypes())
@pytest.mark.parametrize("mode", ["topk", "sampled"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_ground_truth(impl, dtype, mode, reduction, shape):
    if impl == "triton" and INTERPRETED and shape in SLOW_UNDER_INTERPRETER:
        pytest.skip("minutes under the Triton interpreter; runs on a GPU")
    N, H, V, k, chunk = shape
    student = make_student(N, H, V)
    cache = topk_cache(student[0], student[1], k) if mode == "topk" else sampled_cache(
        student[0], student[1], k)
    check(impl, dtype, student, cache, mode, reduction, chunk)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_without_bias_and_fp64(impl, mode):
    student = make_student(11, 16, 300, with_bias=False)
    cache = topk_cache(*student[:2], 8) if mode == "topk" else sampled_cache(*student[:2], 8)
    check(impl, torch.float32, student, cache, mode, "mean", chunk_size=2)
    if impl == "torch":
        loss, grads, go = run(distill_loss, student, cache, mode, torch.float64, "sum",
                              chunk_size=2)
        ref, ref_grads, _ = run(distill_loss_reference, student, cache, mode, torch.float64,
                                "sum", grad_out=go)
        assert loss.dtype == torch.float64 and rel_err(loss, ref) < 1e-12
        for g, r in zip(grads[:2], ref_grads[:2]):
            assert rel_err(g, r) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])  # token walk and vocabulary walk
def test_hand_computed_topk_v3_k1(impl, reduction):
    """h = [1], W = [[ln 2], [0], [0]] -> logits [ln 2, 0, 0], softmax s = [1/2, 1/4, 1/4].
    Cache: id 0 with teacher p = 0.8, tail 0.2. Student q_0 = 1/2, q_tail = 1/4 + 1/4 = 1/2.
      loss = 0.8 ln(0.8/0.5) + 0.2 ln(0.2/0.5) = 0.376003 - 0.183258 = 0.192745
    With T = 0.8 + 0.2 = 1:
      dX_0     = T q_0 - p_0 = 0.5 - 0.8 = -0.3
      dX_{1,2} = s_v (T - p_t/q_t) = 0.25 (1 - 0.4) = 0.15      (sums to 0)
      dH = dX W = -0.3 ln 2 = -0.207944;  dW = dX^T h = [[-0.3], [0.15], [0.15]];  db = dX.
    A second row whose ids[:, 0] is ignore_index adds nothing (mean over 1 row).
    """
    hidden = torch.tensor([[1.0], [5.0]], device=DEVICE, requires_grad=True)
    weight = torch.tensor([[math.log(2.0)], [0.0], [0.0]], device=DEVICE, requires_grad=True)
    bias = torch.zeros(3, device=DEVICE, requires_grad=True)
    ids = torch.tensor([[0], [IGNORE]], device=DEVICE)
    logprobs = torch.tensor([[math.log(0.8)], [0.0]], device=DEVICE)
    tail = torch.tensor([math.log(0.2), 0.0], device=DEVICE)
    loss = distill_loss(hidden, weight, ids, logprobs, tail, bias, impl=impl, reduction=reduction)
    loss.sum().backward()
    want = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert want == pytest.approx(0.192745, abs=1e-6)
    assert loss.sum().item() == pytest.approx(want, rel=1e-6)
    assert hidden.grad.flatten().tolist() == pytest.approx([-0.3 * math.log(2.0), 0.0], abs=1e-6)
    assert weight.grad.flatten().tolist() == pytest.approx([-0.3, 0.15, 0.15], abs=1e-6)
    assert bias.grad.tolist() == pytest.approx([-0.3, 0.15, 0.15], abs=1e-6)
    # the teacher tail left out is 1 - 0.8: the same loss
    again = distill_loss(hidden, weight, ids, logprobs, None, bias, impl=impl)
    assert again.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_sampled_v3(impl):
    """Same logits [ln 2, 0, 0] (s = [1/2, 1/4, 1/4]); ids [0, 2] drawn 3 and 1 times:
      w = [3/4, 1/4];  loss = -(3/4 ln 1/2 + 1/4 ln 1/4) = 0.519860 + 0.346574 = 0.866434
      dX = s - w one-hot = [1/2 - 3/4, 1/4, 1/4 - 1/4] = [-0.25, 0.25, 0]
    """
    hidden = torch.tensor([[1.0]], device=DEVICE)
    weight = torch.tensor([[math.log(2.0)], [0.0], [0.0]], device=DEVICE)
    bias = torch.zeros(3, device=DEVICE, requires_grad=True)
    loss = distill_loss(hidden, weight, torch.tensor([[0, 2]], device=DEVICE), None, None, bias,
                        mode="sampled", counts=torch.tensor([[3, 1]], device=DEVICE), impl=impl)
    loss.backward()
    assert loss.item() == pytest.approx(0.75 * math.log(2) + 0.25 * math.log(4), rel=1e-6)
    assert bias.grad.tolist() == pytest.approx([-0.25, 0.25, 0.0], abs=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_one_id_with_all_the_mass_is_cross_entropy(impl, mode):
    """k = 1, teacher log-prob 0 and tail -inf (or one sample): exactly linear cross-entropy."""
    student = make_student(11, 16, 300)
    targets = torch.randint(0, 300, (11,), device=DEVICE)
    targets[::5] = IGNORE
    ids = targets[:, None]
    if mode == "topk":
        cache = (ids, torch.zeros(11, 1, device=DEVICE),
                 torch.full((11,), float("-inf"), device=DEVICE))
    else:
        cache = (ids, torch.ones(11, 1, device=DEVICE))
    loss, grads, go = run(distill_loss, student, cache, mode, torch.float32, "mean", impl=impl,
                          chunk_size=2)
    leaves = [t.detach().requires_grad_() for t in student]
    ce = linear_cross_entropy_naive(leaves[0], leaves[1], targets, leaves[2])
    (ce * go).backward()
    assert rel_err(loss, ce) < 1e-5
    for g, t in zip(grads, leaves):
        assert rel_err(g, t.grad) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tail", [float("-inf"), -200.0])
def test_teacher_tail_mass_near_zero(impl, tail):
    """The teacher's k log-probs renormalised to hold all the mass; tail -inf or e^-200."""
    student = make_student(11, 16, 300)
    ids, logprobs, _ = topk_cache(*student[:2], 8)
    logprobs = torch.log_softmax(logprobs, dim=1)
    cache = (ids, logprobs, torch.full((11,), tail, device=DEVICE))
    check(impl, torch.float32, student, cache, "topk", "mean", chunk_size=2)


@pytest.mark.parametrize("impl", IMPLS)
def test_student_tail_far_below_fp32_resolution(impl):
    """The student puts all but ~e^-70 of its mass on the cached ids while the teacher keeps
    10% in the tail: 1 - sum q is 0 in fp32, yet loss (~0.1 * 60) and gradients match the
    float64 reference, because the tail is summed from its own terms."""
    N, H, V, k = 11, 16, 300, 8
    hidden, weight, bias = make_student(N, H, V)
    ids, logprobs, _ = topk_cache(hidden, weight, k, ignore_frac=0.0)
    ids = ids[:1].expand(N, k).contiguous()  # one id set for every row, lifted by 80
    bias[ids[0]] += 80.0
    student = (hidden, weight, bias)
    logprobs = torch.log_softmax(logprobs[:1], dim=1).expand(N, k) + math.log(0.9)
    cache = (ids, logprobs, torch.full((N,), math.log(0.1), device=DEVICE))
    check(impl, torch.float32, student, cache, "topk", "sum", chunk_size=2)
    loss, _, _ = run(distill_loss, student, cache, "topk", torch.float32, "none", impl=impl)
    assert (loss > 4.0).all()  # >= 0.1 (ln 0.1 - ln q_tail), q_tail ~ e^-70


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["topk", "sampled"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_rows_contribute_nothing(impl, mode, reduction):
    """Ignored rows: loss 0 and no gradient, whatever their other slots hold; all rows
    ignored: 0, not nan, and zero gradients."""
    student = make_student(11, 16, 300)
    cache = topk_cache(*student[:2], 8, ignore_frac=0.0) if mode == "topk" else sampled_cache(
        *student[:2], 8, ignore_frac=0.0)
    ignored = torch.zeros(11, dtype=torch.bool, device=DEVICE)
    ignored[::3] = True
    ids = cache[0].clone()
    ids[ignored, 0] = IGNORE  # the rest of those rows keeps real ids: still ignored
    loss, grads, go = run(distill_loss, student, (ids, *cache[1:]), mode, torch.float32,
                          reduction, impl=impl, chunk_size=2)
    keep = ~ignored
    sub_cache = tuple(c[keep] for c in cache)
    sub, sub_grads, _ = run(distill_loss_reference, (student[0][keep], *student[1:]), sub_cache,
                            mode, torch.float64, reduction,
                            grad_out=go[keep] if reduction == "none" else go)
    if reduction == "none":
        assert (loss[ignored] == 0).all()
        loss = loss[keep]
    assert rel_err(loss, sub) < 1e-5
    assert (grads[0][ignored] == 0).all()
    assert rel_err(grads[0][keep], sub_grads[0]) < 1e-5
    for g, t in zip(grads[1:], sub_grads[1:]):
        assert rel_err(g, t) < 1e-5
    ids[:, 0] = IGNORE
    loss, grads, _ = run(distill_loss, student, (ids, *cache[1:]), mode, torch.float32,
                         reduction, impl=impl, chunk_size=2)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_same_ids_in_every_row_and_k_equal_v(impl, mode):
    """Ids repeated across rows (each row unique within itself), and k = V: the ids cover
    the vocabulary, the student tail is empty (-inf), the teacher's too."""
    N, H, V = 7, 16, 64
    student = make_student(N, H, V)
    ids = torch.randperm(V, device=DEVICE).expand(N, V).contiguous()
    if mode == "topk":
        logprobs = torch.log_softmax(torch.randn(N, V, dtype=torch.float64, device=DEVICE), dim=1)
        cache = (ids, logprobs, torch.full((N,), float("-inf"), device=DEVICE))
    else:
        cache = (ids, torch.randint(0, 3, (N, V), device=DEVICE))
    check(impl, torch.float32, student, cache, mode, "mean")
    check(impl, torch.float32, student, (ids[:, :5].contiguous(),
                                         *(c[:, :5] if c.dim() == 2 else c for c in cache[1:])),
          mode, "sum", chunk_size=2)


def test_repeated_ids_sampled_is_linear_topk_refused():
    """Sampled mode may repeat an id (counts add up); topk mode needs unique ids per row,
    and the reference says which row breaks that."""
    student = make_student(5, 16, 64)
    ids = torch.tensor([[3, 7, 3], [1, 2, 4], [5, 5, 5], [9, 8, 7], [6, IGNORE, 6]],
                       device=DEVICE)
    counts = torch.tensor([[1, 2, 3], [1, 1, 1], [1, 1, 2], [2, 2, 2], [1, 5, 1]], device=DEVICE)
    merged_ids = torch.tensor([[3, 7, IGNORE], [1, 2, 4], [5, IGNORE, IGNORE], [9, 8, 7],
                               [6, IGNORE, IGNORE]], device=DEVICE)
    merged_counts = torch.tensor([[4, 2, 0], [1, 1, 1], [4, 0, 0], [2, 2, 2], [2, 0, 0]],
                                 device=DEVICE)
    a, ga, go = run(distill_loss, student, (ids, counts), "sampled", torch.float32, "none",
                    impl="torch")
    b, gb, _ = run(distill_loss_reference, student, (merged_ids, merged_counts), "sampled",
                   torch.float64, "none", grad_out=go)
    assert rel_err(a, b) < 1e-6 and all(rel_err(x, y) < 1e-5 for x, y in zip(ga, gb))
    with pytest.raises(ValueError, match="row 0 repeats an id"):
        distill_loss_reference(*[t.float() for t in student[:2]], ids,
                               torch.zeros(5, 3, device=DEVICE))


@pytest.mark.skipif(not HAS_TRITON, reason="triton imported before TRITON_INTERPRET=1")
@pytest.mark.parametrize("mode", ["topk", "sampled"])
@pytest.mark.parametrize("reduction", ["mean", "none"])  # token walk and vocabulary walk
def test_triton_matches_torch(mode, reduction):
    student = make_student(11, 16, 300)
    cache = topk_cache(*student[:2], 8) if mode == "topk" else sampled_cache(*student[:2], 8)
    a, ga, go = run(distill_loss, student, cache, mode, torch.float32, reduction, impl="torch",
                    chunk_size=2)
    b, gb, _ = run(distill_loss, student, cache, mode, torch.float32, reduction, grad_out=go,
                   impl="triton", chunk_size=2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_forward_without_autograd():
    student = [t.float() for t in make_student(11, 16, 300)]
    cache = topk_cache(*[t.double() for t in student[:2]], 8)
    with torch.no_grad():
        loss = distill_loss(student[0], student[1], *cache, student[2], impl="torch")
    ref = distill_loss_reference(*[t.double() for t in student[:2]], *cache, student[2].double())
    assert not loss.requires_grad and rel_err(loss, ref) < 1e-5


def test_bad_arguments_name_the_value():
    h, w = torch.zeros(3, 4), torch.zeros(10, 4)
    ids, lp = torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="mode='kl'"):
        distill_loss(h, w, ids, lp, mode="kl")
    with pytest.raises(ValueError, match="reduction='avg'"):
        distill_loss(h, w, ids, lp, reduction="avg")
    with pytest.raises(ValueError, match="impl='cuda'"):
        distill_loss(h, w, ids, lp, impl="cuda")
    with pytest.raises(ValueError, match=r"teacher_logprobs must be \(3, 2\)"):
        distill_loss(h, w, ids, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"counts must be \(3, 2\) in mode='sampled', got None"):
        distill_loss(h, w, ids, None, mode="sampled")
    with pytest.raises(ValueError, match="counts is for mode='sampled'"):
        distill_loss(h, w, ids, lp, counts=torch.ones(3, 2))
    with pytest.raises(ValueError, match="ids must be integer"):
        distill_loss(h, w, ids.float(), lp)
    with pytest.raises(ValueError, match=r"teacher_tail_logmass must be \(3,\)"):
        distill_loss(h, w, ids, lp, torch.zeros(2))
    with pytest.raises(ValueError, match="chunk_size=0"):
        distill_loss(h, w, ids, lp, chunk_size=0)
    with pytest.raises(ValueError, match="float64"):
        distill_loss(h.double(), w.double(), ids, lp, impl="triton")


def test_second_backward_through_one_graph_is_refused():
    """The token walk hands over the gradient it made in forward, scaled in place; a second
    backward (retain_graph) must fail loudly, not return a gradient scaled twice."""
    student = [t.float().requires_grad_() for t in make_student(5, 16, 64)]
    ids, logprobs, tail = topk_cache(*[t.detach().double() for t in student[:2]], 3)
    loss = distill_loss(student[0], student[1], ids, logprobs, tail, student[2], impl="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
