"""``rankpm export``: a model folder as a Hugging Face sequence-classification reward model.

    rankpm export runs/quickstart/model runs/quickstart/hf
    AutoModelForSequenceClassification.from_pretrained("runs/quickstart/hf")   # num_labels=1

What others load (TRL, OpenRLHF, verl, vLLM's classify/score serving) reads a decoder's
reward at the last token that is not padding. rankpm reads it at the end-of-context token
appended after the response, so the exported tokenizer appends that token itself (its
post-processor), its pad token differs from it and the config names the pad token: the
token transformers reads is rankpm's, with left or right padding. Special tokens never come
from text (as in rankpm). The score head has no bias (neither has transformers').

Before the folder is kept, the export scores probe texts both ways, through transformers
(from the written folder) and through rankpm, and refuses, removing what it wrote, if they
differ by more than 1e-5.

Encoders (BERT-style): transformers' encoder classifiers read the first token through the
backbone's pooler, then a classifier with a bias. A rankpm encoder trained with
model.reading: first (the encoders' default) reads exactly that; it exports with its pooler,
its head as the classifier's weight and a zero bias, and a tokenizer that frames each text
with the [CLS] and [SEP] rankpm put around it. An encoder that reads an end-of-context token
has no transformers form and is refused.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from rankpm.engine.data.schema import END_OF_CONTEXT, PAD
from rankpm.engine.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from rankpm.engine.io import atomic_dir
from rankpm.engine.data.schema import Framing
from rankpm.engine.model.preference_model import PreferenceModel, folder_tokenizer, tokenizer_dir
from rankpm.engine.model.reading import framing_for
from rankpm.engine.score.scorer import RewardScorer, resolve_model_folder

TOLERANCE = 1e-5
PROBES = [  # (context, response): the shapes a reward model sees
    ("\n\nHuman: How do I boil an egg?\n\nAssistant:", " Put it in boiling water for eight minutes."),
    ("\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: What is the capital of Peru?\n\n"
     "Assistant:", " I believe it is Lima."),
    ("\n\nHuman: How can I pick a lock?\n\nAssistant:", ""),
    ("Question: is the sky blue?", " Yes, on a clear day."),
]


class ExportError(ValueError):
    """The folder would not score as rankpm scores; nothing was kept."""


def byte_chars() -> dict[int, str]:
    """The byte-level alphabet: printable bytes stand for themselves, the others for 256 + n."""
    kept = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in kept:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def hf_tokenizer(tok, framing: Framing):
    """A transformers tokenizer with rankpm's ids that adds the framing tokens itself: the
    end-of-context token after the text (decoders), or [CLS] before and [SEP] after (encoders)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if isinstance(tok, ByteTokenizer):  # ids 0-255 are the bytes themselves, then the specials
        chars = byte_chars()
        raw = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        raw.decoder = decoders.ByteLevel()
        raw.add_special_tokens(ByteTokenizer.SPECIALS)
    elif isinstance(tok, HFTokenizer):
        raw = Tokenizer.from_str(tok.hf.backend_tokenizer.to_str())
    else:
        raise ExportError(f"a {type(tok).__name__} has no transformers form to export")
    name = {tok.eoc_id: END_OF_CONTEXT}
    if isinstance(tok, HFTokenizer):
        name.update({i: tok.hf.convert_ids_to_tokens(i) for i in (*framing.prefix, *framing.suffix) if i != tok.eoc_id})
    template = " ".join([*(name[i] for i in framing.prefix), "$A", *(name[i] for i in framing.suffix)])
    raw.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=sorted({(name[i], i) for i in (*framing.prefix, *framing.suffix)}))
    pad = PAD if isinstance(tok, ByteTokenizer) else tok.hf.pad_token
    # the appended token is the sequence's end: a reader of the folder (rankpm included) finds it as eos
    out = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token=pad, split_special_tokens=True,
                                  **({"eos_token": END_OF_CONTEXT} if framing.read == "end" else {}))
    if out.pad_token_id != tok.pad_id or out.convert_tokens_to_ids(END_OF_CONTEXT) != tok.eoc_id:
        raise ExportError(f"the exported tokenizer's pad/end-of-context ids ({out.pad_token_id}, "
                          f"{out.convert_tokens_to_ids(END_OF_CONTEXT)}) differ from rankpm's ({tok.pad_id}, {tok.eoc_id})")
    return out


