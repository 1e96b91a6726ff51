"""Each objective's loss on tiny cases worked out by hand, IL masking, and the LM path.

softplus values used below: softplus(-2) = 0.126928, softplus(-1) = 0.313262,
softplus(0) = ln 2 = 0.693147.
"""
import math

import pytest
import torch

from rankpm.engine.config import ModelConfig, ObjectiveConfig
from rankpm.engine.data.schema import Batch
from rankpm.engine.model.preference_model import IGNORE_INDEX, ModelOutput, PreferenceModel
from rankpm.engine.train.objectives import build_objective, lm_targets, preferred_sequences

SP = {-2: 0.126928, -1: 0.313262, 0: math.log(2)}
X = IGNORE_INDEX


def batch_of(input_ids, attention_mask, response_mask, ranks, offsets):
    input_ids = torch.tensor(input_ids)
    attention_mask = torch.tensor(attention_mask)
    return Batch(input_ids=input_ids, attention_mask=attention_mask,
                 score_index=attention_mask.sum(1) - 1,
                 response_mask=torch.tensor(response_mask, dtype=torch.bool),
                 group_offsets=torch.tensor(offsets), ranks=torch.tensor(ranks),
                 margin=torch.zeros(len(offsets) - 1), ratings=torch.zeros(len(ranks)),
                 turns=torch.ones(len(offsets) - 1, dtype=torch.long))


def two_responses():
    """One group: seq 0 = ctx [5 6] + resp [7 8] + eoc 1 (rank 1, worse);
    seq 1 = ctx [5 6] + resp [9] + eoc 1, padded with 0 (rank 0, preferred)."""
    return batch_of(input_ids=[[5, 6, 7, 8, 1], [5, 6, 9, 1, 0]],
                    attention_mask=[[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]],
                    response_mask=[[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]],
                    ranks=[1, 0], offsets=[0, 2])


def scores_only(scores, batch):
    return ModelOutput(torch.tensor(scores), torch.zeros(batch.input_ids.shape + (1,)))


def test_ranked_loss_is_the_mean_softplus_over_all_ranked_pairs():
    """Scores [2, 1, 0] ranked [0, 1, 2]: pairs (0,1) (0,2) (1,2) with r_w - r_b = -1, -2, -1.
    L = (0.313262 + 0.126928 + 0.313262) / 3 = 0.251151."""
    batch = batch_of([[1]] * 3, [[1]] * 3, [[0]] * 3, ranks=[0, 1, 2], offsets=[0, 3])
    out = build_objective(ObjectiveConfig(name="ranked"))(scores_only([2.0, 1.0, 0.0], batch), batch)
    assert out.loss.item() == pytest.approx((2 * SP[-1] + SP[-2]) / 3, abs=1e-6)
    total, count = out.sums["pair_accuracy"]
    assert (total / count).item() == 1.0 and count.item() == 3


def test_rating_margins_add_the_scaled_rating_gap_of_each_pair():
    """Scores [2, 1, 0] ranked [0, 1, 2], ratings [5, 4, 2], rating_margin 0.5: pair margins
    0.5 * (5-4, 5-2, 4-2) = 0.5, 1.5, 1, so r_w - r_b + m = -0.5, -0.5, 0.
    L = (2 softplus(-0.5) + softplus(0)) / 3 = (2 * 0.474077 + 0.693147) / 3 = 0.547100.
    Without rating_margin the ratings change nothing."""
    batch = batch_of([[1]] * 3, [[1]] * 3, [[0]] * 3, ranks=[0, 1, 2], offsets=[0, 3])
    batch.ratings = torch.tensor([5.0, 4.0, 2.0])
    out = build_objective(ObjectiveConfig(rating_margin=0.5))(scores_only([2.0, 1.0, 0.0], batch), batch)
    assert out.loss.item() == pytest.approx((2 * math.log1p(math.exp(-0.5)) + SP[0]) / 3, abs=1e-6)
    plain = build_objective(ObjectiveConfig())(scores_only([2.0, 1.0, 0.0], batch), batch)
    assert plain.loss.item() == pytest.approx((2 * SP[-1] + SP[-2]) / 3, abs=1e-6)


def test_binary_loss_is_the_same_loss_on_label_pairs():
    """Binarized A > B: [A GOOD, A BAD] scored [1, 0] and [B BAD, B GOOD] scored [0.5, 0.5].
    L = (softplus(0 - 1) + softplus(0.5 - 0.5)) / 2 = (0.313262 + 0.693147) / 2 = 0.503204."""
    batch = batch_of([[1]] * 4, [[1]] * 4, [[0]] * 4, ranks=[0, 1, 0, 1], offsets=[0, 2, 4])
    objective = build_objective(ObjectiveConfig(name="binary"))
    out = objective(scores_only([1.0, 0.0, 0.5, 0.5], batch), batch)
    assert out.loss.item() == pytest.approx((SP[-1] + SP[0]) / 2, abs=1e-6)
    assert objective.judge == "binary" and not objective.needs_lm_head


def test_the_preferred_sequence_is_the_best_rank_of_each_group_ties_included():
    ranks, offsets = torch.tensor([1, 0, 2, 0, 0, 3]), torch.tensor([0, 3, 6])
    assert preferred_sequences(ranks, offsets).tolist() == [False, True, False, True, True, False]


