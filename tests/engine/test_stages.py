"""Stages: each stage's config is the run's merged with the stage's, chained to the previous model."""
import pytest
import torch

from rankpm.engine.config import ConfigError, ModelConfig, from_dict
from rankpm.engine.model.preference_model import PreferenceModel
from rankpm.engine.train.stages import run_stages, stage_configs


def two_stage(tmp_path, **second):
    return {
        "model": {"backbone": "gpt2", "preset": "tiny"},
        "data": {"train": ["base.jsonl"], "eval": ["eval.jsonl"], "max_length": 64},
        "objective": {"name": "ranked"},
        "train": {"out_dir": str(tmp_path / "run"), "lr": 1e-3, "epochs": 3},
        "stages": [
            {"name": "pmp", "data": {"train": ["pretrain.jsonl"]}, "objective": {"name": "binary", "lm_loss": True},
             "train": {"epochs": 1}, "lr_scale": 0.1},
            {"name": "finetune", "data": {"train": ["finetune.jsonl"]}, "objective": {"lm_loss": True},
             "lr_scale": 0.01, **second},
        ],
    }


def test_each_stage_merges_its_sections_over_the_run_and_scales_the_lr(tmp_path):
    pmp, finetune = stage_configs(from_dict(two_stage(tmp_path)))
    assert pmp.data.train == ["pretrain.jsonl"] and pmp.data.eval == ["eval.jsonl"]
    assert (pmp.objective.name, pmp.objective.lm_loss) == ("binary", True)
    assert pmp.train.epochs == 1 and pmp.train.lr == pytest.approx(1e-4)
    # the second stage merges over the run, not over the first stage: its objective name is the run's
    assert (finetune.objective.name, finetune.objective.lm_loss) == ("ranked", True)
    assert finetune.train.epochs == 3 and finetune.train.lr == pytest.approx(1e-5)
    assert pmp.train.out_dir == str(tmp_path / "run" / "stages" / "0-pmp")
    assert finetune.train.out_dir == str(tmp_path / "run" / "stages" / "1-finetune")


def test_a_later_stage_starts_from_the_previous_model_and_its_tokenizer(tmp_path):
    pmp, finetune = stage_configs(from_dict(two_stage(tmp_path)))
    assert pmp.model.init_from is None
    assert finetune.model.init_from == str(tmp_path / "run" / "stages" / "0-pmp" / "model")
    assert finetune.data.tokenizer == str(tmp_path / "run" / "stages" / "0-pmp" / "model" / "tokenizer")


def test_stage_errors_name_the_stage_and_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[1\] \(finetune\): objective.name: got 'dpo'"):
        from_dict(two_stage(tmp_path, objective={"name": "dpo"}))
    with pytest.raises(ConfigError, match=r"stages\[1\] \(finetune\): give train.lr or lr_scale, not both"):
        from_dict(two_stage(tmp_path, train={"lr": 1.0}))
    with pytest.raises(ConfigError, match=r"stages\[1\] \(finetune\): unknown key data.trian"):
        from_dict(two_stage(tmp_path, data={"trian": ["x"]}))


def test_init_from_carries_every_weight_over(tmp_path):
    torch.manual_seed(0)
    first = PreferenceModel.build(ModelConfig(preset="tiny"), vocab_size=50, pad_id=0, eoc_id=1, max_length=32,
                                  with_lm_head=True)
    first.save(tmp_path / "model")
    torch.manual_seed(1)  # a fresh build would differ
    second = PreferenceModel.build(ModelConfig(init_from=str(tmp_path / "model")), vocab_size=50, pad_id=0,
                                   eoc_id=1, max_length=32, with_lm_head=False)
    assert not second.has_lm_head
    a = {k: v for k, v in first.state_dict().items() if not k.startswith("transformer.lm_head")}
    b = second.state_dict()
    assert len(b) > 0
    for name, value in b.items():
        key = name.replace("transformer.", "transformer.transformer.", 1) if name not in a else name
        torch.testing.assert_close(value, a[key], msg=name)
    with pytest.raises(ValueError, match="has 50 token embeddings, the tokenizer has 60"):
        PreferenceModel.build(ModelConfig(init_from=str(tmp_path / "model")), vocab_size=60, pad_id=0,
                              eoc_id=1, max_length=32)


def test_run_stages_runs_each_stage_in_order_and_skips_finished_ones(tmp_path):
    cfg = from_dict(two_stage(tmp_path))
    seen = []

    def runner(stage_cfg):
        seen.append((stage_cfg.train.out_dir, stage_cfg.model.init_from))
        return {"eval_accuracy": 0.5 + 0.1 * len(seen), "model": stage_cfg.train.out_dir + "/model"}

    result = run_stages(cfg, runner, report=False)
    assert [s["stage"] for s in result["stages"]] == ["pmp", "finetune"]
    assert seen[1][1] == seen[0][0] + "/model"
    assert result["eval_accuracy"] == pytest.approx(0.7)
    run_stages(cfg, runner, report=False)  # both finished: nothing runs again
    assert len(seen) == 2


def test_stage_chaining_carries_the_weights_over_and_one_report_covers_both(tmp_path):
    """Stage 2 trains at a vanishing learning rate, so its final weights are stage 1's."""
    cfg = from_dict({
        "model": {"backbone": "gpt2", "preset": "tiny"},
        "data": {"synthetic": {"train_groups": 24, "eval_groups": 8, "seed": 1}, "max_length": 128,
                 "batch_groups": 4, "shuffle_buffer": 8},
        "train": {"out_dir": str(tmp_path / "run"), "lr": 2e-3, "max_steps": 2, "warmup_steps": 1,
                  "log_every": 1, "progress": False},
        "stages": [{"name": "pmp", "objective": {"name": "binary", "lm_loss": True}},
                   {"name": "finetune", "objective": {"name": "ranked"}, "lr_scale": 1e-12}],
    })
    result = run_stages(cfg)
    first = PreferenceModel.load(tmp_path / "run" / "stages" / "0-pmp" / "model", with_lm_head=False)
    second = PreferenceModel.load(tmp_path / "run" / "stages" / "1-finetune" / "model")
    assert not second.has_lm_head
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    import json
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert [(s["name"], s["judge"]) for s in report["sections"]] == [("pmp", "binary"), ("finetune", "score")]
    assert result["report"] == str(tmp_path / "run" / "report")
    # the binary stage trained on binarized pairs and was evaluated on label-expanded groups
    data = tmp_path / "run" / "stages" / "0-pmp" / "data"
    assert (data / "train_binarize.jsonl").is_file() and (data / "eval_label_expand.jsonl").is_file()
