"""Shared vocabulary-block machinery: the online logsumexp over blocks, the walks and the
gradient workspaces against full-logits torch, and the out_dtype matmul decision."""
import pytest
import torch

from rankpm.kernels.vocab_blocks import (
    OnlineLse,
    TokenGrads,
    VocabGrads,
    block_sizes,
    mm_acc,
    online_lse_update_,
    out_dtype_matmul,
    token_blocks,
    vocab_blocks,
)

from kernel_impls import DEVICE


@pytest.mark.parametrize("consume", [False, True])
def test_online_lse_over_blocks_matches_logsumexp(consume):
    x = torch.randn(6, 301, dtype=torch.float64, device=DEVICE) * 30
    x[1] = float("-inf")  # a row with no mass: lse -inf, never nan
    x[2, :150] = float("-inf")  # a row whose first blocks are empty
    ws = OnlineLse.empty(6, torch.float64, DEVICE)
    for c0 in range(0, 301, 64):
        block = x[:, c0:c0 + 64].clone()
        online_lse_update_(ws.m, ws.s, block, consume=consume)
    torch.testing.assert_close(ws.lse(), torch.logsumexp(x, dim=1), rtol=1e-12, atol=0)


def test_walks_and_gradient_workspaces_match_full_logits():
    N, H, V = 23, 17, 300
    h = torch.randn(N, H, dtype=torch.float64, device=DEVICE)
    w = torch.randn(V, H, dtype=torch.float64, device=DEVICE)
    b = torch.randn(V, dtype=torch.float64, device=DEVICE)
    g_full = torch.randn(N, V, dtype=torch.float64, device=DEVICE)  # any logits gradient
    need = (True, True, True)
    tok = TokenGrads(h, w, b, need)
    for r0, r1, x in token_blocks(h, w, 5):
        torch.testing.assert_close(x, h[r0:r1] @ w.t())
        tok.add(g_full[r0:r1], r0, r1, h[r0:r1])
    voc = VocabGrads(h, w, b, need)
    for c0, c1, x in vocab_blocks(h, w, 128):
        torch.testing.assert_close(x, h @ w[c0:c1].t())
        voc.add(g_full[:, c0:c1].contiguous(), c0, c1, h, w[c0:c1])
    want = (g_full @ w, g_full.t() @ h, g_full.sum(0))
    for got in (tok.result(), voc.result()):
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e)


def test_out_dtype_matmul_is_decided_not_probed():
    a = torch.zeros(2, 2, dtype=torch.bfloat16)
    assert not out_dtype_matmul(a, torch.float32)  # CPU: not documented, upcast instead
    assert not out_dtype_matmul(a.float(), torch.float32)
    assert mm_acc(a, a).dtype == torch.float32
    if torch.cuda.is_available() and torch.version.cuda is not None:
        has_overload = "dtype" in torch.ops.aten.mm.overloads()
        assert out_dtype_matmul(a.cuda(), torch.float32) == has_overload


def test_block_sizes_follow_chunk_size():
    assert block_sizes(37, 1000, "cpu", 8) == (8, 128)  # 8 * 1000 / 37 -> 216 -> 128 columns
    tokens, cols = block_sizes(2048, 32000, "cpu", None)
    assert tokens * 32000 <= 1 << 23 and 2048 * cols <= 1 << 23
