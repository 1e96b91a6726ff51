"""Batch layouts: a shared context or packed rows give every response the score, the LM terms
and the gradients of the stacked layout (one padded row per response), to fp32 tolerance.

fp32 tolerance, because the backbones themselves compute parts in fp32 whatever the model's
dtype (Llama's RMSNorm, eager attention's softmax), and a shared context sums the gradients
of its K uses inside attention, in another order than K stacked copies do."""
import numpy as np
import pytest
import torch

from rankpm.engine.config import ModelConfig
from rankpm.engine.data.collate import collate, first_fit_decreasing
from rankpm.engine.model.attention import attention_mask, choose_layout
from rankpm.engine.model.preference_model import PreferenceModel
from rankpm.engine.score.judges import forward, judge

PAD, EOC, VOCAB = 0, 1, 60


def row(ranks, context, responses, id="g"):
    return {"id": id, "source": "", "turns": 1, "margin": None, "ratings": None, "ranks": ranks,
            "context_ids": context, "response_ids": responses}


def test_a_shared_group_by_hand():
    """ctx [5 6], responses [7 8] (rank 1) and [9] (rank 0): one segment
    [5 6 | 7 8 eoc | 9 eoc]; each response's positions continue from the context's end; the
    LM targets of the preferred sample are 6 (from 5), 9 (from 6, the context's last token)
    and eoc (from 9)."""
    batch = collate([row([1, 0], [5, 6], [[7, 8], [9]])], PAD, EOC, layout="shared", targets="sample")
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 1, 9, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3]]
    assert batch.part_ids.tolist() == [[0, 0, 1, 1, 1, 2, 2]] and batch.segment_ids.tolist() == [[1] * 7]
    assert batch.score_index.tolist() == [4, 6]
    assert batch.lm_index.tolist() == [0, 1, 5] and batch.lm_targets.tolist() == [6, 9, 1]
    visible = attention_mask("shared", batch.segment_ids, batch.part_ids, causal=True, implementation="sdpa",
                             dtype=torch.float32)[0, 0].int()
    assert visible[5].tolist() == [1, 1, 0, 0, 0, 1, 0]  # response 2 sees the context and itself, not response 1
    assert visible[4].tolist() == [1, 1, 1, 1, 1, 0, 0]
    stacked = collate([row([1, 0], [5, 6], [[7, 8], [9]])], PAD, EOC, layout="stacked", targets="sample")
    assert stacked.input_ids.tolist() == [[5, 6, 7, 8, 1], [5, 6, 9, 1, 0]]
    assert stacked.input_ids.reshape(-1)[stacked.lm_index].tolist() == [5, 6, 9]  # the same predicting tokens
    assert stacked.lm_targets.tolist() == [6, 9, 1]


def test_rows_hold_whole_units_and_padding_only_ends_a_row():
    lengths = [9, 4, 4, 3, 2, 9, 1]
    place = first_fit_decreasing(lengths, capacity=9)
    rows: dict[int, list] = {}
    for (r, start), n in zip(place, lengths):
        rows.setdefault(r, []).append((start, n))
    for units in rows.values():  # units follow one another from offset 0, none past the row's end
        units.sort()
        assert units[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(units, units[1:]))
        assert units[-1][0] + units[-1][1] <= 9
    assert len(rows) == 4  # 32 tokens in rows of 9: 9 | 9 | 4 4 1 | 3 2


def random_groups(seed, n=7):
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n):
        k = int(rng.integers(2, 5))
        context = rng.integers(2, VOCAB, int(rng.integers(0, 24))).tolist()  # empty contexts too
        responses = [rng.integers(2, VOCAB, int(rng.integers(0, 10))).tolist() for _ in range(k)]  # empty too
        ranks = rng.integers(0, 3, k).tolist()
        if len(set(ranks)) < 2:
            ranks[0] = max(ranks) + 1
        rows.append(row(ranks, context, responses, id=f"g{g}"))
    rows[0]["response_ids"][0] = []  # an empty response is scored right after the context
    rows[1]["context_ids"] = []  # a context truncated away entirely
    rows[2]["ranks"] = [0, 0] + rows[2]["ranks"][2:]  # a tie for best: two preferred samples
    return rows


def model(backbone, **overrides):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, preset="tiny", overrides=overrides)
    return PreferenceModel.build(cfg, vocab_size=VOCAB, pad_id=PAD, eoc_id=EOC, max_length=128,
                                 with_lm_head=backbone != "bert")


