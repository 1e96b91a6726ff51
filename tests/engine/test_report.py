"""The report: pair accuracy by source and turns, binary and log-prob judges, the report folder."""
import json

import pytest
import torch

from rankpm.engine.data.collate import collate
from rankpm.engine.score.judges import binary_logits
from rankpm.engine.model.preference_model import ModelOutput
from rankpm.engine.score.report import analyse, collect_pairs, write_report


class FixedScores(torch.nn.Module):
    """A 'model' whose score for a response is the first token of its row, and whose target
    log-probs are -(target id) / 10 (so shorter, smaller-id responses have the higher mean)."""

    def forward(self, input_ids, position_ids, segment_ids, part_ids, score_index, *, layout, lm_index=None,
                lm_targets=None, lm_reduction="sum"):
        lm = None if lm_targets is None else -lm_targets.float() / 10
        return ModelOutput(input_ids[:, 0].float(), torch.zeros(input_ids.shape + (1,)), lm)


def batch(first_tokens, ranks, offsets, sources, turns):
    """One response row per first token: [t, 2, eoc]; the response is token 2."""
    groups = []
    for g in range(len(offsets) - 1):
        lo, hi = offsets[g], offsets[g + 1]
        groups.append({"id": f"g{g}", "source": sources[g], "turns": turns[g], "margin": None, "ratings": None,
                       "ranks": ranks[lo:hi], "context_ids": [], "response_ids": [[t, 2] for t in first_tokens[lo:hi]]})
    return collate(groups, pad_id=0, eoc_id=1, targets="all_responses")


def test_accuracy_overall_by_source_and_by_turns():
    # group a (source x, 1 turn): scores 3 > 1 > 2 with ranks 0, 1, 2 -> pairs right, right, wrong
    # group b (source y, 2 turns): scores 5, 5 with ranks 0, 1 -> an exact tie counts wrong
    b = batch([3, 1, 2, 5, 5], ranks=[0, 1, 2, 0, 1], offsets=[0, 3, 5], sources=["x", "y"], turns=[1, 2])
    section = analyse(collect_pairs(FixedScores(), [b]), name="t")
    assert section["pairs"] == 4 and section["accuracy"] == pytest.approx(2 / 4)
    assert section["by_source"] == {"x": {"pairs": 3, "accuracy": pytest.approx(2 / 3)},
                                    "y": {"pairs": 1, "accuracy": 0.0}}
    assert section["by_turns"] == {"1": {"pairs": 3, "accuracy": pytest.approx(2 / 3)},
                                   "2": {"pairs": 1, "accuracy": 0.0}}
    assert section["score_stats_by_source"]["y"] == {"n": 2, "mean": 5.0, "std": 0.0}
    assert section["score_mean"] == pytest.approx(16 / 5)


def test_binary_judge_compares_p_good_of_each_response():
    # label-expanded: response 0 -> (x0+GOOD, x0+BAD) scored (2, 0): logit 2; response 1 -> (4, 3): logit 1
    judged = binary_logits(torch.tensor([2.0, 0.0, 4.0, 3.0]), torch.tensor([0, 0, 1, 1]),
                           torch.tensor([0, 4]), torch.zeros(1))
    assert judged.scores.tolist() == [2.0, 1.0] and judged.ranks.tolist() == [0, 1]
    assert judged.group_offsets.tolist() == [0, 2]
    with pytest.raises(ValueError, match="label-expanded"):
        binary_logits(torch.zeros(3), torch.zeros(3), torch.tensor([0, 3]), torch.zeros(1))


def test_logprob_judge_uses_the_mean_log_prob_of_the_response_tokens():
    # the predicted response token is 2 for both -> equal mean log-probs -> the tie is wrong
    b = batch([9, 1], ranks=[0, 1], offsets=[0, 2], sources=["x"], turns=[1])
    data = collect_pairs(FixedScores(), [b], judge="logprob")
    assert data.scores == pytest.approx([-0.2, -0.2]) and data.gaps == [0.0]


def test_the_report_folder_holds_json_markdown_and_pngs(tmp_path):
    b = batch([3, 1, 2, 5, 4], ranks=[0, 1, 2, 0, 1], offsets=[0, 3, 5], sources=["x", "y"], turns=[1, 2])
    sections = [analyse(collect_pairs(FixedScores(), [b]), name="stage 1"),
                analyse(collect_pairs(FixedScores(), [b]), name="stage2")]
    write_report(tmp_path, sections, extra={"model": "m"})
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text  # strict JSON: empty calibration bins are null
    report = json.loads(text)
    assert [s["name"] for s in report["sections"]] == ["stage 1", "stage2"]
    assert report["sections"][0]["images"] == {"reliability": "reliability_stage_1.png", "scores": "scores_stage_1.png"}
    assert report["sections"][0]["calibration"]["bins"][0]["frequency"] is None
    for name in ("reliability_stage_1.png", "scores_stage_1.png", "reliability_stage2.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "report.md").read_text()
    assert "| stage 1 | score | 4 | 0.7500 |" in md and "![reliability](reliability_stage2.png)" in md
