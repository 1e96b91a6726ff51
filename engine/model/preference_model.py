"""PreferenceModel: a transformers backbone with a scalar head read at the end-of-context token.

The position of that token is given by the batch (``score_index``), recorded when the
batch was built; it is never inferred from padding, so pad == EOS cannot shift it. The
model owns its attention mask: it builds the one of the batch's layout for its backbone
(rankpm.engine.model.attention).
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from rankpm.engine.config import ModelConfig
from rankpm.engine.fingerprint import require_same, tokenizer_key
from rankpm.engine.io import atomic_dir
from rankpm.engine.model.attention import attends_causally, attention_mask
from rankpm.engine.model.reward_folder import is_reward_folder, load_reward_transformer, reward_folder_config

log = logging.getLogger(__name__)

# Sizes for backbones built from a config with random initialisation.
PRESETS = {
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256),
    "small": dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=512),
    "base": dict(num_hidden_layers=6, hidden_size=256, num_attention_heads=8, intermediate_size=1024),
}
MODEL_FILE = "rankpm_model.json"
HEAD_FILE = "score_head.pt"


class ModelOutput(NamedTuple):
    scores: torch.Tensor  # (S,) float32, one score per response
    hidden: torch.Tensor  # (R, T, H) last hidden states
    # the batch's LM targets: their summed negative log-likelihood (a differentiable scalar), or
    # with lm_reduction="none" each target's log-probability (L,); None without targets
    lm: torch.Tensor | None = None
    # with distillation targets: the KL to the cached teacher summed over their positions
    # (sampled mode: the cross-entropy to the drawn tokens), a differentiable scalar
    distill: torch.Tensor | None = None


class PreferenceModel(nn.Module):
    def __init__(self, transformer: nn.Module, *, has_lm_head: bool, reading: str = "end"):
        super().__init__()
        self.transformer = transformer  # a base model, or a causal LM when has_lm_head
        self.has_lm_head = has_lm_head
        self.reading = reading  # "end" or "first" (rankpm.engine.model.reading)
        hidden = transformer.config.hidden_size
        # No bias: a pairwise loss never moves it (it cancels in r_i - r_j), so it would only drift
        # on rounding noise; and Hugging Face's reward heads have none.
        self.score_head = nn.Linear(hidden, 1, bias=False)
        nn.init.normal_(self.score_head.weight, std=1.0 / (hidden + 1) ** 0.5)
        self.causal = attends_causally(transformer)
        if reading == "first":
            if self.causal:
                raise ValueError("model.reading='first' on a causal backbone: its first token sees nothing after "
                                 "it; read at the end (model.reading: end or auto)")
            if getattr(transformer.base_model, "pooler", None) is None:
                raise ValueError(f"model.reading='first' needs a backbone with a pooler (BERT-style); "
                                 f"{type(transformer.base_model).__name__} has none")

    @property
    def config(self):
        return self.transformer.config

    @property
    def attention_implementation(self) -> str:
        return getattr(self.transformer.config, "_attn_implementation", None) or "eager"

    @property
    def lm_head(self) -> nn.Linear:
        if not self.has_lm_head:
            raise ValueError("this backbone was built without an LM head; configure an LM term to keep it")
        return self.transformer.get_output_embeddings()

    def forward(self, input_ids, position_ids, segment_ids, part_ids, score_index, *, layout: str = "stacked",
                lm_index=None, lm_targets=None, lm_reduction: str = "sum", distill=None) -> ModelOutput:
        """Scores at ``score_index`` (flat into R * T); with LM targets also their loss; with
        ``distill`` (rankpm.engine.data.text_batch.DistillTargets) the KL to a cached teacher.

        The mask of the layout (rankpm.engine.model.attention) is built here. The LM head
        runs here, inside the module's forward, through the fused linear cross-entropy on
        the target rows only (no (R, T, V) logits): DeepSpeed ZeRO-3 gathers any parameter
        read during a module's forward (it registers it as an external parameter on first
        access), so lm_head.weight is whole when the kernel reads it; read anywhere else it
        would be an empty partition.
        """
        dtype = self.transformer.get_input_embeddings().weight.dtype
        mask = attention_mask(layout, segment_ids, part_ids, causal=self.causal,
                              implementation=self.attention_implementation, dtype=dtype)
        extra = {"use_cache": False} if hasattr(self.config, "use_cache") else {}  # no KV cache: nothing generates
        hidden = self.transformer.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                             **extra).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])  # (R * T, H)
        read = flat[score_index]  # (S, H)
        if self.reading == "first":  # the backbone's pooler on the first token, as its classifiers read
            read = self.transformer.base_model.pooler(read[:, None, :])
        scores = _at_least_fp32(self.score_head(read).squeeze(-1))
        lm = None
        if lm_index is not None:
            lm = self._lm(flat[lm_index], lm_targets, lm_reduction)
        kl = self._distill(flat[distill.index], distill) if distill is not None else None
        return ModelOutput(scores, hidden, lm, kl)

    def _distill(self, rows: torch.Tensor, t) -> torch.Tensor:
        """The fused KL of the LM head's distribution at ``rows`` to the cached teacher, summed:
        the head's weight is read here, inside forward, for the reason _lm is."""
        from rankpm.kernels.distill_loss import distill_loss

        head = self.lm_head
        weight, bias = head.weight.to(rows.dtype), getattr(head, "bias", None)
        bias = bias.to(rows.dtype) if bias is not None else None
        return _at_least_fp32(distill_loss(rows, weight, t.ids, t.logprobs, t.tail, bias, mode=t.mode,
                                           counts=t.counts, reduction="sum"))

    def _lm(self, rows: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        from rankpm.kernels.linear_cross_entropy import linear_cross_entropy

        head = self.lm_head
        # under autocast the hidden states are bf16 and the head's weight fp32: compute in the
        # activations' dtype (the kernel accumulates in fp32 whatever the input dtype)
        weight, bias = head.weight.to(rows.dtype), getattr(head, "bias", None)
        bias = bias.to(rows.dtype) if bias is not None else None
        if reduction == "sum":  # the training path: the gradient made in the forward pass (6 N H V flops)
            return _at_least_fp32(linear_cross_entropy(rows, weight, targets, bias, reduction="sum"))
        return -_at_least_fp32(linear_cross_entropy(rows, weight, targets, bias, reduction="none"))

    # -- building and saving -------------------------------------------------------

    @classmethod
    def build(cls, cfg: ModelConfig, *, vocab_size: int, pad_id: int, eoc_id: int,
              max_length: int, with_lm_head: bool = False, tokenizer: dict | None = None,
              reading: str = "end") -> "PreferenceModel":
        """A backbone from a local folder, or from a model type with random init.

        With ``cfg.init_from`` (a rankpm model folder, e.g. a previous stage's OUT_DIR/model)
        the whole preference model, score head included, starts from those weights.
        ``tokenizer``: the identity of the tokenizer the data was made with; a model folder or
        backbone folder that ships another tokenizer is refused, naming both. ``reading``: where
        scores are read (rankpm.engine.model.reading.resolve_reading; an init_from model keeps its own).
        """
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        if cfg.init_from:
            if tokenizer is not None:
                require_same("the tokenizer", f"model.init_from {cfg.init_from}",
                             tokenizer_key(folder_tokenizer(cfg.init_from)), "the run's data", tokenizer_key(tokenizer))
            model = cls.load(cfg.init_from, with_lm_head=with_lm_head)
            have = model.transformer.get_input_embeddings().num_embeddings
            if have < vocab_size:
                raise ValueError(f"model.init_from: {cfg.init_from} has {have} token embeddings, the "
                                 f"tokenizer has {vocab_size}; use the tokenizer saved in that folder")
            if cfg.gradient_checkpointing:
                model.transformer.gradient_checkpointing_enable()
            return model.freeze_backbone() if cfg.freeze_backbone else model

        auto = AutoModelForCausalLM if with_lm_head else AutoModel
        folder = Path(cfg.backbone)
        if folder.is_dir() and is_reward_folder(folder):
            if tokenizer is not None:
                require_same("the tokenizer", f"model.backbone {folder} (a reward model's own tokenizer)",
                             tokenizer_key(folder_tokenizer(folder)), "the run's data (data.tokenizer)",
                             tokenizer_key(tokenizer))
            if with_lm_head:
                raise ValueError(f"model.backbone: {folder} is a reward model without an LM head; the objective's "
                                 f"LM term needs one")
            model = cls.from_reward_folder(folder)
            if cfg.gradient_checkpointing:
                model.transformer.gradient_checkpointing_enable()
            return model.freeze_backbone() if cfg.freeze_backbone else model
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"model.backbone: {folder} holds no config.json")
            if tokenizer is not None and any((folder / name).is_file() for name in TOKENIZER_FILES):
                from rankpm.engine.data.tokenizer import load_tokenizer
                require_same("the tokenizer", f"model.backbone {folder} (its own tokenizer)",
                             tokenizer_key(load_tokenizer(folder).identity()),
                             "the run's data (data.tokenizer)", tokenizer_key(tokenizer))
            with _quiet_transformers():
                transformer = auto.from_pretrained(folder, local_files_only=True, **cfg.overrides)
            limit = getattr(transformer.config, "max_position_embeddings", None)
            if limit is not None and limit < max_length:
                raise ValueError(f"data.max_length={max_length} exceeds {folder}'s "
                                 f"max_position_embeddings={limit}")
            if transformer.get_input_embeddings().num_embeddings < vocab_size:
                log.info("resizing %s embeddings to the tokenizer's %d tokens", folder, vocab_size)
                transformer.resize_token_embeddings(vocab_size)
        else:
            if cfg.preset not in PRESETS:
                raise ValueError(f"model.preset: got {cfg.preset!r}, expected one of {sorted(PRESETS)}")
            options = dict(PRESETS[cfg.preset], vocab_size=vocab_size, max_position_embeddings=max_length,
                           pad_token_id=pad_id, bos_token_id=eoc_id, eos_token_id=eoc_id)
            for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop",
                         "embd_pdrop", "attn_pdrop", "attention_dropout"):
                options[name] = cfg.dropout
            options.update(cfg.overrides)
            if any(sep in cfg.backbone for sep in ("/", "\\")) or cfg.backbone.startswith((".", "~")):
                raise FileNotFoundError(f"model.backbone: {cfg.backbone} does not exist (a local model folder "
                                        f"was meant; nothing is downloaded)")
            try:
                config = AutoConfig.for_model(cfg.backbone, **options)
            except ValueError:  # transformers' message lists every model type it knows
                raise ValueError(f"model.backbone: {cfg.backbone!r} is neither a local folder nor a transformers "
                                 f"model type (e.g. gpt2, llama, mistral, qwen2, bert)") from None
            transformer = auto.from_config(config)
        if cfg.gradient_checkpointing:
            transformer.gradient_checkpointing_enable()
        model = cls(transformer, has_lm_head=with_lm_head, reading=reading)
        return model.freeze_backbone() if cfg.freeze_backbone else model

    def freeze_backbone(self) -> "PreferenceModel":
        """Only the score head trains: the backbone keeps its weights (the optimizer skips
        parameters without gradients). Dropout still follows train()/eval()."""
        self.transformer.requires_grad_(False)
        return self

    def save(self, directory: str | Path, extra: dict | None = None, tokenizer_dir: str | Path | None = None) -> None:
        """Write a self-contained model folder (transformers files, score head, tokenizer), atomically."""
        with atomic_dir(directory) as tmp:
            meta = {"format": 1, "has_lm_head": self.has_lm_head, "reading": self.reading, **(extra or {})}
            if tokenizer_dir is not None:
                shutil.copytree(tokenizer_dir, tmp / "tokenizer")
                meta["tokenizer"] = folder_tokenizer(tmp)
            with _quiet_transformers():
                self.transformer.save_pretrained(tmp, safe_serialization=True)
            torch.save(self.score_head.state_dict(), tmp / HEAD_FILE)
            (tmp / MODEL_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path, map_location="cpu", *, with_lm_head: bool | None = None) -> "PreferenceModel":
        """A saved model; ``with_lm_head`` keeps/drops/adds the LM head (None: as saved).

        Adding a head to a model saved without one ties it to the input embeddings where
        the backbone does (GPT-2 and most causal LMs); an untied head starts at random.
        """
        from transformers import AutoModel, AutoModelForCausalLM

        directory = Path(directory)
        meta_path = directory / MODEL_FILE
        if not meta_path.is_file() and is_reward_folder(directory):
            if with_lm_head:
                raise ValueError(f"{directory} is a reward model without an LM head")
            return cls.from_reward_folder(directory)
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} is not a rankpm model folder (no {MODEL_FILE})")
        meta = json.loads(meta_path.read_text())
        has_head = meta["has_lm_head"] if with_lm_head is None else with_lm_head
        if has_head and not meta["has_lm_head"]:
            log.info("%s was saved without an LM head; adding one (tied to the embeddings if the "
                     "backbone ties them)", directory)
        auto = AutoModelForCausalLM if has_head else AutoModel
        with _quiet_transformers():
            model = cls(auto.from_pretrained(directory, local_files_only=True), has_lm_head=has_head,
                        reading=meta.get("reading", "end"))
        model.score_head.load_state_dict(_bias_free(torch.load(directory / HEAD_FILE, map_location=map_location),
                                                    directory))
        return model

    @classmethod
    def from_reward_folder(cls, folder: str | Path) -> "PreferenceModel":
        """A transformers sequence-classification reward model: its backbone, its head."""
        base, head = load_reward_transformer(Path(folder))
        model = cls(base, has_lm_head=False)
        with torch.no_grad():
            model.score_head.weight.copy_(head)
        return model

    @staticmethod
    def read_meta(directory: str | Path) -> dict:
        directory = Path(directory)
        if not (directory / MODEL_FILE).is_file() and is_reward_folder(directory):
            return {"format": 1, "has_lm_head": False, "config": reward_folder_config(directory).to_dict(),
                    "score_stats": {}, "source": "transformers reward model"}
        return json.loads((directory / MODEL_FILE).read_text())


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Scores and losses in fp32 when the model runs in bf16/fp16; fp64 stays fp64 (tests)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _bias_free(head: dict, directory: Path) -> dict:
    """A head saved with a bias (rankpm before its heads lost theirs): the bias shifts every score by
    the same amount, so pairwise losses, accuracies and rankings do not see it; say so when it is not 0."""
    bias = head.pop("bias", None)
    if bias is not None and bias.abs().max().item() != 0:
        log.warning("%s: the score head's bias (%.6g) is dropped: heads have none now; pairwise results are "
                    "unchanged, absolute scores shift by %.6g", directory, bias.item(), -bias.item())
    return head


