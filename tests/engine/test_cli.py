"""The command line as a user runs it: the quickstart trains, `rankpm eval` scores."""
import json
import os
import re
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
    result = rankpm("train", str(ROOT / "configs" / "quickstart.yaml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = result.stdout.strip().splitlines()  # stdout holds the summary and nothing else
    summary = json.loads(line)
    # one progress bar: the run's own, no transformers bars at every checkpoint or load
    assert "train:" in result.stderr and "Writing model shards" not in result.stderr
    assert "Loading weights" not in result.stderr
    assert {"eval_accuracy", "eval_loss", "checkpoint", "pairs_per_second"} <= set(summary)
    assert summary["eval_accuracy"] >= 0.90, summary
    assert (tmp_path / summary["checkpoint"] / "trainer.json").is_file()

    evaluated = rankpm("eval", summary["checkpoint"], "runs/quickstart/data/eval", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert report["eval_accuracy"] == pytest.approx(summary["eval_accuracy"], abs=1e-6)


def error_line(result):
    """The one line a failing command ends with; never a traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


TINY = ("data: {synthetic: {train_groups: 48, eval_groups: 8}, max_length: 128, batch_groups: 8}\n"
        "model: {backbone: gpt2, preset: tiny}\ntrain: {max_steps: 2, progress: false, out_dir: run}\n")


@pytest.mark.parametrize("case", ["yaml", "out_dir_file", "backbone_missing", "eval_out_file", "prepare_out_file",
                                  "truncated_gzip"])
def test_bad_settings_and_inputs_end_in_one_line_and_exit_code_2(tmp_path, case):
    import gzip

    config = tmp_path / "run.yaml"
    config.write_text(TINY)
    if case == "yaml":
        config.write_text("data:\n  train: [a.jsonl\n")
        result, expected = rankpm("train", str(config), cwd=tmp_path), r"run.yaml:3:1: YAML syntax error"
    elif case == "out_dir_file":
        (tmp_path / "run").write_text("")
        result, expected = rankpm("train", str(config), cwd=tmp_path), "train.out_dir: run exists and is a file"
    elif case == "backbone_missing":
        result = rankpm("train", str(config), "model.backbone=./models/my-rm", cwd=tmp_path)
        expected = "model.backbone: ./models/my-rm does not exist"
    elif case == "eval_out_file":
        (tmp_path / "taken").write_text("")
        result = rankpm("eval", str(tmp_path), "x.jsonl", "--out", "taken", cwd=tmp_path)
        expected = "is neither a model folder"  # the model is checked first
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "rankpm_model.json").write_text("{}")
        result = rankpm("eval", "model", "x.jsonl", "--out", "taken", cwd=tmp_path)
        expected = "--out: taken exists and is a file, not a folder"
    elif case == "prepare_out_file":
        (tmp_path / "in.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
        (tmp_path / "out").write_text("")
        result = rankpm("prepare", "in.jsonl", "--out", "out", cwd=tmp_path)
        expected = "--out out: exists and is a file, not a folder"
    else:
        rows = "".join(f'{{"prompt": "p{i}", "chosen": "a", "rejected": "b"}}\n' for i in range(3000)).encode()
        whole = gzip.compress(rows)
        (tmp_path / "train.jsonl.gz").write_bytes(whole[: len(whole) // 2])
        result = rankpm("prepare", "train.jsonl.gz", "--out", "out", cwd=tmp_path)
        expected = "field '<gzip>': truncated or corrupt gzip file"
    assert result.returncode == 2, result.stderr[-2000:]
    line = error_line(result)
    assert line.startswith(f"rankpm {result.args[3]}: error: ") and re.search(expected, line), line


def test_a_full_disk_while_saving_is_a_message_and_leaves_nothing_half_written(tmp_path):
    """A file-size limit makes the checkpoint's writes fail the way a full disk does."""
    import resource
    import signal as sig

    config = tmp_path / "run.yaml"
    config.write_text(TINY)

    def limit_file_size():
        sig.signal(sig.SIGXFSZ, sig.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))  # shards fit, the weights do not

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "rankpm.engine.cli", "train", str(config)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900, preexec_fn=limit_file_size)
    assert result.returncode == 2
    line = error_line(result)
    assert re.search(r"rankpm train: error: writing .*checkpoints/step_00000002 failed \(.*\); the partial checkpoint "
                     r"was removed and the previous one is intact. If the disk is full, free space and rerun", line)
    assert os.listdir(tmp_path / "run" / "checkpoints") == []  # no temporary left, no pointer to nothing


def test_a_second_run_on_a_busy_folder_exits_at_once(tmp_path):
    from rankpm.engine.train.run_lock import run_lock

    config = tmp_path / "run.yaml"
    config.write_text(TINY)
    with run_lock(tmp_path / "run"):
        result = rankpm("train", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert re.search(rf"run is in use by pid {os.getpid()} on .*; a folder holds one run at a time", error_line(result))
