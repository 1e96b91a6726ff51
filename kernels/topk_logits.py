"""Top-k log-probabilities of an LM head, streamed over the vocabulary: the cache step of
context distillation (the teacher pass), never the (N, V) logits.

Shapes: hidden (N, H), weight (V, H), bias (V,) or None, 1 <= k <= V. Per row, with
logits x = W h + b, T the ids of the k largest logits and R the other V - k ids:

    lse_T        = logsumexp_{v in T} x_v
    lse_R        = logsumexp_{v in R} x_v                     (-inf when k = V)
    lse          = logaddexp(lse_T, lse_R)                    (= logsumexp over all V)
    logprobs     = x_T - lse                                  (N, k), descending
    ids          = T                                          (N, k) int64
    tail_logmass = lse_R - lse  = log(1 - sum_j exp(logprobs_j))     (N,)

Why the tail is summed and not subtracted: log1p(-sum_j exp(logprobs_j)) cancels when the
top k hold nearly all the mass (fp32 resolves 1 - sum only to ~1e-7, so a tail of 1e-9
comes out as rounding noise, or 0 and then -inf). Summing the tail's own terms against
their own running max has no cancellation: tail_logmass keeps fp32 relative precision
however small the tail is, and it is -inf exactly when k = V (no tail), never a floor.

Streaming: a row's top k are known only after its last block, so the tail is built from
what drops out. Per vocabulary block: the block's top k are taken (top_k of the block),
every other element of the block goes into the tail's online logsumexp, the running
top k and the block's are merged (the top k of their union), and the candidates the merge
drops go into the tail too. Every logit ends exactly once in the final top k or in the
tail, and the full lse is put together at the end from the two (logaddexp) instead of a
running sum over all V from which the top k would be subtracted.

Two implementations of the per-block row work, same results (up to the order of tied
logits):
* torch (the CPU path): torch.topk on the (N, Vc) block, then a torch.topk merge.
* triton (CUDA): one program per row walks the block in tiles. Each logit is packed with
  its column into one int64 key that orders like the logit, ties broken towards the
  smaller id: (order-preserving int32 of the fp32 bits) << 32 | (2^31 - 1 - id). tl.topk
  on keys is then a top k with ids, the tile's other elements are exactly the keys below
  the k-th, and the running top k merge is tl.topk over the concatenation. The running
  keys (N, K) int64 (K = k rounded up to a power of two, tl.topk's constraint) and the
  tail (m, s) are explicit workspaces carried from block to block; the K - k extra keys
  left at the end belong to the tail and are folded in once.

Memory: one (N, Vc) logits block (vocab_blocks.py sizes it) plus O(N k). No autograd:
the teacher pass runs without gradients, and the outputs carry none. Outputs are fp32
(fp64 for fp64 inputs on the torch path). Logits are assumed finite (no -inf bias).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from rankpm.kernels.vocab_blocks import (
    OnlineLse,
    acc_dtype,
    block_sizes,
    online_lse_update_,
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
    "TopKLogprobs",
    "TopKLogprobsParams",
    "topk_logprobs",
    "topk_logprobs_reference",
]

IMPLS = ("auto", "triton", "torch")
_ID_BASE = 2**31 - 1  # key low half = _ID_BASE - id: larger key for the smaller id
_KEY_NONE = -(2**63)  # below every real key, also below the key of a -inf logit


class TopKLogprobs(NamedTuple):
    logprobs: torch.Tensor  # (N, k) fp32, descending
    ids: torch.Tensor  # (N, k) int64
    tail_logmass: torch.Tensor  # (N,) fp32, log of the mass outside the top k; -inf if k = V


@dataclass(frozen=True)
class TopKLogprobsParams:
    k: int
    chunk_size: Optional[int] = None  # tokens' worth of logits per block; see block_sizes
    impl: str = "torch"  # row-work implementation: "triton" or "torch"

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k={self.k}: expected k >= 1")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size}: expected None or >= 1")


# --------------------------------------------------------------------------- kernel

if triton is not None:
    KEY_NONE = tl.constexpr(_KEY_NONE)
    ID_BASE = tl.constexpr(_ID_BASE)

    @triton.jit
    def _encode(x, col):
        """int64 keys ordered like the fp32 values x, ties towards the smaller column."""
        bits = x.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude
        return (ordered.to(tl.int64) << 32) | (ID_BASE - col)

    @triton.jit
    def _decode_value(key):
        ordered = (key >> 32).to(tl.int32)
        bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _topk_block_kernel(
        logits_ptr, stride_row, bias_ptr, keys_ptr, m_ptr, s_ptr, col_start, n_cols,
        HAS_BIAS: tl.constexpr, K: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """Fold one (row, vocabulary block) into the row's running top-K keys and tail (m, s).

        Per tile: cand = topk(tile keys); tail += tile elements below min(cand);
        top, dropped = topk(top ++ cand), the rest; tail += dropped.
        """
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        kk = tl.arange(0, K)
        top = tl.load(keys_ptr + row * K + kk)
        m = tl.load(m_ptr + row)
        s = tl.load(s_ptr + row)
        cols = tl.arange(0, BLOCK_V)
        for c0 in range(0, n_cols, BLOCK_V):
            c = c0 + cols
            cm = c < n_cols
            x = tl.load(base + c, mask=cm, other=float("-inf")).to(tl.float32)
            if HAS_BIAS:
                x += tl.load(bias_ptr + col_start + c, mask=cm, other=0.0).to(tl.float32)
            key = tl.where(cm, _encode(x, (col_start + c).to(tl.int64)), KEY_NONE)
            cand = tl.topk(key, K)
            m, s = online_lse_step(m, s, tl.where(key < tl.min(cand, axis=0), x, float("-inf")))
            both = tl.reshape(tl.join(top, cand), [2 * K])
            top = tl.topk(both, K)
            dropped = (both < tl.min(top, axis=0)) & (both != KEY_NONE)
            m, s = online_lse_step(m, s, tl.where(dropped, _decode_value(both), float("-inf")))
        tl.store(keys_ptr + row * K + kk, top)
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s)


def _decode(keys):
    """Torch twin of the key layout: (values fp32, ids int64); _KEY_NONE gives -inf, id -1."""
    ordered = (keys >> 32).to(torch.int32)
    values = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)
    ids = _ID_BASE - (keys - ((keys >> 32) << 32))
    none = keys == _KEY_NONE
    return values.masked_fill(none, float("-inf")), ids.masked_fill(none, -1)


# --------------------------------------------------------------------------- passes


def _torch_pass(hidden, weight, bias, params):
    """Running top k (values, ids) and tail (m, s) over vocabulary blocks, torch ops."""
    N, V, k = hidden.shape[0], weight.shape[0], params.k
    acc = acc_dtype(hidden.dtype)
    dev = hidden.device
    tail = OnlineLse.empty(N, acc, dev)
    top_v = torch.full((N, k), float("-inf"), dtype=acc, device=dev)
    top_i = torch.full((N, k), -1, dtype=torch.int64, device=dev)
    _, cols = block_sizes(N, V, dev.type, params.chunk_size)
    for c0, c1, x in vocab_blocks(hidden, weight, cols):  # x: (N, Vc)
        if bias is not None:
            x += bias[c0:c1]
        vals, idx = x.topk(min(k, c1 - c0), dim=1)
        x.scatter_(1, idx, float("-inf"))  # what is left can never be in the top k
        online_lse_update_(tail.m, tail.s, x, consume=True)
        del x  # before the next block's matmul: one block alive, not two
        cand_v = torch.cat([top_v, vals], dim=1)
        cand_i = torch.cat([top_i, idx + c0], dim=1)
        top_v, pos = cand_v.topk(k, dim=1)
        top_i = cand_i.gather(1, pos)
        online_lse_update_(tail.m, tail.s, cand_v.scatter_(1, pos, float("-inf")), consume=True)
    return top_v, top_i, tail.lse()


def _triton_pass(hidden, weight, bias, params):
    """Running top-K keys and tail (m, s) in workspaces, one kernel launch per block."""
    N, V, k = hidden.shape[0], weight.shape[0], params.k
    dev = hidden.device
    K = triton.next_power_of_2(k)
    keys = torch.full((N, K), _KEY_NONE, dtype=torch.int64, device=dev)
    tail = OnlineLse.empty(N, torch.float32, dev)
    _, cols = block_sizes(N, V, dev.type, params.chunk_size)
    for c0, c1, x in vocab_blocks(hidden, weight, cols):
        block_v = max(K, min(1024, triton.next_power_of_2(c1 - c0)))  # tl.topk needs K <= tile
        _topk_block_kernel[(N,)](
            x, x.stride(0), bias if bias is not None else x, keys, tail.m, tail.s, c0, c1 - c0,
            HAS_BIAS=bias is not None, K=K, BLOCK_V=block_v, num_warps=4)
        del x
    values, ids = _decode(keys)
    lse_tail = tail.lse()
    if K > k:  # the power-of-two padding of the running top k: tail, by construction
        lse_tail = torch.logaddexp(lse_tail, torch.logsumexp(values[:, k:], dim=1))
    return values[:, :k].contiguous(), ids[:, :k].contiguous(), lse_tail


def topk_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    k: int,
    impl: str = "auto",
    chunk_size: Optional[int] = None,
) -> TopKLogprobs:
    """Top-k log-probabilities, their ids and the log tail mass of ``hidden @ weight.T + bias``.

    Args:
        hidden: (N, H) float (fp32, bf16, fp16; fp64 on the torch path). Any strides.
        weight: (V, H) same dtype. bias: (V,) or None.
        k: how many log-probabilities per row, 1 <= k <= V.
        impl: "triton" (row work in Triton), "torch" (the CPU path) or "auto" (triton on
            CUDA for non-fp64 inputs, torch otherwise).
        chunk_size: tokens' worth of logits per vocabulary block (block_sizes); None picks
            ~16M (CUDA) or ~8M (CPU) logits per block.

    Returns:
        TopKLogprobs(logprobs (N, k) descending, ids (N, k) int64, tail_logmass (N,)),
        fp32 (fp64 for fp64 inputs), no gradient.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    _check_inputs(hidden, weight, bias, k)
    if impl == "auto":
        impl = ("triton" if hidden.is_cuda and triton is not None
                and hidden.dtype != torch.float64 else "torch")
    if impl == "triton" and triton is None:
        raise RuntimeError("impl='triton' needs the triton package")
    if impl == "triton" and hidden.dtype == torch.float64:
        raise ValueError("impl='triton' takes fp32/bf16/fp16 inputs, got float64: use impl='torch'")
    params = TopKLogprobsParams(k, chunk_size, impl)
    pass_ = _triton_pass if impl == "triton" else _torch_pass
    with torch.no_grad():
        top_v, top_i, lse_tail = pass_(hidden, weight, None if bias is None else bias.contiguous(),
                                       params)
        lse = torch.logaddexp(lse_tail, torch.logsumexp(top_v, dim=1))
        return TopKLogprobs(top_v - lse[:, None], top_i, lse_tail - lse)


def topk_logprobs_reference(
    hidden, weight, bias=None, *, k, impl="torch", chunk_size=None,
) -> TopKLogprobs:
    """Full (N, V) logits, log_softmax, torch.topk: the oracle and the baseline.

    Same signature; impl and chunk_size are ignored. Computes in fp32 (fp64 for fp64).
    """
    _check_inputs(hidden, weight, bias, k)
    acc = acc_dtype(hidden.dtype)
    with torch.no_grad():
        logits = hidden.to(acc) @ weight.to(acc).t()
        if bias is not None:
            logits = logits + bias.to(acc)
        logp = torch.log_softmax(logits, dim=-1)
        values, ids = logp.topk(k, dim=1)
        tail = torch.logsumexp(logp.scatter_(1, ids, float("-inf")), dim=1)
    return TopKLogprobs(values, ids, tail)


def _check_inputs(hidden, weight, bias, k):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (V, {hidden.shape[1]}), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} != hidden dtype {hidden.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"k={k}: expected 1 <= k <= V={weight.shape[0]}")
