"""What a run checks for its user: one run per folder, the same run on resume, intact
checkpoints, exact counters, no non-finite step in the weights, epochs that mean epochs."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from rankpm.engine.config import ConfigError, from_dict
from rankpm.engine.fingerprint import MismatchError
from rankpm.engine.train.checkpoint import CheckpointError, latest_checkpoint
from rankpm.engine.train.loop import NonFiniteError, export_model, train
from rankpm.engine.train.run_lock import RunLockError
from rankpm.engine.train.stages import run_stages


def config(out_dir, *, data=None, **train):
    return from_dict({
        "model": {"backbone": "gpt2", "preset": "tiny"},
        "data": {"synthetic": {"train_groups": 96, "eval_groups": 16, "seed": 3}, "max_length": 192,
                 "batch_groups": 8, "shuffle_buffer": 32, **(data or {})},
        "train": {"out_dir": str(out_dir), "lr": 2e-3, "warmup_steps": 2, "log_every": 1, "progress": False,
                  **train},
    })


def rows(out_dir, kind="train"):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


class Crash(Exception):
    pass


# ----- one run per folder ------------------------------------------------------------------

HOLD = """
import sys, time
from rankpm.engine.train.run_lock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_process_on_the_same_folder_is_refused_and_a_crashed_holder_leaves_no_lock(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockError, match=rf"{out} is in use by pid {holder.pid} on {os.uname().nodename} since "
                                               r".*; a folder holds one run at a time"):
            train(config(out, max_steps=1))
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the kernel drops its lock
        holder.wait()
    assert train(config(out, max_steps=1))["steps"] == 1


def test_the_run_folder_must_be_a_writable_folder(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ConfigError, match=r"train.out_dir: .*taken exists and is a file, not a folder"):
        train(config(tmp_path / "taken", max_steps=1))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report").write_text("a file where the report goes")
    with pytest.raises(ConfigError, match=r"the report folder: .*report exists and is a file"):
        run_stages(config(tmp_path / "run", max_steps=1))
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before step 1


# ----- the same run on resume --------------------------------------------------------------

def test_resuming_under_other_settings_is_refused_with_the_keys_that_differ(tmp_path):
    out = tmp_path / "run"
    train(config(out, max_steps=2))
    with pytest.raises(MismatchError, match=r"step_00000002 was written under other settings \(train.lr: 0.002 in "
                                            r"the checkpoint, 0.001 now\)"):
        train(config(out, max_steps=2, lr=1e-3))
    with pytest.raises(MismatchError, match=r"groups per step \(data.batch_groups x cluster.workers x "
                                            r"train.grad_accum\): 8 in the checkpoint, 4 now"):
        train(config(out, max_steps=2, data={"batch_groups": 4}))
    with pytest.raises(MismatchError, match=r"model.preset: 'tiny' in the checkpoint, 'small' now"):
        train(from_dict({**config(out, max_steps=2).to_dict(), "model": {"backbone": "gpt2", "preset": "small"}}))
    # where and how often may change: this reruns only the evaluation
    assert train(config(out, max_steps=2, log_every=5, eval_every=7))["steps"] == 2


def test_more_steps_on_resume_keep_the_schedule_so_the_learning_rate_never_jumps(tmp_path):
    out = tmp_path / "run"
    train(config(out, max_steps=4, min_lr_ratio=0.1))
    with pytest.raises(MismatchError, match=r"train.max_steps: 4 in the checkpoint, 8 now"):
        train(config(out, max_steps=8, min_lr_ratio=0.1))
    summary = train(config(out, max_steps=8, min_lr_ratio=0.1, resume_with_changes=True))
    assert summary["steps"] == 8
    lr = {r["step"]: r["lr"] for r in rows(out)}
    assert lr[4] == pytest.approx(2e-4) and all(lr[s] == pytest.approx(2e-4) for s in (5, 6, 7, 8))  # the floor
    [resumed] = [r for r in rows(out, "config") if "resumed" in r]
    assert resumed["resumed"]["changes"] == {"train.max_steps": [4, 8]}  # recorded with the run


# ----- intact checkpoints --------------------------------------------------------------------

def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog):
    out = tmp_path / "run"
    train(config(out, max_steps=4, save_every=2, keep_last=2))
    root = out / "checkpoints"
    assert latest_checkpoint(out).name == "step_00000004"
    (root / "latest").write_text("step_00000009\n")  # a pointer to nothing
    assert latest_checkpoint(out).name == "step_00000004"
    assert "checkpoint" in caplog.text and "step_00000009" in caplog.text
    state = root / "step_00000004" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # half-written
    assert latest_checkpoint(out).name == "step_00000002"
    assert f"{state} holds 1000 bytes, the index says" in caplog.text
    summary = train(config(out, max_steps=4, save_every=2, keep_last=2))  # resumes from step 2
    assert summary["steps"] == 4 and latest_checkpoint(out).name == "step_00000004"
    for name in ("step_00000002", "step_00000004"):
        (root / name / "index.json").unlink()
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*checkpoints: step_00000004: incomplete "
                                              r"\(no index.json\); step_00000002: incomplete"):
        latest_checkpoint(out)


def test_temporaries_of_a_save_that_died_are_removed(tmp_path):
    out = tmp_path / "run"
    train(config(out, max_steps=1))
    left = out / "checkpoints" / ".step_00000002.tmp-999999-0123abcd@elsewhere"
    left.mkdir()
    (left / "training_state.pt").write_bytes(b"half")
    train(config(out, max_steps=1))
    assert not left.exists()


# ----- exact counters and metrics --------------------------------------------------------------

