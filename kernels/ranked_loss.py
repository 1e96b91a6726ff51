"""Fused ranked-preference loss over K-way comparison groups.

Layout of a batch (flat, one row per response)::

    scores        (S,)   float   model scores r, S = sum of the group sizes
    ranks         (S,)   int     lower is better; equal ranks are ties (no pair)
    group_offsets (G+1,) int64   group g is scores[off[g]:off[g+1]]; any size >= 0
    margin        None | float | (G,) float    margin m_g of every pair of group g
    margin_levels None | (S,) float            per-response levels u: pair (b, w) adds u_b - u_w
    weights       None | (G,) float            weight w_g of group g

Pairs of group g (b = better, w = worse, rank_b < rank_w):
    pairs="all":      every ordered pair with rank_b < rank_w            (K(K-1)/2 without ties)
    pairs="adjacent": rank_w is the next distinct rank level after rank_b  (K-1 without ties)

Per-pair margins are given as level differences, m_bw = m_g + u_b - u_w: the margin
from the gap between two ratings (Llama 2's), and with K = 2 any margin per pair, with no
(G, K, K) margin tensor to build. Margins and levels are constants (no gradient).

Loss (n_g = number of pairs of group g, l_bw = softplus(r_w - r_b + m_bw)):
    reduction="pairs":  L = sum_g w_g sum_(b,w) l_bw / sum_g w_g n_g          (mean over all pairs)
    reduction="groups": L = sum_{g: n_g>0} w_g mean_(b,w) l_bw / sum_{g: n_g>0} w_g
A batch without pairs (or with zero total weight) has L = 0 and a zero gradient.

Gradient (sigma = logistic sigmoid, c_g = w_g / D with D the denominator above,
and for "groups" additionally divided by n_g):
    dL/dr_b = -c_g sigma(r_w - r_b + m_bw)   and   dL/dr_w = +c_g sigma(r_w - r_b + m_bw)
summed over every pair the response belongs to.

By-products (unweighted, over all pairs of the batch, no host sync):
    pair_count  number of pairs
    accuracy    fraction of pairs with r_b > r_w
    mean_gap    mean of r_b - r_w

Triton path: one launch for the forward (which also writes D * dL/dr, with the group
factor folded in, when autograd needs it) and one launch for the backward (a flat scale
by grad_output / D). The forward tiles each group's K x K pairs in BLOCK_K x BLOCK_K
register tiles, GROUPS_PER_PROG groups at a time, BLOCK_K chosen on the host from the
mean group size S/G (no sync; larger groups take several tiles), so no [G, K, K] tensor
is ever in memory; a bounded grid walks the group blocks grid-stride, and the last
program to finish (an atomic ticket) reduces the per-program partial sums in a fixed
order (deterministic) and writes loss and metrics. All arithmetic is fp32 whatever the
score dtype.
"""
from __future__ import annotations

import functools
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
    margin_levels: Optional[torch.Tensor] = None,
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
    _check_inputs(scores, ranks, group_offsets, margin, weights, margin_levels)
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
    if margin_levels is not None and scores.numel() > 0:
        u = torch.where(valid, margin_levels.to(cdt)[idx], 0.0)
        m = m + u[:, :, None] - u[:, None, :]  # (G, K, K): + u_i - u_j where i is better than j
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
#
# The forward visits every ordered (i, j) of a group once. With
#     s_ij = +1 if (i, j) is a pair (i better), -1 if (j, i) is a pair (j better), 0 else
# every pair appears twice, as (b, w) and as (w, b), and both see the same
# z = s_ij (r_j - r_i) + m_g = r_w - r_b + m_g (IEEE subtraction is exactly antisymmetric).
# So one exp and one reciprocal per (i, j) give
#     dL/dr_j * D / c_g = +sum_i s_ij sigma(z_ij)        (a column sum)
#     loss, pair count, correct pairs, gap = half the sums over all (i, j)
# A (GB, BK, BK) tile lives in one 3-D register layout: rows i are loaded as (GB, BK, 1)
# and columns j as (GB, 1, BK), so broadcasts need no shared memory, and in the layout
# Triton gives the column loads each thread holds all rows of its column, so the column
# sums (gradient and the per-column accumulators) never cross lanes.

