"""Hugging Face checkpoints in: a sequence-classification reward model (one trained by TRL or
OpenRLHF, or exported by rankpm) used as a rankpm model, no conversion.

    model.backbone: ./my-trl-rm        # fine-tune it: its score head becomes rankpm's head
    rankpm eval ./my-trl-rm hh_test.jsonl

A decoder reward model reads its score at the last token that is not padding, the
end-of-sequence token its trainer appended; rankpm reads it at the end-of-context token
it appends, so for such a folder that token is the tokenizer's end-of-sequence token
(rankpm.engine.data.tokenizer.reward_model_eos) and the scores are the model's own. The
head is the model's ``score`` (a bias, where one exists, is folded out with a warning: it
shifts every score equally). Encoder reward models, which read the pooled first token, are
refused: rankpm does not read that way.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from rankpm.engine.config import RunConfig, from_dict

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 1024  # when the model states no position limit


def is_reward_folder(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    raw = json.loads(config.read_text())
    labels = raw.get("num_labels", len(raw.get("id2label") or {0: None}))
    return labels == 1 and any(a.endswith("ForSequenceClassification") for a in raw.get("architectures") or [])


def load_reward_transformer(folder: Path):
    """(base model, score weight (1, H)) of a transformers reward-model folder."""
    from transformers import AutoModelForSequenceClassification

    from rankpm.engine.model.preference_model import _quiet_transformers

    with _quiet_transformers():
        classifier = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
    head = getattr(classifier, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise ValueError(f"{folder}: {type(classifier).__name__} has no one-output 'score' head (an encoder "
                         f"classifier reads the pooled first token, which rankpm does not); use a decoder reward "
                         f"model, or train one with rankpm")
    if head.bias is not None and head.bias.abs().max().item() != 0:
        log.warning("%s: the score head's bias (%.6g) is dropped: it shifts every score equally, so pairwise "
                    "results are unchanged, absolute scores shift by %.6g", folder, head.bias.item(), -head.bias.item())
    return classifier.base_model, head.weight.detach().clone()


def reward_folder_config(folder: Path) -> RunConfig:
    """The run config a reward-model folder stands for: itself as backbone and tokenizer."""
    raw = json.loads((folder / "config.json").read_text())
    limit = raw.get("max_position_embeddings") or raw.get("n_positions") or DEFAULT_MAX_LENGTH
    return from_dict({"model": {"backbone": str(folder)},
                      "data": {"train": [str(folder)], "tokenizer": str(folder), "max_length": int(limit)}})
