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


def test_a_backbone_folder_with_its_own_tokenizer_refuses_data_made_with_another(tmp_path):
    from rankpm.engine.config import ModelConfig
    from rankpm.engine.data.tokenizer import load_tokenizer
    from rankpm.engine.fingerprint import MismatchError
    from rankpm.engine.model.preference_model import PreferenceModel

    folder = local_model_folder(tmp_path / "my-model", ["a few words to learn from"] * 20, "llama")
    ours, theirs = load_tokenizer("bytes"), load_tokenizer(folder)
    cfg = ModelConfig(backbone=str(folder))
    with pytest.raises(MismatchError, match=r"the tokenizer differs between model.backbone .*my-model \(its own "
                                            r"tokenizer\) and the run's data \(data.tokenizer\): .*kind: "
                                            r"'transformers' vs 'bytes'"):
        PreferenceModel.build(cfg, vocab_size=ours.vocab_size, pad_id=ours.pad_id, eoc_id=ours.eoc_id, max_length=64,
                              tokenizer=ours.identity())
    model = PreferenceModel.build(cfg, vocab_size=theirs.vocab_size, pad_id=theirs.pad_id, eoc_id=theirs.eoc_id,
                                  max_length=64, tokenizer=theirs.identity())
    assert model.transformer.get_input_embeddings().num_embeddings == theirs.vocab_size


def test_a_backbone_path_that_does_not_exist_says_so(tmp_path):
    from rankpm.engine.config import ModelConfig
    from rankpm.engine.model.preference_model import PreferenceModel

    with pytest.raises(FileNotFoundError, match=r"model.backbone: ./no-such-model does not exist"):
        PreferenceModel.build(ModelConfig(backbone="./no-such-model"), vocab_size=300, pad_id=0, eoc_id=1, max_length=64)
    with pytest.raises(ValueError, match=r"model.backbone: 'gtp2' is neither a local folder nor a transformers model "
                                         r"type \(e.g. gpt2, llama, mistral, qwen2, bert\)$"):
        PreferenceModel.build(ModelConfig(backbone="gtp2"), vocab_size=300, pad_id=0, eoc_id=1, max_length=64)
