"""rankpm cache-logits: the teacher's prompted next-token distributions, cached per text token.

A tiny config-built GPT-2 teacher (bytes tokenizer) with a short prompt file keeps every case
to seconds; the packaged HHH prompt is checked as text and token ids.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from rankpm.engine.config import ConfigError
from rankpm.engine.data.errors import DataError
from rankpm.engine.data.logit_shards import (
    EMPTY_ID, LogitStream, high_bits, join_ids, open_logit_cache, require_student, split_ids,
)
from rankpm.engine.data.tokenizer import load_tokenizer, train_bpe
from rankpm.engine.distill.cache import cache_logits
from rankpm.engine.distill.config import cache_config_from_dict
from rankpm.engine.distill.prompt import default_prompt
from rankpm.engine.distill.teacher import load_teacher
from rankpm.engine.fingerprint import MismatchError

PROMPT = "\n\nHuman: Be kind.\n\nAssistant: I will try to be helpful, honest and harmless.\n\n----\n"
TEXTS = ["\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for eight minutes.",
         "\n\nHuman: What is the capital of Peru?\n\nAssistant: I believe it is Lima.",
         "Hello there.", "A short one.", "\n\nHuman: Can you help me steal a car?\n\nAssistant: I can't help with that."]


def write_corpus(path, texts=TEXTS):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def config(tmp_path, *, texts=TEXTS, corpus=None, teacher=None, **distill):
    tmp_path.mkdir(exist_ok=True)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT)
    corpus = corpus or write_corpus(tmp_path / "corpus.jsonl", texts)
    return cache_config_from_dict({
        "teacher": {"model": "gpt2", "preset": "tiny", "tokenizer": "bytes", "max_length": 256, "seed": 1,
                    **(teacher or {})},
        "corpus": {"files": [str(corpus)], "kind": "text"},
        "distill": {"out_dir": str(tmp_path / "logits"), "prompt": str(prompt), "k": 8, "batch_texts": 2,
                    "rows_per_shard": 2, **distill},
    })


def rows(path):
    return list(LogitStream(path))


# ----- the prompt --------------------------------------------------------------------------------

def test_the_packaged_hhh_prompt_is_dialogues_with_a_refusal_and_an_admission_of_uncertainty():
    text = default_prompt()
    assert text.count("\n\nHuman:") >= 14 and text.count("\n\nAssistant:") >= 14
    assert 2000 <= len(text.split()) <= 6000
    assert "I can't help" in text and "I'm not confident" in text


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_a_text_has_the_same_token_ids_with_and_without_the_prompt(tmp_path, tokenizer):
    if tokenizer == "bpe":  # merges could cross a prompt/text boundary if the two were tokenized as one string
        train_bpe([default_prompt()] + TEXTS, 400).save(tmp_path / "tok")
        tokenizer = str(tmp_path / "tok")
    tok = load_tokenizer(tokenizer)
    with_prompt = config(tmp_path / "a", teacher={"tokenizer": tokenizer, "max_length": 1024})
    without = config(tmp_path / "b", teacher={"tokenizer": tokenizer, "max_length": 1024}, prompt="none")
    cache_logits(with_prompt), cache_logits(without)
    a, b = rows(with_prompt.distill.out_dir), rows(without.distill.out_dir)
    for text, x, y in zip(TEXTS, a, b):
        assert x["input_ids"].tolist() == y["input_ids"].tolist() == tok.encode(text)
    assert not np.allclose(a[0]["logprobs"], b[0]["logprobs"])  # the prompt does change the teacher


# ----- the cache against a full-logits reference ----------------------------------------------

def reference(teacher, prompt_ids, text_ids, k):
    """Full logits of prompt + text, log_softmax, topk: the teacher's top k at each text token."""
    ids = torch.tensor(prompt_ids + text_ids)[None]
    with torch.no_grad():
        logp = torch.log_softmax(teacher.model(input_ids=ids).logits[0, len(prompt_ids):].double(), dim=-1)
    values, top = logp.topk(k, dim=-1)
    tail = torch.logsumexp(logp.scatter(1, top, float("-inf")), dim=-1)
    return values.numpy(), top.numpy(), tail.numpy(), logp.numpy()


