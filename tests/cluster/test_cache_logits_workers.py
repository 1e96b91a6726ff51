"""rankpm cache-logits --workers N: the corpus split over Ray workers gives the cache one process gives."""
import json

import numpy as np
import pytest

from rankpm.cluster.cache_logits import run_parts_on_ray
from rankpm.engine.data.logit_shards import LogitStream
from rankpm.engine.distill.cache import cache_logits
from rankpm.engine.distill.config import cache_config_from_dict

PROMPT = "\n\nHuman: Be kind.\n\nAssistant: I will try to be helpful, honest and harmless.\n\n----\n"


def config(tmp_path, out, corpus, workers, mode="topk"):
    (tmp_path / "prompt.txt").write_text(PROMPT)
    return cache_config_from_dict({
        "teacher": {"model": "gpt2", "preset": "tiny", "tokenizer": "bytes", "max_length": 256, "seed": 1},
        "corpus": {"files": [str(corpus)], "kind": "text"},
        "distill": {"out_dir": str(tmp_path / out), "prompt": str(tmp_path / "prompt.txt"), "k": 8, "mode": mode,
                    "samples": 5, "rows_per_shard": 3, "workers": workers},
    })


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_two_ray_workers_write_the_cache_one_process_writes(tmp_path, ray_session, mode):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Human: text number {i}. Assistant: reply {i}."}) + "\n"
                              for i in range(11)))
    one = cache_logits(config(tmp_path, "one", corpus, 1, mode))
    two = cache_logits(config(tmp_path, "two", corpus, 2, mode), run_parts=run_parts_on_ray)
    assert [s["rows"] for s in two["shards"]] == [3, 3, 3, 2] and two["tokens"] == one["tokens"]
    assert [s["sha256"] for s in two["shards"]] == [s["sha256"] for s in one["shards"]]  # byte for byte
    a, b = list(LogitStream(tmp_path / "one")), list(LogitStream(tmp_path / "two"))
    assert [r["row"] for r in b] == list(range(11))
    for x, y in zip(a, b):
        assert np.array_equal(x["ids"], y["ids"])
