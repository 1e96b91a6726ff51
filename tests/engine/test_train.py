"""The training loop: it learns, its checkpoints are atomic, and resume is exact."""
import json

import pytest

from rankpm.engine.train.checkpoint import latest_checkpoint
from rankpm.engine.config import from_dict
from rankpm.engine.score.scorer import RewardScorer
from rankpm.engine.train.loop import train


def tiny_config(out_dir, **train_overrides):
    return from_dict({
        "model": {"backbone": "gpt2", "preset": "tiny"},
        "data": {"synthetic": {"train_groups": 96, "eval_groups": 32, "seed": 3},
                 "max_length": 192, "batch_groups": 8, "shuffle_buffer": 32},
        "train": {"out_dir": str(out_dir), "lr": 2e-3, "warmup_steps": 2, "log_every": 1,
                  "progress": False, **train_overrides},
    })


def train_rows(out_dir):
    """The last logged train row of each step (a resumed run logs some steps twice)."""
    rows = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train":
            rows[row["step"]] = row
    return rows


class Crash(Exception):
    pass


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    first = train(tiny_config(straight, max_steps=6, save_every=3))

    resumed = tmp_path / "resumed"

    def crash_at_step_5(row):
        if row["kind"] == "train" and row["step"] == 5:
            raise Crash

    with pytest.raises(Crash):
        train(tiny_config(resumed, max_steps=6, save_every=3), on_record=crash_at_step_5)
    assert latest_checkpoint(resumed).name == "step_00000003"
    summary = train(tiny_config(resumed, max_steps=6, save_every=3))

    a, b = train_rows(straight), train_rows(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-6), step
        assert b[step]["pairs_seen"] == a[step]["pairs_seen"]  # no batch skipped or repeated
    assert summary["steps"] == 6
    assert summary["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-5)


def test_checkpoints_keep_the_last_n_and_latest_points_at_a_complete_one(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(out, max_steps=6, save_every=2, keep_last=2))
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_00000004", "step_00000006"]
    assert latest_checkpoint(out).name == "step_00000006"
    meta = json.loads((out / "checkpoints" / "step_00000006" / "trainer.json").read_text())
    assert meta["step"] == 6 and meta["world_size"] == 1 and meta["config"]["train"]["max_steps"] == 6
    # every checkpoint holds a consolidated model: an older one can be scored too
    older = RewardScorer.from_folder(out / "checkpoints" / "step_00000004")
    final = RewardScorer.from_folder(out / "checkpoints" / "step_00000006")
    context, responses = "\n\nHuman: hi\n\nAssistant:", [" hello", " go away"]
    assert older.score(context, responses) != final.score(context, responses)
    assert final.score(context, responses) == RewardScorer.from_folder(out).score(context, responses)


@pytest.mark.slow
def test_short_run_learns_well_above_chance_and_exports_a_scorer(tmp_path):
    cfg = from_dict({
        "model": {"backbone": "gpt2", "preset": "tiny"},
        "data": {"synthetic": {"train_groups": 1200, "eval_groups": 200, "seed": 1}, "batch_groups": 16},
        "train": {"out_dir": str(tmp_path / "run"), "lr": 2e-3, "epochs": 1, "progress": False},
    })
    summary = train(cfg)
    assert summary["eval_accuracy"] > 0.75, summary
    scorer = RewardScorer.from_folder(summary["model"])
    scores = scorer.score("\n\nHuman: hello\n\nAssistant:", ["a reply", "another reply", "x"])
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)


def test_binary_discrimination_learns_which_label_fits_the_response(tmp_path):
    """The label must flip the score's sign depending on the text before it (an interaction);
    one token carries the quality here, so a tiny model learns it in seconds. Training mixes
    comparison rows (binarized) with responses that carry their own label."""
    import random

    rng = random.Random(0)
    good, bad = [" yes", " sure", " ok"], [" no", " never", " nope"]

    def write(path, n, labelled):
        lines = []
        for i in range(n):
            prompt = f"Q{rng.randrange(1000)}:"
            if labelled and i % 2:
                is_good = rng.random() < 0.5
                row = {"prompt": prompt, "response": rng.choice(good if is_good else bad), "label": is_good}
            else:
                row = {"prompt": prompt, "chosen": rng.choice(good), "rejected": rng.choice(bad)}
            lines.append(json.dumps(row) + "\n")
        path.write_text("".join(lines))
        return str(path)

    summary = train(from_dict({
        "model": {"backbone": "gpt2", "preset": "tiny"},
        "data": {"train": [write(tmp_path / "train.jsonl", 400, True)],
                 "eval": [write(tmp_path / "eval.jsonl", 100, False)], "max_length": 32, "batch_groups": 16},
        "objective": {"name": "binary"},
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 150, "warmup_steps": 10, "lr": 1e-3,
                  "progress": False},
    }))
    assert summary["eval_pairs"] == 100 and summary["eval_accuracy"] > 0.9


