"""The attention mask of a batch layout, which the model builds for its backbone.

    causal = attends_causally(transformer)                # probed once, whatever the architecture
    layout, why = choose_layout("auto", causal, "sdpa")   # "shared" for decoders, "packed" for encoders
    mask = attention_mask(batch_layout, segment_ids, part_ids, causal=causal, implementation="sdpa")

The rule, for tokens i (query) and j (key) of one row: j is visible when both lie in the
same segment and, for a causal backbone, j is not after i and j belongs to the context
(part 0) or to i's own part. A shared-prefix group is one segment whose responses are
parts: each sees the context and itself only, which is what it would see alone. Padding
(segment 0) sees padding, so no softmax row is empty.

Stacked rows need no such mask: the backbone's own padding mask (2-D) is passed, the path
every peer runs. The 4-D mask is dense, (R, 1, T, T) with T the longest group of the batch;
it goes to scaled-dot-product attention (bool) or eager attention (additive). Backbones on
other attention implementations (FlashAttention, FlexAttention, paged) cannot take it and
run stacked.
"""
from __future__ import annotations

import torch
from torch import nn

MASKED_IMPLEMENTATIONS = ("sdpa", "eager")
CHOICES = ("auto", "stacked", "shared", "packed")


@torch.no_grad()
def attends_causally(transformer: nn.Module) -> bool:
    """Whether a token's hidden state ignores later tokens: a two-input probe, so any
    architecture answers for itself (a changed last token moves no earlier state in a decoder,
    and every earlier state in an encoder, random weights or not)."""
    base = transformer.base_model
    vocab = base.get_input_embeddings().num_embeddings
    ids = torch.tensor([[1, 2, 3, 4 % vocab], [1, 2, 3, 5 % vocab]]) % vocab
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    try:
        hidden = base(input_ids=ids.to(device)).last_hidden_state
    finally:
        base.train(was_training)
    return bool(torch.allclose(hidden[0, :3], hidden[1, :3], atol=1e-6))


def choose_layout(requested: str, causal: bool, implementation: str) -> tuple[str, str]:
    """(layout, why): the layout a backbone trains in, and the reason, for the run's log."""
    if requested not in CHOICES:
        raise ValueError(f"data.layout: got {requested!r}, expected one of {CHOICES}")
    takes_mask = implementation in MASKED_IMPLEMENTATIONS
    kind = "a causal backbone" if causal else "a bidirectional (encoder) backbone"
    if requested == "auto":
        if not takes_mask:
            return "stacked", (f"{kind} on {implementation!r} attention, which cannot take a block mask: every "
                               f"response in its own padded row")
        if causal:
            return "shared", f"{kind}: each group's context encoded once, its responses after it"
        return "packed", (f"{kind}: sequences packed into rows without sharing (a context would attend to "
                          f"the responses after it, so it cannot be shared)")
    if requested != "stacked" and not takes_mask:
        raise ValueError(f"data.layout={requested!r}: the backbone's {implementation!r} attention cannot take a "
                         f"block mask; use data.layout=stacked (or auto) or build it with sdpa attention")
    if requested == "shared" and not causal:
        raise ValueError("data.layout='shared': the backbone attends both ways (an encoder), so a shared context "
                         "would see its responses; use data.layout=packed (or auto)")
    return requested, f"{kind}: data.layout={requested!r} as configured"


def attention_mask(layout: str, segment_ids: torch.Tensor, part_ids: torch.Tensor, *, causal: bool,
                   implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """(R, T) long padding mask for stacked rows; else the (R, 1, T, T) block mask."""
    if layout == "stacked":
        return (segment_ids > 0).long()
    R, T = segment_ids.shape
    visible = segment_ids[:, :, None] == segment_ids[:, None, :]  # (R, T, T): query, key
    if causal:
        visible &= torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
        if layout == "shared":
            key_part, query_part = part_ids[:, None, :], part_ids[:, :, None]
            visible &= (key_part == 0) | (key_part == query_part)
    visible = visible[:, None]  # (R, 1, T, T)
    if implementation == "eager":  # added to the attention scores
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
            ~visible, torch.finfo(dtype).min)
    return visible
