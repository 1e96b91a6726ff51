"""Parallel layouts give the same training; checkpoints, export, resume and worker failures.

One module-scoped sweep trains the same tiny run (same prepared data, 8 groups per global
step, 6 steps) in five layouts:
  - local_1x2: one local process, gradient accumulation 2 (LocalStrategy, no DeepSpeed);
  - zero{0,1,2,3}: two Ray workers, accumulation 1, DeepSpeed ZeRO stage 0..3;
  - zero2_offload, zero3_offload_ckpt: the same with the optimizer offloaded to the CPU,
    and with activation checkpointing too
    (one TorchTrainer worker group runs the six one after another).

Tolerances. Every group has two responses (one pair) and every micro-batch 4 groups, so
every layout's gradient is the mean over the same 8 pairs of a step, and the logged loss
is the mean over the same pairs; only the order of float32 additions differs (buckets,
all-reduce vs reduce-scatter, two accumulated halves vs two ranks): ~1e-7 relative on the
gradient. AdamW's first steps move each weight by about lr * g / |g|, so wherever a
gradient entry is itself at float-noise level its sign, and the update, can differ: that
is the case for the "gauge" parameters whose gradient is zero in exact arithmetic (a bias
that shifts every score of a group equally: ln_f.bias, the key part of
c_attn.bias), which are excluded from the weight comparison. Measured spreads: losses
~1e-6 relative across ZeRO stages and ~1e-5 between 1x2 and 2x1; other weights ~1e-5.
The tests allow rel 1e-3 on losses and abs 1e-4 on weights, far below what one skipped or
repeated batch does (it changes a step's loss by >1e-2 here).
"""
import json
import os
import shutil
import signal

import pytest
import torch
from cluster_helpers import tiny_config, train_rows

from rankpm.cluster.launch import ClusterRunError, preflight, train_many_on_ray, train_on_ray
from rankpm.engine.train.checkpoint import CheckpointError, checkpoint_problem, latest_checkpoint
from rankpm.engine.model.preference_model import PreferenceModel
from rankpm.engine.train.loop import train

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "tiny_losses.json")
LOSS_TOL = dict(rel=1e-3, abs=1e-5)
WEIGHT_ATOL = 1e-4
STAGES = (0, 1, 2, 3)
EXTRAS = {"zero2_offload": {"zero_stage": 2, "offload_optimizer": True},
          "zero3_offload_ckpt": {"zero_stage": 3, "offload_optimizer": True, "activation_checkpointing": True}}


@pytest.fixture(scope="module")
def ray_module(ray_session):
    """The session's one embedded Ray (conftest.py): a second ray.init in the same process fails."""
    return ray_session


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, ray_module):
    root = tmp_path_factory.mktemp("layouts")
    local = train(tiny_config(root / "local_1x2", grad_accum=2, cluster={"workers": 1}))
    data = {"train": [str(root / "local_1x2" / "data" / "train")],  # the very same shards for every layout
            "eval": [str(root / "local_1x2" / "data" / "eval")]}
    runs = {f"zero{s}": {"zero_stage": s} for s in STAGES}
    runs.update(EXTRAS)
    summaries = train_many_on_ray([tiny_config(root / name, data=data, cluster=cluster)
                                   for name, cluster in runs.items()])
    return {"root": root, "data": data, "local": local, **dict(zip(runs, summaries))}


def losses(out_dir) -> list[float]:
    rows = train_rows(out_dir)
    return [rows[step]["loss"] for step in sorted(rows)]


def exported_weights(out_dir) -> dict:
    """Exported parameters minus the gauge ones (no gradient in exact arithmetic; see above)."""
    model = PreferenceModel.load(out_dir / "model")
    state = {k: v.float() for k, v in model.state_dict().items() if not k.endswith("ln_f.bias")}
    hidden = model.config.hidden_size
    for name in [k for k in state if k.endswith("attn.c_attn.bias")]:  # [query | key | value]
        state[name] = torch.cat([state[name][:hidden], state[name][2 * hidden:]])
    return state


def test_zero_stages_give_the_same_step_one_loss_and_the_same_weights(layouts):
    root = layouts["root"]
    reference = losses(root / "zero0")
    assert len(reference) == 6
    weights0 = exported_weights(root / "zero0")
    for stage in STAGES[1:]:
        curve = losses(root / f"zero{stage}")
        assert curve[0] == pytest.approx(reference[0], rel=1e-6), f"ZeRO-{stage} step-1 loss"
        assert curve == pytest.approx(reference, **LOSS_TOL), f"ZeRO-{stage} loss curve"
        weights = exported_weights(root / f"zero{stage}")
        assert weights.keys() == weights0.keys()
        for name, value in weights.items():
            torch.testing.assert_close(value, weights0[name], rtol=0, atol=WEIGHT_ATOL, msg=f"ZeRO-{stage} {name}")
        assert layouts[f"zero{stage}"]["eval_loss"] == pytest.approx(layouts["zero0"]["eval_loss"], **LOSS_TOL)