def test_a_rank_with_no_evaluation_groups_keeps_in_step_with_a_filler_batch(tmp_path):
    """With more ranks than evaluation groups, an empty rank still runs the forward passes
    the others run (ZeRO-3 gathers parameters inside them) and contributes nothing."""
    import torch

    from rankpm.engine.data.stream import ComparisonStream
    from rankpm.engine.score.evaluate import evaluate
    from rankpm.engine.model.preference_model import PreferenceModel
    from rankpm.engine.train.strategy import LocalStrategy

    out = tmp_path / "run"
    train(tiny_config(out, max_steps=1))
    calls = []
    model = PreferenceModel.load(out / "model")
    model.register_forward_hook(lambda *_: calls.append(1))
    strategy = LocalStrategy(device=torch.device("cpu"))
    filler = next(iter(ComparisonStream(out / "data" / "eval", shuffle=False, batch_groups=1, loop=False)))
    result = evaluate(model, [], strategy=strategy, num_batches=3, filler=filler).metrics
    assert len(calls) == 3 and result["eval_pairs"] == 0 and result["eval_sequences"] == 0


def test_an_encoder_run_reads_the_first_token_and_every_consumer_reads_it_the_same_way(tmp_path):
    """auto reading on an encoder is 'first': the data are framed [CLS] ... [SEP] (two special tokens
    counted in max_length), the model folder records it, and rankpm eval and the export score it so."""
    from rankpm.engine.model.preference_model import PreferenceModel
    from rankpm.engine.score.eval_folder import evaluate_model_folder
    from rankpm.engine.score.export import export_hf

    cfg = from_dict({**tiny_config(tmp_path / "run").to_dict(), "model": {"backbone": "bert", "preset": "tiny"}})
    summary = train(cfg)
    manifest = json.loads((tmp_path / "run" / "data" / "train" / "manifest.json").read_text())
    assert manifest["specials"] == 2 and manifest["lengths"]["sequence"]["max"] <= 192
    assert PreferenceModel.read_meta(summary["model"])["reading"] == "first"
    again = evaluate_model_folder(summary["model"], [str(tmp_path / "run" / "data" / "synthetic_eval.jsonl")])
    assert again["eval_accuracy"] == pytest.approx(summary["eval_accuracy"], abs=1e-6)
    assert export_hf(summary["model"], tmp_path / "hf")["max_abs_difference"] <= 1e-5


def test_data_prepared_for_another_reading_is_prepared_again_or_refused(tmp_path):
    from rankpm.engine.data.stream import ComparisonStream
    from rankpm.engine.model.reading import framing_for
    from rankpm.engine.data.tokenizer import load_tokenizer

    cfg = from_dict({**tiny_config(tmp_path / "run", max_steps=1).to_dict(),
                     "model": {"backbone": "bert", "preset": "tiny", "reading": "end"}})
    train(cfg)
    data = tmp_path / "run" / "data" / "train"
    tok = load_tokenizer(str(data / "tokenizer"))
    with pytest.raises(ValueError, match="prepared for 1 special token.* frames each with 2"):
        ComparisonStream(data, framing=framing_for("first", tok))
    fresh = from_dict({**tiny_config(tmp_path / "run2", max_steps=1).to_dict(),
                       "model": {"backbone": "bert", "preset": "tiny", "reading": "first"},
                       "data": {**cfg.to_dict()["data"], "synthetic": None, "train": [str(data)], "eval": []}})
    with pytest.raises(Exception, match="special tokens per sequence"):
        train(fresh)
