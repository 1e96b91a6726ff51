"""The command line as a user runs it: the quickstart trains, `rankpm eval` scores."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def rankpm(*args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "rankpm.engine.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_bad_config_key_exits_with_its_name(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("data: {synthetic: {}}\ntrain: {learning_rate: 1}\n")
    result = rankpm("train", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown key train.learning_rate" in result.stderr


def test_overrides_may_follow_options(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("data: {synthetic: {}}\n")
    # parsed as overrides (the bad key proves it reached the config), not refused by argparse
    result = rankpm("train", str(config), "--workers", "1", "train.nope=1", cwd=tmp_path)
    assert result.returncode == 2 and "unknown key train.nope" in result.stderr
    result = rankpm("train", str(config), "--workers", "1", "--frobnicate", cwd=tmp_path)
    assert result.returncode == 2 and "unrecognized arguments: --frobnicate" in result.stderr


@pytest.mark.slow
def test_quickstart_reaches_90_percent_and_eval_agrees(tmp_path):
    result = rankpm("train", str(ROOT / "configs" / "quickstart.yaml"), "train.progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"eval_accuracy", "eval_loss", "checkpoint", "pairs_per_second"} <= set(summary)
    assert summary["eval_accuracy"] >= 0.90, summary
    assert (tmp_path / summary["checkpoint"] / "trainer.json").is_file()

    evaluated = rankpm("eval", summary["checkpoint"], "runs/quickstart/data/eval", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert report["eval_accuracy"] == pytest.approx(summary["eval_accuracy"], abs=1e-6)
