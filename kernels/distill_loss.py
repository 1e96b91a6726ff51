"""Distillation from a cached teacher: hidden @ weight.T (+ bias) -> KL to the cached top-k
(or sampled) teacher distribution, forward and backward, never the full logits.

Shapes: hidden (N, H), weight (V, H), bias (V,) or None, ids (N, k) int, teacher_logprobs
(N, k), teacher_tail_logmass (N,) or None, counts (N, k) (sampled mode).
Padding: a row whose first id is ignore_index is ignored (loss 0, no gradient, not counted
by "mean"); any other slot whose id is ignore_index is empty, not a category (its teacher
log-prob or count is dropped), so rows with fewer than k entries pad this way.

Student, per row, with logits x = W h + b, s_v = softmax(x)_v and I the row's ids:

    lse   = logsumexp_v x_v            log q_j = x_{id_j} - lse
    lse_R = logsumexp_{v not in I} x_v log q_t = lse_R - lse      (the tail; -inf if I = V)

mode="topk", the KL over k + 1 categories of context distillation (ids unique in a row):

    p_j = exp(teacher_logprobs_j),  p_t = exp(teacher_tail_logmass)  (or 1 - sum_j p_j)
    loss_row = sum_j p_j (log p_j - log q_j) + p_t (log p_t - log q_t),   0 log 0 = 0

  With T = sum_j p_j + p_t (1 for a normalised teacher), d log q_j/dx_v = [v = id_j] - s_v
  and d log q_t/dx_v = [v not in I] s_v / q_t - s_v:

    dL/dx_v = T s_v - p_j                   v = id_j
    dL/dx_v = s_v (T - p_t / q_t)           v not in I

  a per-row multiple of the softmax, C_row = T - p_t/q_t, corrected at the k ids (the
  gradient sums to T - sum_j p_j - p_t = 0). It is computed as
  exp(x_v - lse_R) (T q_t - p_t) outside the ids, which never forms 1/q_t (that overflows
  when the tail is tiny), and T q_j - p_j at the ids.

mode="sampled", sampled distillation (arXiv 2503.16870): ids are tokens drawn from the
teacher and counts how often each was drawn (an id may repeat; the math is linear in it):

    w_j = c_j / sum_j c_j,   loss_row = -sum_j w_j log q_j
    dL/dx_v = (sum_j w_j) s_v - sum_{j: id_j = v} w_j

Reduction: "mean" over non-ignored rows (0 when all are ignored), "sum", or "none" ((N,),
0 for ignored rows). dX_row is scaled by c_row (mean: g / n_valid, sum: g, none: g_row, 0
for ignored rows); dH = dX W, dW = dX^T H, db = sum_rows dX. The teacher inputs get no
gradient.

Why the student tail is a logsumexp of its own terms, not log1p(-sum_j q_j): 1 - sum_j q_j
cancels once the ids hold nearly all the mass (fp32 resolves it only to ~1e-7), and both the
loss (log q_t) and the tail gradient depend on q_t relatively. The ids are taken out of the
streamed sum instead: the torch path sets each block's id columns to -inf (scatter_reduce
"amin" with +inf for slots outside the block, so those are no-ops), the Triton kernel
compares each tile with the row's ids. lse is then logaddexp(lse_R, logsumexp_j x_{id_j}),
exact, with nothing subtracted. An id repeated in a topk row would count twice there:
topk_logprobs never repeats one, the reference checks it, the fused path does not (a sync).

Walks (vocab_blocks.py), as in linear_cross_entropy: token blocks with the gradient made in
the forward pass when the weights are fp32/fp64 and the loss is reduced (6 N H V flops);
otherwise vocabulary blocks, the row statistics in pass one and the gradient recomputed
block by block in backward (8 N H V). The per-block row work, as Triton kernels on CUDA
and torch ops on CPU: statistics (online logsumexp over the tail, or over all columns in
sampled mode, and the logits at the ids) and the gradient block (the scaled exponential
plus the k corrections). The torch token block works in place: its statistics leave
exp(x - m) in the block, and the gradient only rescales it, so the CPU path holds one
block. The token walk's gradient goes to autograd scaled in place by grad_output (no
second V x H buffer beside it; a second backward through the same graph is refused by
autograd's saved-tensor check). No .item() or other host sync in forward or backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from rankpm.kernels.vocab_blocks import (
    OnlineLse,
    TokenGrads,
    VocabGrads,
    acc_dtype,
    block_sizes,
    grad_block,
    online_lse_update_,
    token_blocks,
    vocab_blocks,
)

try:  # CPU-only installs import this module without triton
    import triton
    import triton.language as tl

    from rankpm.kernels.vocab_blocks import online_lse_step
except ImportError:  # pragma: no cover
    triton = None
    tl = None

__all__ = ["DistillLossParams", "distill_loss", "distill_loss_reference"]

MODES = ("topk", "sampled")
REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "triton", "torch")
_BLOCK_V, _BLOCK_K = 512, 16  # Triton tile: columns x ids compared at once


@dataclass(frozen=True)
class DistillLossParams:
    mode: str = "topk"
    ignore_index: int = -100
    reduction: str = "mean"
    chunk_size: Optional[int] = None  # tokens per block (token walk); see block_sizes
    impl: str = "torch"  # row-work implementation: "triton" or "torch"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {MODES}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction={self.reduction!r}: expected one of {REDUCTIONS}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size}: expected None or >= 1")


class _Teacher(NamedTuple):
    """The cache, cleaned: slot ids with -1 for empty slots and ignored rows (-1 matches no
    column), slot weights w (p_j or c_j / sum c), the teacher tail, valid rows."""

    ids: torch.Tensor  # (N, k) int64
    w: torch.Tensor  # (N, k) acc
    logp: Optional[torch.Tensor]  # (N, k) acc, -inf where empty (topk)
    p_tail: torch.Tensor  # (N,) acc, 0 in sampled mode and for ignored rows
    logp_tail: torch.Tensor  # (N,) acc
    valid: torch.Tensor  # (N,) bool


class _RowStats(NamedTuple):
    lse: torch.Tensor  # (N,) logsumexp over all V
    lse_tail: Optional[torch.Tensor]  # (N,) logsumexp outside the ids (topk mode)
    xid: torch.Tensor  # (N, k) logits at the ids, -inf at empty slots


# --------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _distill_stats_kernel(
        logits_ptr, stride_row, bias_ptr, ids_ptr, m_ptr, s_ptr, xid_ptr,
        row_start, col_start, n_cols, K,
        HAS_BIAS: tl.constexpr, MASK_IDS: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Fold one block of a row into its running (m, s) and take the logits at its ids.

        (m, s) run over the columns outside the row's ids when MASK_IDS (topk: the tail),
        over all columns otherwise; xid[j] = x_{id_j} for the ids inside this block.
        """
        r = tl.program_id(0).to(tl.int64)
        row = row_start + r
        base = logits_ptr + r * stride_row
        ids_row = ids_ptr + row * K
        m = tl.load(m_ptr + row).to(tl.float32)
        s = tl.load(s_ptr + row).to(tl.float32)
        cols = tl.arange(0, BLOCK_V)
        kk = tl.arange(0, BLOCK_K)
        for c0 in range(0, n_cols, BLOCK_V):
            c = c0 + cols
            cm = c < n_cols
            x = tl.load(base + c, mask=cm, other=float("-inf")).to(tl.float32)
            if HAS_BIAS:
                x += tl.load(bias_ptr + col_start + c, mask=cm, other=0.0).to(tl.float32)
            if MASK_IDS:
                hit = tl.zeros([BLOCK_V], dtype=tl.int32)
                for k0 in range(0, K, BLOCK_K):
                    idj = tl.load(ids_row + k0 + kk, mask=k0 + kk < K, other=-1) - col_start
                    hit = tl.maximum(hit, tl.max((idj[:, None] == c[None, :]).to(tl.int32), axis=0))
                x = tl.where(hit > 0, float("-inf"), x)
            m, s = online_lse_step(m, s, x)
        tl.store(m_ptr + row, m.to(m_ptr.dtype.element_ty))
        tl.store(s_ptr + row, s.to(s_ptr.dtype.element_ty))
        for k0 in range(0, K, BLOCK_K):
            jm = k0 + kk < K
            idj = tl.load(ids_row + k0 + kk, mask=jm, other=-1) - col_start
            inside = jm & (idj >= 0) & (idj < n_cols)
            xj = tl.load(base + idj, mask=inside, other=0.0).to(tl.float32)
            if HAS_BIAS:
                xj += tl.load(bias_ptr + col_start + idj, mask=inside, other=0.0).to(tl.float32)
            tl.store(xid_ptr + row * K + k0 + kk, xj.to(xid_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _distill_grad_kernel(
        logits_ptr, stride_row, bias_ptr, ids_ptr, u_ptr, ref_ptr, scale_ptr,
        out_ptr, stride_out, row_start, col_start, n_cols, K,
        HAS_BIAS: tl.constexpr, MASK_IDS: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """dX_v = scale exp(x_v - ref) (0 at the ids when MASK_IDS) + sum_{j: id_j = v} u_j
        for one row and BLOCK_V columns; may write in place."""
        r = tl.program_id(0).to(tl.int64)
        row = row_start + r
        c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        cm = c < n_cols
        x = tl.load(logits_ptr + r * stride_row + c, mask=cm, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + col_start + c, mask=cm, other=0.0).to(tl.float32)
        ref = tl.load(ref_ptr + row).to(tl.float32)
        scale = tl.load(scale_ptr + row).to(tl.float32)
        dense = scale * tl.exp(x - ref)
        kk = tl.arange(0, BLOCK_K)
        hit = tl.zeros([BLOCK_V], dtype=tl.int32)
        corr = tl.zeros([BLOCK_V], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            jm = k0 + kk < K
            idj = tl.load(ids_ptr + row * K + k0 + kk, mask=jm, other=-1) - col_start
            uj = tl.load(u_ptr + row * K + k0 + kk, mask=jm, other=0.0).to(tl.float32)
            eq = idj[:, None] == c[None, :]
            corr += tl.sum(tl.where(eq, uj[:, None], 0.0), axis=0)
            if MASK_IDS:
                hit = tl.maximum(hit, tl.max(eq.to(tl.int32), axis=0))
        if MASK_IDS:  # a select, not a product: exp(x - ref) may be inf at an id
            dense = tl.where(hit > 0, 0.0, dense)
        tl.store(out_ptr + r * stride_out + c, (dense + corr).to(out_ptr.dtype.element_ty),
                 mask=cm)


# --------------------------------------------------------------------------- row ops
# Each has a Triton launcher and a torch twin with the same semantics. x is the raw logits
# block (no bias) for rows row_start.. and columns col_start..; the torch twins may modify it.


def _ids_in_block(ids, col_start, n_cols):
    local = ids - col_start
    inside = (local >= 0) & (local < n_cols)
    return local.clamp(0, n_cols - 1), inside


def _stats_update(x, bias, ids, col_start, ws, xid, row_start, params):
    """Running (m, s) and xid for the block. The torch twin leaves exp(x + b - shift) in x,
    shift = the new m (0 while it is -inf), with the id columns at 0 in topk mode."""
    rows, n_cols = x.shape
    mask_ids = params.mode == "topk"
    if params.impl == "triton":
        _distill_stats_kernel[(rows,)](
            x, x.stride(0), bias if bias is not None else x, ids, ws.m, ws.s, xid,
            row_start, col_start, n_cols, ids.shape[1],
            HAS_BIAS=bias is not None, MASK_IDS=mask_ids,
            BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(n_cols)), BLOCK_K=_BLOCK_K, num_warps=8)
        return
    sl = slice(row_start, row_start + rows)
    if bias is not None:
        x += bias[col_start:col_start + n_cols]
    idx, inside = _ids_in_block(ids[sl], col_start, n_cols)
    xid[sl] = torch.where(inside, x.gather(1, idx), xid[sl])
    if mask_ids:
        x.scatter_reduce_(1, idx, torch.where(inside, float("-inf"), float("inf")).to(x.dtype),
                          reduce="amin")
    online_lse_update_(ws.m[sl], ws.s[sl], x, consume=True)


def _grad_block(x, bias, ids, col_start, ref, scale, u, out, row_start, params):
    """out = scale exp(x + b - ref) (0 at the ids in topk mode) + u at the ids."""
    rows, n_cols = x.shape
    mask_ids = params.mode == "topk"
    if params.impl == "triton":
        block = min(_BLOCK_V, triton.next_power_of_2(n_cols))
        _distill_grad_kernel[(rows, triton.cdiv(n_cols, block))](
            x, x.stride(0), bias if bias is not None else x, ids, u, ref, scale,
            out, out.stride(0), row_start, col_start, n_cols, ids.shape[1],
            HAS_BIAS=bias is not None, MASK_IDS=mask_ids, BLOCK_V=block, BLOCK_K=_BLOCK_K,
            num_warps=8)
        return out
    sl = slice(row_start, row_start + rows)
    if bias is not None:
        x += bias[col_start:col_start + n_cols]
    idx, inside = _ids_in_block(ids[sl], col_start, n_cols)
    if mask_ids:  # -inf before the exp: an id's exp(x - ref) could overflow
        x.scatter_reduce_(1, idx, torch.where(inside, float("-inf"), float("inf")).to(x.dtype),
                          reduce="amin")
    x.sub_(ref[sl, None]).exp_().mul_(scale[sl, None])
    x.scatter_add_(1, idx, torch.where(inside, u[sl], 0.0).to(x.dtype))
    if out is not x:
        out.copy_(x)
    return out


# --------------------------------------------------------------------------- row math


def _finish_stats(m, s, xid, mode):
    """lse (and lse_tail in topk mode) of rows from their running (m, s) and id logits."""
    run = m + torch.log(s)
    if mode == "sampled":
        return run, None
    return torch.logaddexp(run, torch.logsumexp(xid, dim=1)), run


def _grad_terms(t, lse, lse_tail, xid, coef, mode):
    """(ref, scale, u) of the gradient: dX_v = scale exp(x_v - ref) outside the ids (all v
    in sampled mode) plus u_j at id_j; see the module docstring."""
    if mode == "topk":
        total = t.w.sum(dim=1) + t.p_tail
        q = torch.exp(xid - lse[:, None])
        q_tail = torch.exp(lse_tail - lse)
        ref = lse_tail
        scale = coef * (total * q_tail - t.p_tail)
        u = coef[:, None] * (total[:, None] * q - t.w)
    else:
        ref = lse
        scale = coef * t.w.sum(dim=1)
        u = -coef[:, None] * t.w
    # no tail (the ids cover V): no element reads ref, keep exp(x - ref) finite
    return torch.where(torch.isneginf(ref), 0.0, ref), scale, u.contiguous()


def _row_loss(t, stats, mode):
    logq = stats.xid - stats.lse[:, None]
    if mode == "sampled":
        return -torch.where(t.w > 0, t.w * logq, 0.0).sum(dim=1)
    kl = torch.where(t.w > 0, t.w * (t.logp - logq), 0.0).sum(dim=1)
    logq_tail = stats.lse_tail - stats.lse
    return kl + torch.where(t.p_tail > 0, t.p_tail * (t.logp_tail - logq_tail), 0.0)


def _teacher(ids, teacher_logprobs, teacher_tail, counts, params, acc):
    valid = ids[:, 0] != params.ignore_index
    live = valid[:, None] & (ids != params.ignore_index)
    slot_ids = torch.where(live, ids.to(torch.int64), -1).contiguous()
    if params.mode == "sampled":
        c = torch.where(live, counts.to(acc), 0.0)
        total = c.sum(dim=1, keepdim=True)
        w = torch.where(total > 0, c / torch.where(total > 0, total, 1.0), 0.0)
        none = torch.zeros(ids.shape[0], dtype=acc, device=ids.device)
        return _Teacher(slot_ids, w, None, none, none, valid)
    logp = torch.where(live, teacher_logprobs.to(acc), float("-inf"))
    w = torch.exp(logp)
    if teacher_tail is None:
        logp_tail = torch.log1p(-w.sum(dim=1).clamp(max=1.0))
    else:
        logp_tail = teacher_tail.to(acc)
    logp_tail = torch.where(valid, logp_tail, float("-inf"))
    return _Teacher(slot_ids, w, logp, torch.exp(logp_tail), logp_tail, valid)


def _coefficients(grad_output, valid, n_valid, reduction, acc):
    c = grad_output.to(acc)
    if reduction == "mean":
        c = c / n_valid.clamp_min(1).to(acc)
    return torch.where(valid, c, 0.0)


# --------------------------------------------------------------------------- passes


def _token_pass(hidden, weight, bias, t, coef, params, need):
    """Blocks of tokens x all V: statistics, then the gradient block at once (for
    grad_output = 1, scaled by coef). Returns (stats, (dH, dW, db))."""
    N, V = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    dev = hidden.device
    ws = OnlineLse.empty(N, acc, dev)
    xid = torch.full(t.ids.shape, float("-inf"), dtype=acc, device=dev)
    lse = torch.empty(N, dtype=acc, device=dev)
    lse_tail = torch.empty(N, dtype=acc, device=dev) if params.mode == "topk" else None
    grads = TokenGrads(hidden, weight, bias, need)
    tokens, _ = block_sizes(N, V, dev.type, params.chunk_size)
    for r0, r1, x in token_blocks(hidden, weight, tokens):  # x: (C, V)
        sl = slice(r0, r1)
        _stats_update(x, bias, t.ids, 0, ws, xid, r0, params)
        lse[sl], tail = _finish_stats(ws.m[sl], ws.s[sl], xid[sl], params.mode)
        if tail is not None:
            lse_tail[sl] = tail
        ref, scale, u = _grad_terms(_slice_teacher(t, sl), lse[sl], tail, xid[sl], coef[sl],
                                    params.mode)
        if params.impl == "torch":  # x holds exp(x - shift): rescale it in place
            shift = torch.where(torch.isneginf(ws.m[sl]), 0.0, ws.m[sl])
            x.mul_((scale * torch.exp(shift - ref))[:, None])
            idx, inside = _ids_in_block(t.ids[sl], 0, V)
            x.scatter_add_(1, idx, torch.where(inside, u, 0.0))
            g = x
        else:
            g = grad_block(x, hidden.dtype)
            _grad_block(x, bias, t.ids[sl], 0, ref, scale, u, g, 0, params)
        grads.add(g, r0, r1, hidden[sl])
        del x, g  # before the next block's matmul: one block alive, not two
    return _RowStats(lse, lse_tail, xid), grads.result()


def _slice_teacher(t, sl):
    return _Teacher(*(None if a is None else a[sl] for a in t))


def _vocab_stats_pass(hidden, weight, bias, t, params):
    """Blocks of all N tokens x Vc columns: the row statistics."""
    N, V = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    dev = hidden.device
    ws = OnlineLse.empty(N, acc, dev)
    xid = torch.full(t.ids.shape, float("-inf"), dtype=acc, device=dev)
    _, cols = block_sizes(N, V, dev.type, params.chunk_size)
    for c0, _, x in vocab_blocks(hidden, weight, cols):  # x: (N, Vc)
        _stats_update(x, bias, t.ids, c0, ws, xid, 0, params)
        del x
    lse, lse_tail = _finish_stats(ws.m, ws.s, xid, params.mode)
    return _RowStats(lse, lse_tail, xid)


def _vocab_grad_pass(hidden, weight, bias, ids, ref, scale, u, params, need):
    """Recompute each (N, Vc) block and form the gradients; need = (dH, dW, db) flags."""
    N, V = hidden.shape[0], weight.shape[0]
    grads = VocabGrads(hidden, weight, bias, need)
    _, cols = block_sizes(N, V, hidden.device.type, params.chunk_size)
    for c0, c1, x in vocab_blocks(hidden, weight, cols):
        g = grad_block(x, hidden.dtype)
        _grad_block(x, bias, ids, c0, ref, scale, u, g, 0, params)
        grads.add(g, c0, c1, hidden, weight[c0:c1])
        del x, g
    return grads.result()


class _DistillLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, teacher_logprobs, teacher_tail, counts, params):
        acc = acc_dtype(hidden.dtype)
        t = _teacher(ids, teacher_logprobs, teacher_tail, counts, params, acc)
        n_valid = t.valid.sum()
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        in_forward = (any(need) and params.reduction != "none"
                      and weight.dtype in (torch.float32, torch.float64))
        if in_forward:
            coef = _coefficients(torch.ones((), device=hidden.device), t.valid, n_valid,
                                 params.reduction, acc)
            stats, grads = _token_pass(hidden, weight, bias, t, coef, params, need)
        else:
            stats = _vocab_stats_pass(hidden, weight, bias, t, params)
        loss = _row_loss(t, stats, params.mode)
        if params.reduction == "sum":
            loss = loss.sum()
        elif params.reduction == "mean":
            loss = loss.sum() / n_valid.clamp_min(1).to(acc)
        ctx.params, ctx.need, ctx.in_forward = params, need, in_forward
        if in_forward:
            ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        elif any(need):
            lse_tail = stats.lse_tail if stats.lse_tail is not None else torch.empty(0)
            ctx.save_for_backward(hidden, weight, bias, t.ids, t.w, t.p_tail, t.valid, n_valid,
                                  stats.lse, lse_tail, stats.xid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        params, need = ctx.params, ctx.need
        if ctx.in_forward:
            # The gradient made in forward (for grad_output = 1) is scaled in place and
            # handed over: a product would hold a second V x H buffer next to it. A second
            # backward through the same graph then fails autograd's saved-tensor version
            # check instead of scaling twice.
            gh, gw, gb = ctx.saved_tensors
            grads = [g.mul_(grad_loss.to(g.dtype)) if n else None
                     for g, n in zip((gh, gw, gb), need)]
            return (*grads, None, None, None, None, None)
        hidden, weight, bias, ids, w, p_tail, valid, n_valid, lse, lse_tail, xid = ctx.saved_tensors
        coef = _coefficients(grad_loss, valid, n_valid, params.reduction, lse.dtype)
        t = _Teacher(ids, w, None, p_tail, None, valid)
        ref, scale, u = _grad_terms(t, lse, lse_tail, xid, coef, params.mode)
        dh, dw, db = _vocab_grad_pass(hidden, weight, bias, ids, ref, scale, u, params, need)
        return dh, dw, db, None, None, None, None, None


def distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    teacher_logprobs: Optional[torch.Tensor],
    teacher_tail_logmass: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    mode: str = "topk",
    counts: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """KL of the student ``hidden @ weight.T + bias`` to a cached teacher, without full logits.

    Args:
        hidden: (N, H) float (fp32, bf16, fp16; fp64 on the torch path). Any strides.
        weight: (V, H) same dtype. bias: (V,) or None.
        ids: (N, k) integer token ids; a row whose ids[:, 0] is ``ignore_index`` is ignored,
            another slot equal to it is empty. topk mode: unique within a row.
        teacher_logprobs: (N, k) teacher log-probabilities at ids (topk mode; unused and may
            be None in sampled mode).
        teacher_tail_logmass: (N,) log of the teacher mass outside the ids, or None for
            log(1 - sum exp(teacher_logprobs)). topk mode only.
        mode: "topk" (KL over the k ids + one tail bucket) or "sampled" (cross-entropy on
            the empirical distribution of sampled ids with ``counts``).
        counts: (N, k) how often each id was sampled (sampled mode), int or float.
        reduction: "mean" (over non-ignored rows; 0 when all are ignored), "sum", "none".
        impl: "triton" (row work in Triton), "torch" (the CPU path) or "auto" (triton on
            CUDA for non-fp64 inputs, torch otherwise).
        chunk_size: tokens per logits block; None picks ~16M (CUDA) / ~8M (CPU) logits.

    Returns:
        loss (0-dim, or (N,) for "none"), fp32 (fp64 for fp64 inputs). Gradients flow to
        hidden, weight and bias.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        impl = ("triton" if hidden.is_cuda and triton is not None
                and hidden.dtype != torch.float64 else "torch")
    if impl == "triton" and triton is None:
        raise RuntimeError("impl='triton' needs the triton package")
    if impl == "triton" and hidden.dtype == torch.float64:
        raise ValueError("impl='triton' takes fp32/bf16/fp16 inputs, got float64: use impl='torch'")
    params = DistillLossParams(mode, ignore_index, reduction, chunk_size, impl)
    _check_inputs(hidden, weight, ids, teacher_logprobs, teacher_tail_logmass, bias, counts,
                  params)
    return _DistillLossFunction.apply(
        hidden, weight, None if bias is None else bias.contiguous(), ids, teacher_logprobs,
        teacher_tail_logmass, counts, params)


def distill_loss_reference(
    hidden, weight, ids, teacher_logprobs, teacher_tail_logmass=None, bias=None, *,
    mode="topk", counts=None, ignore_index=-100, reduction="mean", impl="torch",
    chunk_size=None,
):
    """Full (N, V) logits, log_softmax and the loss through autograd: the oracle (give it
    float64 inputs) and the baseline. Same signature; impl and chunk_size are ignored.

    Computes in fp32 (fp64 for fp64). In topk mode it refuses a row that repeats an id (one
    host sync), the fused path's contract.
    """
    params = DistillLossParams(mode, ignore_index, reduction, chunk_size, "torch")
    _check_inputs(hidden, weight, ids, teacher_logprobs, teacher_tail_logmass, bias, counts,
                  params)
    acc = acc_dtype(hidden.dtype)
    N, V = hidden.shape[0], weight.shape[0]
    logits = hidden.to(acc) @ weight.to(acc).t()
    if bias is not None:
        logits = logits + bias.to(acc)
    logp = torch.log_softmax(logits, dim=-1)
    valid = ids[:, 0] != ignore_index
    live = valid[:, None] & (ids != ignore_index)
    safe_ids = torch.where(live, ids, 0).long()
    logq = logp.gather(1, safe_ids)
    if mode == "sampled":
        c = torch.where(live, counts.to(acc), 0.0)
        total = c.sum(dim=1, keepdim=True)
        w = torch.where(total > 0, c / total, 0.0)
        loss = -torch.where(w > 0, w * logq, 0.0).sum(dim=1)
    else:
        _check_unique(ids, live)
        lp = torch.where(live, teacher_logprobs.to(acc), float("-inf"))
        p = torch.exp(lp)
        if teacher_tail_logmass is None:
            lt = torch.log(torch.clamp(1.0 - p.sum(dim=1), min=0.0))
        else:
            lt = teacher_tail_logmass.to(acc)
        p_t = torch.where(valid, torch.exp(lt), 0.0)
        member = torch.zeros(N, V + 1, dtype=torch.bool, device=ids.device)
        member = member.scatter_(1, torch.where(live, ids, V).long(), True)[:, :V]
        has_tail = ~member.all(dim=1)
        tail = logp.masked_fill(member, float("-inf")).masked_fill(~has_tail[:, None], 0.0)
        logq_t = torch.where(has_tail, torch.logsumexp(tail, dim=1), float("-inf"))
        loss = (torch.where(p > 0, p * (lp - logq), 0.0).sum(dim=1)
                + torch.where(p_t > 0, p_t * (lt - logq_t), 0.0))
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp_min(1)
    return loss


def _check_unique(ids, live):
    srt, order = torch.where(live, ids, -1).sort(dim=1)
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if bool(dup.any()):
        row = int(dup.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"ids row {row} repeats an id ({ids[row].tolist()}): "
                         "mode='topk' needs unique ids within a row")


def _check_inputs(hidden, weight, ids, teacher_logprobs, teacher_tail, bias, counts, params):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, H), got shape {tuple(hidden.shape)}")
    N = hidden.shape[0]
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (V, {hidden.shape[1]}), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} != hidden dtype {hidden.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if ids.dim() != 2 or ids.shape[0] != N or ids.shape[1] < 1:
        raise ValueError(f"ids must be ({N}, k) with k >= 1, got {tuple(ids.shape)}")
    if ids.is_floating_point():
        raise ValueError(f"ids must be integer token ids, got {ids.dtype}")
    k = ids.shape[1]
    if params.mode == "topk":
        if teacher_logprobs is None or teacher_logprobs.shape != (N, k):
            got = None if teacher_logprobs is None else tuple(teacher_logprobs.shape)
            raise ValueError(f"teacher_logprobs must be ({N}, {k}) in mode='topk', got {got}")
        if teacher_tail is not None and teacher_tail.shape != (N,):
            raise ValueError(f"teacher_tail_logmass must be ({N},) or None, "
                             f"got {tuple(teacher_tail.shape)}")
        if counts is not None:
            raise ValueError("counts is for mode='sampled'; mode='topk' takes teacher_logprobs")
    elif counts is None or counts.shape != (N, k):
        got = None if counts is None else tuple(counts.shape)
        raise ValueError(f"counts must be ({N}, {k}) in mode='sampled', got {got}")
