"""The DeepSpeed config is built from the rankpm config in one function; a raw JSON overrides it."""
import json

import pytest

from rankpm.engine.config import ConfigError
from rankpm.engine.train.deepspeed_strategy import build_deepspeed_config

from cluster_helpers import tiny_config


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_built_config_follows_the_run_config(tmp_path, stage):
    cfg = tiny_config(tmp_path, grad_accum=3, grad_clip=0.5, precision="bf16", cluster={"zero_stage": stage})
    ds = build_deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"]["stage"] == stage
    # DeepSpeed's identity: global batch = micro (groups per rank) * accumulation * ranks = 4 * 3 * 2
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 3, 24)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    assert "optimizer" not in ds and "scheduler" not in ds  # the loop's AdamW and schedule are used


def test_offload_needs_zero(tmp_path):
    ds = build_deepspeed_config(tiny_config(tmp_path, cluster={"zero_stage": 2, "offload_optimizer": True}), 2)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(ConfigError, match="offload_optimizer: needs cluster.zero_stage >= 1"):
        build_deepspeed_config(tiny_config(tmp_path, cluster={"offload_optimizer": True}), 2)


def test_raw_json_overrides_key_by_key(tmp_path):
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000},
                               "train_micro_batch_size_per_gpu": 8, "gradient_clipping": "auto"}))
    ds = build_deepspeed_config(tiny_config(tmp_path, cluster={"zero_stage": 1, "deepspeed_config": str(raw)}), 2)
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_optimization"]["contiguous_gradients"] is True  # untouched keys of the section survive
    assert ds["gradient_clipping"] == 1.0  # "auto" keeps the built value
    assert ds["train_batch_size"] == 8 * 1 * 2  # kept consistent with the new micro-batch size


@pytest.mark.parametrize("content, message", [
    ({"optimizer": {"type": "Adam"}}, "sets 'optimizer'; rankpm builds the optimizer"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4, but the loop runs train.grad_accum=1"),
    ([1, 2], "must hold a JSON object"),
])
def test_raw_json_that_would_fight_the_loop_is_refused(tmp_path, content, message):
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        build_deepspeed_config(tiny_config(tmp_path, cluster={"deepspeed_config": str(raw)}), 2)


def test_missing_raw_json_is_named(tmp_path):
    with pytest.raises(ConfigError, match="deepspeed_config: file not found: .*nope.json"):
        build_deepspeed_config(tiny_config(tmp_path, cluster={"deepspeed_config": str(tmp_path / "nope.json")}), 2)