@pytest.mark.parametrize("name", EXTRAS)
def test_optimizer_offload_and_activation_checkpointing_train_the_same_run(layouts, name):
    root = layouts["root"]
    assert losses(root / name) == pytest.approx(losses(root / "zero0"), **LOSS_TOL)
    weights0 = exported_weights(root / "zero0")
    for key, value in exported_weights(root / name).items():
        torch.testing.assert_close(value, weights0[key], rtol=0, atol=WEIGHT_ATOL, msg=f"{name} {key}")


def test_two_workers_match_one_worker_with_accumulation_two(layouts):
    root = layouts["root"]
    one, two = losses(root / "local_1x2"), losses(root / "zero0")
    assert two == pytest.approx(one, **LOSS_TOL)
    assert [r["pairs_seen"] for r in train_rows(root / "zero0").values()] == \
        [r["pairs_seen"] for r in train_rows(root / "local_1x2").values()]  # the same groups, step by step
    assert layouts["zero0"]["eval_loss"] == pytest.approx(layouts["local"]["eval_loss"], **LOSS_TOL)
    weights_one, weights_two = exported_weights(root / "local_1x2"), exported_weights(root / "zero0")
    for name, value in weights_two.items():
        torch.testing.assert_close(value, weights_one[name], rtol=0, atol=WEIGHT_ATOL, msg=name)


def test_loss_curve_matches_the_golden_file(layouts):
    """A fixed tiny run's curve, kept under tests/; RANKPM_UPDATE_GOLDEN=1 rewrites it (review the diff)."""
    curves = {"local_1x2": losses(layouts["root"] / "local_1x2"), "ray_2x1_zero0": losses(layouts["root"] / "zero0")}
    if os.environ.get("RANKPM_UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump({"about": "tests/cluster/test_layouts.py tiny run: 6 steps, 8 groups per step, "
                                "seed 0, synthetic seed 5; loss per step", **curves}, f, indent=2)
            f.write("\n")
    with open(GOLDEN) as f:
        golden = json.load(f)
    for name, curve in curves.items():
        assert curve == pytest.approx(golden[name], **LOSS_TOL), name


