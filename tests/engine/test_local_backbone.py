"""A user's own local model folder and HH-RLHF-style transcripts: the quickstart with the
backbone, tokenizer and data swapped, nothing else."""
import json

import pytest

from rankpm.engine.config import load_config
from rankpm.engine.data.synthetic import generate
from rankpm.engine.train.loop import train
from tests_paths import QUICKSTART


def hh_transcripts(src, dst):
    """Ranked synthetic groups -> HH-RLHF rows: whole dialogues, best vs worst response."""
    with open(src) as f, open(dst, "w") as out:
        for line in f:
            g = json.loads(line)
            best = g["responses"][g["ranks"].index(min(g["ranks"]))]
            worst = g["responses"][g["ranks"].index(max(g["ranks"]))]
            out.write(json.dumps({"chosen": g["prompt"] + best, "rejected": g["prompt"] + worst}) + "\n")
    return dst


def local_model_folder(folder, texts, arch):
    """What a user brings: a transformers tokenizer and a small model saved side by side."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    tok.save_pretrained(str(folder))
    config = AutoConfig.for_model(arch, vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128, max_position_embeddings=256)
    AutoModel.from_config(config).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_local_model_folder_trains_on_hh_style_transcripts(tmp_path, arch):
    train_file = hh_transcripts(generate(tmp_path / "a.jsonl", groups=600, seed=1), tmp_path / "hh_train.jsonl")
    eval_file = hh_transcripts(generate(tmp_path / "b.jsonl", groups=150, seed=2), tmp_path / "hh_test.jsonl")
    texts = [json.loads(line)["chosen"] for line in open(train_file)]
    folder = local_model_folder(tmp_path / "my-model", texts, arch)

    cfg = load_config(QUICKSTART, [
        f"model.backbone={folder}", f"data.tokenizer={folder}", "data.synthetic=null",
        f"data.train=[{train_file}]", f"data.eval=[{eval_file}]",
        f"train.out_dir={tmp_path / 'run'}", "train.progress=false", "train.epochs=3", "train.eval_every=0",
        "train.save_every=0"])
    summary = train(cfg)
    assert summary["eval_pairs"] == 150
    assert summary["eval_accuracy"] > 0.7, summary
    manifest = json.loads((tmp_path / "run" / "data" / "train" / "manifest.json").read_text())
    assert manifest["tokenizer"]["added_tokens"]  # the end-of-context token was added; embeddings grew
