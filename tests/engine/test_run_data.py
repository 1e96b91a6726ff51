"""A run's data: the objective's transforms, then prepared shards whose manifest lists every skipped row."""
import json

import pytest
import torch

from rankpm.engine.config import from_dict
from rankpm.engine.fingerprint import MismatchError
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


# ----- prepared data vs the run: the manifest's request is compared, never assumed --------

def synthetic_config(tmp_path, **data):
    return from_dict({
        "model": {"backbone": "gpt2", "preset": "tiny"},
        "data": {"synthetic": {"train_groups": 24, "eval_groups": 8}, "max_length": 96, **data},
        "train": {"out_dir": str(tmp_path / "run")},
    })


def resolve(cfg, **kwargs):
    return resolve_run_data(cfg, LocalStrategy(device=torch.device("cpu")), **kwargs)


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_a_prepared_folder_is_reused_only_for_the_same_request(tmp_path, caplog):
    caplog.set_level("INFO")
    first = resolve(synthetic_config(tmp_path))
    stamp = (first.train_dir / "manifest.json").stat().st_mtime_ns
    resolve(synthetic_config(tmp_path))
    assert (first.train_dir / "manifest.json").stat().st_mtime_ns == stamp  # same request: reused
    assert "preparing it again" not in caplog.text

    resolve(synthetic_config(tmp_path, max_length=128))  # a setting changed: prepared again, and said so
    assert manifest(first.train_dir)["max_length"] == 128 and manifest(first.eval_dir)["max_length"] == 128
    assert "was prepared for other data or settings (max_length: 96 vs 128)" in caplog.text

    resolve(from_dict({**synthetic_config(tmp_path).to_dict(),
                       "data": {"synthetic": {"train_groups": 30, "eval_groups": 8}, "max_length": 96}}))
    assert manifest(first.train_dir)["counts"]["groups"] == 30  # the generator's size reaches the shards