@contextlib.contextmanager
def _quiet_transformers():
    """No "Writing model shards" or "Loading weights" bars: the run's own bar is the one on screen."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# Files by which a backbone folder ships a tokenizer of its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def tokenizer_dir(directory: str | Path) -> Path:
    """Where a model folder's tokenizer is: its tokenizer/, or a reward-model folder itself."""
    directory = Path(directory)
    return directory if not (directory / MODEL_FILE).is_file() and is_reward_folder(directory) else directory / "tokenizer"


def folder_tokenizer(directory: str | Path) -> dict:
    """The identity of a model folder's tokenizer/, checked against the one the model recorded
    when it was saved (a replaced tokenizer folder would give other token ids)."""
    from rankpm.engine.data.tokenizer import META_FILE, load_tokenizer

    directory = Path(directory)
    if tokenizer_dir(directory) == directory:  # a reward-model folder: its own tokenizer
        return load_tokenizer(directory).identity()
    path = directory / "tokenizer" / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no tokenizer/{META_FILE}; a rankpm model folder carries the "
                                f"tokenizer it was trained with")
    identity = json.loads(path.read_text())["identity"]
    meta_path = directory / MODEL_FILE
    recorded = json.loads(meta_path.read_text()).get("tokenizer") if meta_path.is_file() else None
    if recorded is not None:
        require_same("the tokenizer", f"{meta_path} (recorded at save)", tokenizer_key(recorded),
                     f"{directory / 'tokenizer'}", tokenizer_key(identity))
    return identity
