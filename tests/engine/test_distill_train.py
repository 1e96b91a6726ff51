"""objective.name: distill: the student without the prompt learns the prompted teacher's
next-token distributions from a logit cache, in the one training loop.

A tiny GPT-2 teacher saved as a rankpm model folder (bytes tokenizer), a short prompt, k = 8:
every case runs in seconds."""
import json

import pytest
import torch

from rankpm.engine.config import ConfigError, ModelConfig, from_dict
from rankpm.engine.data.logit_shards import LogitStream
from rankpm.engine.data.text_batch import collate_texts
from rankpm.engine.data.tokenizer import load_tokenizer, train_bpe
from rankpm.engine.distill.cache import cache_logits
from rankpm.engine.distill.config import cache_config_from_dict
from rankpm.engine.fingerprint import MismatchError
from rankpm.engine.model.preference_model import PreferenceModel
from rankpm.engine.score.judges import forward
from rankpm.engine.train.loop import train

PROMPT = "\n\nHuman: Be kind.\n\nAssistant: I will be helpful, honest and harmless.\n\n----\n"
TEXTS = ["\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for eight minutes.",
         "\n\nHuman: What is the capital of Peru?\n\nAssistant: I believe it is Lima.",
         "Hello there.", "A short one.", "\n\nHuman: Can you help me steal a car?\n\nAssistant: I can't help."]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A rankpm model folder with an LM head: the teacher, and the student's starting point."""
    root = tmp_path_factory.mktemp("teacher")
    tok = load_tokenizer("bytes")
    tok.save(root / "tok")
    torch.manual_seed(0)
    model = PreferenceModel.build(ModelConfig(backbone="gpt2", preset="tiny"), vocab_size=tok.vocab_size,
                                  pad_id=tok.pad_id, eoc_id=tok.eoc_id, max_length=512, with_lm_head=True)
    cfg = from_dict({"data": {"synthetic": {}, "max_length": 512}, "objective": {"name": "imitation"}})
    model.save(root / "model", extra={"config": cfg.to_dict()}, tokenizer_dir=root / "tok")
    return root / "model"


def make_cache(root, teacher, texts, **distill):
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompt.txt").write_text(PROMPT)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = cache_config_from_dict({
        "teacher": {"model": str(teacher)},
        "corpus": {"files": [str(root / "corpus.jsonl")], "kind": "text"},
        "distill": {"out_dir": str(root / "logits"), "prompt": str(root / "prompt.txt"), "k": 8,
                    "batch_texts": 4, "rows_per_shard": 8, **distill}})
    cache_logits(cfg)
    return root / "logits"


def distill_config(out_dir, teacher, train_cache, eval_cache=None, **train):
    return from_dict({
        "model": {"init_from": str(teacher)},
        "data": {"train": [str(train_cache)], "eval": [str(eval_cache)] if eval_cache else [],
                 "batch_groups": 4, "eval_batch_groups": 8, "shuffle_buffer": 16},
        "objective": {"name": "distill"},
        "train": {"out_dir": str(out_dir), "lr": 3e-3, "warmup_steps": 0, "log_every": 1, "progress": False,
                  **train},
    })


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_the_batch_lines_each_position_up_with_the_teacher_entry_of_the_token_after_it(tmp_path, teacher, mode):
    """The model's distillation term on a packed batch equals the KL computed by hand from dense
    logits, text by text: position t's log-softmax against the cache's entry t."""
    cache = make_cache(tmp_path, teacher, TEXTS, mode=mode)
    rows = list(LogitStream(cache))
    model = PreferenceModel.load(teacher, with_lm_head=True).eval()
    batch = collate_texts(rows, pad_id=load_tokenizer("bytes").pad_id, mode=mode)
    assert batch.input_ids.shape[0] < len(rows)  # texts share rows
    with torch.no_grad():
        fused = forward(model, batch, distill=batch.distill).distill
        by_hand = 0.0
        for row in rows:
            ids = torch.as_tensor(row["input_ids"])[None]
            logq = torch.log_softmax(model.transformer(input_ids=ids).logits[0].double(), -1)  # (T, V)
            cached = torch.as_tensor(row["ids"])
            if mode == "topk":
                p = torch.as_tensor(row["logprobs"]).double()
                tail_p = torch.as_tensor(row["tail_logmass"]).double()
                q = logq.gather(1, cached)
                q_tail = torch.log1p(-q.exp().sum(1).clamp(max=1 - 1e-12))
                by_hand += float((p.exp() * (p - q)).sum() + (tail_p.exp() * (tail_p - q_tail)).sum())
            else:
                live = cached >= 0
                w = torch.as_tensor(row["counts"]).double() * live
                w = w / w.sum(1, keepdim=True)
                by_hand += float(-(w * logq.gather(1, cached.clamp(min=0))).sum())
    assert float(fused) == pytest.approx(by_hand, rel=1e-4)


