"""Each objective's loss on tiny cases worked out by hand, the LM targets, and the LM path.

softplus values used below: softplus(-2) = 0.126928, softplus(-1) = 0.313262,
softplus(0) = ln 2 = 0.693147.
"""
import math

import pytest
import torch

from rankpm.engine.config import ModelConfig, ObjectiveConfig
from rankpm.engine.data.collate import collate
from rankpm.engine.model.preference_model import ModelOutput, PreferenceModel
from rankpm.engine.score.judges import forward
from rankpm.engine.train.objectives import build_objective

SP = {-2: 0.126928, -1: 0.313262, 0: math.log(2)}


def group(ranks, context=(5,), responses=None, **extra):
    responses = responses or [[9 + i] for i in range(len(ranks))]
    return {"id": "g", "source": "", "turns": 1, "margin": None, "ratings": None, "ranks": list(ranks),
            "context_ids": list(context), "response_ids": [list(r) for r in responses], **extra}


def batch_of(*groups, targets="none", layout="stacked"):
    return collate(list(groups), pad_id=0, eoc_id=1, layout=layout, targets=targets)


def two_responses(targets):
    """One group: ctx [5 6]; response [7 8] (rank 1, worse) and [9] (rank 0, preferred)."""
    return batch_of(group([1, 0], context=[5, 6], responses=[[7, 8], [9]]), targets=targets)


def scores_only(scores, lm=None):
    return ModelOutput(torch.tensor(scores), torch.zeros(1, 1, 1), None if lm is None else torch.tensor(lm))


def test_ranked_loss_is_the_mean_softplus_over_all_ranked_pairs():
    """Scores [2, 1, 0] ranked [0, 1, 2]: pairs (0,1) (0,2) (1,2) with r_w - r_b = -1, -2, -1.
    L = (0.313262 + 0.126928 + 0.313262) / 3 = 0.251151."""
    batch = batch_of(group([0, 1, 2]))
    out = build_objective(ObjectiveConfig(name="ranked"))(scores_only([2.0, 1.0, 0.0]), batch)
    assert out.loss.item() == pytest.approx((2 * SP[-1] + SP[-2]) / 3, abs=1e-6)
    total, count = out.sums["pair_accuracy"]
    assert (total / count).item() == 1.0 and count.item() == 3


def test_rating_margins_add_the_scaled_rating_gap_of_each_pair():
    """Scores [2, 1, 0] ranked [0, 1, 2], ratings [5, 4, 2], rating_margin 0.5: pair margins
    0.5 * (5-4, 5-2, 4-2) = 0.5, 1.5, 1, so r_w - r_b + m = -0.5, -0.5, 0.
    L = (2 softplus(-0.5) + softplus(0)) / 3 = (2 * 0.474077 + 0.693147) / 3 = 0.547100.
    Without rating_margin the ratings change nothing."""
    batch = batch_of(group([0, 1, 2], ratings=[5.0, 4.0, 2.0]))
    out = build_objective(ObjectiveConfig(rating_margin=0.5))(scores_only([2.0, 1.0, 0.0]), batch)
    assert out.loss.item() == pytest.approx((2 * math.log1p(math.exp(-0.5)) + SP[0]) / 3, abs=1e-6)
    plain = build_objective(ObjectiveConfig())(scores_only([2.0, 1.0, 0.0]), batch)
    assert plain.loss.item() == pytest.approx((2 * SP[-1] + SP[-2]) / 3, abs=1e-6)


def test_binary_loss_is_the_same_loss_on_label_pairs():
    """Binarized A > B: [A GOOD, A BAD] scored [1, 0] and [B BAD, B GOOD] scored [0.5, 0.5].
    L = (softplus(0 - 1) + softplus(0.5 - 0.5)) / 2 = (0.313262 + 0.693147) / 2 = 0.503204."""
    batch = batch_of(group([0, 1]), group([0, 1]))
    objective = build_objective(ObjectiveConfig(name="binary"))
    out = objective(scores_only([1.0, 0.0, 0.5, 0.5]), batch)
    assert out.loss.item() == pytest.approx((SP[-1] + SP[0]) / 2, abs=1e-6)
    assert objective.judge == "binary" and not objective.needs_lm_head and objective.targets == "none"


@pytest.mark.parametrize("layout", ["stacked", "shared"])
def test_imitation_targets_are_the_preferred_response_tokens_only(layout):
    """Only response [9] is preferred: its token, predicted from the context's last token 6.
    The context, the end-of-context token and the worse response are not targets."""
    batch = two_responses("response") if layout == "stacked" else batch_of(
        group([1, 0], context=[5, 6], responses=[[7, 8], [9]]), targets="response", layout=layout)
    assert batch.lm_targets.tolist() == [9] and batch.input_ids.reshape(-1)[batch.lm_index].tolist() == [6]
    assert batch.lm_sequence.tolist() == [1] and batch.lm_sequences == 1


