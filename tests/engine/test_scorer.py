"""The scorer: a model's own judge, batched like one-at-a-time, cut like training, normalised
in the units it returns."""
import json

import pytest

from rankpm.engine.config import from_dict
from rankpm.engine.data.readers import read_groups
from rankpm.engine.data.synthetic_pmp import generate_groups, write_jsonl
from rankpm.engine.score.eval_folder import evaluate_model_folder
from rankpm.engine.score.scorer import RewardScorer
from rankpm.engine.train.loop import train


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A ranked, a binary and an imitation model, two steps each, on the same small data."""
    root = tmp_path_factory.mktemp("scorer")
    data = write_jsonl(generate_groups("finetune", 24, seed=0), root / "data.jsonl")
    out = {}
    for name in ("ranked", "binary", "imitation"):
        train(from_dict({
            "model": {"backbone": "gpt2", "preset": "tiny"},
            "data": {"train": [str(data)], "eval": [str(data)], "max_length": 96, "batch_groups": 4},
            "objective": {"name": name},
            "train": {"out_dir": str(root / name), "max_steps": 2, "warmup_steps": 1, "progress": False},
        }))
        out[name] = root / name / "model"
    return out, data


@pytest.mark.parametrize("name, judge", [("ranked", "score"), ("binary", "binary"), ("imitation", "logprob")])
def test_batched_scores_equal_one_at_a_time_and_follow_the_models_judge(models, name, judge):
    folders, data = models
    groups = [(g.context, g.responses) for g in read_groups([data])]
    batched = RewardScorer.from_folder(folders[name], tokens_per_batch=300)  # several batches
    assert batched.judge == judge
    together = batched.score_groups(groups)
    alone = [batched.score(context, responses) for context, responses in groups]
    assert [len(s) for s in together] == [len(r) for _, r in groups]
    for a, b in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("name", ["ranked", "binary", "imitation"])
def test_the_saved_statistics_are_in_the_units_the_scorer_returns(models, name):
    """The model folder's score_mean/score_std come from its judge on the evaluation set; the
    scorer's own scores of that set have the same mean and spread, so normalising is consistent."""
    folders, data = models
    meta = json.loads((folders[name] / "rankpm_model.json").read_text())["score_stats"]
    scorer = RewardScorer.from_folder(folders[name])
    scores = [s for g in read_groups([data]) for s in scorer.score(g.context, g.responses)]
    mean = sum(scores) / len(scores)
    std = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
    assert mean == pytest.approx(meta["score_mean"], rel=1e-4, abs=1e-5)
    assert std == pytest.approx(meta["score_std"], rel=1e-4, abs=1e-5)
    centred = scorer.score_groups([(g.context, g.responses) for g in read_groups([data])], normalize="standardize")
    flat = [s for group in centred for s in group]
    assert sum(flat) / len(flat) == pytest.approx(0.0, abs=1e-4)


def test_the_scorer_agrees_with_rankpm_eval_pair_by_pair(models, tmp_path):
    """Scoring texts and evaluating prepared data are the same path: the same accuracy."""
    folders, data = models
    scorer = RewardScorer.from_folder(folders["ranked"])
    right = total = 0
    for g in read_groups([data]):
        s = scorer.score(g.context, g.responses)
        for i, ri in enumerate(g.ranks):
            for j, rj in enumerate(g.ranks):
                if ri < rj:
                    right += s[i] > s[j]
                    total += 1
    report = evaluate_model_folder(folders["ranked"], [str(data)])
    assert report["eval_pairs"] == total and report["eval_accuracy"] == pytest.approx(right / total, abs=1e-6)


def test_over_long_inputs_are_cut_as_training_cut_them(models):
    folders, _ = models
    scorer = RewardScorer.from_folder(folders["ranked"])  # max_length 96, truncation left
    response = " a fine answer"
    long, kept = "x" * 500 + "\n\nHuman: hi\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:"
    # the cut keeps the context's end: 96 - len(response) - 1 bytes of it
    end = long[-(96 - len(response) - 1):]
    assert scorer.score(long, [response]) == pytest.approx(scorer.score(end, [response]), abs=1e-6)
    assert scorer.score(kept, [response]) != pytest.approx(scorer.score(long, [response]), abs=1e-6)


def test_bf16_scores_track_fp32(models):
    folders, data = models
    groups = [(g.context, g.responses) for g in read_groups([data])][:4]
    fp32 = RewardScorer.from_folder(folders["ranked"]).score_groups(groups)
    bf16 = RewardScorer.from_folder(folders["ranked"], dtype="bf16").score_groups(groups)
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, abs=0.1 * max(1.0, max(abs(x) for x in a)))
