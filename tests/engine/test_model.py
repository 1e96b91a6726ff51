"""PreferenceModel: the score is read where the batch says, whatever the padding."""
import pytest
import torch

from rankpm.engine.config import ModelConfig
from rankpm.engine.model.preference_model import PreferenceModel

VOCAB, PAD, EOC = 300, 0, 0  # pad == end-of-context: the classic reward-model trap


def tiny(backbone="gpt2", **kw):
    torch.manual_seed(0)
    return PreferenceModel.build(ModelConfig(backbone=backbone, preset="tiny"), vocab_size=VOCAB,
                                 pad_id=PAD, eoc_id=EOC, max_length=64, **kw).eval()


@pytest.mark.parametrize("backbone", ["gpt2", "llama"])
def test_score_is_read_at_recorded_position_not_inferred_from_padding(backbone):
    model = tiny(backbone)
    seq = torch.randint(1, VOCAB, (9,)).tolist() + [EOC]
    alone = model(torch.tensor([seq]), torch.ones(1, 10, dtype=torch.long), torch.tensor([9])).scores
    # the same sequence right-padded with PAD (== EOC) beside a longer one
    padded = torch.tensor([seq + [PAD] * 5, torch.randint(1, VOCAB, (14,)).tolist() + [EOC]])
    mask = torch.tensor([[1] * 10 + [0] * 5, [1] * 15])
    both = model(padded, mask, torch.tensor([9, 14])).scores
    assert both.dtype == torch.float32 and both.shape == (2,)
    torch.testing.assert_close(both[0], alone[0], rtol=1e-5, atol=1e-5)


def test_encoder_backbone_scores_too():
    model = tiny("bert")
    ids = torch.randint(1, VOCAB, (3, 12))
    scores = model(ids, torch.ones_like(ids), torch.tensor([11, 11, 11])).scores
    assert scores.shape == (3,) and torch.isfinite(scores).all()


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="model.backbone: 'no-such-model' is neither a local folder"):
        tiny("no-such-model")


def test_save_and_load_round_trip(tmp_path):
    model = tiny(with_lm_head=True)
    ids = torch.randint(1, VOCAB, (2, 8))
    args = (ids, torch.ones_like(ids), torch.tensor([7, 5]))
    model.save(tmp_path / "m", extra={"note": "x"})
    loaded = PreferenceModel.load(tmp_path / "m").eval()
    torch.testing.assert_close(loaded(*args).scores, model(*args).scores)
    assert loaded.has_lm_head and PreferenceModel.read_meta(tmp_path / "m")["note"] == "x"
    assert not list(tmp_path.glob(".m.tmp*"))  # the atomic write left no temporary folder


def test_local_folder_backbone_grows_embeddings_for_new_tokens(tmp_path):
    from transformers import GPT2Config, GPT2Model
    GPT2Model(GPT2Config(vocab_size=200, n_layer=1, n_embd=32, n_head=2, n_positions=64)).save_pretrained(tmp_path)
    model = PreferenceModel.build(ModelConfig(backbone=str(tmp_path)), vocab_size=VOCAB, pad_id=PAD,
                                  eoc_id=EOC, max_length=64)
    assert model.transformer.get_input_embeddings().num_embeddings == VOCAB
    with pytest.raises(ValueError, match="max_length=128 exceeds"):
        PreferenceModel.build(ModelConfig(backbone=str(tmp_path)), vocab_size=VOCAB, pad_id=PAD,
                              eoc_id=EOC, max_length=128)