def test_counters_and_metrics_rows_are_exact_across_a_crash_and_resume(tmp_path):
    straight = tmp_path / "straight"
    train(config(straight, max_steps=6, save_every=3, log_every=4))
    crashed = tmp_path / "crashed"

    def crash_after_step_4(row):
        if row["kind"] == "train" and row["step"] == 4:
            raise Crash

    with pytest.raises(Crash):
        train(config(crashed, max_steps=6, save_every=3, log_every=4), on_record=crash_after_step_4)
    summary = train(config(crashed, max_steps=6, save_every=3, log_every=4))
    a, b = rows(straight), rows(crashed)
    # the save at step 3 closes a window, so no step is lost between a log and a save; the row the
    # crashed run logged after its checkpoint is gone, and every step appears once
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 4, 6]
    assert [r["pairs_seen"] for r in a] == [r["pairs_seen"] for r in b]
    assert summary["epochs"] == pytest.approx(6 * 8 / 96)
    state = json.loads((crashed / "checkpoints" / "step_00000006" / "trainer.json").read_text())
    assert state["pairs_seen"] == a[-1]["pairs_seen"] and state["groups_seen"] == 48


def test_the_final_checkpoint_is_written_before_the_final_evaluation(tmp_path):
    out = tmp_path / "run"

    def fail_in_final_eval(row):
        if row["kind"] == "eval":
            raise Crash

    with pytest.raises(Crash):
        train(config(out, max_steps=3), on_record=fail_in_final_eval)
    assert latest_checkpoint(out).name == "step_00000003"  # no training lost
    summary = train(config(out, max_steps=3))  # only evaluates
    assert summary["steps"] == 3 and summary["eval_pairs"] > 0
    assert [r["step"] for r in rows(out)] == [1, 2, 3] and len(rows(out, "eval")) == 1


# ----- nothing non-finite reaches the weights ---------------------------------------------------

def test_a_non_finite_step_stops_the_run_naming_it_and_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    # an absurd learning rate: step 1's update makes every later forward overflow
    with pytest.raises(NonFiniteError, match=r"step 2: the loss or the gradient norm is not finite; the weights were "
                                             r"not updated. Groups of this step on rank 0: hhh-\d+, hhh-\d+, .*"
                                             r"Last good checkpoint: .*step_00000001"):
        train(config(out, max_steps=4, lr=1e30, warmup_steps=0, save_every=1))
    assert latest_checkpoint(out).name == "step_00000001"


def test_non_finite_steps_can_be_skipped_and_are_counted(tmp_path):
    summary = train(config(tmp_path / "run", max_steps=4, lr=1e30, warmup_steps=0, on_nonfinite="skip"))
    assert summary["steps"] == 4 and summary["skipped_steps"] == 3
    assert [r["skipped_steps"] for r in rows(tmp_path / "run")] == [0, 1, 2, 3]  # each row says so


def test_weights_that_are_not_finite_are_never_written(tmp_path):
    from rankpm.engine.config import ModelConfig
    from rankpm.engine.model.preference_model import PreferenceModel
    from rankpm.engine.train.strategy import LocalStrategy

    model = PreferenceModel.build(ModelConfig(), vocab_size=300, pad_id=0, eoc_id=1, max_length=64)
    with torch.no_grad():
        model.score_head.weight[0, 3] = float("nan")
    strategy = LocalStrategy(device=torch.device("cpu"))
    strategy.setup(model, None, None)
    with pytest.raises(NonFiniteError, match=r"refusing to write .*model: weights are not finite \(score_head.weight\)"):
        export_model(strategy, tmp_path / "model", tokenizer_dir=None, cfg=config(tmp_path), eval_metrics={})
    assert not (tmp_path / "model").exists()


# ----- epochs mean epochs ---------------------------------------------------------------------

def test_a_step_larger_than_the_data_is_refused_and_passes_are_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"data.batch_groups: one step takes 128 groups \(32 groups x 1 ranks x "
                                          r"train.grad_accum 4\), more than the 96 the training data holds"):
        train(config(tmp_path / "big", data={"batch_groups": 32}, grad_accum=4, max_steps=1))
    summary = train(config(tmp_path / "run", max_steps=30, log_every=10))
    assert summary["epochs"] == pytest.approx(30 * 8 / 96)  # 2.5 passes, said in the summary
    [row] = rows(tmp_path / "run", "config")
    assert row["planned_epochs"] == pytest.approx(2.5)


def test_the_same_groups_per_step_split_over_other_ranks_is_the_same_run(tmp_path):
    from rankpm.engine.train.resume import run_changes

    def layout(workers, batch_groups, grad_accum=1, out="runs/a"):
        cfg = config(out, max_steps=4, grad_accum=grad_accum, data={"batch_groups": batch_groups}).to_dict()
        cfg["cluster"]["workers"] = workers
        return cfg

    assert run_changes(layout(2, 4), layout(4, 2)) == {}
    assert run_changes(layout(1, 4, grad_accum=2), layout(2, 4)) == {}
    assert list(run_changes(layout(2, 4), layout(2, 2))) == [
        "groups per step (data.batch_groups x cluster.workers x train.grad_accum)"]
    # a path compares by where it leads (a Ray run records it absolute)
    (tmp_path / "data.jsonl").write_text("")
    relative = dict(layout(1, 8), data=dict(layout(1, 8)["data"], train=[os.path.relpath(tmp_path / "data.jsonl")]))
    absolute = dict(layout(1, 8), data=dict(layout(1, 8)["data"], train=[str(tmp_path / "data.jsonl")]))
    assert run_changes(relative, absolute) == {}
