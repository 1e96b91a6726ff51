"""A run's data: the objective's transforms, then prepared shards whose manifest lists every skipped row."""
import json

import torch

from rankpm.engine.config import from_dict
from rankpm.engine.data.run_data import resolve_run_data
from rankpm.engine.train.strategy import LocalStrategy


def test_binary_run_mixes_ranked_and_labelled_rows_and_its_manifest_lists_rows_the_transform_skipped(tmp_path):
    rows = [
        {"prompt": "Q1", "responses": [" a", " b", " c"], "ranks": [0, 1, 1]},  # 2 pairs -> 4 label pairs
        {"prompt": "Q2", "response": " fine", "label": "good"},  # 1 label pair
        {"prompt": "Q3", "response": " rude", "label": "maybe"},  # bad label: skipped
        {"prompt": "Q4", "chosen": " x", "rejected": " x"},  # identical responses: skipped
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict({
        "model": {"backbone": "gpt2", "preset": "tiny"},
        "data": {"train": [str(data)], "eval": [str(data)], "skip_bad": True, "max_length": 64},
        "objective": {"name": "binary", "labels": {"good": " +", "bad": " -"}},
        "train": {"out_dir": str(tmp_path / "run")},
    })
    run_data = resolve_run_data(cfg, LocalStrategy(device=torch.device("cpu")))

    for folder, groups in ((run_data.train_dir, 5), (run_data.eval_dir, 2)):  # eval: label-expanded, 1 + 1
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["counts"]["groups"] == groups and manifest["counts"]["skipped"] == 2
        assert [(s["file"], s["line"], s["field"]) for s in manifest["skipped"]] == [
            (str(data), 3, "label"), (str(data), 4, "rejected")]
