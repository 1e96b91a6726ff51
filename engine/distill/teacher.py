"""The teacher of context distillation: a causal LM, its tokenizer, what identifies its weights.

    teacher = load_teacher(cfg.teacher)
    hidden = teacher.base(input_ids=..., ...).last_hidden_state   # (B, T, H)
    logits = hidden @ teacher.head_weight.T (+ teacher.head_bias)  # what topk_logprobs streams

From, in this order: a rankpm model folder (it must have been saved with an LM head), a
local transformers folder whose architecture is a causal LM (``*ForCausalLM``,
``*LMHeadModel``), or a transformers model type built from a config with random init
(``teacher.seed``; the README and tests). A folder without an LM head is refused by name.
The cache streams the head itself over the final hidden states, so a model whose logits are
not that linear map (a softcap, a logit scale) is refused after one probe.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rankpm.engine.config import ConfigError, ModelConfig
from rankpm.engine.distill.config import TeacherConfig

LM_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")


@dataclass
class Teacher:
    model: torch.nn.Module  # the causal LM
    tokenizer: object  # rankpm.engine.data.tokenizer.Tokenizer
    identity: dict  # source, kind, weights_sha256
    max_length: int  # positions: prompt + text
    device: torch.device

    @property
    def base(self) -> torch.nn.Module:
        return self.model.base_model

    @property
    def head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    @property
    def vocab_size(self) -> int:
        return self.head.weight.shape[0]


def load_teacher(cfg: TeacherConfig) -> Teacher:
    from rankpm.engine.data.tokenizer import load_tokenizer
    from rankpm.engine.model.preference_model import MODEL_FILE, PreferenceModel, _quiet_transformers

    folder = Path(cfg.model)
    if (folder / MODEL_FILE).is_file():
        meta = PreferenceModel.read_meta(folder)
        if not meta.get("has_lm_head"):
            raise ConfigError(f"teacher.model: {folder} is a rankpm model folder saved without an LM head; "
                              f"the teacher needs one (train with objective.lm_loss or objective.name=imitation)")
        model = PreferenceModel.load(folder, with_lm_head=True).transformer
        tokenizer = load_tokenizer(folder / "tokenizer")
        kind = "rankpm model folder"
    elif folder.is_dir():
        config = folder / "config.json"
        if not config.is_file():
            raise ConfigError(f"teacher.model: {folder} holds no config.json (not a transformers model folder)")
        architectures = json.loads(config.read_text()).get("architectures") or []
        if not any(a.endswith(LM_ARCHITECTURES) for a in architectures):
            raise ConfigError(f"teacher.model: {folder} has no LM head (architectures {architectures}); the teacher "
                              f"must be a causal language model (*ForCausalLM, *LMHeadModel)")
        from transformers import AutoModelForCausalLM
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **cfg.overrides)
        tokenizer = load_tokenizer(folder)
        kind = "transformers folder"
    else:
        tokenizer = load_tokenizer(cfg.tokenizer)
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            torch.manual_seed(cfg.seed)
            built = PreferenceModel.build(ModelConfig(backbone=cfg.model, preset=cfg.preset, overrides=cfg.overrides),
                                          vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                                          eoc_id=tokenizer.eoc_id, max_length=cfg.max_length, with_lm_head=True)
        model = built.transformer
        kind = f"config-built ({cfg.preset}, seed {cfg.seed})"
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    max_length = limit or cfg.max_length  # a config-built teacher was given cfg.max_length positions
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    identity = {"source": str(cfg.model), "kind": kind, "class": type(model).__name__,
                "weights_sha256": weights_hash(model)}
    teacher = Teacher(model, tokenizer, identity, int(max_length), device)
    _check_linear_head(teacher)
    return teacher


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, dtypes, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def _check_linear_head(teacher: Teacher) -> None:
    """The model's own logits must be its head applied to its final hidden states."""
    ids = torch.arange(min(8, teacher.vocab_size), device=teacher.device)[None]
    full = teacher.model(input_ids=ids, use_cache=False).logits.float()
    hidden = teacher.base(input_ids=ids, use_cache=False).last_hidden_state
    mine = teacher.head(hidden).float()
    tol = 1e-3 * max(1.0, full.abs().max().item()) * (16 if hidden.dtype == torch.bfloat16 else 1)
    if (full - mine).abs().max().item() > tol:
        raise ConfigError(f"teacher.model: {teacher.identity['source']}'s logits are not its LM head applied to its "
                          f"final hidden states (a logit scale or softcap); the cache cannot stream them")
