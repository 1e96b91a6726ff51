"""Fused LM-head cross-entropy: hidden @ weight.T (+ bias) -> cross-entropy, never the full logits.

Shapes: hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) int with
ignore_index. Per token i with target t_i (not ignored) and logits x_i = W h_i + b:

    lse_i     = log sum_v exp(x_iv)                       (online over vocabulary blocks)
    logprob_i = x_it - lse_i                              (returned on request; 0 if ignored)
    loss      = sum_i (lse_i - x_it) [/ n_valid for "mean"; "none" keeps (N,)]

Gradient, with c_i the per-token coefficient (mean: g/n_valid, sum: g, none: g_i,
0 for ignored tokens; g = grad_output):

    dX_iv = c_i (softmax(x_i)_v - [v == t_i])            (one logits block at a time)
    dH    = dX W,   dW = dX^T H,   db = sum_i dX_i

Two ways through the vocabulary, both with bounded memory (one block of logits):

* token strategy (fp32/fp64 weights, reduction sum/mean, gradient needed): blocks of
  chunk_size tokens x all V. The gradient is made in the forward pass (the block is
  overwritten in place by dX) and accumulated straight into the fp32 weight gradient;
  backward is one scale by grad_output. 6 N H V flops in all.
* vocab strategy (bf16/fp16 weights, reduction "none", or no gradient in forward):
  blocks of all N tokens x Vc vocabulary columns. Forward keeps an online logsumexp
  per token; backward recomputes each block, and dW for a block is one matmul whose
  reduction over all N tokens accumulates in fp32 inside the matmul, so no fp32 V x H
  buffer is needed; dH accumulates in an fp32 (N, H) buffer. 8 N H V flops.

The two walks, their block sizes, the fp32-accumulating matmuls, the online logsumexp
and the gradient workspaces live in vocab_blocks.py, shared with the other vocabulary-
blocked losses. Logits are produced in fp32 (fp64 for fp64 inputs) straight from the
matmul, never rounded to bf16 first. The per-row work (online logsumexp, target gather, softmax
gradient) runs in the Triton kernels below on CUDA and in the same algorithm written
with torch ops on CPU. No .item() or other host sync anywhere in forward or backward.
An all-ignored batch gives loss 0 (not NaN) and zero gradients.
Target ids outside [0, V) that are not ignore_index are not checked (it would sync).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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

__all__ = [
    "LinearCrossEntropyParams",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "linear_cross_entropy_naive",
]

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "triton", "torch")
_block_sizes = block_sizes  # the name this module's tests import


@dataclass(frozen=True)
class LinearCrossEntropyParams:
    ignore_index: int = -100
    reduction: str = "mean"
    return_logprobs: bool = False
    chunk_size: Optional[int] = None  # tokens per block (token strategy); see block_sizes
    impl: str = "torch"  # row-kernel implementation: "triton" or "torch"

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction={self.reduction!r}: expected one of {REDUCTIONS}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size}: expected None or >= 1")


# --------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _lse_update_kernel(
        logits_ptr, stride_row, bias_ptr, targets_ptr, m_ptr, s_ptr, tgt_ptr,
        row_start, col_start, n_cols,
        HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """Fold one block of logits into the running (max m, sum s, target logit) of a row.

        m' = max(m, max_v x_v);  s' = s exp(m - m') + sum_v exp(x_v - m');
        target logit taken when col_start <= t < col_start + n_cols.
        """
        r = tl.program_id(0).to(tl.int64)
        row = row_start + r
        base = logits_ptr + r * stride_row
        m = tl.load(m_ptr + row).to(tl.float32)
        s = tl.load(s_ptr + row).to(tl.float32)
        t = tl.load(targets_ptr + row).to(tl.int64) - col_start
        cols = tl.arange(0, BLOCK_V)
        for c0 in range(0, n_cols, BLOCK_V):
            c = c0 + cols
            cm = c < n_cols
            x = tl.load(base + c, mask=cm, other=float("-inf")).to(tl.float32)
            if HAS_BIAS:
                x += tl.load(bias_ptr + col_start + c, mask=cm, other=0.0).to(tl.float32)
            m, s = online_lse_step(m, s, x)
        tl.store(m_ptr + row, m.to(m_ptr.dtype.element_ty))
        tl.store(s_ptr + row, s.to(s_ptr.dtype.element_ty))
        if (t >= 0) & (t < n_cols):
            xt = tl.load(base + t).to(tl.float32)
            if HAS_BIAS:
                xt += tl.load(bias_ptr + col_start + t).to(tl.float32)
            tl.store(tgt_ptr + row, xt.to(tgt_ptr.dtype.element_ty))

    @triton.jit
    def _softmax_grad_kernel(
        logits_ptr, stride_row, bias_ptr, targets_ptr, lse_ptr, coef_ptr,
        out_ptr, stride_out, row_start, col_start, n_cols,
        HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """dX_v = c (exp(x_v - lse) - [v == t]) for one row and BLOCK_V columns; may write in place."""
        r = tl.program_id(0).to(tl.int64)
        row = row_start + r
        c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        cm = c < n_cols
        x = tl.load(logits_ptr + r * stride_row + c, mask=cm, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + col_start + c, mask=cm, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + row).to(tl.float32)
        coef = tl.load(coef_ptr + row).to(tl.float32)
        t = tl.load(targets_ptr + row).to(tl.int64) - col_start
        g = coef * (tl.exp(x - lse) - tl.where(c == t, 1.0, 0.0))
        tl.store(out_ptr + r * stride_out + c, g.to(out_ptr.dtype.element_ty), mask=cm)


# --------------------------------------------------------------------------- row ops
# Each has a Triton launcher and a torch twin with identical semantics.


def _lse_update(logits, bias, targets, col_start, ws, tgt, row_start, impl):
    rows, n_cols = logits.shape
    if impl == "triton":
        _lse_update_kernel[(rows,)](
            logits, logits.stride(0), bias if bias is not None else logits, targets,
            ws.m, ws.s, tgt, row_start, col_start, n_cols,
            HAS_BIAS=bias is not None, BLOCK_V=min(4096, triton.next_power_of_2(n_cols)),
            num_warps=8)
        return
    sl = slice(row_start, row_start + rows)
    x = logits if bias is None else logits + bias[col_start:col_start + n_cols].to(logits.dtype)
    t = targets[sl] - col_start
    inside = (t >= 0) & (t < n_cols)
    xt = x.gather(1, t.clamp(0, n_cols - 1)[:, None]).squeeze(1)
    tgt[sl] = torch.where(inside, xt.to(tgt.dtype), tgt[sl])
    online_lse_update_(ws.m[sl], ws.s[sl], x, consume=bias is not None)  # x is our copy then


def _softmax_grad(logits, bias, targets, col_start, lse, coef, out, row_start, impl):
    """out = coef * (softmax - onehot) for a block; out may be logits itself."""
    rows, n_cols = logits.shape
    if impl == "triton":
        block = min(4096, triton.next_power_of_2(n_cols))
        _softmax_grad_kernel[(rows, triton.cdiv(n_cols, block))](
            logits, logits.stride(0), bias if bias is not None else logits, targets, lse, coef,
            out, out.stride(0), row_start, col_start, n_cols,
            HAS_BIAS=bias is not None, BLOCK_V=block, num_warps=8)
        return out
    sl = slice(row_start, row_start + rows)
    x = logits if bias is None else logits.add_(bias[col_start:col_start + n_cols].to(logits.dtype))
    x.sub_(lse[sl, None]).exp_()
    t = targets[sl] - col_start
    inside = (t >= 0) & (t < n_cols)
    x.scatter_add_(1, t.clamp(0, n_cols - 1)[:, None], -inside.to(x.dtype)[:, None])
    x.mul_(coef[sl, None])
    if out is not x:
        out.copy_(x)
    return out


# --------------------------------------------------------------------------- passes


def _token_pass(hidden, weight, bias, targets, coef, params, need):
    """Blocks of tokens x all V. Returns (lse, target logit); with any(need) also dH, dW, db
    (scaled by coef, i.e. for grad_output = 1)."""
    N, V = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    dev = hidden.device
    ws = OnlineLse.empty(N, acc, dev)
    tgt = torch.zeros(N, dtype=acc, device=dev)
    lse = torch.empty(N, dtype=acc, device=dev)
    grads = TokenGrads(hidden, weight, bias, need) if any(need) else None
    tokens, _ = block_sizes(N, V, dev.type, params.chunk_size)
    for r0, r1, x in token_blocks(hidden, weight, tokens):  # x: (C, V) fp32 logits block
        _lse_update(x, bias, targets, 0, ws, tgt, r0, params.impl)
        lse[r0:r1] = ws.m[r0:r1] + torch.log(ws.s[r0:r1])
        if grads is not None:
            g = grad_block(x, hidden.dtype)
            _softmax_grad(x, bias, targets, 0, lse, coef, g, r0, params.impl)
            grads.add(g, r0, r1, hidden[r0:r1])
    return lse, tgt, None if grads is None else grads.result()


def _vocab_lse_pass(hidden, weight, bias, targets, params):
    """Blocks of all N tokens x Vc columns, online logsumexp. Returns (lse, target logit)."""
    N, V = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    dev = hidden.device
    ws = OnlineLse.empty(N, acc, dev)
    tgt = torch.zeros(N, dtype=acc, device=dev)
    _, cols = block_sizes(N, V, dev.type, params.chunk_size)
    for c0, _, x in vocab_blocks(hidden, weight, cols):  # x: (N, Vc)
        _lse_update(x, bias, targets, c0, ws, tgt, 0, params.impl)
    return ws.lse(), tgt


def _vocab_grad_pass(hidden, weight, bias, targets, lse, coef, params, need):
    """Recompute each (N, Vc) block and form the gradients; need = (dH, dW, db) flags."""
    N, V = hidden.shape[0], weight.shape[0]
    grads = VocabGrads(hidden, weight, bias, need)
    _, cols = block_sizes(N, V, hidden.device.type, params.chunk_size)
    for c0, c1, x in vocab_blocks(hidden, weight, cols):
        g = grad_block(x, hidden.dtype)
        _softmax_grad(x, bias, targets, c0, lse, coef, g, 0, params.impl)
        grads.add(g, c0, c1, hidden, weight[c0:c1])
    return grads.result()


def _coefficients(targets, params, grad_output, valid, n_valid, acc):
    if params.reduction == "none":
        return torch.where(valid, grad_output.to(acc), 0.0)
    c = grad_output.to(acc)
    if params.reduction == "mean":
        c = c / n_valid.clamp_min(1).to(acc)
    return torch.where(valid, c, 0.0)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, params):
        acc = acc_dtype(hidden.dtype)
        valid = targets != params.ignore_index
        n_valid = valid.sum()
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[3])
        in_forward = (any(need) and params.reduction != "none"
                      and weight.dtype in (torch.float32, torch.float64))
        if in_forward:
            coef = _coefficients(targets, params, torch.ones((), device=hidden.device),
                                 valid, n_valid, acc)
            lse, tgt, grads = _token_pass(hidden, weight, bias, targets, coef, params, need)
        else:
            lse, tgt = _vocab_lse_pass(hidden, weight, bias, targets, params)
            grads = None
        logprobs = torch.where(valid, tgt - lse, 0.0)
        loss = -logprobs
        if params.reduction == "sum":
            loss = loss.sum()
        elif params.reduction == "mean":
            loss = loss.sum() / n_valid.clamp_min(1).to(acc)
        ctx.params, ctx.need, ctx.in_forward = params, need, in_forward
        if in_forward:
            ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        else:
            ctx.save_for_backward(hidden, weight, targets, bias, lse, valid, n_valid)
        logprobs = logprobs.to(torch.float32) if acc == torch.float32 else logprobs
        ctx.mark_non_differentiable(logprobs)
        return loss, logprobs

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprobs):
        params, need = ctx.params, ctx.need
        if ctx.in_forward:  # gradient made in forward for grad_output = 1: one scale
            gh, gw, gb = ctx.saved_tensors
            go = grad_loss
            dh = gh * go.to(gh.dtype) if need[0] else None
            dw = gw * go.to(gw.dtype) if need[1] else None
            db = gb * go.to(gb.dtype) if need[2] else None
            return dh, dw, None, db, None
        hidden, weight, targets, bias, lse, valid, n_valid = ctx.saved_tensors
        acc = lse.dtype
        coef = _coefficients(targets, params, grad_loss, valid, n_valid, acc)
        dh, dw, db = _vocab_grad_pass(hidden, weight, bias, targets, lse, coef, params, need)
        return dh, dw, None, db, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_logprobs: bool = False,
    chunk_size: Optional[int] = None,
    impl: str = "auto",
):
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``targets`` without full logits.

    Args:
        hidden: (N, H) float (fp32, bf16, fp16; fp64 on the torch path). Any strides.
        weight: (V, H) same dtype. bias: (V,) or None.
        targets: (N,) integer class ids; ``ignore_index`` entries are skipped.
        reduction: "mean" (over non-ignored tokens; 0 when all are ignored), "sum", "none".
        return_logprobs: also return (N,) target log-probabilities (0 for ignored tokens,
            no gradient), fp32.
        chunk_size: tokens per logits block; None picks a block of ~16M (CUDA) or ~8M
            (CPU) logits elements. The vocabulary strategy uses the same element count.
        impl: "triton" (row kernels in Triton), "torch" (the same chunked algorithm with
            torch row ops; the CPU path) or "auto" (triton on CUDA, torch otherwise).

    Returns:
        loss (0-dim, or (N,) for "none"; fp32, fp64 for fp64 inputs), or (loss, logprobs) when
        return_logprobs. Gradients flow to hidden, weight and bias.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        impl = "triton" if (hidden.is_cuda and triton is not None) else "torch"
    if impl == "triton" and triton is None:
        raise RuntimeError("impl='triton' needs the triton package")
    _check_inputs(hidden, weight, targets, bias)
    params = LinearCrossEntropyParams(ignore_index, reduction, return_logprobs, chunk_size, impl)
    loss, logprobs = _LinearCrossEntropyFunction.apply(
        hidden, weight, targets.contiguous(), None if bias is None else bias.contiguous(), params)
    return (loss, logprobs) if return_logprobs else loss


def linear_cross_entropy_reference(
    hidden, weight, targets, bias=None, *, ignore_index=-100, reduction="mean",
    return_logprobs=False, chunk_size=None, impl="torch",
):
    """The chunked algorithm with torch row ops (the CPU path); same signature."""
    return linear_cross_entropy(
        hidden, weight, targets, bias, ignore_index=ignore_index, reduction=reduction,
        return_logprobs=return_logprobs, chunk_size=chunk_size, impl="torch")


def linear_cross_entropy_naive(
    hidden, weight, targets, bias=None, *, ignore_index=-100, reduction="mean",
    return_logprobs=False, chunk_size=None, impl="torch",
):
    """Full (N, V) logits then cross-entropy, through autograd: the oracle and the baseline.

    Computes in fp32 (fp64 stays fp64). Same signature; chunk_size and impl are ignored.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {REDUCTIONS}")
    acc = acc_dtype(hidden.dtype)
    logits = hidden.to(acc) @ weight.to(acc).t()
    if bias is not None:
        logits = logits + bias.to(acc)
    valid = targets != ignore_index
    logp = torch.log_softmax(logits, dim=-1)
    tl_ = logp.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    logprobs = torch.where(valid, tl_, 0.0)
    loss = -logprobs
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / valid.sum().clamp_min(1)
    return (loss, logprobs.detach().to(torch.float32)) if return_logprobs else loss


def _check_inputs(hidden, weight, targets, bias):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (V, {hidden.shape[1]}), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} != hidden dtype {hidden.dtype}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if targets.is_floating_point():
        raise ValueError(f"targets must be integer class ids, got {targets.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
