"""Vocabulary-blocked walks over an LM head: what the fused losses on hidden @ weight.T share.

A loss over logits x = hidden @ weight.T (+ bias), hidden (N, H), weight (V, H), never holds
the (N, V) logits. It walks blocks of them in one of two orders and does its per-row work
(online logsumexp, gathers, the block's gradient) in its own row ops:

* token blocks (`token_blocks`): C tokens x all V. A row's statistics are complete inside
  its block, so a loss can form the gradient block in the same pass (6 N H V flops).
* vocabulary blocks (`vocab_blocks`): all N tokens x Vc columns. Row statistics are carried
  from block to block in an explicit workspace (`OnlineLse`); the gradient needs a second
  walk that recomputes each block (8 N H V flops).

Both orders take their block size from one element budget (`block_sizes`), so a block holds
about `BLOCK_ELEMENTS[device]` logits whatever N and V. Gradients are collected in the
workspace of the walk (`TokenGrads`, `VocabGrads`): dH = dX W, dW = dX^T H, db = sum_i dX_i.

Online logsumexp of a row over blocks (the torch twin `online_lse_update_` and the Triton
helper `online_lse_step` compute the same thing):

    m' = max(m, max_v x_v);   s' = s exp(m - m') + sum_v exp(x_v - m');   lse = m + log s

with m = -inf, s = 0 before the first block. A block (or a whole row) of -inf entries
leaves (m, s) = (-inf, 0) and its lse -inf: exponents are taken against 0 while the max
is still -inf, never against -inf (which would give exp(nan)).

Matmuls accumulate in fp32 (fp64 for fp64): `mm_acc`, `addmm_acc_`. Whether cuBLAS may
write fp32 straight from fp16/bf16 operands (torch.mm/addmm with out_dtype=) is decided by
`out_dtype_matmul(a, acc)` from what is documented: CUDA builds (not ROCm), fp16/bf16
operands, an fp32 result, and a torch whose aten has the mm/addmm dtype overloads.
Everywhere else the operands are upcast first. Nothing is learnt from a caught error.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

try:  # CPU-only installs import this module without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

__all__ = [
    "BLOCK_ELEMENTS",
    "OnlineLse",
    "TokenGrads",
    "VocabGrads",
    "acc_dtype",
    "addmm_acc_",
    "block_sizes",
    "grad_block",
    "mm_acc",
    "online_lse_update_",
    "out_dtype_matmul",
    "token_blocks",
    "vocab_blocks",
]

BLOCK_ELEMENTS = {"cuda": 1 << 24, "cpu": 1 << 23}  # logits elements per block

# torch.mm/addmm(..., out_dtype=) exist as the aten overloads "dtype"/"dtype_out"; their
# documentation: "Supported only on CUDA and for torch.float32 given torch.float16/
# torch.bfloat16 input dtypes". A property of the installed torch, fixed at import.
_ATEN_HAS_OUT_DTYPE = all(
    name in op.overloads()
    for op in (torch.ops.aten.mm, torch.ops.aten.addmm)
    for name in ("dtype", "dtype_out"))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 stays fp64, everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def out_dtype_matmul(a: torch.Tensor, acc: torch.dtype) -> bool:
    """True where torch.mm(a, b, out_dtype=acc) is documented to work (see module docstring)."""
    return (_ATEN_HAS_OUT_DTYPE and a.is_cuda and torch.version.cuda is not None
            and a.dtype in (torch.float16, torch.bfloat16) and acc == torch.float32)


def mm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 (fp64 for fp64): bf16/fp16 operands are not rounded in the output."""
    acc = acc_dtype(a.dtype)
    if a.dtype == acc:
        return torch.mm(a, b)
    if out_dtype_matmul(a, acc):
        return torch.mm(a, b, out_dtype=acc)  # cuBLAS: low precision in, fp32 out
    return torch.mm(a.to(acc), b.to(acc))


def addmm_acc_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32/fp64 and a, b possibly bf16/fp16."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif out_dtype_matmul(a, acc.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(mm_acc(a, b))


