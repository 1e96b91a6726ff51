"""The experiments end to end at toy sizes (slow), and the synthetic data they rely on."""
import json

import pytest

from rankpm.engine.cli import main
from rankpm.engine.data.synthetic_pmp import generate_groups
from rankpm.engine.data.readers import read_groups
from rankpm.engine.data.transforms import ranked_pairs
from rankpm.engine.score.eval_folder import evaluate_model_folder


def test_the_finetune_source_has_graded_multi_response_rankings():
    groups = generate_groups("finetune", 300, seed=0)
    assert {g.source for g in groups} == {"helpful", "honest", "harmless"} and {g.turns for g in groups} == {1, 2}
    assert all(ranked_pairs(g) for g in groups)  # every group has at least one pair
    graded = [g for g in groups if len(set(g.ranks)) >= 3]
    assert len(graded) > 30  # three or more quality levels: more than a good/bad label can say
    assert generate_groups("finetune", 5, seed=0)[0] == groups[0]  # deterministic by seed


def test_the_pretraining_source_is_distinct_and_noisier():
    groups = generate_groups("pretrain", 200, seed=0)
    assert {g.source for g in groups} == {"forum"}
    assert all(g.context.startswith("Question:") and "Human:" not in g.context for g in groups)


@pytest.mark.slow
def test_objectives_experiment_runs_and_writes_its_table_and_plot(tmp_path, capsys):
    out = tmp_path / "objectives"
    assert main(["experiment", "objectives", "--out", str(out), "--sizes", "xxs", "--train-groups", "40",
                 "--eval-groups", "12", "--steps", "3", "--max-length", "128", "--sequences-per-step", "12"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["objective"] for r in rows] == ["ranked", "binary", "imitation"]
    assert [r["judge"] for r in rows] == ["score", "binary", "logprob"]
    # each row is its own model's evaluation on every pair of the held-out file, with its judge:
    # what `rankpm eval` reports for that model folder
    eval_pairs = sum(len(ranked_pairs(g)) for g in read_groups([out / "data" / "eval.jsonl"]))
    for row in rows:
        again = evaluate_model_folder(out / "runs" / f"xxs-{row['objective']}" / "model",
                                      [str(out / "data" / "eval.jsonl")])
        assert row["pairs"] == again["eval_pairs"] == eval_pairs
        assert row["accuracy"] == pytest.approx(again["eval_accuracy"], abs=1e-6) and again["judge"] == row["judge"]
    assert (out / "accuracy_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    assert "| xxs |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_pmp_experiment_runs_both_pmp_variants_and_fine_tunes_from_them(tmp_path):
    out = tmp_path / "pmp"
    assert main(["experiment", "pmp", "--out", str(out), "--sizes", "16", "--pretrain-groups", "40",
                 "--pretrain-steps", "3", "--finetune-groups", "16", "--eval-groups", "12",
                 "--min-finetune-steps", "2", "--max-finetune-steps", "2", "--model-size", "xxs",
                 "--max-length", "128", "--sequences-per-step", "12"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["pmp"] for r in result["pmp"]] == ["ranked", "binary"]
    assert [r["pmp"] for r in result["rows"]] == ["none", "ranked", "binary"]
    stage = json.loads((out / "runs" / "ft-16-binary" / "model" / "rankpm_model.json").read_text())
    assert stage["config"]["model"]["init_from"].endswith("pmp-binary/model")
    assert (out / "accuracy_vs_comparisons.png").is_file()


@pytest.mark.slow
def test_distill_experiment_pretrains_caches_distills_and_measures_every_model(tmp_path):
    out = tmp_path / "distill"
    assert main(["experiment", "distill", "--out", str(out), "--groups", "40", "--distill-groups", "8",
                 "--eval-groups", "8", "--lm-steps", "3", "--distill-steps", "4", "--batch", "4", "--size", "xxs"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in result["rows"]] == ["LM, no prompt (before)", "teacher: LM with the prompt",
                                                    "student, top-k cache", "student, sampled cache"]
    assert result["rows"][1]["full_kl_to_teacher"] == pytest.approx(0.0, abs=1e-9)  # the teacher against itself
    topk, sampled = result["caches"]["topk"], result["caches"]["sampled"]
    assert sampled["mode"] == "sampled" and abs(sampled["bytes_per_token"] - topk["bytes_per_token"]) < 4  # equal bytes
    assert all(len(curve) >= 2 for curve in result["curves"].values())  # the held-out KL during training
    # the students are rankpm model folders that `rankpm eval` reads with the log-prob judge
    again = evaluate_model_folder(out / "student_topk" / "model", [str(out / "data" / "eval_plain.jsonl")])
    assert again["judge"] == "logprob" and again["eval_accuracy"] == pytest.approx(result["rows"][2]["comparison_accuracy"])
    assert (out / "distill.png").read_bytes()[:4] == b"\x89PNG"
