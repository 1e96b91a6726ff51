"""The teacher's forward over texts behind a prompt, and what is kept of its distributions.

    prompt = PromptState(teacher, prompt_ids, reuse=True)    # the prompt's keys/values, once
    hidden = text_hidden(teacher, prompt, [ids_a, ids_b])    # (T_a + T_b, H)
    logprobs, ids, tail = topk_entries(teacher, hidden, k)   # kernels.topk_logits, streamed
    ids, counts = sampled_entries(teacher, hidden, n, row_generator(seed, row, device))

With reuse the prompt is run once (in chunks of PREFILL_CHUNK tokens, so a long prompt never
forms a prompt x prompt attention matrix) and each batch of texts attends to its keys and
values, expanded to the batch as views; without, every batch runs prompt + text (the
benchmark's baseline). Both give hidden state t of a text = the state after prompt +
text[:t+1]; texts are right-padded, so no real token attends to padding.
"""
from __future__ import annotations

import numpy as np
import torch

from rankpm.engine.distill.teacher import Teacher

PREFILL_CHUNK = 1024  # prompt tokens per step of the prompt's key/value prefill


class PromptState:
    """The prompt's ids and, when reused, its key/value cache (batch 1), computed once."""

    def __init__(self, teacher: Teacher, prompt_ids: list[int], reuse: bool):
        self.ids = torch.tensor(prompt_ids, dtype=torch.long, device=teacher.device)
        self.cache = _prefill(teacher, self.ids) if reuse and len(prompt_ids) else None

    def __len__(self) -> int:
        return int(self.ids.numel())

    def expanded(self, batch: int):
        """A cache for ``batch`` texts: the prompt's keys/values as views (the forward appends to
        copies, so the prompt's own cache is never changed)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, entry in enumerate(self.cache.layers):
            cache.update(entry.keys.expand(batch, -1, -1, -1), entry.values.expand(batch, -1, -1, -1), layer)
        return cache


def _cache_arg(teacher: Teacher) -> str:
    """The forward's name for a key/value cache: ``cache`` in newer transformers, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(teacher.base.forward).parameters else "past_key_values"


@torch.no_grad()
def _prefill(teacher: Teacher, ids: torch.Tensor):
    from transformers import DynamicCache

    cache = DynamicCache()
    for start in range(0, ids.numel(), PREFILL_CHUNK):
        chunk = ids[start:start + PREFILL_CHUNK][None]
        positions = torch.arange(start, start + chunk.shape[1], device=ids.device)[None]
        teacher.base(input_ids=chunk, position_ids=positions, use_cache=True, **{_cache_arg(teacher): cache})
    return cache


@torch.no_grad()
def text_hidden(teacher: Teacher, prompt: PromptState, texts: list[list[int]]) -> torch.Tensor:
    """Final hidden states at every text token, the batch's texts one after another: (sum T, H).
    Row t of a text is the state after prompt + text[:t+1]."""
    dev, B, P = teacher.device, len(texts), len(prompt)
    T = max(len(t) for t in texts)
    ids = torch.zeros(B, T, dtype=torch.long, device=dev)  # right padding: no real token attends to it
    mask = torch.zeros(B, T, dtype=torch.long, device=dev)
    for i, t in enumerate(texts):
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, :len(t)] = 1
    ones = torch.ones(B, P, dtype=torch.long, device=dev)
    if prompt.cache is not None:
        positions = torch.arange(P, P + T, device=dev)[None].expand(B, -1)
        hidden = teacher.base(input_ids=ids, attention_mask=torch.cat([ones, mask], 1), position_ids=positions,
                              use_cache=True, **{_cache_arg(teacher): prompt.expanded(B)}).last_hidden_state  # (B, T, H)
    else:
        full = torch.cat([prompt.ids[None].expand(B, -1), ids], 1)  # prompt ids, then the text's own
        positions = torch.arange(P + T, device=dev)[None].expand(B, -1)
        hidden = teacher.base(input_ids=full, attention_mask=torch.cat([ones, mask], 1), position_ids=positions,
                              use_cache=False).last_hidden_state[:, P:]
    return torch.cat([hidden[i, :len(t)] for i, t in enumerate(texts)])


@torch.no_grad()
def topk_entries(teacher: Teacher, hidden: torch.Tensor, k: int):
    """TopKLogprobs(logprobs (N, k) fp32, ids (N, k) int64, tail_logmass (N,)) from the fused top-k pass."""
    from rankpm.kernels.topk_logits import topk_logprobs

    head = teacher.head
    bias = getattr(head, "bias", None)
    return topk_logprobs(hidden.to(head.weight.dtype), head.weight, bias, k=k)


@torch.no_grad()
def sampled_entries(teacher: Teacher, hidden: torch.Tensor, n: int, generator: torch.Generator):
    """(ids (N, n), counts (N, n)): n draws per row from softmax(head(hidden)), distinct ids
    first-come in ascending order with their counts, unused slots count 0 (id 0)."""
    from rankpm.kernels.vocab_blocks import block_sizes, token_blocks

    head = teacher.head
    bias = getattr(head, "bias", None)
    weight = head.weight
    tokens, _ = block_sizes(hidden.shape[0], weight.shape[0], hidden.device.type, None)
    ids_out, counts_out = [], []
    for _, _, x in token_blocks(hidden.to(weight.dtype), weight, tokens):  # x: (C, V) fp32
        if bias is not None:
            x += bias.float()
        draws = torch.multinomial(torch.softmax(x, dim=1), n, replacement=True, generator=generator)
        draws, _ = draws.sort(dim=1)
        first = torch.ones_like(draws, dtype=torch.bool)
        first[:, 1:] = draws[:, 1:] != draws[:, :-1]
        slot = first.long().cumsum(1) - 1  # the distinct id's slot of each draw
        ids = torch.zeros_like(draws).scatter_(1, slot, draws)
        counts = torch.zeros_like(draws).scatter_add_(1, slot, torch.ones_like(draws))
        ids_out.append(ids)
        counts_out.append(counts)
    return torch.cat(ids_out), torch.cat(counts_out)


def row_generator(seed: int, row: int, device) -> torch.Generator:
    state = int(np.random.SeedSequence([seed, row]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)
