"""Fused ranked-preference loss over K-way comparison groups.

Layout of a batch (flat, one row per response)::

    scores        (S,)   float   model scores r, S = sum of the group sizes
    ranks         (S,)   int     lower is better; equal ranks are ties (no pair)
    group_offsets (G+1,) int64   group g is scores[off[g]:off[g+1]]; any size >= 0
    margin        None | float | (G,) float    margin m_g of every pair of group g
    weights       None | (G,) float            weight w_g of group g

Pairs of group g (b = better, w = worse, rank_b < rank_w):
    pairs="all":      every ordered pair with rank_b < rank_w            (K(K-1)/2 without ties)
    pairs="adjacent": rank_w is the next distinct rank level after rank_b  (K-1 without ties)

Loss (n_g = number of pairs of group g, l_bw = softplus(r_w - r_b + m_g)):
    reduction="pairs":  L = sum_g w_g sum_(b,w) l_bw / sum_g w_g n_g          (mean over all pairs)
    reduction="groups": L = sum_{g: n_g>0} w_g mean_(b,w) l_bw / sum_{g: n_g>0} w_g
A batch without pairs (or with zero total weight) has L = 0 and a zero gradient.

Gradient (sigma = logistic sigmoid, c_g = w_g / D with D the denominator above,
and for "groups" additionally divided by n_g):
    dL/dr_b = -c_g sigma(r_w - r_b + m_g)   and   dL/dr_w = +c_g sigma(r_w - r_b + m_g)
summed over every pair the response belongs to.

By-products (unweighted, over all pairs of the batch, no host sync):
    pair_count  number of pairs
    accuracy    fraction of pairs with r_b > r_w
    mean_gap    mean of r_b - r_w

Triton path: one launch for the forward (which also writes the unnormalised gradient
when autograd needs it) and one launch for the backward (a scale by grad_output). Each
program owns GROUPS_PER_PROG whole groups and walks the K x K pairs of each in
BLOCK_K x BLOCK_K register tiles, so no [G, K, K] tensor is ever in memory; the last
program to finish (an atomic ticket) reduces the per-program partial sums in a fixed
order (deterministic) and writes loss and metrics. All arithmetic is fp32 whatever the
score dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

try:  # CPU-only installs import this module without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = [
    "RankedLossOutput",
    "RankedLossParams",
    "ranked_preference_loss",
    "ranked_preference_loss_reference",
]

PAIR_MODES = ("all", "adjacent")
REDUCTIONS = ("pairs", "groups")
IMPLS = ("auto", "triton", "torch")


class RankedLossOutput(NamedTuple):
    """0-dim tensors; only ``loss`` is differentiable. pair_count is a float tensor."""

    loss: torch.Tensor
    pair_count: torch.Tensor
    accuracy: torch.Tensor
    mean_gap: torch.Tensor


@dataclass(frozen=True)
class RankedLossParams:
    """Non-tensor options, so the autograd.Function returns one None for all of them."""

    pairs: str = "all"
    reduction: str = "pairs"
    margin_value: float = 0.0  # used when margin is a Python number

    def __post_init__(self):
        if self.pairs not in PAIR_MODES:
            raise ValueError(f"pairs={self.pairs!r}: expected one of {PAIR_MODES}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction={self.reduction!r}: expected one of {REDUCTIONS}")


# --------------------------------------------------------------------------- reference


def ranked_preference_loss_reference(
    scores: torch.Tensor,
    ranks: torch.Tensor,
    group_offsets: torch.Tensor,
    margin: Union[None, float, torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    *,
    pairs: str = "all",
    reduction: str = "pairs",
    impl: str = "torch",
) -> RankedLossOutput:
    """Plain-PyTorch ranked loss, same signature; the oracle and the CPU path.

    Pads the batch to [G, Kmax] and forms the [G, Kmax, Kmax] pair mask: fine for an
    oracle and for CPU batches, which is why the Triton kernel exists. Computes in fp32
    (float64 stays float64). Reads Kmax on the host (one sync).
    """
    params = RankedLossParams(pairs, reduction, float(margin) if _is_number(margin) else 0.0)
    _check_inputs(scores, ranks, group_offsets, margin, weights)
    cdt = torch.float64 if scores.dtype == torch.float64 else torch.float32
    dev = scores.device
    offsets = group_offsets.to(device=dev, dtype=torch.long)
    G = offsets.numel() - 1
    sizes = offsets[1:] - offsets[:-1]  # (G,)
    kmax = int(sizes.max()) if G > 0 else 0
    kmax = max(kmax, 1)
    col = torch.arange(kmax, device=dev)
    valid = col[None, :] < sizes[:, None]  # (G, K)
    idx = (offsets[:-1, None] + col[None, :]).clamp(max=max(scores.numel() - 1, 0))
    if scores.numel() == 0:
        r = scores.new_zeros(G, kmax, dtype=cdt)
        q = torch.zeros(G, kmax, dtype=torch.long, device=dev)
    else:
        r = torch.where(valid, scores.to(cdt)[idx], 0.0)  # (G, K)
        q = torch.where(valid, ranks.to(torch.long)[idx], 0)
    qi, qj = q[:, :, None], q[:, None, :]
    both = valid[:, :, None] & valid[:, None, :]
    if params.pairs == "all":
        mask = both & (qi < qj)  # (G, K, K): i better than j
    else:
        big = torch.iinfo(torch.long).max
        above = both & (qj > qi)
        nxt = torch.where(above, qj, big).amin(dim=2, keepdim=True)  # next rank level
        mask = both & (qj == nxt)
    if margin is None:
        m = torch.zeros(G, 1, 1, dtype=cdt, device=dev)
    elif _is_number(margin):
        m = torch.full((G, 1, 1), float(margin), dtype=cdt, device=dev)
    else:
        m = margin.to(cdt).reshape(G, 1, 1)
    w = torch.ones(G, dtype=cdt, device=dev) if weights is None else weights.to(cdt)
    z = r[:, None, :] - r[:, :, None] + m  # (G, K, K): r_j - r_i + m
    maskf = mask.to(cdt)
    n = maskf.sum(dim=(1, 2))  # (G,)
    loss_g = (F.softplus(z) * maskf).sum(dim=(1, 2))
    if params.reduction == "pairs":
        num, den = (w * loss_g).sum(), (w * n).sum()
    else:
        has = n > 0
        num = torch.where(has, w * loss_g / n.clamp_min(1), 0.0).sum()
        den = torch.where(has, w, 0.0).sum()
    loss = num / torch.where(den != 0, den, torch.ones_like(den))
    with torch.no_grad():
        count = n.sum()
        gap = ((r[:, :, None] - r[:, None, :]) * maskf).sum()
        correct = ((r[:, :, None] > r[:, None, :]) & mask).to(cdt).sum()
        safe = count.clamp_min(1)
        acc = correct / safe
        mgap = gap / safe
    f32 = torch.float32 if cdt == torch.float32 else cdt
    return RankedLossOutput(loss.to(f32), count.to(f32), acc.to(f32), mgap.to(f32))


# --------------------------------------------------------------------------- kernel

if triton is not None:

    @triton.jit
    def _ranked_loss_fwd_kernel(
        scores_ptr, ranks_ptr, offsets_ptr, margin_ptr, weight_ptr,
        graw_ptr,      # (S,) fp32 out: sum over the element's pairs of -+sigmoid (unscaled)
        factor_ptr,    # (G,) fp32 out: per-group gradient factor (w_g, or w_g/n_g)
        partial_ptr,   # (num_programs, 8) fp32 scratch
        ticket_ptr,    # (1,) int32, zero on entry, reset to zero by the last program
        loss_ptr,      # () fp32 out
        stats_ptr,     # (4,) fp32 out: pair_count, accuracy, mean_gap, 1/denominator
        G, margin_value, num_programs,
        HAS_MARGIN: tl.constexpr, HAS_WEIGHT: tl.constexpr, ADJACENT: tl.constexpr,
        GROUP_MEAN: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
        GROUPS_PER_PROG: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        pid = tl.program_id(0)
        g = pid * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)  # (GB,)
        gmask = g < G
        start = tl.load(offsets_ptr + g, mask=gmask, other=0)
        size = (tl.load(offsets_ptr + g + 1, mask=gmask, other=0) - start).to(tl.int32)
        kmax = tl.max(size, axis=0)
        if HAS_MARGIN:
            m = tl.load(margin_ptr + g, mask=gmask, other=0.0).to(tl.float32)
        else:
            m = tl.zeros([GROUPS_PER_PROG], dtype=tl.float32) + margin_value
        m3 = m[:, None, None]
        kk = tl.arange(0, BLOCK_K)

        loss_g = tl.zeros([GROUPS_PER_PROG], dtype=tl.float32)
        npair_g = tl.zeros([GROUPS_PER_PROG], dtype=tl.float32)
        correct_g = tl.zeros([GROUPS_PER_PROG], dtype=tl.float32)
        gap_g = tl.zeros([GROUPS_PER_PROG], dtype=tl.float32)
        for i0 in range(0, kmax, BLOCK_K):
            ki = i0 + kk
            imask = gmask[:, None] & (ki[None, :] < size[:, None])  # (GB, BK)
            iptr = start[:, None] + ki[None, :]
            ri = tl.load(scores_ptr + iptr, mask=imask, other=0.0).to(tl.float32)
            qi = tl.load(ranks_ptr + iptr, mask=imask, other=0).to(tl.int64)
            qi3 = qi[:, :, None]
            if ADJACENT:  # next and previous distinct rank level of each i
                nxt = tl.full([GROUPS_PER_PROG, BLOCK_K], 2**62, tl.int64)
                prv = tl.full([GROUPS_PER_PROG, BLOCK_K], -(2**62), tl.int64)
                for j0 in range(0, kmax, BLOCK_K):
                    kj = j0 + kk
                    jmask = gmask[:, None] & (kj[None, :] < size[:, None])
                    qj = tl.load(ranks_ptr + start[:, None] + kj[None, :], mask=jmask, other=0).to(tl.int64)
                    qj3 = qj[:, None, :]
                    jm3 = jmask[:, None, :]
                    nxt = tl.minimum(nxt, tl.min(tl.where(jm3 & (qj3 > qi3), qj3, 2**62), axis=2))
                    prv = tl.maximum(prv, tl.max(tl.where(jm3 & (qj3 < qi3), qj3, -(2**62)), axis=2))
            gi = tl.zeros([GROUPS_PER_PROG, BLOCK_K], dtype=tl.float32)
            for j0 in range(0, kmax, BLOCK_K):
                kj = j0 + kk
                jmask = gmask[:, None] & (kj[None, :] < size[:, None])
                jptr = start[:, None] + kj[None, :]
                rj = tl.load(scores_ptr + jptr, mask=jmask, other=0.0).to(tl.float32)
                qj = tl.load(ranks_ptr + jptr, mask=jmask, other=0).to(tl.int64)
                qj3 = qj[:, None, :]
                both = imask[:, :, None] & jmask[:, None, :]  # (GB, BK, BK)
                if ADJACENT:
                    better = both & (qj3 == nxt[:, :, None])  # i better, j next level
                    worse = both & (qj3 == prv[:, :, None])   # j previous level, i worse
                else:
                    better = both & (qi3 < qj3)
                    worse = both & (qi3 > qj3)
                d = rj[:, None, :] - ri[:, :, None]  # r_j - r_i
                # pair (i better, j worse): z = r_j - r_i + m
                zb = d + m3
                eb = tl.exp(-tl.abs(zb))
                sp = tl.maximum(zb, 0.0) + tl.log(1.0 + eb)
                sigb = tl.where(zb >= 0, 1.0 / (1.0 + eb), eb / (1.0 + eb))
                loss_g += tl.sum(tl.sum(tl.where(better, sp, 0.0), axis=2), axis=1)
                npair_g += tl.sum(tl.sum(better.to(tl.float32), axis=2), axis=1)
                correct_g += tl.sum(tl.sum((better & (d < 0)).to(tl.float32), axis=2), axis=1)
                gap_g += tl.sum(tl.sum(tl.where(better, -d, 0.0), axis=2), axis=1)
                if COMPUTE_GRAD:
                    # pair (j better, i worse): z = r_i - r_j + m
                    zw = m3 - d
                    ew = tl.exp(-tl.abs(zw))
                    sigw = tl.where(zw >= 0, 1.0 / (1.0 + ew), ew / (1.0 + ew))
                    gi += tl.sum(tl.where(worse, sigw, 0.0) - tl.where(better, sigb, 0.0), axis=2)
            if COMPUTE_GRAD:
                tl.store(graw_ptr + iptr, gi, mask=imask)

        if HAS_WEIGHT:
            w = tl.load(weight_ptr + g, mask=gmask, other=0.0).to(tl.float32)
        else:
            w = tl.where(gmask, 1.0, 0.0)
        if GROUP_MEAN:
            has = npair_g > 0
            factor = tl.where(has, w / tl.maximum(npair_g, 1.0), 0.0)
            den = tl.sum(tl.where(has, w, 0.0), axis=0)
        else:
            factor = w
            den = tl.sum(w * npair_g, axis=0)
        if COMPUTE_GRAD:
            tl.store(factor_ptr + g, factor, mask=gmask)
        num = tl.sum(factor * loss_g, axis=0)
        cols = tl.arange(0, 8)
        part = tl.where(cols == 0, num, 0.0)
        part = tl.where(cols == 1, den, part)
        part = tl.where(cols == 2, tl.sum(npair_g, axis=0), part)
        part = tl.where(cols == 3, tl.sum(correct_g, axis=0), part)
        part = tl.where(cols == 4, tl.sum(gap_g, axis=0), part)
        tl.store(partial_ptr + pid * 8 + cols, part)

        # Last program in reduces the partials in a fixed order (deterministic).
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == num_programs - 1:
            acc = tl.zeros([BLOCK_P, 8], dtype=tl.float32)
            rows = tl.arange(0, BLOCK_P)
            for p0 in range(0, num_programs, BLOCK_P):
                pm = (p0 + rows) < num_programs
                acc += tl.load(partial_ptr + (p0 + rows)[:, None] * 8 + cols[None, :],
                               mask=pm[:, None], other=0.0, volatile=True)
            tot = tl.sum(acc, axis=0)  # (8,)
            t_num = tl.sum(tl.where(cols == 0, tot, 0.0), axis=0)
            t_den = tl.sum(tl.where(cols == 1, tot, 0.0), axis=0)
            t_cnt = tl.sum(tl.where(cols == 2, tot, 0.0), axis=0)
            t_cor = tl.sum(tl.where(cols == 3, tot, 0.0), axis=0)
            t_gap = tl.sum(tl.where(cols == 4, tot, 0.0), axis=0)
            inv_den = tl.where(t_den != 0, 1.0 / tl.where(t_den != 0, t_den, 1.0), 0.0)
            inv_cnt = 1.0 / tl.maximum(t_cnt, 1.0)
            tl.store(loss_ptr, t_num * inv_den)
            st = tl.where(cols == 0, t_cnt, 0.0)
            st = tl.where(cols == 1, t_cor * inv_cnt, st)
            st = tl.where(cols == 2, t_gap * inv_cnt, st)
            st = tl.where(cols == 3, inv_den, st)
            tl.store(stats_ptr + cols, st, mask=cols < 4)
            tl.atomic_xchg(ticket_ptr, 0)  # ready for the next call

    @triton.jit
    def _ranked_loss_bwd_kernel(
        graw_ptr, factor_ptr, offsets_ptr, stats_ptr, grad_out_ptr, grad_ptr, G,
        GROUPS_PER_PROG: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """grad[e] = graw[e] * factor[g(e)] * (1/denominator) * grad_output."""
        pid = tl.program_id(0)
        g = pid * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
        gmask = g < G
        start = tl.load(offsets_ptr + g, mask=gmask, other=0)
        size = (tl.load(offsets_ptr + g + 1, mask=gmask, other=0) - start).to(tl.int32)
        kmax = tl.max(size, axis=0)
        scale = tl.load(stats_ptr + 3) * tl.load(grad_out_ptr).to(tl.float32)
        f = tl.load(factor_ptr + g, mask=gmask, other=0.0) * scale
        kk = tl.arange(0, BLOCK_K)
        for i0 in range(0, kmax, BLOCK_K):
            ki = i0 + kk
            imask = gmask[:, None] & (ki[None, :] < size[:, None])
            ptr = start[:, None] + ki[None, :]
            gr = tl.load(graw_ptr + ptr, mask=imask, other=0.0)
            tl.store(grad_ptr + ptr, (gr * f[:, None]).to(grad_ptr.dtype.element_ty), mask=imask)


# --------------------------------------------------------------------------- launcher

GROUPS_PER_PROG = 16
BLOCK_K = 8
BLOCK_P = 1024
NUM_WARPS = 4
_TICKETS: dict = {}


def _ticket(device: torch.device) -> torch.Tensor:
    # A self-resetting arrival counter per device: saves a memset launch per call.
    # Calls running concurrently on two streams of one device must not overlap.
    key = (device.type, device.index)
    t = _TICKETS.get(key)
    if t is None:
        t = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return t


def _launch_forward(scores, ranks, offsets, margin, weights, params, compute_grad):
    S, G = scores.numel(), offsets.numel() - 1
    dev = scores.device
    num_programs = max(triton.cdiv(G, GROUPS_PER_PROG), 1)
    graw = torch.empty(S if compute_grad else 1, dtype=torch.float32, device=dev)
    factor = torch.empty(max(G, 1) if compute_grad else 1, dtype=torch.float32, device=dev)
    partial = torch.empty(num_programs, 8, dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    stats = torch.empty(4, dtype=torch.float32, device=dev)
    has_margin = isinstance(margin, torch.Tensor)
    _ranked_loss_fwd_kernel[(num_programs,)](
        scores, ranks, offsets,
        margin if has_margin else scores, weights if weights is not None else scores,
        graw, factor, partial, _ticket(dev), loss, stats,
        G, params.margin_value, num_programs,
        HAS_MARGIN=has_margin, HAS_WEIGHT=weights is not None,
        ADJACENT=params.pairs == "adjacent", GROUP_MEAN=params.reduction == "groups",
        COMPUTE_GRAD=compute_grad,
        GROUPS_PER_PROG=GROUPS_PER_PROG, BLOCK_K=BLOCK_K, BLOCK_P=BLOCK_P, num_warps=NUM_WARPS,
    )
    return loss, stats, graw, factor


def _launch_backward(graw, factor, offsets, stats, grad_output, dtype):
    G = offsets.numel() - 1
    grad = torch.empty(graw.numel(), dtype=dtype, device=graw.device)
    num_programs = max(triton.cdiv(G, GROUPS_PER_PROG), 1)
    _ranked_loss_bwd_kernel[(num_programs,)](
        graw, factor, offsets, stats, grad_output, grad, G,
        GROUPS_PER_PROG=GROUPS_PER_PROG, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
    )
    return grad


class _RankedLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, ranks, offsets, margin, weights, params):
        compute_grad = ctx.needs_input_grad[0]
        loss, stats, graw, factor = _launch_forward(
            scores, ranks, offsets, margin, weights, params, compute_grad)
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(graw, factor, offsets, stats)
        ctx.score_dtype = scores.dtype
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        graw, factor, offsets, stats = ctx.saved_tensors
        grad = _launch_backward(graw, factor, offsets, stats, grad_loss, ctx.score_dtype)
        return grad, None, None, None, None, None


# --------------------------------------------------------------------------- API


def ranked_preference_loss(
    scores: torch.Tensor,
    ranks: torch.Tensor,
    group_offsets: torch.Tensor,
    margin: Union[None, float, torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    *,
    pairs: str = "all",
    reduction: str = "pairs",
    impl: str = "auto",
) -> RankedLossOutput:
    """Ranked preference loss of a batch of comparison groups (see the module docstring).

    Args:
        scores: (S,) float32/bfloat16/float16/float64 scores, flat over groups.
        ranks: (S,) integer ranks, lower is better, ties allowed.
        group_offsets: (G+1,) int64, non-decreasing, off[0] = 0, off[G] = S.
        margin: None, a float, or (G,) per-group margin added inside the softplus.
        weights: None or (G,) per-group weights.
        pairs: "all" ordered pairs, or "adjacent" rank levels.
        reduction: "pairs" (mean over all pairs) or "groups" (mean of per-group means).
        impl: "triton", "torch" (reference) or "auto" (Triton on CUDA, torch elsewhere).

    Returns:
        RankedLossOutput(loss, pair_count, accuracy, mean_gap), 0-dim tensors on the
        scores' device; only loss carries a gradient (to scores). fp32 (fp64 for fp64
        scores on the torch path). No host synchronisation on the Triton path.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        impl = "triton" if (scores.is_cuda and triton is not None) else "torch"
    if impl == "torch":
        return ranked_preference_loss_reference(
            scores, ranks, group_offsets, margin, weights, pairs=pairs, reduction=reduction)
    if triton is None:
        raise RuntimeError("impl='triton' needs the triton package")
    params = RankedLossParams(pairs, reduction, float(margin) if _is_number(margin) else 0.0)
    _check_inputs(scores, ranks, group_offsets, margin, weights)
    tensor_margin = margin if isinstance(margin, torch.Tensor) else None
    loss, stats = _RankedLossFunction.apply(
        scores.contiguous(), ranks.contiguous(), group_offsets.contiguous(),
        None if tensor_margin is None else tensor_margin.contiguous(),
        None if weights is None else weights.contiguous(), params)
    return RankedLossOutput(loss, stats[0], stats[1], stats[2])


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_inputs(scores, ranks, offsets, margin, weights):
    # Shape and dtype checks only: value checks would need a host sync.
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (S,), got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    if ranks.shape != scores.shape:
        raise ValueError(f"ranks shape {tuple(ranks.shape)} != scores shape {tuple(scores.shape)}")
    if ranks.is_floating_point() or ranks.is_complex():
        raise ValueError(f"ranks must be an integer tensor, got {ranks.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"group_offsets must be 1-D (G+1,), got shape {tuple(offsets.shape)}")
    if offsets.is_floating_point():
        raise ValueError(f"group_offsets must be an integer tensor, got {offsets.dtype}")
    G = offsets.numel() - 1
    if isinstance(margin, torch.Tensor) and margin.shape != (G,):
        raise ValueError(f"margin must be None, a float or shape ({G},), got {tuple(margin.shape)}")
    if margin is not None and not isinstance(margin, torch.Tensor) and not _is_number(margin):
        raise ValueError(f"margin must be None, a float or a tensor, got {type(margin).__name__}")
    if weights is not None and weights.shape != (G,):
        raise ValueError(f"weights must be None or shape ({G},), got {tuple(weights.shape)}")
