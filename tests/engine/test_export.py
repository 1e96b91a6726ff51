"""Hugging Face checkpoints out: AutoModelForSequenceClassification loads the export and reads
rankpm's end-of-context token, left or right padded, scoring as rankpm scores."""
import json

import pytest
import torch

from rankpm.engine.config import ModelConfig, from_dict
from rankpm.engine.data.prepare import prepare
from rankpm.engine.data.tokenizer import load_tokenizer
from rankpm.engine.model.preference_model import PreferenceModel
from rankpm.engine.score.export import ExportError, export_hf
from rankpm.engine.score.scorer import RewardScorer

TEXTS = [("\n\nHuman: How do I boil an egg?\n\nAssistant:", [" Boil water, add the egg for eight minutes.", " No."]),
         ("\n\nHuman: Say hi.\n\nAssistant:", ["", " Hi! <|endofcontext|> is just text here."])]
DECODERS = [("gpt2", {}), ("llama", {"num_key_value_heads": 2}), ("qwen2", {"num_key_value_heads": 2})]


def model_folder(root, backbone, overrides, tokenizer="bytes", reading="end"):
    """A rankpm model folder (random init) with the given tokenizer."""
    if tokenizer != "bytes":  # a BPE trained on a little text
        src = root / "text.jsonl"
        src.write_text("".join(json.dumps({"prompt": c, "chosen": r[0], "rejected": r[1] or " x"}) + "\n"
                               for c, r in TEXTS * 20))
        prepare([src], root / "prepared", tokenizer, max_length=128)
        tokenizer = str(root / "prepared" / "tokenizer")
        tok_dir = root / "prepared" / "tokenizer"
    else:
        tok_dir = root / "bytes_tok"
        load_tokenizer("bytes").save(tok_dir)
    tok = load_tokenizer(tokenizer)
    torch.manual_seed(0)
    model = PreferenceModel.build(ModelConfig(backbone=backbone, preset="tiny", overrides=overrides),
                                  vocab_size=tok.vocab_size, pad_id=tok.pad_id, eoc_id=tok.eoc_id, max_length=128,
                                  reading=reading)
    with torch.no_grad():  # a head that separates the responses, so equal scores would not pass by chance
        model.score_head.weight.normal_()
    cfg = from_dict({"data": {"synthetic": {}, "max_length": 128, "tokenizer": tokenizer}})
    model.save(root / "model", extra={"config": cfg.to_dict()}, tokenizer_dir=tok_dir)
    return root / "model"


