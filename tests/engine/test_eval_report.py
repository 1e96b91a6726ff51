"""`rankpm eval` with a report folder, the judge of the model's objective, and BIG-bench files."""
import json

import pytest

from rankpm.engine.cli import main
from rankpm.engine.config import from_dict
from rankpm.engine.data.synthetic_pmp import generate_groups, write_jsonl
from rankpm.engine.train.loop import train


@pytest.fixture(scope="module")
def binary_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("binary")
    data = write_jsonl(generate_groups("finetune", 24, seed=0), root / "train.jsonl")
    train(from_dict({
        "model": {"backbone": "gpt2", "preset": "tiny"},
        "data": {"train": [str(data)], "eval": [str(data)], "max_length": 128, "batch_groups": 4},
        "objective": {"name": "binary", "labels": {"good": " :)", "bad": " :("}},
        "train": {"out_dir": str(root / "run"), "max_steps": 2, "warmup_steps": 1, "progress": False},
    }))
    return root / "run" / "model", root


def test_eval_writes_the_report_folder_with_the_models_own_judge(binary_model, capsys):
    model, root = binary_model
    data = write_jsonl(generate_groups("finetune", 10, seed=5), root / "eval.jsonl")
    assert main(["eval", str(model), str(data), "--out", str(root / "e1"), "--report", str(root / "r1")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["judge"] == "binary" and out["eval_pairs"] > 0 and "ece" in out
    expanded = (root / "e1" / "label_expanded.jsonl").read_text().splitlines()
    first = json.loads(expanded[0])
    assert first["responses"][0].endswith(" :)") and first["responses"][1].endswith(" :(")
    report = json.loads((root / "r1" / "report.json").read_text())
    assert report["sections"][0]["judge"] == "binary"
    assert set(report["checkpoint_score_stats"]) == {"score_mean", "score_std"}
    assert {p.name for p in (root / "r1").iterdir()} >= {"report.json", "report.md", "reliability_eval.png",
                                                        "scores_eval.png"}


def test_eval_reads_bigbench_multiple_choice_tasks(binary_model, tmp_path, capsys):
    model, _ = binary_model
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"name": "hhh_tiny", "examples": [
        {"input": "Human: Help me?\n\nAssistant:", "target_scores": {" Sure, happy to help!": 1, " No.": 0}},
        {"input": "Human: Is it safe?\n\nAssistant:", "target_scores": {" Yes.": 0, " Let me check.": 1, " Eh": 0}},
    ]}))
    assert main(["eval", str(model), str(task), "--bigbench", "--out", str(tmp_path / "e"), "--judge", "binary",
                 "--report", str(tmp_path / "r")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["eval_pairs"] == 1 + 2
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert list(report["sections"][0]["by_source"]) == ["hhh_tiny"]


def test_scores_are_centred_or_standardised_only_on_request(binary_model):
    from rankpm.engine.model.preference_model import PreferenceModel
    from rankpm.engine.score.scorer import RewardScorer

    model, _ = binary_model
    stats = PreferenceModel.read_meta(model)["score_stats"]
    scorer = RewardScorer.from_folder(model)
    raw = scorer.score("Human: hi\n\nAssistant:", [" Hello!", " Go away."])
    assert scorer.score("Human: hi\n\nAssistant:", [" Hello!", " Go away."], normalize="center") == pytest.approx(
        [r - stats["score_mean"] for r in raw])
    assert scorer.score("Human: hi\n\nAssistant:", [" Hello!", " Go away."], normalize="standardize") == pytest.approx(
        [(r - stats["score_mean"]) / stats["score_std"] for r in raw])
    scorer.score_stats = {}
    with pytest.raises(ValueError, match="stores no score statistics"):
        scorer.score("x", ["y"], normalize="center")


@pytest.mark.parametrize("context, responses, error, message", [
    ("ctx", "a string", TypeError, r"responses: expected a list of strings, got one string; score a single response "
                                   r"as score\(context, \[response\]\)"),
    ("ctx", [], ValueError, r"responses: the list is empty"),
    ("ctx", ["fine", 3], TypeError, r"responses\[1\]: expected a string, got int"),
    ("ctx", None, TypeError, r"responses: expected a list of strings, got NoneType"),
    (["ctx"], ["a"], TypeError, r"context: expected a string, got list"),
])
def test_the_scorer_refuses_what_it_would_score_wrongly(binary_model, context, responses, error, message):
    from rankpm.engine.score.scorer import RewardScorer

    scorer = RewardScorer.from_folder(binary_model[0])
    with pytest.raises(error, match=message):
        scorer.score(context, responses)
    assert len(scorer.score("ctx", ("a", ""))) == 2  # a tuple is a list of responses; an empty one is a response
