"""Scoring throughput: the batched scorer against scoring one context at a time.

    pytest benchmarks/bench_scoring.py --benchmark-json=benchmarks/scoring.json

Side by side in one run, on the same model folder (the training benchmark's Llama shape,
4 layers, width 256, random init, a BPE of 4,000) and the same 64 HH-shaped groups of two
responses (contexts ~50-240 tokens, responses 0-111): ``RewardScorer.score_groups`` over all
of them (sorted by length, batched by a token budget, the context once per group) against
``RewardScorer.score`` called once per group (what a loop over requests does). Reported:
pairs scored per second (extra_info["pairs_per_s"]).
"""
import json

import pytest
import torch

from harness import DEVICE

GROUPS = 64


@pytest.fixture(scope="module")
def scorer_and_groups(tmp_path_factory):
    from rankpm.engine.config import ModelConfig, from_dict
    from rankpm.engine.data.prepare import prepare
    from rankpm.engine.data.readers import read_groups
    from rankpm.engine.data.synthetic import generate
    from rankpm.engine.data.tokenizer import load_tokenizer
    from rankpm.engine.model.preference_model import PreferenceModel
    from rankpm.engine.score.scorer import RewardScorer

    root = tmp_path_factory.mktemp("scoring")
    data = generate(root / "hh.jsonl", groups=GROUPS, seed=3, k_min=2, k_max=2, context_words=(40, 300),
                    response_words=(0, 90))
    prepare([data], root / "prepared", "bpe:4000", max_length=256)
    tok = load_tokenizer(root / "prepared" / "tokenizer")
    overrides = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                 "intermediate_size": 688}
    torch.manual_seed(0)
    model = PreferenceModel.build(ModelConfig(backbone="llama", preset="small", overrides=overrides),
                                  vocab_size=tok.vocab_size, pad_id=tok.pad_id, eoc_id=tok.eoc_id, max_length=256)
    config = from_dict({"data": {"train": [str(data)], "max_length": 256}})
    model.save(root / "model", extra={"config": config.to_dict()}, tokenizer_dir=root / "prepared" / "tokenizer")
    groups = [(g.context, g.responses) for g in read_groups([data])]
    return RewardScorer.from_folder(root / "model", device=DEVICE), groups


def test_batched(benchmark, scorer_and_groups):
    scorer, groups = scorer_and_groups
    result = benchmark.pedantic(scorer.score_groups, args=(groups,), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["pairs_per_s"] = len(groups) / benchmark.stats.stats.median
    assert len(result) == len(groups)


def test_one_at_a_time(benchmark, scorer_and_groups):
    scorer, groups = scorer_and_groups

    def each():
        return [scorer.score(context, responses) for context, responses in groups]

    result = benchmark.pedantic(each, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["pairs_per_s"] = len(groups) / benchmark.stats.stats.median
    assert len(result) == len(groups)
