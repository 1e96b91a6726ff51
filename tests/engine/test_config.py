"""Config: YAML onto typed sections; every bad key or value named in the error."""
from pathlib import Path

import pytest

from rankpm.engine.config import ConfigError, RunConfig, load_config


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_maps_onto_typed_sections(tmp_path):
    cfg = load_config(write(tmp_path, """
model: {backbone: llama, preset: small}
data: {train: [a.jsonl, b.jsonl], batch_groups: 4}
train: {lr: 1e-4, betas: [0.9, 0.99], max_steps: 10}
"""))
    assert isinstance(cfg, RunConfig)
    assert cfg.model.backbone == "llama" and cfg.model.preset == "small"
    assert cfg.data.train == ["a.jsonl", "b.jsonl"] and cfg.data.batch_groups == 4
    assert cfg.train.lr == 1e-4  # YAML reads "1e-4" as a string; the float field converts it
    assert cfg.train.betas == (0.9, 0.99)
    assert cfg.objective.name == "ranked"  # defaults fill what the file leaves out


def test_overrides_apply_on_top(tmp_path):
    cfg = load_config(write(tmp_path, "data: {train: x.jsonl}\n"),
                      ["train.lr=3e-4", "data.synthetic.train_groups=10", "cluster.workers=2"])
    assert cfg.data.train == ["x.jsonl"]  # a single path becomes a list
    assert cfg.train.lr == 3e-4
    assert cfg.data.synthetic.train_groups == 10 and cfg.data.synthetic.seed == 0
    assert cfg.cluster.workers == 2


@pytest.mark.parametrize("text, overrides, message", [
    ("data: {train: x}\ntrain: {lrr: 1}\n", [], "unknown key train.lrr"),
    ("data: {train: x}\nmodle: {}\n", [], "unknown key modle"),
    ("data: {train: x}\n", ["objective.pairs=some"], "objective.pairs: got 'some', expected one of 'all', 'adjacent'"),
    ("data: {train: x}\n", ["data.batch_groups=many"], "data.batch_groups: got 'many'"),
    ("data: {train: x}\n", ["data.batch_groups=0"], "data.batch_groups: got 0, expected an integer >= 1"),
    ("data: {train: x}\n", ["cluster.zero_stage=4"], "cluster.zero_stage: got 4, expected 0, 1, 2 or 3"),
    ("data: {train: x}\n", ["train.lr"], "expected KEY=VALUE"),
    ("train: {lr: 1.0}\n", [], "data.train: empty"),
])
def test_bad_config_names_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, text), overrides)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_quickstart_config_is_valid():
    cfg = load_config(Path(__file__).parents[2] / "configs" / "quickstart.yaml")
    assert cfg.data.synthetic is not None and cfg.train.out_dir == "runs/quickstart"
