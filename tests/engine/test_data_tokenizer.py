"""Tokenizers: bytes, a BPE trained on the inputs, a local transformers folder; save and load."""
import pytest

from rankpm.engine.data.schema import END_OF_CONTEXT, PAD
from rankpm.engine.data.tokenizer import (ByteTokenizer, TokenizerError, build_tokenizer, load_tokenizer,
                                          train_bpe)

TEXTS = ["\n\nHuman: How do I boil an egg?\n\nAssistant:", " Put it in boiling water for eight minutes.",
         " I don't know.", "héllo wörld ✓"] * 20


def test_bytes_round_trip_and_specials():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.eoc_id) == (264, 256, 257)
    text = "héllo ✓"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text
    # the special token's text is just bytes: only collate places the real end-of-context
    assert tok.eoc_id not in tok.encode(END_OF_CONTEXT)
    assert tok.decode([104, 105, tok.eoc_id]) == "hi" + END_OF_CONTEXT


def test_bytes_save_and_load(tmp_path):
    tok = ByteTokenizer()
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert isinstance(again, ByteTokenizer) and again.identity() == tok.identity()


def test_bpe_is_deterministic_round_trips_and_reloads(tmp_path):
    a, b = train_bpe(iter(TEXTS), 300), train_bpe(iter(TEXTS), 300)
    assert a.identity() == b.identity()
    assert a.identity()["kind"] == "bpe" and a.vocab_size <= 300
    for text in TEXTS[:4]:
        assert a.decode(a.encode(text)) == text
    assert a.encode_batch(TEXTS[:2]) == [a.encode(TEXTS[0]), a.encode(TEXTS[1])]
    assert len(a.encode(TEXTS[1])) < len(TEXTS[1])  # it did learn merges
    a.save(tmp_path / "bpe")
    again = load_tokenizer(tmp_path / "bpe")
    assert again.identity() == a.identity() and again.encode(TEXTS[0]) == a.encode(TEXTS[0])
    assert {again.pad_id, again.eoc_id} == {again.hf.convert_tokens_to_ids(PAD),
                                            again.hf.convert_tokens_to_ids(END_OF_CONTEXT)}


def test_bpe_needs_texts_and_a_sensible_size():
    with pytest.raises(TokenizerError, match="trained on the input texts"):
        build_tokenizer("bpe:500")
    with pytest.raises(TokenizerError, match="expected bpe:<vocab size>"):
        build_tokenizer("bpe:big", texts=lambda: TEXTS)
    with pytest.raises(TokenizerError, match="at least the 256 bytes"):
        build_tokenizer("bpe:100", texts=lambda: TEXTS)


def transformers_folder(path, *, with_specials: bool):
    """A tiny word-level BPE wrapped as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[UNK]"] + ([PAD, END_OF_CONTEXT] if with_specials else [])
    raw.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=120, special_tokens=specials, show_progress=False))
    extra = {"pad_token": PAD} if with_specials else {}
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", **extra).save_pretrained(str(path))
    return path


def test_transformers_folder_gets_the_missing_specials_and_reports_growth(tmp_path, caplog):
    folder = transformers_folder(tmp_path / "hf", with_specials=False)
    with caplog.at_level("WARNING"):
        tok = load_tokenizer(folder)
    ident = tok.identity()
    assert ident["kind"] == "transformers" and ident["added_tokens"] == [PAD, END_OF_CONTEXT]
    assert tok.vocab_size == ident["base_vocab_size"] + 2
    assert {tok.pad_id, tok.eoc_id} == {ident["base_vocab_size"], ident["base_vocab_size"] + 1}
    assert "vocabulary grows" in caplog.text
    ids = tok.encode("boil an egg")
    assert ids and max(ids) < tok.vocab_size and tok.eoc_id not in ids
    # the prepared folder keeps exactly this tokenizer, growth record included
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.identity() == ident and again.encode("boil an egg") == ids


def test_transformers_folder_with_specials_is_unchanged(tmp_path):
    folder = transformers_folder(tmp_path / "hf", with_specials=True)
    tok = load_tokenizer(folder)
    assert tok.identity()["added_tokens"] == [] and tok.vocab_size == tok.identity()["base_vocab_size"]


def test_unknown_tokenizer_spec_is_named(tmp_path):
    with pytest.raises(TokenizerError, match="no such folder"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="not a transformers tokenizer folder"):
        load_tokenizer(tmp_path / "empty")
