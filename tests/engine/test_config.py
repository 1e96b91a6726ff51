"""Config: YAML onto typed sections; every bad key or value named in the error."""
import re
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
    # every numeric key has a range, named with the value in the message
    ("data: {train: x}\n", ["train.lr=.nan"], "train.lr: got nan, expected a finite number > 0"),
    ("data: {train: x}\n", ["train.lr=-1"], "train.lr: got -1.0, expected a finite number > 0"),
    ("data: {train: x}\n", ["train.lr=.inf"], "train.lr: got inf, expected a finite number > 0"),
    ("data: {train: x}\n", ["train.min_lr_ratio=1.5"], "train.min_lr_ratio: got 1.5, expected a number in [0, 1]"),
    ("data: {train: x}\n", ["train.grad_clip=-1"], "train.grad_clip: got -1.0, expected a finite number > 0, or 0"),
    ("data: {train: x}\n", ["train.log_every=0"], "train.log_every: got 0, expected an integer >= 1"),
    ("data: {train: x}\n", ["train.warmup_steps=-5"], "train.warmup_steps: got -5, expected an integer >= 0"),
    ("data: {train: x}\n", ["train.betas=[0.9, 1.0]"], "train.betas: got (0.9, 1.0), expected two numbers in [0, 1)"),
    ("data: {train: x}\n", ["train.max_steps=0"], "train.max_steps: got 0, expected an integer >= 1"),
    ("data: {train: x}\n", ["train.epochs=0"], "train.epochs: got 0.0, expected a finite number > 0"),
    ("data: {train: x}\n", ["data.eval_batch_groups=0"], "data.eval_batch_groups: got 0, expected an integer >= 1"),
    ("data: {train: x}\n", ["data.tokens_per_batch=0"], "data.tokens_per_batch: got 0, expected an integer >= 1"),
    ("data: {train: x}\n", ["model.dropout=1"], "model.dropout: got 1.0, expected a number in [0, 1)"),
    ("data: {train: x}\n", ["objective.rating_margin=.inf"], "objective.rating_margin: got inf"),
    ("data: {train: x}\n", ["cluster.gpus_per_worker=-1"], "cluster.gpus_per_worker: got -1.0"),
    ("data: {train: x}\n", ["train.on_nonfinite=ignore"], "train.on_nonfinite: got 'ignore', expected one of 'stop', 'skip'"),
    ("data: {synthetic: {k_min: 4, k_max: 3}}\n", [], "data.synthetic.k_max: got 3, expected >= data.synthetic.k_min"),
    ("data: {synthetic: {eval_groups: 0}}\n", [], "data.synthetic.eval_groups: got 0, expected an integer >= 1"),
    ("data: {train: x}\n", ["objective.labels.bad=' GOOD'"], "objective.labels: good=' GOOD' and bad=' GOOD'"),
])
def test_bad_config_names_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, text), overrides)


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = write(tmp_path, "data:\n  train: [a.jsonl\ntrain: {lr: 1}\n")
    with pytest.raises(ConfigError, match=r"run.yaml:3:6: YAML syntax error: "):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'train.betas=\[0.9':1:5: YAML syntax error"):
        load_config(write(tmp_path, "data: {train: x}\n"), ["train.betas=[0.9"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_quickstart_config_is_valid():
    cfg = load_config(Path(__file__).parents[2] / "configs" / "quickstart.yaml")
    assert cfg.data.synthetic is not None and cfg.train.out_dir == "runs/quickstart"