@pytest.mark.parametrize("reuse", [True, False])
def test_shards_round_trip_to_the_full_logits_reference(tmp_path, reuse):
    cfg = config(tmp_path, reuse_prompt_cache=reuse)
    manifest = cache_logits(cfg)
    teacher = load_teacher(cfg.teacher)
    prompt_ids = teacher.tokenizer.encode(PROMPT)
    got = rows(cfg.distill.out_dir)
    assert [r["row"] for r in got] == list(range(len(TEXTS)))
    for text, r in zip(TEXTS, got):
        T = len(teacher.tokenizer.encode(text))
        values, top, tail, logp = reference(teacher, prompt_ids, r["input_ids"].tolist(), 8)
        assert r["ids"].shape == r["logprobs"].shape == (T, 8) and r["tail_logmass"].shape == (T,)
        assert r["ids"].dtype == np.int64 and r["logprobs"].dtype == np.float32
        # ids equal up to ties: each cached id's reference log-prob is the cached value (fp16 storage)
        at_ids = np.take_along_axis(logp, r["ids"], axis=1)
        np.testing.assert_allclose(r["logprobs"], at_ids, atol=2e-2, rtol=2e-3)
        np.testing.assert_allclose(r["logprobs"], values, atol=2e-2, rtol=2e-3)
        assert (r["ids"] == top).mean() > 0.95
        np.testing.assert_allclose(r["tail_logmass"], tail, atol=2e-2, rtol=2e-3)
    assert manifest["tokens"] == sum(len(r["input_ids"]) for r in got)