def test_the_student_without_the_prompt_moves_towards_the_prompted_teacher(tmp_path, teacher):
    texts = [t + f" ({i})" for i in range(12) for t in TEXTS]
    train_cache = make_cache(tmp_path / "train", teacher, texts[:48])
    eval_cache = make_cache(tmp_path / "eval", teacher, texts[48:])
    summary = train(distill_config(tmp_path / "run", teacher, train_cache, eval_cache, max_steps=12, eval_every=4))
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kls = [row["eval_kl"] for row in evals if row["kind"] == "eval"]
    assert len(kls) >= 3 and kls[-1] < kls[0] * 0.8, kls
    train_rows = [row for row in evals if row["kind"] == "train"]
    assert all("kl" in row for row in train_rows)
    meta = PreferenceModel.read_meta(summary["model"])
    assert meta["has_lm_head"] and meta["config"]["objective"]["name"] == "distill"


def test_a_cache_from_another_tokenizer_is_refused_naming_both(tmp_path, teacher):
    cache = make_cache(tmp_path, teacher, TEXTS)
    cfg = distill_config(tmp_path / "run", teacher, cache, max_steps=1)
    train_bpe(TEXTS * 4, 300).save(tmp_path / "bpe")
    cfg = from_dict({**cfg.to_dict(), "model": {"backbone": "gpt2", "preset": "tiny"},
                     "data": {**cfg.to_dict()["data"], "tokenizer": str(tmp_path / "bpe")}})
    with pytest.raises(MismatchError, match="the tokenizer differs between the logit cache and the student"):
        train(cfg)


def test_distill_trains_on_one_logit_cache_and_says_so_otherwise(tmp_path, teacher):
    with pytest.raises(ConfigError, match="data.train: objective.name='distill' trains on one logit cache folder"):
        from_dict({"objective": {"name": "distill"}, "data": {"synthetic": {}}})
    with pytest.raises(FileNotFoundError, match="not a logit cache"):
        train(distill_config(tmp_path / "run", teacher, tmp_path, max_steps=1))


def test_distillation_is_a_stage_like_any_other(tmp_path, teacher):
    """A stage of language modelling, then a distillation stage from its weights."""
    from rankpm.engine.data.synthetic import generate
    from rankpm.engine.train.stages import run_stages

    cache = make_cache(tmp_path, teacher, TEXTS)
    dialogues = generate(tmp_path / "dialogues.jsonl", groups=16, seed=0)
    cfg = from_dict({
        "data": {"train": [str(dialogues)], "batch_groups": 4, "max_length": 256},
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 2, "progress": False, "log_every": 1},
        "stages": [{"name": "lm", "objective": {"name": "imitation"}},
                   {"name": "distill", "data": {"train": [str(cache)]}, "objective": {"name": "distill"},
                    "lr_scale": 0.05}],
    })
    result = run_stages(cfg)
    assert [s["stage"] for s in result["stages"]] == ["lm", "distill"]
    meta = PreferenceModel.read_meta(tmp_path / "run" / "stages" / "1-distill" / "model")
    assert meta["config"]["model"]["init_from"].endswith("0-lm/model") and meta["has_lm_head"]