def test_an_edited_input_file_is_prepared_again(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b"}) + "\n")
    cfg = from_dict({"data": {"train": [str(data)], "max_length": 32}, "train": {"out_dir": str(tmp_path / "run")}})
    run = resolve(cfg)
    assert manifest(run.train_dir)["counts"]["groups"] == 1
    data.write_text(data.read_text() + json.dumps({"prompt": "Q2", "chosen": " c", "rejected": " d"}) + "\n")
    resolve(cfg)
    assert manifest(run.train_dir)["counts"]["groups"] == 2


def test_data_a_checkpoint_was_trained_on_is_never_replaced(tmp_path):
    run = resolve(synthetic_config(tmp_path))
    with pytest.raises(MismatchError, match=r"holds the data the run's checkpoint was trained on, but the run now "
                                            r"asks for other data \(max_length: 96 vs 128\)"):
        resolve(synthetic_config(tmp_path, max_length=128), keep_prepared=True)
    assert manifest(run.train_dir)["max_length"] == 96


def test_a_given_prepared_folder_must_match_the_runs_tokenizer_and_length(tmp_path):
    from rankpm.engine.data.prepare import prepare
    from rankpm.engine.data.synthetic import generate

    src = generate(tmp_path / "syn.jsonl", groups=20, seed=0)
    prepare([src], tmp_path / "bpe", "bpe:300", max_length=128)

    def cfg(**data):
        return from_dict({"data": {"train": [str(tmp_path / "bpe")], "max_length": 128, **data},
                          "train": {"out_dir": str(tmp_path / "run")}})

    with pytest.raises(MismatchError, match=r"the tokenizer differs between data.tokenizer='bytes' and prepared "
                                            r"folder .*bpe: .*set data.tokenizer=.*bpe/tokenizer"):
        resolve(cfg())
    with pytest.raises(MismatchError, match=r"the length policy differs between the run's data settings .* and "
                                            r"prepared folder .*bpe: max_length: 256 vs 128"):
        resolve(cfg(tokenizer=str(tmp_path / "bpe" / "tokenizer"), max_length=256))
    assert resolve(cfg(tokenizer=str(tmp_path / "bpe" / "tokenizer"))).train_dir == tmp_path / "bpe"
    assert resolve(cfg(tokenizer="bpe:300")).train_dir == tmp_path / "bpe"  # trained the same way

    prepare([src], tmp_path / "bytes_eval", "bytes", max_length=128)  # evaluation data, another tokenizer
    with pytest.raises(MismatchError, match=r"the tokenizer differs between training data .*bpe and evaluation "
                                            r"data .*bytes_eval: .*kind: 'bpe' vs 'bytes'"):
        resolve(from_dict({**cfg(tokenizer="bpe:300").to_dict(),
                           "data": {"train": [str(tmp_path / "bpe")], "eval": [str(tmp_path / "bytes_eval")],
                                    "tokenizer": "bpe:300", "max_length": 128}}))


# ----- tokenizer vs model vs data ----------------------------------------------------------

def saved_model(folder, tokenizer_dir, max_length=128):
    from rankpm.engine.config import ModelConfig
    from rankpm.engine.data.tokenizer import load_tokenizer
    from rankpm.engine.model.preference_model import PreferenceModel

    tok = load_tokenizer(tokenizer_dir)
    model = PreferenceModel.build(ModelConfig(), vocab_size=tok.vocab_size, pad_id=tok.pad_id, eoc_id=tok.eoc_id,
                                  max_length=max_length)
    cfg = from_dict({"data": {"synthetic": {}, "max_length": max_length}})
    model.save(folder, extra={"config": cfg.to_dict()}, tokenizer_dir=tokenizer_dir)
    return folder


def test_init_from_a_model_with_another_tokenizer_is_refused(tmp_path):
    from rankpm.engine.data.tokenizer import load_tokenizer
    from rankpm.engine.model.preference_model import PreferenceModel

    run = resolve(synthetic_config(tmp_path))
    model_dir = saved_model(tmp_path / "model", run.tokenizer_dir)
    cfg = synthetic_config(tmp_path).model.__class__(init_from=str(model_dir))
    tok = load_tokenizer(run.tokenizer_dir)
    PreferenceModel.build(cfg, vocab_size=tok.vocab_size, pad_id=tok.pad_id, eoc_id=tok.eoc_id, max_length=96,
                          tokenizer=tok.identity())  # the same tokenizer: fine
    other = dict(tok.identity(), fingerprint="0" * 64, vocab_size=4000)
    with pytest.raises(MismatchError, match=r"the tokenizer differs between model.init_from .*model and the run's "
                                            r"data: fingerprint: '[0-9a-f]+' vs '0000.*; vocab_size: 264 vs 4000"):
        PreferenceModel.build(cfg, vocab_size=4000, pad_id=0, eoc_id=1, max_length=96, tokenizer=other)


def test_eval_refuses_data_made_with_another_tokenizer_and_a_replaced_tokenizer_folder(tmp_path):
    import shutil

    from rankpm.engine.data.prepare import prepare
    from rankpm.engine.data.synthetic import generate
    from rankpm.engine.score.eval_folder import evaluate_model_folder
    from rankpm.engine.score.scorer import RewardScorer

    src = generate(tmp_path / "syn.jsonl", groups=20, seed=0)
    prepare([src], tmp_path / "bytes", "bytes", max_length=128)
    prepare([src], tmp_path / "bpe", "bpe:300", max_length=128)
    model_dir = saved_model(tmp_path / "model", tmp_path / "bytes" / "tokenizer")
    assert evaluate_model_folder(model_dir, [str(tmp_path / "bytes")])["eval_pairs"] > 0
    with pytest.raises(MismatchError, match=r"the tokenizer differs between model folder .*model and prepared "
                                            r"data .*bpe: .*kind: 'bytes' vs 'bpe'"):
        evaluate_model_folder(model_dir, [str(tmp_path / "bpe")])
    prepare([src], tmp_path / "long", "bytes", max_length=256)
    with pytest.raises(MismatchError, match=r"prepared data .*long has sequences of up to max_length=256 tokens, "
                                            r"model folder .*model was trained with max_length=128"):
        evaluate_model_folder(model_dir, [str(tmp_path / "long")])

    shutil.rmtree(model_dir / "tokenizer")
    shutil.copytree(tmp_path / "bpe" / "tokenizer", model_dir / "tokenizer")
    with pytest.raises(MismatchError, match=r"the tokenizer differs between .*rankpm_model.json \(recorded at save\) "
                                            r"and .*model/tokenizer"):
        RewardScorer.from_folder(model_dir)
