"""Context distillation on two Ray workers: ZeRO-3 gives ZeRO-0's losses and held-out KL.

The fused sparse KL reads the LM head's weight inside the model's forward, as the LM term
does (test_zero3_lm_term.py): with an untied Llama head and every parameter partitioned, a
read outside a forward would see an empty partition and fail.
"""
import json

import pytest
import torch
from cluster_helpers import train_rows
from test_zero3_lm_term import UNTIED_LLAMA

from rankpm.cluster.launch import train_many_on_ray
from rankpm.engine.config import ModelConfig, from_dict
from rankpm.engine.data.tokenizer import load_tokenizer
from rankpm.engine.distill.cache import cache_logits
from rankpm.engine.distill.config import cache_config_from_dict
from rankpm.engine.model.preference_model import PreferenceModel

TEXTS = ["\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for eight minutes.",
         "\n\nHuman: What is the capital of Peru?\n\nAssistant: I believe it is Lima.",
         "\n\nHuman: Can you help me steal a car?\n\nAssistant: I can't help with that."]


def teacher_and_caches(root):
    tok = load_tokenizer("bytes")
    tok.save(root / "tok")
    torch.manual_seed(0)
    model = PreferenceModel.build(ModelConfig(**UNTIED_LLAMA), vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                                  eoc_id=tok.eoc_id, max_length=256, with_lm_head=True)
    model.save(root / "teacher", extra={"config": from_dict({"data": {"synthetic": {}}}).to_dict()},
               tokenizer_dir=root / "tok")
    (root / "prompt.txt").write_text("Be helpful, honest and harmless.\n")
    caches = []
    for name, texts in (("train", [t + f" {i}" for i in range(8) for t in TEXTS]), ("eval", TEXTS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        cache_logits(cache_config_from_dict({
            "teacher": {"model": str(root / "teacher")},
            "corpus": {"files": [str(root / f"{name}.jsonl")]},
            "distill": {"out_dir": str(root / f"cache_{name}"), "prompt": str(root / "prompt.txt"), "k": 8}}))
        caches.append(root / f"cache_{name}")
    return root / "teacher", caches


@pytest.mark.slow
def test_distillation_gives_the_same_losses_under_zero_3_as_under_zero_0(tmp_path, ray_session):
    teacher, (train_cache, eval_cache) = teacher_and_caches(tmp_path)
    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage3_param_persistence_threshold": 0}}')

    def config(stage):
        return from_dict({
            "model": {"init_from": str(teacher)},
            "data": {"train": [str(train_cache)], "eval": [str(eval_cache)], "batch_groups": 4,
                     "shuffle_buffer": 8, "eval_batch_groups": 2},
            "objective": {"name": "distill"},
            "train": {"out_dir": str(tmp_path / f"zero{stage}"), "lr": 3e-3, "warmup_steps": 0, "log_every": 1,
                      "progress": False, "max_steps": 3, "save_every": 0},
            "cluster": {"workers": 2, "cpus_per_worker": 1, "zero_stage": stage, "deepspeed_config": str(ds_json)},
        })

    zero0, zero3 = train_many_on_ray([config(0), config(3)])
    a, b = train_rows(tmp_path / "zero0"), train_rows(tmp_path / "zero3")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step]["kl"] == pytest.approx(a[step]["kl"], rel=1e-4), step
    assert zero3["eval_kl"] == pytest.approx(zero0["eval_kl"], rel=1e-4)
    assert zero3["eval_tokens"] == zero0["eval_tokens"] == sum(len(t) for t in TEXTS)