@pytest.mark.parametrize("backbone, overrides", DECODERS, ids=[d[0] for d in DECODERS])
@pytest.mark.parametrize("tokenizer", ["bytes", "bpe:300"])
def test_transformers_loads_the_export_and_scores_as_rankpm(tmp_path, backbone, overrides, tokenizer):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = model_folder(tmp_path, backbone, overrides, tokenizer)
    summary = export_hf(folder, tmp_path / "hf")
    assert summary["max_abs_difference"] <= 1e-5
    hf, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert hf.config.num_labels == 1 and not info["missing_keys"] and not info["unexpected_keys"]
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.config.pad_token_id == hf_tok.pad_token_id != hf_tok.convert_tokens_to_ids("<|endofcontext|>")
    scorer = RewardScorer.from_folder(folder)
    for context, responses in TEXTS:
        ours = scorer.score(context, responses)
        for side in ("right", "left"):
            hf_tok.padding_side = side
            enc = hf_tok([context + r for r in responses], padding=True, return_tensors="pt")
            last = enc["input_ids"][:, -1] if side == "left" else None
            if side == "left":  # the last column is each text's end-of-context token
                assert (last == hf_tok.convert_tokens_to_ids("<|endofcontext|>")).all()
                enc["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                theirs = hf(**enc).logits[:, 0].tolist()
            assert theirs == pytest.approx(ours, abs=1e-5), (side, context)


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe:300"])
def test_an_encoder_reading_its_first_token_exports_as_transformers_reads_it(tmp_path, tokenizer):
    """BertForSequenceClassification: [CLS] text [SEP], the pooler on [CLS], the classifier (bias 0)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = model_folder(tmp_path, "bert", {}, tokenizer, reading="first")
    summary = export_hf(folder, tmp_path / "hf")
    assert summary["architecture"] == "BertForSequenceClassification" and summary["max_abs_difference"] <= 1e-5
    hf, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and float(hf.classifier.bias.detach()) == 0.0
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    scorer = RewardScorer.from_folder(folder)
    for context, responses in TEXTS:
        enc = hf_tok([context + r for r in responses], padding=True, return_tensors="pt")
        with torch.no_grad():
            theirs = hf(**enc).logits[:, 0].tolist()
        assert theirs == pytest.approx(scorer.score(context, responses), abs=1e-5)


def test_an_encoder_reading_an_end_of_context_token_is_refused_with_the_reason(tmp_path):
    folder = model_folder(tmp_path, "bert", {}, reading="end")
    with pytest.raises(ExportError, match="transformers' encoder classifiers read the first token through the "
                                          "backbone's pooler.*model.reading: first"):
        export_hf(folder, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_the_command_line_exports(tmp_path):
    from rankpm.engine.cli import main

    folder = model_folder(tmp_path, "gpt2", {})
    assert main(["export", str(folder), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()


# ----- Hugging Face checkpoints in ----------------------------------------------------------

def trl_style_reward_folder(root):
    """What TRL or OpenRLHF leave: a LlamaForSequenceClassification and its tokenizer with an
    end-of-sequence token, the score read at the last token that is not padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = [c + r for c, rs in TEXTS for r in rs] * 20
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(root)
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                                  max_position_embeddings=128, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(root)
    return root, tok


def hf_scores(folder, tok, pairs):
    """Scores as a TRL user gets them: the text, the end-of-sequence token after it."""
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    for text in pairs:
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            out.append(hf(input_ids=torch.tensor([ids])).logits[0, 0].item())
    return out


def test_a_reward_model_trained_elsewhere_is_evaluated_as_transformers_scores_it(tmp_path):
    from rankpm.engine.score.eval_folder import evaluate_model_folder

    folder, tok = trl_style_reward_folder(tmp_path / "trl-rm")
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": c, "chosen": r[0], "rejected": r[1]} for c, r in TEXTS]
    rows += [{"prompt": c, "chosen": r[1], "rejected": r[0]} for c, r in TEXTS]  # both orders: not all right
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    theirs = hf_scores(folder, tok, [r["prompt"] + x for r in rows for x in (r["chosen"], r["rejected"])])
    expected = sum(theirs[2 * i] > theirs[2 * i + 1] for i in range(len(rows))) / len(rows)
    report = evaluate_model_folder(folder, [str(data)])
    assert report["eval_pairs"] == len(rows) and report["eval_accuracy"] == pytest.approx(expected)
    ours = RewardScorer.from_folder(folder).score_groups([(r["prompt"], [r["chosen"], r["rejected"]]) for r in rows])
    assert [s for pair in ours for s in pair] == pytest.approx(theirs, abs=1e-5)  # the model's own scores


def test_fine_tuning_starts_from_the_reward_models_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    folder, tok = trl_style_reward_folder(tmp_path / "trl-rm")
    ours = load_tokenizer(folder)
    assert ours.eoc_id == tok.eos_token_id and ours.vocab_size == len(tok)  # its own end token, nothing added
    model = PreferenceModel.build(ModelConfig(backbone=str(folder)), vocab_size=ours.vocab_size, pad_id=ours.pad_id,
                                  eoc_id=ours.eoc_id, max_length=128, tokenizer=ours.identity())
    hf = AutoModelForSequenceClassification.from_pretrained(folder)
    torch.testing.assert_close(model.score_head.weight, hf.score.weight)


def test_an_export_reads_back_as_a_reward_model_with_the_same_accuracy(tmp_path):
    from rankpm.engine.score.eval_folder import evaluate_model_folder

    folder = model_folder(tmp_path, "llama", {"num_key_value_heads": 2}, "bpe:300")
    export_hf(folder, tmp_path / "hf")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": c, "chosen": r[0], "rejected": r[1]}) + "\n" for c, r in TEXTS))
    a, b = evaluate_model_folder(folder, [str(data)]), evaluate_model_folder(tmp_path / "hf", [str(data)])
    assert a["eval_pairs"] == b["eval_pairs"] and a["eval_accuracy"] == b["eval_accuracy"]
    assert a["score_mean"] == pytest.approx(b["score_mean"], abs=1e-5)
