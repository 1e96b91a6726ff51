"""PM + LM under ZeRO-3 matches ZeRO-0, with every parameter partitioned.

The fused LM term reads lm_head.weight inside the model's forward rather than the head's;
the strategy registers it as an external parameter of the model, as DeepSpeed asks. (On
this DeepSpeed the run also matches without the registration; the test guards the result,
whichever mechanism gathers the weight.)"""
import pytest
from cluster_helpers import tiny_config, train_rows

from rankpm.cluster.launch import train_many_on_ray
from rankpm.engine.config import from_dict


@pytest.mark.slow
def test_pm_plus_lm_gives_the_same_losses_under_zero_3_as_under_zero_0(tmp_path, ray_session):
    # partition every parameter, however small (by default ZeRO-3 keeps small ones whole)
    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage3_param_persistence_threshold": 0}}')

    def config(stage):
        base = tiny_config(tmp_path / f"zero{stage}", max_steps=3, save_every=0,
                           cluster={"zero_stage": stage, "deepspeed_config": str(ds_json)})
        raw = base.to_dict()
        raw["objective"]["lm_loss"] = True
        raw["stages"] = []
        return from_dict(raw)

    zero0, zero3 = train_many_on_ray([config(0), config(3)])
    a, b = train_rows(tmp_path / "zero0"), train_rows(tmp_path / "zero3")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4), step
    assert zero3["eval_loss"] == pytest.approx(zero0["eval_loss"], rel=1e-4)