def block_sizes(N: int, V: int, device_type: str, chunk_size: Optional[int]):
    """(tokens per token block, columns per vocabulary block) for about one element budget.

    chunk_size (tokens per block) overrides the budget; the vocabulary block then holds
    the same number of elements, rounded down to a multiple of 128 columns (at least 128).
    """
    budget = BLOCK_ELEMENTS.get(device_type, 1 << 24)
    tokens = chunk_size if chunk_size is not None else max(1, budget // max(V, 1))
    tokens = max(1, min(tokens, max(N, 1)))
    cols = max(1, min(V, (tokens * V) // max(N, 1)))
    if cols < V:
        cols = min(V, max(128, cols // 128 * 128))
    return tokens, cols


def token_blocks(hidden: torch.Tensor, weight: torch.Tensor, tokens: int):
    """Yield (r0, r1, x): x = hidden[r0:r1] @ weight.T, (r1 - r0, V), fp32 (fp64), no bias."""
    wt = weight.t()
    for r0 in range(0, hidden.shape[0], tokens):
        r1 = min(hidden.shape[0], r0 + tokens)
        yield r0, r1, mm_acc(hidden[r0:r1], wt)


def vocab_blocks(hidden: torch.Tensor, weight: torch.Tensor, cols: int):
    """Yield (c0, c1, x): x = hidden @ weight[c0:c1].T, (N, c1 - c0), fp32 (fp64), no bias."""
    V = weight.shape[0]
    for c0 in range(0, V, cols):
        c1 = min(V, c0 + cols)
        yield c0, c1, mm_acc(hidden, weight[c0:c1].t())


def grad_block(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where a logits block's gradient goes: the block itself when the operand dtype matches
    (written in place), else a block of the operands' dtype for the gradient matmuls."""
    return x if x.dtype == dtype else torch.empty_like(x, dtype=dtype)


# --------------------------------------------------------------------------- online lse


class OnlineLse(NamedTuple):
    """Workspace of running (max m, sum s) per row, carried across vocabulary blocks."""

    m: torch.Tensor  # (N,) acc dtype, -inf before the first block
    s: torch.Tensor  # (N,) acc dtype, sum exp(x - m)

    @classmethod
    def empty(cls, N: int, dtype: torch.dtype, device) -> "OnlineLse":
        return cls(torch.full((N,), float("-inf"), dtype=dtype, device=device),
                   torch.zeros(N, dtype=dtype, device=device))

    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.s)  # -inf for a row that saw only -inf


def online_lse_update_(m: torch.Tensor, s: torch.Tensor, x: torch.Tensor,
                       consume: bool = False) -> None:
    """Fold the rows of block x into (m, s) in place (m, s: (rows,) views of the workspace).

    consume=True lets it overwrite x with exp(x - shift) instead of allocating a block-sized
    temporary, for callers done with x.
    """
    m_new = torch.maximum(m, x.amax(dim=1))
    shift = torch.where(m_new == float("-inf"), 0.0, m_new)
    e = x.sub_(shift[:, None]).exp_() if consume else torch.exp(x - shift[:, None])
    s.mul_(torch.exp(m - shift)).add_(e.sum(dim=1))
    m.copy_(m_new)


if triton is not None:

    @triton.jit
    def online_lse_step(m, s, x):
        """The update above for one row and one tile x (masked entries -inf); m, s fp32 scalars."""
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        return m_new, s


# --------------------------------------------------------------------------- gradients


class TokenGrads:
    """dH, dW, db collected over token blocks: dH rows are written once per block (one
    matmul, rounded once); dW and db are summed over blocks in fp32 (fp64) buffers, which
    for fp32 weights are the outputs themselves."""

    def __init__(self, hidden, weight, bias, need):
        acc = acc_dtype(hidden.dtype)
        dev = hidden.device
        self.weight, self.bias_dtype = weight, None if bias is None else bias.dtype
        self.gh = (torch.empty_like(hidden, memory_format=torch.contiguous_format)
                   if need[0] else None)
        self.gw = torch.zeros(weight.shape, dtype=acc, device=dev) if need[1] else None
        self.gb = (torch.zeros(weight.shape[0], dtype=acc, device=dev)
                   if need[2] and bias is not None else None)

    def add(self, g, r0, r1, h):
        """g: (r1 - r0, V) gradient block in the operand dtype; h = hidden[r0:r1]."""
        if self.gh is not None:
            self.gh[r0:r1] = torch.mm(g, self.weight)
        if self.gw is not None:
            addmm_acc_(self.gw, g.t(), h)
        if self.gb is not None:
            self.gb += g.sum(dim=0, dtype=self.gb.dtype)

    def result(self):
        gw = None if self.gw is None else self.gw.to(self.weight.dtype)
        gb = None if self.gb is None else self.gb.to(self.bias_dtype)
        return self.gh, gw, gb


class VocabGrads:
    """dH, dW, db collected over vocabulary blocks: dH is summed in an fp32 (N, H) buffer;
    dW and db rows of a block are one matmul / sum each, whose reduction over all N tokens
    accumulates in fp32 inside it, so no fp32 V x H buffer is needed."""

    def __init__(self, hidden, weight, bias, need):
        acc = acc_dtype(hidden.dtype)
        dev = hidden.device
        self.hidden_dtype = hidden.dtype
        self.gh = torch.zeros(hidden.shape, dtype=acc, device=dev) if need[0] else None
        self.gw = (torch.empty(weight.shape, dtype=weight.dtype, device=dev)
                   if need[1] else None)
        self.gb = (torch.empty(weight.shape[0], dtype=bias.dtype, device=dev)
                   if need[2] and bias is not None else None)

    def add(self, g, c0, c1, hidden, w):
        """g: (N, c1 - c0) gradient block in the operand dtype; w = weight[c0:c1]."""
        if self.gh is not None:
            addmm_acc_(self.gh, g, w)
        if self.gw is not None:
            torch.mm(g.t(), hidden, out=self.gw[c0:c1])
        if self.gb is not None:
            self.gb[c0:c1] = g.sum(dim=0, dtype=acc_dtype(g.dtype)).to(self.gb.dtype)

    def result(self):
        gh = None if self.gh is None else self.gh.to(self.hidden_dtype)
        return gh, self.gw, self.gb