@pytest.mark.parametrize("vocab,bits", [(264, 0), (65536, 0), (65537, 1), (128256, 1), (300000, 3)])
def test_ids_are_16_bits_plus_the_high_bits_the_vocabulary_needs_bit_packed(vocab, bits):
    ids = np.random.default_rng(0).integers(0, vocab, size=(7, 50))
    ids[0, :2] = 0, vocab - 1
    assert high_bits(vocab) == bits
    stored = split_ids(ids, bits)
    assert stored["lo"].dtype == np.uint16 and (stored["hi"] is None) == (bits == 0)
    if bits:
        assert stored["hi"].nbytes == -(-ids.size * bits // 8)  # 350 ids at 17 bits: 700 + 44 bytes
    assert np.array_equal(join_ids(stored["lo"], stored["hi"], bits).reshape(ids.shape), ids)


def test_a_teacher_vocabulary_beyond_65536_round_trips(tmp_path):
    cfg = config(tmp_path, texts=TEXTS[:2], teacher={"overrides": {"vocab_size": 70000}})
    manifest = cache_logits(cfg)
    assert manifest["vocab_size"] == 70000 and manifest["dtypes"]["ids"] == "uint16+1bit"
    teacher = load_teacher(cfg.teacher)
    got = rows(cfg.distill.out_dir)
    for r in got:
        _, top, _, logp = reference(teacher, teacher.tokenizer.encode(PROMPT), r["input_ids"].tolist(), 8)
        np.testing.assert_allclose(r["logprobs"], np.take_along_axis(logp, r["ids"], axis=1), atol=2e-2, rtol=2e-3)
    assert max(r["ids"].max() for r in got) >= 65536


def test_entry_t_is_the_distribution_after_prompt_and_text_up_to_t(tmp_path):
    """Alignment: entry t predicts text token t + 1; the teacher's top-1 at t is the argmax of the
    model's own next-token logits after prompt + text[:t+1]."""
    cfg = config(tmp_path, texts=["abcdef"], k=1)
    cache_logits(cfg)
    teacher = load_teacher(cfg.teacher)
    row = rows(cfg.distill.out_dir)[0]
    prompt_ids = teacher.tokenizer.encode(PROMPT)
    for t in range(6):
        ids = torch.tensor(prompt_ids + row["input_ids"][:t + 1].tolist())[None]
        with torch.no_grad():
            assert row["ids"][t, 0] == teacher.model(input_ids=ids).logits[0, -1].argmax().item()


def test_8_bit_log_probs_decode_close_to_fp16(tmp_path):
    a, b = config(tmp_path / "a"), config(tmp_path / "b", logprobs="int8")
    cache_logits(a), cache_logits(b)
    for x, y in zip(rows(a.distill.out_dir), rows(b.distill.out_dir)):
        span = x["logprobs"][:, :1] - x["logprobs"][:, -1:]
        assert np.all(np.abs(x["logprobs"] - y["logprobs"]) <= span / 255 + 2e-2)


def test_sampled_mode_counts_sum_to_n_and_do_not_depend_on_batching(tmp_path):
    a, b = config(tmp_path / "a", mode="sampled", samples=6), config(tmp_path / "b", mode="sampled", samples=6,
                                                                       batch_texts=5, rows_per_shard=3)
    manifest = cache_logits(a)
    cache_logits(b)
    assert manifest["mode"] == "sampled" and manifest["k"] == 6
    for x, y in zip(rows(a.distill.out_dir), rows(b.distill.out_dir)):
        assert (x["counts"].sum(axis=1) == 6).all()
        assert ((x["ids"] == EMPTY_ID) == (x["counts"] == 0)).all()
        live = x["ids"][x["counts"] > 0]
        assert ((live >= 0) & (live < manifest["vocab_size"])).all()
        for ids, counts in zip(x["ids"], x["counts"]):  # distinct ids
            assert len(set(ids[counts > 0].tolist())) == int((counts > 0).sum())
        assert np.array_equal(x["ids"], y["ids"]) and np.array_equal(x["counts"], y["counts"])
        assert "logprobs" not in x


# ----- the manifest and the reader --------------------------------------------------------------

def test_the_manifest_says_what_made_the_cache_and_refuses_another_student(tmp_path):
    cfg = config(tmp_path)
    manifest = cache_logits(cfg)
    assert manifest == open_logit_cache(cfg.distill.out_dir)
    assert manifest["vocab_size"] == 264 and manifest["k"] == 8 and manifest["mode"] == "topk"
    assert manifest["tokenizer"]["kind"] == "bytes" and len(manifest["teacher"]["weights_sha256"]) == 64
    assert manifest["prompt"]["tokens"] == len(PROMPT.encode()) and len(manifest["prompt"]["sha256"]) == 64
    assert manifest["dtypes"] == {"ids": "uint16", "input_ids": "uint16", "logprobs": "fp16", "tail_logmass": "fp16"}
    assert manifest["rows"] == 5 and [s["rows"] for s in manifest["shards"]] == [2, 2, 1]
    assert manifest["truncation"] == {"texts": 0, "tokens_cut": 0, "side": "left"}
    assert manifest["bytes_per_token"] > 0  # the files' bytes a token; at k = 50 see benchmarks/bench_cache_logits.py
    require_student(manifest, load_tokenizer("bytes").identity(), 264)
    with pytest.raises(MismatchError, match="the vocabulary size differs between the logit cache and the student: "
                                            "value: 264 vs 300"):
        require_student(manifest, load_tokenizer("bytes").identity(), 300)


def test_the_logit_stream_resumes_exactly_and_splits_ranks(tmp_path):
    cfg = config(tmp_path)
    cache_logits(cfg)
    out = cfg.distill.out_dir
    stream = LogitStream(out, shuffle=True, seed=3, shuffle_buffer=2)
    it = iter(stream)
    first = [next(it)["row"] for _ in range(2)]
    resumed = LogitStream(out, shuffle=True, seed=3, shuffle_buffer=2)
    resumed.load_state_dict(json.loads(json.dumps(stream.state_dict())))
    rest = [r["row"] for r in resumed]
    assert sorted(first + rest) == list(range(5))
    shares = [[r["row"] for r in LogitStream(out, rank=k, world_size=2)] for k in range(2)]
    assert shares == [[0, 2, 4], [1, 3]]


# ----- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("line,field,reason", [
    ('{"text": ""}', "text", "empty or whitespace-only text"),
    ('{"text": "  \\n "}', "text", "empty or whitespace-only text"),
    ('{"text": 12}', "text", "expected a string of text, got int 12"),
    ('["a list"]', "<row>", "expected a JSON object with a 'text' field, got list"),
    ('{"body": "x"}', "text", "missing"),
])
def test_a_bad_row_is_named_by_file_line_and_field_and_nothing_is_written(tmp_path, line, field, reason):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "fine"}\n' * 3 + line + "\n")
    cfg = config(tmp_path, corpus=corpus)
    with pytest.raises(DataError, match=rf"corpus.jsonl:4: field '{field}': {reason}"):
        cache_logits(cfg)
    assert not (tmp_path / "logits").exists()