def test_pm_plus_lm_targets_are_the_whole_preferred_sample():
    """Every real token after the first: 6 (context), 9 (response), 1 (end of context); not the pad."""
    batch = two_responses("sample")
    assert batch.lm_targets.tolist() == [6, 9, 1]
    assert batch.input_ids.reshape(-1)[batch.lm_index].tolist() == [5, 6, 9]


def test_ties_for_best_give_each_preferred_response_its_targets():
    batch = batch_of(group([0, 0, 1], context=[5], responses=[[7], [8], [9]]), targets="response")
    assert batch.lm_targets.tolist() == [7, 8] and batch.lm_sequences == 2


def test_imitation_loss_sums_the_response_tokens_of_each_preferred_sequence():
    """Two groups, preferred responses of 1 and 2 tokens whose NLL sums to 0.5 + (1 + 2) = 3.5:
    L = 3.5 / 2 sequences = 1.75 ("sum"); 3.5 / 3 tokens with lm_reduction="mean"."""
    batch = batch_of(group([0, 1], responses=[[9], [7]]), group([0, 1], responses=[[7, 8], [9]]),
                     targets="response")
    assert batch.lm_targets.tolist() == [9, 7, 8] and batch.lm_sequences == 2
    objective = build_objective(ObjectiveConfig(name="imitation"))
    out = objective(scores_only([0.0] * 4, lm=3.5), batch)
    assert out.loss.item() == pytest.approx(1.75)
    total, tokens = out.sums["lm_nll_per_token"]
    assert (total / tokens).item() == pytest.approx(3.5 / 3)
    assert objective.needs_lm_head and objective.judge == "logprob" and objective.targets == "response"
    mean = build_objective(ObjectiveConfig(name="imitation", lm_reduction="mean"))
    assert mean(scores_only([0.0] * 4, lm=3.5), batch).loss.item() == pytest.approx(3.5 / 3)


def test_pm_plus_lm_is_lambda_pm_plus_mu_lm():
    """Scores [0, 1] with response 1 preferred: L_PM = softplus(0 - 1) = 0.313262.
    Preferred-sample NLL 1 + 2 + 3 = 6 over 3 tokens: L_LM = mean per token = 2.
    lambda = mu = 1: 2.313262;  lambda = 0.5, mu = 0.1: 0.156631 + 0.2 = 0.356631."""
    batch = two_responses("sample")
    output = scores_only([0.0, 1.0], lm=6.0)
    default = build_objective(ObjectiveConfig(name="ranked", lm_loss=True))
    assert default.needs_lm_head and default.targets == "sample"
    assert default(output, batch).loss.item() == pytest.approx(SP[-1] + 2.0, abs=1e-6)
    weighted = build_objective(ObjectiveConfig(name="ranked", lm_loss=True, pm_weight=0.5, lm_weight=0.1))
    result = weighted(output, batch)
    assert result.loss.item() == pytest.approx(0.5 * SP[-1] + 0.2, abs=1e-6)
    pm_total, pairs = result.sums["pm_loss"]
    assert (pm_total / pairs).item() == pytest.approx(SP[-1], abs=1e-6)


def test_lm_term_without_the_model_lm_output_says_how_to_call_the_model():
    batch = two_responses("sample")
    with pytest.raises(ValueError, match="model_inputs"):
        build_objective(ObjectiveConfig(lm_loss=True))(scores_only([0.0, 1.0]), batch)


@pytest.mark.parametrize("backbone", ["gpt2", "llama"])
def test_the_models_lm_term_matches_the_backbones_own_logits(backbone):
    """The fused LM path inside forward equals -log_softmax(lm_head(hidden)) summed at the targets,
    and the scalar head is still read at the end-of-context token."""
    torch.manual_seed(0)
    model = PreferenceModel.build(ModelConfig(backbone=backbone, preset="tiny"), vocab_size=40, pad_id=0,
                                  eoc_id=1, max_length=16, with_lm_head=True).eval()
    batch = two_responses("sample")
    out = forward(model, batch, lm_index=batch.lm_index, lm_targets=batch.lm_targets)
    logits = model.transformer(input_ids=batch.input_ids, attention_mask=(batch.segment_ids > 0).long()).logits
    logp = torch.log_softmax(logits.float(), -1).reshape(-1, logits.shape[-1])[batch.lm_index]
    expected = -logp.gather(1, batch.lm_targets[:, None]).sum()
    torch.testing.assert_close(out.lm, expected, rtol=1e-5, atol=1e-5)
    per_token = forward(model, batch, lm_index=batch.lm_index, lm_targets=batch.lm_targets, lm_reduction="none").lm
    torch.testing.assert_close(per_token, logp.gather(1, batch.lm_targets[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    plain = forward(model, batch)
    assert plain.lm is None
    torch.testing.assert_close(plain.scores, out.scores)
    out.lm.backward()  # gradients reach the LM head
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
