"""PM + LM under ZeRO-3 matches ZeRO-0, with every parameter partitioned.

The fused LM term reads the LM head's weight inside the model's forward, not through the
head's own forward: ZeRO-3 gathers it because DeepSpeed registers any parameter read
during a forward as an external parameter of that module. A Llama-shaped backbone keeps
its head untied from the embeddings, so no other module's forward gathers that weight on
the way (GPT-2 ties them, which would hide a missing gather): were the head read outside
a forward (say, by the objective), it would be an empty partition and this run would fail.
"""
import pytest
from cluster_helpers import tiny_config, train_rows

from rankpm.cluster.launch import train_many_on_ray
from rankpm.engine.config import from_dict

UNTIED_LLAMA = {"backbone": "llama", "preset": "tiny",
                "overrides": {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2,
                              "intermediate_size": 64, "tie_word_embeddings": False}}


@pytest.mark.slow
def test_pm_plus_lm_gives_the_same_losses_under_zero_3_as_under_zero_0(tmp_path, ray_session):
    # partition every parameter, however small (by default ZeRO-3 keeps small ones whole)
    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage3_param_persistence_threshold": 0}}')

    def config(stage):
        raw = tiny_config(tmp_path / f"zero{stage}", max_steps=3, save_every=0,
                          cluster={"zero_stage": stage, "deepspeed_config": str(ds_json)}).to_dict()
        raw["model"] = UNTIED_LLAMA
        raw["objective"]["lm_loss"] = True
        raw["stages"] = []
        return from_dict(raw)

    zero0, zero3 = train_many_on_ray([config(0), config(3)])
    a, b = train_rows(tmp_path / "zero0"), train_rows(tmp_path / "zero3")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4), step
        assert b[step]["lm_nll_per_token"] == pytest.approx(a[step]["lm_nll_per_token"], rel=1e-4), step
    assert zero3["eval_loss"] == pytest.approx(zero0["eval_loss"], rel=1e-4)