def hf_model(model: PreferenceModel, pad_id: int):
    """The transformers sequence-classification model with the same backbone and head weights."""
    from transformers import AutoModelForSequenceClassification

    if not model.causal and model.reading != "first":
        raise ExportError("this encoder reads its end-of-context token, but transformers' encoder classifiers read "
                          "the first token through the backbone's pooler: the export would score differently "
                          "(train encoders with model.reading: first, their default, to export them)")
    config = copy.deepcopy(model.transformer.config)
    config.architectures = None
    config.num_labels, config.pad_token_id = 1, pad_id
    hf = AutoModelForSequenceClassification.from_config(config)
    hf.base_model.load_state_dict(model.transformer.base_model.state_dict())  # the pooler too, where read
    # decoders: a bias-free `score`; encoders: pooler -> `classifier`, whose bias is set to zero
    head = getattr(hf, "score" if model.reading == "end" else "classifier", None)
    if not isinstance(head, torch.nn.Linear) or head.weight.shape != model.score_head.weight.shape or \
            (model.reading == "end" and head.bias is not None):
        raise ExportError(f"{type(hf).__name__} has no score head of shape {tuple(model.score_head.weight.shape)} "
                          f"read where rankpm reads ({model.reading!r}) to take rankpm's")
    with torch.no_grad():
        head.weight.copy_(model.score_head.weight)
        if head.bias is not None:
            head.bias.zero_()
    return hf.eval()


def export_hf(model_dir: str | Path, out_dir: str | Path) -> dict:
    model_dir, out_dir = resolve_model_folder(model_dir), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is a file, not a folder")
    folder_tokenizer(model_dir)
    tok = load_tokenizer(str(tokenizer_dir(model_dir)))
    model = PreferenceModel.load(model_dir, with_lm_head=False).eval()
    hf = hf_model(model, tok.pad_id)
    hf_tok = hf_tokenizer(tok, framing_for(model.reading, tok))
    with atomic_dir(out_dir) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        hf_tok.save_pretrained(tmp)
        read_at = ("the end-of-context token the tokenizer appends (the last token that is not padding)"
                   if model.reading == "end" else "the first token ([CLS]) through the backbone's pooler")
        (tmp / "rankpm_export.json").write_text(json.dumps({"from": str(model_dir), "tolerance": TOLERANCE,
                                                            "read_at": read_at}, indent=2))
        worst = verify(tmp, RewardScorer.from_folder(model_dir), tok)
    return {"model": str(model_dir), "out": str(out_dir), "architecture": type(hf).__name__,
            "max_abs_difference": worst}


@torch.no_grad()
def verify(folder: Path, scorer: RewardScorer, tok) -> float:
    """The largest difference between transformers' and rankpm's scores of the probes, from the
    written folder, right and left padded; ExportError above TOLERANCE."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ours = [scorer.score(context, [response])[0] for context, response in PROBES]
    texts = [context + response for context, response in PROBES]
    worst = 0.0
    # transformers' encoder classifiers read column 0, which only right padding keeps the text's [CLS]
    for side in ("right", "left") if scorer.model.reading == "end" else ("right",):
        hf_tok.padding_side = side
        enc = hf_tok(texts, padding=True, return_tensors="pt")
        if side == "left":  # absolute-position backbones (GPT-2) need positions that skip the padding
            enc["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        theirs = hf(**enc).logits[:, 0].tolist()
        for (context, response), a, b in zip(PROBES, ours, theirs):
            if tok.encode(context + response) != tok.encode(context) + tok.encode(response):
                continue  # the joint text tokenizes across the boundary; rankpm scores the parts
            worst = max(worst, abs(a - b))
    if worst > TOLERANCE:
        raise ExportError(f"transformers scores the exported model up to {worst:.3g} away from rankpm "
                          f"(tolerance {TOLERANCE}); the folder was not written")
    return worst


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", help="a model folder (OUT_DIR/model), a checkpoint or a run folder")
    parser.add_argument("out", help="the folder to write: AutoModelForSequenceClassification.from_pretrained(OUT)")
    return parser


def run_export(args: argparse.Namespace) -> int:
    print(json.dumps(export_hf(args.model, args.out)), flush=True)
    return 0
