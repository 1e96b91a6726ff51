"""Ranked preference loss: Triton kernel and torch path against a float64 ground truth.

On a machine without a GPU the Triton kernel runs under TRITON_INTERPRET=1 (conftest).
"""
import math

import pytest
import torch

from rankpm.kernels.ranked_loss import (
    RankedLossOutput,
    ranked_preference_loss,
    ranked_preference_loss_reference,
    resolve_impl,
)

from kernel_impls import DEVICE, HAS_TRITON, IMPLS

DTYPES = [torch.float32] + ([torch.bfloat16, torch.float16] if DEVICE == "cuda" else [])


def sp(x):
    return math.log1p(math.exp(x)) if x < 30 else x


def make_batch(n_groups, kmin=2, kmax=9, n_levels=4, seed=None, device=DEVICE):
    """Mixed group sizes, ranks drawn from n_levels levels (so ties happen)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    sizes = torch.randint(kmin, kmax + 1, (n_groups,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    S = int(offsets[-1])
    scores = torch.randn(S, dtype=torch.float64, generator=g) * 2
    ranks = torch.randint(0, n_levels, (S,), generator=g)
    margin = torch.rand(n_groups, dtype=torch.float64, generator=g)
    weights = torch.rand(n_groups, dtype=torch.float64, generator=g) + 0.5
    return [t.to(device) for t in (scores, ranks, offsets, margin, weights)]


def run(scores, ranks, offsets, margin, weights, impl, dtype, grad_out=1.0, **kw):
    x = scores.to(dtype).detach().requires_grad_()
    if isinstance(margin, torch.Tensor):
        margin = margin.to(torch.float32 if dtype != torch.float64 else dtype)
    if weights is not None:
        weights = weights.to(torch.float32 if dtype != torch.float64 else dtype)
    out = ranked_preference_loss(x, ranks, offsets, margin, weights, impl=impl, **kw)
    (out.loss * grad_out).backward()
    return out, x.grad


def brute_force(scores, ranks, offsets, margin=None, weights=None, levels=None, pairs="all", reduction="pairs"):
    """The loss written out pair by pair, group by group: the oracle for the reference."""
    num, den = 0.0, 0.0
    for g in range(len(offsets) - 1):
        lo, hi = int(offsets[g]), int(offsets[g + 1])
        r, q = [float(x) for x in scores[lo:hi]], [int(x) for x in ranks[lo:hi]]
        u = [float(x) for x in levels[lo:hi]] if levels is not None else [0.0] * len(r)
        m = 0.0 if margin is None else float(margin) if isinstance(margin, float) else float(margin[g])
        w = 1.0 if weights is None else float(weights[g])
        levels_above = sorted(set(q))
        losses = []
        for b in range(len(r)):
            for v in range(len(r)):
                if q[b] >= q[v]:
                    continue
                if pairs == "adjacent" and levels_above.index(q[v]) != levels_above.index(q[b]) + 1:
                    continue
                losses.append(sp(r[v] - r[b] + m + u[b] - u[v]))
        if reduction == "pairs":
            num, den = num + w * sum(losses), den + w * len(losses)
        elif losses:
            num, den = num + w * sum(losses) / len(losses), den + w
    return num / den if den else 0.0


@pytest.mark.parametrize("pairs", ["all", "adjacent"])
@pytest.mark.parametrize("reduction", ["pairs", "groups"])
def test_reference_matches_a_pair_by_pair_loop(pairs, reduction):
    scores, ranks, offsets, margin, weights = make_batch(17, kmax=7, n_levels=3, device="cpu")
    levels = torch.randn(scores.shape, dtype=torch.float64)
    for m, w, u in ((None, None, None), (margin, weights, None), (0.3, None, levels), (margin, weights, levels)):
        out = ranked_preference_loss_reference(scores, ranks, offsets, m, w, margin_levels=u, pairs=pairs,
                                               reduction=reduction)
        expected = brute_force(scores, ranks, offsets, m, w, u, pairs, reduction)
        assert out.loss.item() == pytest.approx(expected, rel=1e-12)


def tolerance(dtype):
    return {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
@pytest.mark.parametrize("reduction", ["pairs", "groups"])
@pytest.mark.parametrize("extras", ["none", "margin_weights", "float_margin"])
def test_matches_float64_ground_truth(impl, dtype, pairs, reduction, extras):
    scores, ranks, offsets, margin, weights = make_batch(23)
    if extras == "none":
        margin, weights = None, None
    elif extras == "float_margin":
        margin, weights = 0.5, None
    # ground truth: the reference in float64 on the same (rounded) scores
    scores = scores.to(dtype).to(torch.float64)
    ref, ref_grad = run(scores, ranks, offsets, margin, weights, "torch", torch.float64,
                        grad_out=1.7, pairs=pairs, reduction=reduction)
    out, grad = run(scores, ranks, offsets, margin, weights, impl, dtype,
                    grad_out=1.7, pairs=pairs, reduction=reduction)
    tol = tolerance(dtype)
    assert grad.dtype == dtype
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol)
    assert out.pair_count.item() == ref.pair_count.item()
    torch.testing.assert_close(out.accuracy.double(), ref.accuracy, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.mean_gap.double(), ref.mean_gap, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
@pytest.mark.parametrize("reduction", ["pairs", "groups"])
def test_per_pair_margins_from_levels_match_float64_ground_truth(impl, dtype, pairs, reduction):
    scores, ranks, offsets, margin, weights = make_batch(23)
    levels = torch.randn(scores.shape, dtype=torch.float64, device=DEVICE)
    scores = scores.to(dtype).to(torch.float64)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    ref, ref_grad = run(scores, ranks, offsets, margin, weights, "torch", torch.float64, grad_out=1.3,
                        margin_levels=levels, pairs=pairs, reduction=reduction)
    out, grad = run(scores, ranks, offsets, margin, weights, impl, dtype, grad_out=1.3,
                    margin_levels=levels.to(cdt), pairs=pairs, reduction=reduction)
    tol = tolerance(dtype)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol)
    # metrics judge the scores alone, margins aside
    plain = ranked_preference_loss_reference(scores, ranks, offsets, pairs=pairs)
    assert out.accuracy.item() == pytest.approx(plain.accuracy.item(), abs=1e-6)
    torch.testing.assert_close(out.mean_gap.double(), plain.mean_gap.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_per_pair_margin(impl):
    """scores [3, 2, 0], ranks [0, 1, 2], levels u = [2, 1, 0] (ratings): pair margins
    u_b - u_w are 1 for (0,1) and (1,2) and 2 for (0,2):
    (softplus(2 - 3 + 1) + softplus(0 - 2 + 1) + softplus(0 - 3 + 2)) / 3
    = (0.693147 + 0.313262 + 0.313262) / 3 = 0.439890."""
    scores = torch.tensor([3.0, 2.0, 0.0], device=DEVICE)
    ranks = torch.tensor([0, 1, 2], device=DEVICE)
    offsets = torch.tensor([0, 3], device=DEVICE)
    levels = torch.tensor([2.0, 1.0, 0.0], device=DEVICE)
    out, _ = run(scores, ranks, offsets, None, None, impl, torch.float32, margin_levels=levels)
    assert out.loss.item() == pytest.approx((sp(0) + 2 * sp(-1)) / 3, rel=1e-6)
    assert out.accuracy.item() == 1.0 and out.mean_gap.item() == pytest.approx(2.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_two_groups(impl):
    """Group A: scores [2, 0], ranks [0, 1] -> one pair, softplus(0 - 2) = 0.126928.
    Group B: scores [1, 0, 0], ranks [0, 1, 1] (a tie) -> pairs (0,1), (0,2), each
    softplus(0 - 1) = 0.313262; the tied (1,2) forms no pair.
    pairs mean  = (0.126928 + 2 * 0.313262) / 3 = 0.251151
    groups mean = (0.126928 + 0.313262) / 2     = 0.220095
    accuracy = 3/3; mean gap = (2 + 1 + 1) / 3 = 1.333333.
    d loss/d r_A0 (pairs) = -sigmoid(-2)/3 = -0.039734; d/d r_A1 = +0.039734.
    """
    scores = torch.tensor([2.0, 0.0, 1.0, 0.0, 0.0], device=DEVICE)
    ranks = torch.tensor([0, 1, 0, 1, 1], device=DEVICE)
    offsets = torch.tensor([0, 2, 5], device=DEVICE)
    out, grad = run(scores, ranks, offsets, None, None, impl, torch.float32)
    a, b = sp(-2.0), sp(-1.0)
    assert out.loss.item() == pytest.approx((a + 2 * b) / 3, rel=1e-6)
    assert out.pair_count.item() == 3
    assert out.accuracy.item() == pytest.approx(1.0)
    assert out.mean_gap.item() == pytest.approx(4 / 3, rel=1e-6)
    s2 = 1 / (1 + math.exp(2.0))
    assert grad[0].item() == pytest.approx(-s2 / 3, rel=1e-5)
    assert grad[1].item() == pytest.approx(s2 / 3, rel=1e-5)
    out, _ = run(scores, ranks, offsets, None, None, impl, torch.float32, reduction="groups")
    assert out.loss.item() == pytest.approx((a + b) / 2, rel=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_adjacent_and_margin(impl):
    """scores [3, 2, 0], ranks [0, 1, 2]:
    adjacent pairs (0,1), (1,2): (softplus(-1) + softplus(-2)) / 2 = (0.313262 + 0.126928)/2 = 0.220095
    all pairs add (0,2): (0.313262 + 0.126928 + 0.048587) / 3 = 0.162926
    margin 1 on all pairs: (softplus(0) + softplus(-1) + softplus(-2)) / 3 = (0.693147 + 0.313262 + 0.126928)/3 = 0.377779
    """
    scores = torch.tensor([3.0, 2.0, 0.0], device=DEVICE)
    ranks = torch.tensor([0, 1, 2], device=DEVICE)
    offsets = torch.tensor([0, 3], device=DEVICE)
    out, _ = run(scores, ranks, offsets, None, None, impl, torch.float32, pairs="adjacent")
    assert out.loss.item() == pytest.approx((sp(-1) + sp(-2)) / 2, rel=1e-6)
    assert out.pair_count.item() == 2
    out, _ = run(scores, ranks, offsets, None, None, impl, torch.float32, pairs="all")
    assert out.loss.item() == pytest.approx((sp(-1) + sp(-2) + sp(-3)) / 3, rel=1e-6)
    margin = torch.tensor([1.0], device=DEVICE)
    out, _ = run(scores, ranks, offsets, margin, None, impl, torch.float32)
    assert out.loss.item() == pytest.approx((sp(0) + sp(-1) + sp(-2)) / 3, rel=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["pairs", "groups"])
def test_all_tied_batch_is_zero_without_nan(impl, reduction):
    scores = torch.randn(7, device=DEVICE)
    ranks = torch.tensor([0, 0, 0, 2, 2, 5, 5], device=DEVICE)
    offsets = torch.tensor([0, 3, 5, 5, 6, 7], device=DEVICE)  # an empty and size-1 groups too
    out, grad = run(scores, ranks, offsets, None, None, impl, torch.float32, reduction=reduction)
    for v in out:
        assert torch.isfinite(v).all() and v.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("impl", IMPLS)
def test_tied_group_contributes_nothing(impl):
    """A fully tied group next to a normal group: same loss as the normal group alone."""
    scores = torch.tensor([0.3, -0.2, 5.0, 5.0, 1.0], device=DEVICE)
    ranks = torch.tensor([0, 1, 1, 1, 1], device=DEVICE)
    both, g_both = run(scores, ranks, torch.tensor([0, 2, 5], device=DEVICE), None, None,
                       impl, torch.float32, reduction="groups")
    alone, g_alone = run(scores[:2], ranks[:2], torch.tensor([0, 2], device=DEVICE), None, None,
                         impl, torch.float32, reduction="groups")
    torch.testing.assert_close(both.loss, alone.loss)
    torch.testing.assert_close(g_both[:2], g_alone)
    assert torch.equal(g_both[2:], torch.zeros(3, device=DEVICE))


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_scores_stay_finite(impl):
    scores, ranks, offsets, margin, weights = make_batch(11)
    scores = torch.where(torch.rand_like(scores) < 0.5, -1e4, 1e4)
    out, grad = run(scores, ranks, offsets, margin, weights, impl, torch.float32)
    ref, ref_grad = run(scores, ranks, offsets, margin, weights, "torch", torch.float64)
    for v in out:
        assert torch.isfinite(v).all()
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    scores, ranks, offsets, margin, weights = make_batch(13)
    S, G = scores.numel(), margin.numel()
    big = torch.randn(2 * S, device=DEVICE)
    big[::2] = scores.float()
    ranks_nc = torch.stack([ranks, ranks], 1)[:, 0]
    margin_nc = torch.stack([margin, margin], 1)[:, 1].float()
    x = big.detach().requires_grad_()
    out = ranked_preference_loss(x[::2], ranks_nc, offsets, margin_nc, weights.float()[:G],
                                 impl=impl)
    out.loss.backward()
    ref, ref_grad = run(scores, ranks, offsets, margin, weights, "torch", torch.float64)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(x.grad[::2].double(), ref_grad, rtol=2e-5, atol=2e-5)
    assert torch.equal(x.grad[1::2], torch.zeros(S, device=DEVICE))


@pytest.mark.parametrize("impl", IMPLS)
def test_large_groups_span_several_tiles(impl):
    """K up to 40 crosses several BLOCK_K tiles in the kernel."""
    scores, ranks, offsets, margin, weights = make_batch(5, kmin=17, kmax=40, n_levels=30)
    for pairs in ("all", "adjacent"):
        ref, ref_grad = run(scores, ranks, offsets, margin, weights, "torch", torch.float64,
                            pairs=pairs)
        out, grad = run(scores, ranks, offsets, margin, weights, impl, torch.float32, pairs=pairs)
        torch.testing.assert_close(out.loss.double(), ref.loss, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-5, atol=2e-5)


def _check_against_float64(batch, impl, ranks_dtype=torch.long, **kw):
    scores, ranks, offsets, margin, weights = batch
    ref, ref_grad = run(scores, ranks, offsets, margin, weights, "torch", torch.float64,
                        grad_out=0.7, **kw)
    out, grad = run(scores, ranks.to(ranks_dtype), offsets, margin, weights, impl,
                    torch.float32, grad_out=0.7, **kw)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-5, atol=2e-5)
    assert out.pair_count.item() == ref.pair_count.item()
    torch.testing.assert_close(out.accuracy.double(), ref.accuracy, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.mean_gap.double(), ref.mean_gap, rtol=2e-5, atol=2e-5)
    return out, grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
@pytest.mark.parametrize("reduction", ["pairs", "groups"])
@pytest.mark.parametrize("sizes", [(1, 2), (2, 2), (2, 4), (8, 8), (2, 64)])
def test_group_size_mixes(impl, pairs, reduction, sizes):
    """The kernel picks its tile from the mean group size (2x2 for pairs-only batches up
    to 16x16); every mix, with size-1 and size-64 groups, must give the same answer."""
    kmin, kmax = sizes
    n_groups = 6 if kmax > 16 else 37
    batch = make_batch(n_groups, kmin=kmin, kmax=kmax, n_levels=max(kmax // 2, 2))
    _check_against_float64(batch, impl, pairs=pairs, reduction=reduction)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
def test_one_large_group_among_pairs(impl, pairs):
    """30 groups of 2 and one of 40: the tile fits the pairs (mean size 3 -> 4x4), so the
    large group walks 10 x 10 tiles."""
    g = torch.Generator().manual_seed(3)
    sizes = torch.tensor([2] * 15 + [40] + [2] * 15)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    S = int(offsets[-1])
    batch = [torch.randn(S, dtype=torch.float64, generator=g),
             torch.randint(0, 12, (S,), generator=g), offsets,
             torch.rand(31, dtype=torch.float64, generator=g),
             torch.rand(31, dtype=torch.float64, generator=g) + 0.5]
    batch = [t.to(DEVICE) for t in batch]
    for reduction in ("pairs", "groups"):
        _check_against_float64(batch, impl, pairs=pairs, reduction=reduction)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ranks_dtype", [torch.int32, torch.int16])
def test_narrow_rank_dtypes(impl, ranks_dtype):
    """Ranks are compared in their own dtype on the Triton path."""
    batch = make_batch(29, n_levels=5)
    for pairs in ("all", "adjacent"):
        _check_against_float64(batch, impl, ranks_dtype, pairs=pairs)


@pytest.mark.skipif(not HAS_TRITON, reason="triton imported before TRITON_INTERPRET=1")
@pytest.mark.parametrize("reduction", ["pairs", "groups"])
def test_programs_walk_several_group_blocks(monkeypatch, reduction):
    """With the grid capped at 3 programs of one group each, every program walks many
    group blocks and the last one in reduces 3 partials; same answer, bitwise repeatable."""
    import rankpm.kernels.ranked_loss as rl

    monkeypatch.setattr(rl, "MAX_PROGRAMS", 3)
    monkeypatch.setattr(rl, "TILE_PAIRS", 64)
    batch = make_batch(23)
    out, grad = _check_against_float64(batch, "triton", reduction=reduction)
    again, grad_again = run(*batch, "triton", torch.float32, grad_out=0.7, reduction=reduction)
    for u, v in zip(out, again):
        assert torch.equal(u, v)
    assert torch.equal(grad, grad_again)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_forward_and_repeat_calls(impl):
    """Forward without autograd; the arrival counter resets so repeated calls agree."""
    scores, ranks, offsets, margin, weights = make_batch(40)
    with torch.no_grad():
        a = ranked_preference_loss(scores.float(), ranks, offsets, impl=impl)
        b = ranked_preference_loss(scores.float(), ranks, offsets, impl=impl)
    assert isinstance(a, RankedLossOutput)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert a.loss.dim() == 0 and a.pair_count.dim() == 0


def test_bad_arguments_name_the_value():
    s, r, o = torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.tensor([0, 3])
    with pytest.raises(ValueError, match="pairs='some'"):
        ranked_preference_loss(s, r, o, pairs="some")
    with pytest.raises(ValueError, match="reduction"):
        ranked_preference_loss(s, r, o, reduction="mean")
    with pytest.raises(ValueError, match="impl"):
        ranked_preference_loss(s, r, o, impl="cuda")
    with pytest.raises(ValueError, match="margin"):
        ranked_preference_loss(s, r, o, margin=torch.zeros(2))
    with pytest.raises(ValueError, match="ranks"):
        ranked_preference_loss(s, r.float(), o)
    with pytest.raises(ValueError, match=r"margin_levels must be .* shaped like scores \(3,\)"):
        ranked_preference_loss(s, r, o, margin_levels=torch.zeros(2))


def test_auto_runs_triton_on_cuda_and_the_reference_elsewhere():
    assert resolve_impl("auto", torch.zeros(2)) == "torch"
    if torch.cuda.is_available():
        assert resolve_impl("auto", torch.zeros(2, device="cuda")) == "triton"
    assert resolve_impl("torch", torch.zeros(2)) == "torch" and resolve_impl("triton", torch.zeros(2)) == "triton"