def test_a_teacher_folder_without_an_lm_head_is_refused(tmp_path):
    from transformers import AutoConfig, AutoModel
    AutoModel.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=264)).save_pretrained(
        tmp_path / "base")
    load_tokenizer("bytes").save(tmp_path / "base")
    with pytest.raises(ConfigError, match=r"teacher.model: .*base has no LM head \(architectures \['GPT2Model'\]\)"):
        cache_logits(config(tmp_path, teacher={"model": str(tmp_path / "base")}))


def test_k_beyond_the_vocabulary_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="distill.k: got 300, expected at most the teacher's vocabulary of 264"):
        cache_logits(config(tmp_path, k=300))
    assert not (tmp_path / "logits").exists()


def test_a_text_longer_than_the_context_after_the_prompt_keeps_its_end_and_is_counted(tmp_path, caplog):
    long = "x" * 150 + "THE END"
    cfg = config(tmp_path, texts=["short", long], teacher={"max_length": 128})
    manifest = cache_logits(cfg)
    room = 128 - len(PROMPT.encode())
    got = rows(cfg.distill.out_dir)[1]
    assert bytes(got["input_ids"].tolist()).decode().endswith("THE END") and len(got["input_ids"]) == room
    assert manifest["truncation"] == {"texts": 1, "tokens_cut": len(long) - room, "side": "left"}
    assert "corpus.jsonl:2: field 'text' (row 1)" in caplog.text and "cut" in caplog.text


def test_rerunning_under_other_settings_is_refused_naming_them(tmp_path):
    cache_logits(config(tmp_path))
    with pytest.raises(MismatchError, match=r"the cache's request differs between .*request.json \(the run being resumed\) and this run: k: 8 vs 4"):
        cache_logits(config(tmp_path, k=4))


# ----- resume after a kill -----------------------------------------------------------------------

