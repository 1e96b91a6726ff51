"""PreferenceModel: the score is read where the batch says, whatever the padding."""
import pytest
import torch

from rankpm.engine.config import ModelConfig
from rankpm.engine.data.collate import collate
from rankpm.engine.model.preference_model import PreferenceModel
from rankpm.engine.score.judges import forward

VOCAB, PAD, EOC = 300, 0, 0  # pad == end-of-context: the classic reward-model trap


def tiny(backbone="gpt2", **kw):
    torch.manual_seed(0)
    return PreferenceModel.build(ModelConfig(backbone=backbone, preset="tiny"), vocab_size=VOCAB,
                                 pad_id=PAD, eoc_id=EOC, max_length=64, **kw).eval()


def groups(*responses):
    return [{"id": "g", "source": "", "turns": 1, "margin": None, "ratings": None, "ranks": list(range(len(r))),
             "context_ids": [3, 4], "response_ids": r} for r in responses]


@pytest.mark.parametrize("backbone", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", ["stacked", "shared", "packed"])
def test_score_is_read_at_recorded_position_not_inferred_from_padding(backbone, layout):
    model = tiny(backbone)
    short = [torch.randint(1, VOCAB, (7,)).tolist(), torch.randint(1, VOCAB, (3,)).tolist()]
    alone = forward(model, collate(groups(short), PAD, EOC, layout=layout)).scores
    # the same group beside a longer one: padded with PAD (== EOC) in the stacked rows, in a longer row otherwise
    long = [torch.randint(1, VOCAB, (20,)).tolist(), torch.randint(1, VOCAB, (12,)).tolist()]
    both = forward(model, collate(groups(short, long), PAD, EOC, layout=layout)).scores
    assert both.dtype == torch.float32 and both.shape == (4,)
    torch.testing.assert_close(both[:2], alone, rtol=1e-5, atol=1e-5)


def test_encoder_backbone_scores_too():
    model = tiny("bert")
    scores = forward(model, collate(groups([[5, 6, 7], [8]]), PAD, EOC, layout="packed")).scores
    assert scores.shape == (2,) and torch.isfinite(scores).all() and not model.causal


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="model.backbone: 'no-such-model' is neither a local folder"):
        tiny("no-such-model")


def test_save_and_load_round_trip(tmp_path):
    model = tiny(with_lm_head=True)
    batch = collate(groups([[5, 6, 7], [8]]), PAD, EOC, layout="shared")
    model.save(tmp_path / "m", extra={"note": "x"})
    loaded = PreferenceModel.load(tmp_path / "m").eval()
    torch.testing.assert_close(forward(loaded, batch).scores, forward(model, batch).scores)
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
