"""model.freeze_backbone: a fixed backbone, only the score head trains (the paper's question of
what a pre-trained representation already knows, asked with a linear probe)."""
import pytest
import torch

from rankpm.engine.config import ConfigError, from_dict
from rankpm.engine.model.preference_model import PreferenceModel
from rankpm.engine.train.loop import train


def config(out_dir, **model):
    return from_dict({
        "model": {"backbone": "gpt2", "preset": "tiny", "overrides": {"num_hidden_layers": 1}, **model},
        "data": {"synthetic": {"train_groups": 48, "eval_groups": 16, "seed": 5}, "max_length": 160,
                 "batch_groups": 8, "shuffle_buffer": 16},
        "train": {"out_dir": str(out_dir), "lr": 1e-2, "warmup_steps": 0, "max_steps": 3, "log_every": 1,
                  "progress": False, "weight_decay": 0.1},
    })


def test_a_frozen_backbone_keeps_every_weight_and_only_the_score_head_moves(tmp_path):
    start = train(config(tmp_path / "start"))["model"]
    frozen = train(config(tmp_path / "frozen", init_from=start, freeze_backbone=True))["model"]
    trained = train(config(tmp_path / "trained", init_from=start))["model"]  # the same run, unfrozen
    before, after, moved = (PreferenceModel.load(m) for m in (start, frozen, trained))
    for (name, a), b in zip(before.transformer.state_dict().items(), after.transformer.state_dict().values()):
        assert torch.equal(a, b), name  # no gradient, no optimizer state, so no weight decay either
    assert not torch.equal(before.score_head.weight, after.score_head.weight)
    assert not torch.equal(before.transformer.get_input_embeddings().weight,
                           moved.transformer.get_input_embeddings().weight)


@pytest.mark.parametrize("objective", [{"name": "imitation"}, {"name": "ranked", "lm_loss": True}])
def test_a_frozen_backbone_refuses_an_objective_that_trains_the_lm_head(tmp_path, objective):
    raw = config(tmp_path).to_dict()
    raw.pop("stages")
    raw["model"]["freeze_backbone"] = True
    raw["objective"] = objective
    with pytest.raises(ConfigError, match="model.freeze_backbone: got True"):
        from_dict(raw)


def test_a_checkpoint_written_before_the_key_existed_resumes_when_it_is_left_at_its_default():
    from rankpm.engine.train.resume import run_changes

    now = config("runs/x").to_dict()
    stored = {**now, "model": {k: v for k, v in now["model"].items() if k != "freeze_backbone"}}
    assert run_changes(stored, now) == {}
    frozen = {**now, "model": {**now["model"], "freeze_backbone": True}}
    assert run_changes(stored, frozen) == {"model.freeze_backbone": ["<absent>", True]}
