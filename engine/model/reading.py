"""Where a model reads a response's score, and the special tokens that frame each sequence.

    reading = resolve_reading(cfg.model)        # "end" or "first"
    framing = framing_for(reading, tokenizer)   # prefix/suffix token ids, the position read

"end" (decoders): ``context + response + [eoc]``, the score read at the end-of-context token,
the one position that has seen the whole text in a causal model.
"first" (encoders, BERT-style): ``[CLS] + context + response + [SEP]``, the score read at the
first token through the backbone's pooler, as transformers' encoder classifiers do and as
the encoder was pre-trained to summarise a text; an export then scores exactly as rankpm.
"auto" is "first" for encoders and "end" otherwise; an encoder is a model type transformers
knows a masked-language-model head for (the model's own attention is probed when it is built,
and "first" on a causal backbone is refused). Why "first" is the encoders' default: it is the
one reading an encoder can be exported in, and it reads at least as well as an appended token
(benchmarks/RESULTS.md, "Encoder reading").
"""
from __future__ import annotations

import json
from pathlib import Path

from rankpm.engine.data.schema import Framing

READINGS = ("auto", "end", "first")


def model_type(backbone: str) -> str | None:
    """The transformers model type a backbone names: a type, or a local folder's config."""
    config = Path(backbone) / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type")
    return backbone if not Path(backbone).exists() else None


def is_encoder_type(kind: str | None) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return kind is not None and kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def resolve_reading(model_cfg, init_meta: dict | None = None) -> str:
    """The concrete reading of a run's model: as configured, as a model it starts from was
    trained, or by the backbone's kind."""
    if init_meta is not None and init_meta.get("reading"):
        return init_meta["reading"]
    if model_cfg.reading != "auto":
        return model_cfg.reading
    return "first" if is_encoder_type(model_type(model_cfg.backbone)) else "end"


def run_reading(model_cfg) -> str:
    """The reading of a run: a model it starts from (model.init_from) keeps its own."""
    meta = None
    if model_cfg.init_from is not None:
        from rankpm.engine.model.preference_model import PreferenceModel

        meta = PreferenceModel.read_meta(model_cfg.init_from)
    return resolve_reading(model_cfg, meta)


def specials_for(reading: str) -> int:
    """Special tokens around each sequence: [eoc] after it, or [CLS] before and [SEP] after."""
    return 1 if reading == "end" else 2


def framing_for(reading: str, tokenizer) -> Framing:
    """end: nothing before, the end-of-context token after; first: the tokenizer's own [CLS]
    before and [SEP] after (the end-of-context token where it has none)."""
    if reading == "end":
        return Framing(suffix=(tokenizer.eoc_id,), read="end")
    hf = getattr(tokenizer, "hf", None)
    cls = getattr(hf, "cls_token_id", None) if hf is not None else None
    sep = getattr(hf, "sep_token_id", None) if hf is not None else None
    return Framing(prefix=(tokenizer.eoc_id if cls is None else cls,),
                   suffix=(tokenizer.eoc_id if sep is None else sep,), read="first")