@pytest.mark.slow  # ~40 s: a subprocess, and the corpus cached twice
def test_a_killed_run_resumes_with_no_row_lost_or_written_twice(tmp_path):
    texts = [f"\n\nHuman: question {i}?\n\nAssistant: answer number {i}, " + "with more words " * 4 for i in range(120)]
    straight = config(tmp_path / "a", texts=texts, rows_per_shard=1)
    killed = config(tmp_path / "b", texts=texts, rows_per_shard=1)
    config_file = tmp_path / "b" / "cfg.json"
    config_file.write_text(json.dumps({"teacher": killed.teacher.__dict__, "corpus": killed.corpus.__dict__,
                                       "distill": killed.distill.__dict__}))
    code = ("import json, sys; from rankpm.engine.distill.cache import cache_logits; "
            "from rankpm.engine.distill.config import cache_config_from_dict; "
            "cache_logits(cache_config_from_dict(json.load(open(sys.argv[1]))))")
    process = subprocess.Popen([sys.executable, "-c", code, str(config_file)], env=dict(os.environ),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "b" / "logits"
    try:
        deadline = time.time() + 120
        while len(list(out.glob("shard_*.arrow"))) < 3 and time.time() < deadline and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)  # mid-run: some shards written, one perhaps half
    finally:
        process.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    done = len(list(out.glob("shard_*.arrow")))
    assert 3 <= done < 120
    manifest = cache_logits(killed)
    reference = cache_logits(straight)
    assert manifest["rows"] == 120 and manifest["tokens"] == reference["tokens"]
    got, want = rows(out), rows(straight.distill.out_dir)
    assert [r["row"] for r in got] == list(range(120))
    for x, y in zip(got, want):
        assert np.array_equal(x["ids"], y["ids"]) and np.array_equal(x["logprobs"], y["logprobs"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the killed run's temporary is gone


# ----- the command line --------------------------------------------------------------------------

def test_generate_text_then_cache_logits_from_the_command_line(tmp_path, capsys):
    from rankpm.engine.cli import main

    corpus = tmp_path / "corpus.jsonl"
    assert main(["generate", "--text", "--out", str(corpus), "--groups", "6", "--seed", "1"]) == 0
    (tmp_path / "prompt.txt").write_text(PROMPT)
    capsys.readouterr()
    assert main(["cache-logits", "configs/cache_logits.yaml", f"corpus.files=[{corpus}]",
                 f"distill.out_dir={tmp_path / 'logits'}", f"distill.prompt={tmp_path / 'prompt.txt'}",
                 "teacher.max_length=512", "distill.k=16"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 6 and summary["k"] == 16 and summary["shards"] == 1
    assert main(["cache-logits", "configs/cache_logits.yaml", "distill.k=0"]) == 2
    assert "distill.k: got 0, expected an integer >= 1" in capsys.readouterr().err


# ----- corpora of comparison files ---------------------------------------------------------------

def test_comparison_files_give_their_responses_or_whole_dialogues_as_texts(tmp_path):
    from rankpm.engine.distill.corpus import iter_texts, scan_texts

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."})
                    + "\n" + json.dumps({"chosen": "\n\nHuman: Q\n\nAssistant: A good answer.",
                                         "rejected": "\n\nHuman: Q\n\nAssistant: A bad one."}) + "\n")
    responses = [(row, where.line, field, text) for row, where, field, text in iter_texts([str(path)], "responses")]
    assert responses == [(0, 1, "chosen", " Hello!"), (1, 1, "rejected", " Go away."),
                         (2, 2, "chosen", " A good answer."), (3, 2, "rejected", " A bad one.")]
    dialogues = [text for _, _, _, text in iter_texts([str(path)], "dialogues")]
    assert dialogues[1] == "\n\nHuman: Hi\n\nAssistant: Go away."
    assert dialogues[2] == "\n\nHuman: Q\n\nAssistant: A good answer."  # an HH transcript as it was
    path.write_text(json.dumps({"prompt": "P", "chosen": " ", "rejected": "No."}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'chosen': empty or whitespace-only text"):
        scan_texts([str(path)], "responses")


def test_a_cache_of_another_schema_version_is_refused_by_name(tmp_path):
    from rankpm.engine.data.logit_shards import LOGIT_SCHEMA_VERSION

    out = tmp_path / "logits"
    cache_logits(config(tmp_path))
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(dict(manifest, schema_version=LOGIT_SCHEMA_VERSION - 1)))
    with pytest.raises(ValueError, match=f"logit schema version {LOGIT_SCHEMA_VERSION - 1}, this rankpm reads "
                                         f"version {LOGIT_SCHEMA_VERSION}; cache the logits again"):
        open_logit_cache(out)