if triton is not None:

    @triton.jit
    def _load_rows(scores_ptr, ranks_ptr, start, size, gmask, k):
        """Scores (fp32), ranks and validity of elements k of each group; start, size and
        gmask are (GB, 1, 1) and k is (1, BK, 1) or (1, 1, BK), so everything stays in one
        3-D register layout and broadcasts without shared-memory shuffles."""
        mask = gmask & (k < size)
        ptr = start + k
        r = tl.load(scores_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
        q = tl.load(ranks_ptr + ptr, mask=mask, other=0)
        return r, q, mask, ptr

    @triton.jit
    def _load_bounds(offsets_ptr, g, G):
        """First and one-past-last element of groups g, (GB, 1, 1) int64; empty past G."""
        gmask = g < G
        return (tl.load(offsets_ptr + g, mask=gmask, other=0).to(tl.int64),
                tl.load(offsets_ptr + g + 1, mask=gmask, other=0).to(tl.int64))

    @triton.jit
    def _rank_levels_around(qi, ranks_ptr, start, size, gmask, kmax, BLOCK_K: tl.constexpr):
        """Next and previous distinct rank level of each row i over its group: (GB, BK, 1) int64."""
        kj = tl.arange(0, BLOCK_K)[None, None, :]
        qi = qi.to(tl.int64)
        nxt = tl.full(qi.shape, 2**62, tl.int64)
        prv = tl.full(qi.shape, -(2**62), tl.int64)
        for j0 in range(0, kmax, BLOCK_K):
            jmask = gmask & (j0 + kj < size)
            qj = tl.load(ranks_ptr + start + j0 + kj, mask=jmask, other=0).to(tl.int64)
            nxt = tl.minimum(nxt, tl.min(tl.where(jmask & (qj > qi), qj, 2**62), axis=2,
                                         keep_dims=True))
            prv = tl.maximum(prv, tl.max(tl.where(jmask & (qj < qi), qj, -(2**62)), axis=2,
                                         keep_dims=True))
        return nxt, prv

    @triton.jit
    def _pair_sign(qi, qj, imask, jmask, nxt, prv, ADJACENT: tl.constexpr):
        """s_ij of the comment above as fp32, (GB, BK, BK), from row (GB, BK, 1) and column
        (GB, 1, BK) ranks; nxt/prv only read when ADJACENT."""
        if ADJACENT:
            qj = qj.to(tl.int64)
            better = qj == nxt  # j is the next level after i
            worse = qj == prv   # j is the level just before i
        else:  # compare in the ranks' own dtype
            better = qi < qj
            worse = qi > qj
        s = better.to(tl.float32) - worse.to(tl.float32)
        return tl.where(imask & jmask, s, 0.0)

    @triton.jit
    def _softplus_sigmoid(z):
        """softplus(z) and sigma(z), fp32, with one exp and one reciprocal.

        With e = exp(-|z|): softplus = max(z, 0) + log(1 + e), sigma = (z >= 0 ? 1 : e)/(1 + e),
        and log(1 + e) = 2 atanh(t), t = e / (2 + e) in [0, 1/3], summed as its odd series to
        t^13 (truncation < 2e-8 relative; 3e-7 worst case in fp32 against float64 log1p).
        That is a fifth of the instructions of tl.log's general-range polynomial, which
        dominated the kernel, and stays accurate as e -> 0. 1/(1+e) and 1/(2+e) share one
        reciprocal.
        """
        e = tl.exp(-tl.abs(z))
        one_e = 1.0 + e
        two_e = 2.0 + e
        r = 1.0 / (one_e * two_e)
        t = e * (one_e * r)
        t2 = t * t
        p = t2 * (1.0 / 13.0) + (1.0 / 11.0)
        p = p * t2 + (1.0 / 9.0)
        p = p * t2 + (1.0 / 7.0)
        p = p * t2 + (1.0 / 5.0)
        p = p * t2 + (1.0 / 3.0)
        p = p * t2 + 1.0
        softplus = tl.maximum(z, 0.0) + 2.0 * t * p
        sigmoid = tl.where(z >= 0.0, 1.0, e) * (two_e * r)
        return softplus, sigmoid

    @triton.jit(do_not_specialize=["G", "num_programs"])  # no recompiles as G changes
    def _ranked_loss_fwd_kernel(
        scores_ptr, ranks_ptr, offsets_ptr, margin_ptr, levels_ptr, weight_ptr,
        grad_ptr,      # (S,) fp32 out: D * dL/dr, D the loss denominator (divided out in backward)
        partial_ptr,   # (8, num_programs) fp32 scratch: per-program sums
        ticket_ptr,    # (1,) int32, zero on entry, reset to zero by the last program
        loss_ptr,      # () fp32 out
        stats_ptr,     # (4,) fp32 out: pair_count, accuracy, mean_gap, 1/D
        G, margin_value, num_programs,
        HAS_MARGIN: tl.constexpr, HAS_LEVELS: tl.constexpr, HAS_WEIGHT: tl.constexpr, ADJACENT: tl.constexpr,
        GROUP_MEAN: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
        GROUPS_PER_PROG: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        pid = tl.program_id(0)
        gg = tl.arange(0, GROUPS_PER_PROG)[:, None, None]  # (GB, 1, 1)
        ki = tl.arange(0, BLOCK_K)[None, :, None]  # (1, BK, 1): rows i
        kj = tl.arange(0, BLOCK_K)[None, None, :]  # (1, 1, BK): columns j
        # half-sums over the (i, j) this program visits, see the comment above, kept per
        # column (summing over rows i stays within a thread; a full tile would cost registers)
        acc_loss = tl.zeros([GROUPS_PER_PROG, 1, BLOCK_K], dtype=tl.float32)  # c_g|s|softplus
        acc_pairs = tl.zeros([GROUPS_PER_PROG, 1, BLOCK_K], dtype=tl.float32)  # |s|
        acc_correct = tl.zeros([GROUPS_PER_PROG, 1, BLOCK_K], dtype=tl.float32)  # r_b > r_w
        acc_gap = tl.zeros([GROUPS_PER_PROG, 1, BLOCK_K], dtype=tl.float32)  # r_w - r_b
        acc_den = tl.zeros([GROUPS_PER_PROG, 1, BLOCK_K], dtype=tl.float32)  # w_g |s|
        den_g = tl.zeros([GROUPS_PER_PROG, 1, 1], dtype=tl.float32)  # GROUP_MEAN: w_g, n_g > 0

        # grid-stride over blocks of GROUPS_PER_PROG (GB) groups: one wave of programs, so
        # the arrival counter and the last program's reduction stay short
        stride = num_programs * GROUPS_PER_PROG
        start, end = _load_bounds(offsets_ptr, pid * GROUPS_PER_PROG + gg, G)
        for blk in range(pid, tl.cdiv(G, GROUPS_PER_PROG), num_programs):
            g = blk * GROUPS_PER_PROG + gg  # (GB, 1, 1)
            gmask = g < G
            size = (end - start).to(tl.int32)
            kmax = tl.max(size)
            # the next block's offsets, loaded now: their latency hides behind this block
            start_next, end_next = _load_bounds(offsets_ptr, g + stride, G)
            if HAS_MARGIN:
                m = tl.load(margin_ptr + g, mask=gmask, other=0.0).to(tl.float32)
            else:
                m = tl.zeros([GROUPS_PER_PROG, 1, 1], dtype=tl.float32) + margin_value
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + g, mask=gmask, other=0.0).to(tl.float32)
            else:
                w = tl.where(gmask, 1.0, 0.0)
            if GROUP_MEAN:  # c_g = w_g / n_g is needed before the first gradient store
                n_g = tl.zeros([GROUPS_PER_PROG, 1, 1], dtype=tl.float32)
                for i0 in range(0, kmax, BLOCK_K):
                    imask = gmask & (i0 + ki < size)
                    qi = tl.load(ranks_ptr + start + i0 + ki, mask=imask, other=0)
                    if ADJACENT:
                        nxt, prv = _rank_levels_around(qi, ranks_ptr, start, size, gmask, kmax,
                                                       BLOCK_K)
                    else:
                        nxt, prv = qi, qi
                    for j0 in range(0, kmax, BLOCK_K):
                        jmask = gmask & (j0 + kj < size)
                        qj = tl.load(ranks_ptr + start + j0 + kj, mask=jmask, other=0)
                        s = _pair_sign(qi, qj, imask, jmask, nxt, prv, ADJACENT)
                        n_g += tl.sum(tl.sum(tl.where(s > 0.0, 1.0, 0.0), axis=2, keep_dims=True),
                                      axis=1, keep_dims=True)
                has = n_g > 0
                c = tl.where(has, w / tl.maximum(n_g, 1.0), 0.0)
                den_g += tl.where(has, w, 0.0)
            elif HAS_WEIGHT:
                c = w
            else:  # a constant, so the multiplies fold away (padding groups have s = 0)
                c = 1.0

            for i0 in range(0, kmax, BLOCK_K):
                ri, qi, imask, iptr = _load_rows(scores_ptr, ranks_ptr, start, size, gmask, i0 + ki)
                if HAS_LEVELS:  # r_i - u_i: the margin u_b - u_w joins the score difference
                    ri_u = ri - tl.load(levels_ptr + iptr, mask=imask, other=0.0).to(tl.float32)
                if ADJACENT:
                    nxt, prv = _rank_levels_around(qi, ranks_ptr, start, size, gmask, kmax, BLOCK_K)
                else:
                    nxt, prv = qi, qi
                for j0 in range(0, kmax, BLOCK_K):
                    rj, qj, jmask, jptr = _load_rows(scores_ptr, ranks_ptr, start, size, gmask,
                                                     j0 + kj)
                    s = _pair_sign(qi, qj, imask, jmask, nxt, prv, ADJACENT)  # (GB, BK, BK)
                    sd = s * (rj - ri)  # r_w - r_b on pairs, 0 elsewhere
                    if HAS_LEVELS:  # r_w - r_b + u_b - u_w, still symmetric in (i, j)
                        uj = tl.load(levels_ptr + jptr, mask=jmask, other=0.0).to(tl.float32)
                        z = s * ((rj - uj) - ri_u) + m
                    else:
                        z = sd + m
                    softplus, sigmoid = _softplus_sigmoid(z)
                    a = tl.abs(s)
                    acc_loss += tl.sum((c * a) * softplus, axis=1, keep_dims=True)
                    acc_pairs += tl.sum(a, axis=1, keep_dims=True)
                    acc_correct += tl.sum(tl.where(sd < 0.0, 1.0, 0.0), axis=1, keep_dims=True)
                    acc_gap += tl.sum(sd, axis=1, keep_dims=True)
                    if HAS_WEIGHT:
                        if not GROUP_MEAN:
                            acc_den += tl.sum(w * a, axis=1, keep_dims=True)
                    if COMPUTE_GRAD:
                        # column j's gradient, +sum_i s_ij sigma(z_ij) (s antisymmetric, z
                        # symmetric): in the layout the column loads get, the sum over i stays
                        # within a thread, where the row sum over j would cross lanes
                        gj = tl.sum(s * sigmoid, axis=1, keep_dims=True) * c  # (GB, 1, BK)
                        if kmax > BLOCK_K:  # later row tiles add into the same columns
                            tl.debug_barrier()
                            gj += tl.load(grad_ptr + jptr, mask=jmask & (i0 > 0), other=0.0)
                        tl.store(grad_ptr + jptr, gj, mask=jmask)
            start, end = start_next, end_next

        num = 0.5 * tl.sum(acc_loss)
        pairs = 0.5 * tl.sum(acc_pairs)
        if GROUP_MEAN:
            den = tl.sum(den_g)
        elif HAS_WEIGHT:
            den = 0.5 * tl.sum(acc_den)
        else:
            den = pairs
        cols = tl.arange(0, 8)
        part = tl.where(cols == 0, num, 0.0)
        part = tl.where(cols == 1, den, part)
        part = tl.where(cols == 2, pairs, part)
        part = tl.where(cols == 3, 0.5 * tl.sum(acc_correct), part)
        part = tl.where(cols == 4, -0.5 * tl.sum(acc_gap), part)
        tl.store(partial_ptr + cols * num_programs + pid, part)

        # Last program in reduces the partials in a fixed order (deterministic).
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == num_programs - 1:
            acc = tl.zeros([8, BLOCK_P], dtype=tl.float32)
            pp = tl.arange(0, BLOCK_P)
            for p0 in range(0, num_programs, BLOCK_P):
                pm = (p0 + pp) < num_programs
                acc += tl.load(partial_ptr + cols[:, None] * num_programs + (p0 + pp)[None, :],
                               mask=pm[None, :], other=0.0, volatile=True)
            tot = tl.sum(acc, axis=1)  # (8,)
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

    @triton.jit(do_not_specialize=["S"])
    def _ranked_loss_bwd_kernel(graw_ptr, stats_ptr, grad_out_ptr, grad_ptr, S,
                                BLOCK: tl.constexpr):
        """grad[e] = graw[e] * (1/D) * grad_output: flat, no group structure left."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < S
        scale = tl.load(stats_ptr + 3) * tl.load(grad_out_ptr).to(tl.float32)
        gr = tl.load(graw_ptr + offs, mask=mask, other=0.0)
        tl.store(grad_ptr + offs, (gr * scale).to(grad_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launcher

TILE_PAIRS = 1024  # GROUPS_PER_PROG * BLOCK_K**2: ordered (i, j) per register tile
MAX_BLOCK_K = 16
MAX_PROGRAMS = 512  # forward grid cap: about one wave on an H100; a constant, so the
#                    order of the sums, hence the bits of the result, is the same on any GPU
BLOCK_P = 512  # partials per step of the final reduction (its registers count for the kernel)
NUM_WARPS = 4
BWD_BLOCK = 2048
BWD_WARPS = 4
_SCRATCH: dict = {}


def _tiling(S: int, G: int):
    """(GROUPS_PER_PROG, BLOCK_K) from the mean group size, known on the host without a sync.

    BLOCK_K covers a mean-sized group in one tile (K=8 -> 8x8 tiles, pairs only -> 2x2);
    larger groups take several tiles, so any size stays correct.
    """
    mean = -(-S // G) if G > 0 else 1
    bk = min(max(triton.next_power_of_2(mean), 2), MAX_BLOCK_K)
    return max(TILE_PAIRS // (bk * bk), 1), bk


def _scratch(device: torch.device, num_programs: int):
    # A self-resetting arrival counter and the partial-sum buffer, one per device, kept
    # across calls: saves a memset and an allocation per call. Calls running concurrently
    # on two streams of one device must not overlap.
    key = (device.type, device.index)
    s = _SCRATCH.get(key)
    if s is None or s[1].numel() < 8 * num_programs:
        ticket = torch.zeros(1, dtype=torch.int32, device=device) if s is None else s[0]
        partial = torch.empty(8 * max(num_programs, MAX_PROGRAMS), dtype=torch.float32,
                              device=device)
        s = _SCRATCH[key] = (ticket, partial)
    return s


def _launch_forward(scores, ranks, offsets, margin, levels, weights, params, compute_grad):
    S, G = scores.numel(), offsets.numel() - 1
    dev = scores.device
    gpp, bk = _tiling(S, G)
    num_programs = max(min(triton.cdiv(G, gpp), MAX_PROGRAMS), 1)
    ticket, partial = _scratch(dev, num_programs)
    graw = torch.empty(S if compute_grad else 1, dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    stats = torch.empty(4, dtype=torch.float32, device=dev)
    has_margin = margin is not None
    _ranked_loss_fwd_kernel[(num_programs,)](
        scores, ranks, offsets,
        margin if has_margin else scores, levels if levels is not None else scores,
        weights if weights is not None else scores,
        graw, partial, ticket, loss, stats,
        G, params.margin_value, num_programs,
        HAS_MARGIN=has_margin, HAS_LEVELS=levels is not None, HAS_WEIGHT=weights is not None,
        ADJACENT=params.pairs == "adjacent", GROUP_MEAN=params.reduction == "groups",
        COMPUTE_GRAD=compute_grad,
        GROUPS_PER_PROG=gpp, BLOCK_K=bk, BLOCK_P=BLOCK_P, num_warps=NUM_WARPS,
    )
    return loss, stats, graw


def _launch_backward(graw, stats, grad_output, dtype):
    S = graw.numel()
    grad = torch.empty(S, dtype=dtype, device=graw.device)
    _ranked_loss_bwd_kernel[(max(triton.cdiv(S, BWD_BLOCK), 1),)](
        graw, stats, grad_output, grad, S, BLOCK=BWD_BLOCK, num_warps=BWD_WARPS)
    return grad


class _RankedLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, ranks, offsets, margin, levels, weights, params):
        compute_grad = ctx.needs_input_grad[0]
        loss, stats, graw = _launch_forward(
            scores, ranks, offsets, margin, levels, weights, params, compute_grad)
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(graw, stats)
        ctx.score_dtype = scores.dtype
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        graw, stats = ctx.saved_tensors
        grad = _launch_backward(graw, stats, grad_loss, ctx.score_dtype)
        return grad, None, None, None, None, None, None


# --------------------------------------------------------------------------- API


def ranked_preference_loss(
    scores: torch.Tensor,
    ranks: torch.Tensor,
    group_offsets: torch.Tensor,
    margin: Union[None, float, torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    *,
    margin_levels: Optional[torch.Tensor] = None,
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
        margin_levels: None or (S,) per-response levels u; pair (b, w) adds u_b - u_w to
            its margin (per-pair margins; with K = 2, any margin per pair).
        pairs: "all" ordered pairs, or "adjacent" rank levels.
        reduction: "pairs" (mean over all pairs) or "groups" (mean of per-group means).
        impl: "triton", "torch" (reference) or "auto" (Triton on CUDA, torch elsewhere).

    Returns:
        RankedLossOutput(loss, pair_count, accuracy, mean_gap), 0-dim tensors on the
        scores' device; only loss carries a gradient (to scores). fp32 (fp64 for fp64
        scores on the torch path). No host synchronisation on the Triton path.
    """
    impl = resolve_impl(impl, scores)
    if impl == "torch":
        return ranked_preference_loss_reference(
            scores, ranks, group_offsets, margin, weights, margin_levels=margin_levels, pairs=pairs,
            reduction=reduction)
    if triton is None:
        raise RuntimeError("impl='triton' needs the triton package")
    _check_inputs(scores, ranks, group_offsets, margin, weights, margin_levels)
    tensor_margin = margin if isinstance(margin, torch.Tensor) else None
    params = _params(pairs, reduction, 0.0 if margin is None or tensor_margin is not None
                     else float(margin))
    args = (scores.contiguous(), ranks.contiguous(), group_offsets.contiguous(),
            None if tensor_margin is None else tensor_margin.contiguous(),
            None if margin_levels is None else margin_levels.contiguous(),
            None if weights is None else weights.contiguous(), params)
    if scores.requires_grad and torch.is_grad_enabled():
        loss, stats = _RankedLossFunction.apply(*args)
    else:  # evaluation: no autograd node, no gradient pass (host-bound at training sizes)
        loss, stats, _ = _launch_forward(*args, compute_grad=False)
    pair_count, accuracy, mean_gap, _ = stats.unbind()
    return RankedLossOutput(loss, pair_count, accuracy, mean_gap)


def resolve_impl(impl: str, scores: torch.Tensor) -> str:
    """The implementation ``impl`` stands for: "auto" is Triton on CUDA, the reference elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        return "triton" if (scores.is_cuda and triton is not None) else "torch"
    return impl


@functools.lru_cache(maxsize=64)
def _params(pairs: str, reduction: str, margin_value: float) -> RankedLossParams:
    # Eager calls are host-bound at training sizes; build (and validate) each option set once.
    return RankedLossParams(pairs, reduction, margin_value)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_inputs(scores, ranks, offsets, margin, weights, levels=None):
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
    if levels is not None and (levels.shape != scores.shape or not levels.is_floating_point()):
        raise ValueError(f"margin_levels must be None or a float tensor shaped like scores "
                         f"{tuple(scores.shape)}, got {levels.dtype} {tuple(levels.shape)}")