def test_checkpoint_holds_deepspeed_state_every_reader_rng_and_config(layouts):
    out = layouts["root"] / "zero3"
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_00000003", "step_00000006"]  # keep_last=2, no temporary folder left
    last = latest_checkpoint(out)
    assert last.name == "step_00000006"
    files = {p.name for p in last.iterdir()}
    assert {"trainer.json", "reader_rank0.json", "reader_rank1.json", "rng_rank0.pt", "rng_rank1.pt",
            "deepspeed", "strategy.json"} <= files
    shards = sorted(p.name for p in (last / "deepspeed").iterdir())
    assert sum("optim_states" in n for n in shards) == 2, shards  # one ZeRO optimizer partition per rank
    meta = json.loads((last / "trainer.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 6
    assert meta["config"]["cluster"]["zero_stage"] == 3
    readers = [json.loads((last / f"reader_rank{r}.json").read_text()) for r in (0, 1)]
    assert readers[0] != readers[1]  # each rank's own position in its own share


@pytest.mark.parametrize("stage", [0, 3])
def test_export_is_one_consolidated_model_with_its_reward_head(layouts, stage):
    out = layouts["root"] / f"zero{stage}"
    model = PreferenceModel.load(out / "model")
    head = model.score_head.weight.detach()
    assert head.shape == (1, model.config.hidden_size) and head.abs().sum() > 0
    init = PreferenceModel.load(layouts["root"] / "local_1x2" / "model").score_head.weight.detach()
    torch.testing.assert_close(head, init, rtol=0, atol=WEIGHT_ATOL)  # trained, and the same as one process
    assert (out / "model" / "tokenizer").is_dir()


def test_resume_with_another_world_size_is_refused_with_the_reason_where_the_state_cannot_move(layouts):
    out = layouts["root"] / "zero1"
    cfg = tiny_config(out, data=dict(layouts["data"], batch_groups=2), cluster={"workers": 4, "zero_stage": 1})
    with pytest.raises(ClusterRunError, match="written by 2 data-parallel ranks, resuming with cluster.workers=4: "
                                              "ZeRO-1 partitions the optimizer state .* --workers 2"):
        preflight(cfg)
    with pytest.raises(CheckpointError, match="written by 2 data-parallel ranks, resuming with 1: one local process "
                                              "loads only"):
        train(tiny_config(out, data=dict(layouts["data"], batch_groups=8), cluster={"workers": 1}))
    token_budget = tiny_config(layouts["root"] / "zero0", data=dict(layouts["data"], tokens_per_batch=4096, batch_groups=2),
                               cluster={"workers": 4}, resume_with_changes=True)
    with pytest.raises(ClusterRunError, match="token-budget batches"):
        preflight(token_budget)
    assert latest_checkpoint(out).name == "step_00000006"  # nothing was touched


def test_a_zero0_run_resumes_on_four_workers_and_continues_the_same_curve(layouts, tmp_path, caplog):
    """Stopped after step 3 of the 2-worker ZeRO-0 run (batch 4 per rank), resumed on 4
    workers with batches of 2: the same 8 groups per step, so the same loss curve."""
    source = layouts["root"] / "zero0" / "checkpoints" / "step_00000003"
    out = tmp_path / "resized"
    shutil.copytree(source, out / "checkpoints" / source.name)
    (out / "checkpoints" / "latest").write_text(source.name + "\n")
    cfg = tiny_config(out, data=dict(layouts["data"], batch_groups=2), cluster={"workers": 4})
    with caplog.at_level("INFO"):
        summary = train_on_ray(cfg)
    assert "written by 2 ranks, with 4" in caplog.text
    config_row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert config_row["kind"] == "config" and config_row["resumed"]["ranks_before"] == 2
    assert config_row["resumed"]["reader_mapping"].startswith(
        "the 2 ranks had read every group before global position 24 (epoch 0, position 24) and none after it; "
        "4 ranks continue from there")
    rows, straight = train_rows(out), train_rows(layouts["root"] / "zero0")
    assert sorted(rows) == [4, 5, 6] and summary["steps"] == 6
    assert [rows[s]["loss"] for s in (4, 5, 6)] == pytest.approx([straight[s]["loss"] for s in (4, 5, 6)], **LOSS_TOL)
    assert [rows[s]["pairs_seen"] for s in (4, 5, 6)] == [straight[s]["pairs_seen"] for s in (4, 5, 6)]
    assert summary["eval_loss"] == pytest.approx(layouts["zero0"]["eval_loss"], **LOSS_TOL)


class KillRank1:
    """Driver-side hook: SIGKILL rank 1's process once rank 0 has logged ``at_step`` (first attempt only)."""

    def __init__(self, at_step: int):
        self.at_step, self.pids, self.killed = at_step, {}, []

    def __call__(self, row: dict) -> None:
        if row["kind"] == "worker":
            self.pids.setdefault(row["rank"], row["pid"])
        elif row["kind"] == "train" and row["step"] >= self.at_step and not self.killed:
            os.kill(self.pids[1], signal.SIGKILL)
            self.killed.append(self.pids[1])


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_nothing_happened(layouts, tmp_path, caplog):
    cfg = tiny_config(tmp_path / "faulty", data=layouts["data"], cluster={"zero_stage": 2, "max_failures": 2})
    killer = KillRank1(at_step=2)
    with caplog.at_level("INFO"):
        summary = train_on_ray(cfg, on_record=killer)
    assert killer.killed, "the run ended before the test could kill a worker"
    assert summary["restarts"] == 1 and summary["steps"] == 6
    assert "restart 1 of at most 2" in caplog.text
    assert losses(tmp_path / "faulty") == pytest.approx(losses(layouts["root"] / "zero2"), **LOSS_TOL)
    assert summary["eval_loss"] == pytest.approx(layouts["zero2"]["eval_loss"], **LOSS_TOL)
    events = [json.loads(line) for line in (tmp_path / "faulty" / "cluster_events.jsonl").read_text().splitlines()]
    assert [e["restart"] for e in events if e["event"] == "restart"] == [1]


@pytest.mark.slow
def test_a_failure_beyond_max_failures_ends_the_run_and_leaves_only_complete_checkpoints(layouts, tmp_path):
    out = tmp_path / "doomed"
    cfg = tiny_config(out, data=layouts["data"], save_every=1, cluster={"zero_stage": 1, "max_failures": 0})
    killer = KillRank1(at_step=2)
    with pytest.raises(ClusterRunError, match=r"failed after 0 worker restart\(s\) \(cluster.max_failures=0\)"):
        train_on_ray(cfg, on_record=killer)
    assert killer.killed
    # every checkpoint renamed into place is whole (each file as its index says), the newest is the
    # one resumed from, and it holds the step its name says: rank 1 died at step 2 or later
    folders = sorted((out / "checkpoints").glob("step_*"))
    assert folders, "no checkpoint of steps 1 and on survived"
    for folder in folders:
        assert checkpoint_problem(folder) is None, folder
        assert (folder / "deepspeed").is_dir() and json.loads((folder / "trainer.json").read_text())["step"] == \
            int(folder.name[len("step_"):])
    assert latest_checkpoint(out) == folders[-1]