def test_imitation_targets_are_the_preferred_response_tokens_only():
    # Position t predicts token t+1. Only seq 1 is preferred; its response is the single token 9
    # at position 2, predicted from position 1. Context, end-of-context and the worse response: ignored.
    batch = two_responses()
    assert lm_targets(batch, response_only=True).tolist() == [[X, X, X, X, X], [X, 9, X, X, X]]


def test_pm_plus_lm_targets_are_the_whole_preferred_sample():
    # every real token after the first: 6 (context), 9 (response), 1 (end of context); not the pad
    batch = two_responses()
    assert lm_targets(batch, response_only=False).tolist() == [[X, X, X, X, X], [6, 9, 1, X, X]]


def test_imitation_loss_sums_the_response_tokens_of_each_preferred_sequence():
    """Two groups, preferred responses of 1 and 2 tokens with log-probs -0.5 and (-1, -2).
    L = ((0.5) + (1 + 2)) / 2 sequences = 1.75; the worse responses' log-probs never count."""
    ids = torch.tensor([[5, 9, 1, 0], [5, 7, 1, 0], [5, 7, 8, 1], [5, 9, 1, 0]])
    attn = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    resp = [[0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 0, 0]]
    batch = batch_of(ids.tolist(), attn.tolist(), resp, ranks=[0, 1, 0, 1], offsets=[0, 2, 4])
    objective = build_objective(ObjectiveConfig(name="imitation"))
    targets = objective.model_inputs(batch)["lm_targets"]
    assert targets.tolist() == [[9, X, X, X], [X, X, X, X], [7, 8, X, X], [X, X, X, X]]
    # what the model returns: the log-prob of each target, 0 where the target is ignored
    logprobs = torch.tensor([[-0.5, 0, 0, 0], [0, 0, 0, 0], [-1.0, -2.0, 0, 0], [0, 0, 0, 0]])
    out = objective(ModelOutput(torch.zeros(4), torch.zeros(4, 4, 1), logprobs), batch)
    assert out.loss.item() == pytest.approx(1.75)
    total, tokens = out.sums["lm_nll_per_token"]
    assert (total / tokens).item() == pytest.approx(3.5 / 3)
    assert objective.needs_lm_head and objective.judge == "logprob"
    mean = build_objective(ObjectiveConfig(name="imitation", lm_reduction="mean"))
    assert mean(ModelOutput(torch.zeros(4), torch.zeros(4, 4, 1), logprobs), batch).loss.item() == pytest.approx(3.5 / 3)


def test_pm_plus_lm_is_lambda_pm_plus_mu_lm():
    """Scores [0, 1] with seq 1 preferred: L_PM = softplus(0 - 1) = 0.313262.
    Preferred-sample log-probs (-1, -2, -3): L_LM = mean per token = 2.
    lambda = mu = 1: 2.313262;  lambda = 0.5, mu = 0.1: 0.156631 + 0.2 = 0.356631."""
    batch = two_responses()
    logprobs = torch.tensor([[0, 0, 0, 0, 0], [-1.0, -2.0, -3.0, 0, 0]])
    output = ModelOutput(torch.tensor([0.0, 1.0]), torch.zeros(2, 5, 1), logprobs)
    default = build_objective(ObjectiveConfig(name="ranked", lm_loss=True))
    assert default.needs_lm_head
    assert default(output, batch).loss.item() == pytest.approx(SP[-1] + 2.0, abs=1e-6)
    weighted = build_objective(ObjectiveConfig(name="ranked", lm_loss=True, pm_weight=0.5, lm_weight=0.1))
    result = weighted(output, batch)
    assert result.loss.item() == pytest.approx(0.5 * SP[-1] + 0.2, abs=1e-6)
    pm_total, pairs = result.sums["pm_loss"]
    assert (pm_total / pairs).item() == pytest.approx(SP[-1], abs=1e-6)


def test_lm_term_without_token_logprobs_says_how_to_call_the_model():
    batch = two_responses()
    with pytest.raises(ValueError, match="model_inputs"):
        build_objective(ObjectiveConfig(lm_loss=True))(scores_only([0.0, 1.0], batch), batch)


@pytest.mark.parametrize("backbone", ["gpt2", "llama"])
def test_model_token_logprobs_match_the_backbones_own_logits(backbone):
    """The fused LM path inside forward equals log_softmax(lm_head(hidden)) at the targets, and
    the scalar head is still read at the end-of-context token."""
    torch.manual_seed(0)
    model = PreferenceModel.build(ModelConfig(backbone=backbone, preset="tiny"), vocab_size=40, pad_id=0,
                                  eoc_id=1, max_length=16, with_lm_head=True).eval()
    batch = two_responses()
    targets = lm_targets(batch, response_only=False)
    out = model(batch.input_ids, batch.attention_mask, batch.score_index, lm_targets=targets)
    logits = model.transformer(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    expected = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = torch.where(targets == X, 0.0, expected)
    torch.testing.assert_close(out.token_logprobs, expected, rtol=1e-5, atol=1e-5)
    plain = model(batch.input_ids, batch.attention_mask, batch.score_index)
    assert plain.token_logprobs is None
    torch.testing.assert_close(plain.scores, out.scores)
    out.token_logprobs.sum().backward()  # gradients reach the LM head
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