def close(actual, expected, rtol=1e-5):
    """Equal to fp32 rounding, relative to the tensor's own scale."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(expected.abs().max().item(), 1e-3))


CAUSAL = [("gpt2", {}), ("llama", {"num_key_value_heads": 2}), ("qwen2", {"num_key_value_heads": 2})]


@pytest.mark.parametrize("backbone, overrides", CAUSAL, ids=[c[0] for c in CAUSAL])
@pytest.mark.parametrize("layout", ["shared", "packed"])
@pytest.mark.parametrize("targets", ["sample", "response"])
def test_causal_layouts_equal_the_stacked_one_scores_lm_terms_and_gradients(backbone, overrides, layout, targets):
    m = model(backbone, **overrides)
    assert m.causal and choose_layout("auto", m.causal, m.attention_implementation)[0] == "shared"
    rows = random_groups(1)
    results = {}
    for name in ("stacked", layout):
        batch = collate(rows, PAD, EOC, layout=name, targets=targets)
        m.zero_grad()
        out = forward(m, batch, lm_index=batch.lm_index, lm_targets=batch.lm_targets)
        (out.scores.sum() + out.lm).backward()
        grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
        results[name] = (out.scores.detach(), out.lm.detach(), batch.lm_targets.numel(), batch.lm_sequences, grads)
    (s0, lm0, n0, q0, g0), (s1, lm1, n1, q1, g1) = results["stacked"], results[layout]
    close(s1, s0)
    close(lm1, lm0)
    assert (n1, q1) == (n0, q0)
    assert g1.keys() == g0.keys()
    for k in g0:
        close(g1[k], g0[k], rtol=1e-4)


@pytest.mark.parametrize("backbone, overrides", CAUSAL[:2], ids=[c[0] for c in CAUSAL[:2]])
def test_the_log_prob_judge_is_the_same_in_every_layout(backbone, overrides):
    m = model(backbone, **overrides).eval()
    rows = random_groups(2)
    judged = [judge(m, collate(rows, PAD, EOC, layout=name, targets="all_responses"), "logprob").scores
              for name in ("stacked", "shared", "packed")]
    close(judged[1], judged[0])
    close(judged[2], judged[0])


def test_an_encoder_packs_without_sharing_and_scores_as_stacked():
    m = model("bert")
    assert not m.causal
    assert choose_layout("auto", m.causal, m.attention_implementation)[0] == "packed"
    with pytest.raises(ValueError, match="attends both ways .* a shared context would see its responses"):
        choose_layout("shared", m.causal, m.attention_implementation)
    rows = random_groups(3)
    stacked, packed = (forward(m, collate(rows, PAD, EOC, layout=name)).scores for name in ("stacked", "packed"))
    close(packed, stacked)
    assert collate(rows, PAD, EOC, layout="packed").input_ids.shape[0] < len(stacked)  # fewer rows, less padding


def test_attention_that_cannot_take_a_block_mask_runs_stacked_and_says_so():
    layout, why = choose_layout("auto", True, "flash_attention_2")
    assert layout == "stacked" and "'flash_attention_2' attention, which cannot take a block mask" in why
    with pytest.raises(ValueError, match="data.layout='shared': the backbone's 'flash_attention_2' attention cannot"):
        choose_layout("shared", True, "flash_attention_2")


def test_eager_attention_takes_the_additive_mask():
    eager = model("llama", num_key_value_heads=2)
    eager.transformer.set_attn_implementation("eager")
    assert eager.attention_implementation == "eager"
    rows = random_groups(4)
    stacked, shared = (forward(eager, collate(rows, PAD, EOC, layout=name)).scores for name in ("stacked", "shared"))
    close(shared, stacked)


CLS, SEP = 2, 3  # an encoder's framing tokens in these tests


def test_an_encoder_reading_its_first_token_reads_cls_text_sep_through_the_pooler():
    """reading 'first': [CLS] context response [SEP], the pooler on [CLS], as transformers' encoder
    classifiers read; packed rows score as stacked ones."""
    from rankpm.engine.data.schema import Framing

    torch.manual_seed(0)
    m = PreferenceModel.build(ModelConfig(backbone="bert", preset="tiny"), vocab_size=VOCAB, pad_id=PAD, eoc_id=EOC,
                              max_length=128, reading="first").eval()
    framing = Framing(prefix=(CLS,), suffix=(SEP,), read="first")
    rows = random_groups(4)
    stacked, packed = (forward(m, collate(rows, PAD, EOC, layout=name, framing=framing)).scores
                       for name in ("stacked", "packed"))
    close(packed, stacked)
    context, response = rows[0]["context_ids"], rows[0]["response_ids"][1]
    ids = torch.tensor([[CLS, *context, *response, SEP]])
    with torch.no_grad():
        hidden = m.transformer(input_ids=ids).last_hidden_state
        by_hand = m.score_head(m.transformer.pooler(hidden)).squeeze()
    close(stacked[1], by_hand)
    with pytest.raises(ValueError, match="shared layout frames responses at their end only"):
        collate(rows, PAD, EOC, layout="shared", framing=framing)


def test_reading_the_first_token_of_a_causal_backbone_is_refused():
    with pytest.raises(ValueError, match="model.reading='first' on a causal backbone: its first token sees nothing"):
        PreferenceModel.build(ModelConfig(backbone="gpt2", preset="tiny"), vocab_size=VOCAB, pad_id=PAD, eoc_id=EOC,
                              max_length=128, reading="first")


def test_auto_reading_is_first_for_encoders_and_end_for_decoders():
    from rankpm.engine.model.reading import resolve_reading

    assert resolve_reading(ModelConfig(backbone="bert")) == "first"
    assert resolve_reading(ModelConfig(backbone="gpt2")) == "end"
    assert resolve_reading(ModelConfig(backbone="bert", reading="end")) == "end"
    assert resolve_reading(ModelConfig(backbone="gpt2"), {"reading": "first"}) == "first"  # init_from keeps its own
