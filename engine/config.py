"""Run configuration: frozen, typed dataclasses per component, from YAML plus overrides.

    cfg = load_config("configs/quickstart.yaml", ["train.lr=3e-4", "data.batch_groups=32"])

Every key is checked: an unknown key, a value of the wrong type or out of range raises
ConfigError naming the dotted key, the bad value and what was expected.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    # A transformers model type built from a config with random init ("gpt2", "llama",
    # "bert", ...) or a local folder holding a transformers model.
    backbone: str = "gpt2"
    preset: Literal["tiny", "small", "base"] = "tiny"  # sizes for config-built backbones
    overrides: dict = field(default_factory=dict)  # extra transformers config keys
    dropout: float = 0.0
    gradient_checkpointing: bool = False
    # A rankpm model folder (e.g. a previous stage's OUT_DIR/model) to start from: every
    # weight, score head included; backbone/preset are then ignored.
    init_from: str | None = None
    # Where the score is read (rankpm.engine.model.reading): "end", the end-of-context token
    # after the response (decoders); "first", the first token through the backbone's pooler
    # (BERT-style encoders, as transformers' classifiers read); "auto": by the backbone's kind.
    reading: Literal["auto", "end", "first"] = "auto"
    # Train the score head (and nothing else) on a fixed backbone: the backbone's weights,
    # embeddings (and a pooler) included, get no gradient and no optimizer state.
    freeze_backbone: bool = False


@dataclass(frozen=True)
class SyntheticConfig:
    """Generate HHH-style comparison groups instead of reading files."""

    train_groups: int = 2000
    eval_groups: int = 300
    seed: int = 0
    k_min: int = 2
    k_max: int = 4


@dataclass(frozen=True)
class DataConfig:
    # Each of train/eval: a prepared folder (holds manifest.json) or a list of input
    # files (JSONL/Parquet) that the run prepares into OUT_DIR/data/ first.
    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    synthetic: SyntheticConfig | None = None
    tokenizer: str = "bytes"  # "bytes", "bpe:<vocab>", or a local tokenizer folder
    max_length: int = 256
    truncation: Literal["left", "error"] = "left"
    skip_bad: bool = False
    batch_groups: int = 16  # groups per micro-batch per rank
    # A token budget per micro-batch instead of a group count: whole groups, counted in the real
    # tokens they take in the layout (a shared context once).
    tokens_per_batch: int | None = None
    # How groups are laid out (rankpm.engine.data.collate): "auto" shares each group's context
    # on causal backbones and packs sequences on encoders; "stacked" is one padded row per response.
    layout: Literal["auto", "stacked", "shared", "packed"] = "auto"
    prefetch: int = 2  # batches built ahead of the step in a background thread (0: none)
    shuffle_buffer: int = 1024
    eval_batch_groups: int = 64
    # Text-level pair transforms before tokenization (rankpm.engine.data.transforms).
    # "auto": what the objective needs (binary: binarize the training groups and
    # label-expand the evaluation groups); "none": the inputs are already in that form.
    transform: Literal["auto", "none"] = "auto"


@dataclass(frozen=True)
class LabelConfig:
    """The label strings of binary discrimination, appended right after the response."""

    good: str = " GOOD"
    bad: str = " BAD"


@dataclass(frozen=True)
class ObjectiveConfig:
    # ranked:    softplus(r_worse - r_better) over the ranked pairs of each group.
    # binary:    the same loss on label pairs: the run binarizes the training data
    #            (A > B -> A+GOOD > A+BAD, B+BAD > B+GOOD) and evaluates responses by
    #            P(GOOD) = sigmoid(r(x+GOOD) - r(x+BAD)).
    # imitation: LM loss on the preferred response's tokens only; evaluated by the mean
    #            per-token log-probability of each response.
    # distill:   context distillation: KL to a teacher's cached next-token distributions
    #            (data.train: a logit cache from `rankpm cache-logits`) on the texts' tokens.
    name: Literal["ranked", "binary", "imitation", "distill"] = "ranked"
    pairs: Literal["all", "adjacent"] = "all"  # for binary: the ranked pairs that are binarized
    reduction: Literal["pairs", "groups"] = "pairs"
    kernel: Literal["auto", "triton", "torch"] = "auto"
    # Per-pair margins from the data's per-response ratings: pair (b, w) of a group with
    # ratings adds rating_margin * (rating_b - rating_w) to its margin (0: ratings unused).
    rating_margin: float = 0.0
    # PM + LM: pm_weight * L_PM + lm_weight * L_LM, the LM term over the whole preferred
    # sample (context and response). Keeps the backbone's LM head.
    lm_loss: bool = False
    pm_weight: float = 1.0
    lm_weight: float = 1.0
    distill_weight: float = 1.0  # distill: the KL term's weight (lm_loss adds the texts' own LM loss)
    # "sum": summed over tokens, averaged over sequences; "mean": averaged over tokens.
    # "auto": sum for imitation (the paper's IL loss), mean for the PM + LM term (a sum
    # over a few hundred tokens would outweigh the PM loss by that factor).
    lm_reduction: Literal["auto", "sum", "mean"] = "auto"
    labels: LabelConfig = field(default_factory=LabelConfig)


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 20
    schedule: Literal["cosine", "linear"] = "cosine"  # after warmup, decays to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    max_steps: int | None = None  # None: derived from epochs
    epochs: float = 1.0
    grad_accum: int = 1
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    eval_every: int = 0  # steps; 0: only at the end
    save_every: int = 0  # steps; 0: only at the end
    keep_last: int = 2
    log_every: int = 10
    progress: bool = True
    device: str = "auto"  # "auto": cuda when available, else cpu
    # A step whose loss or gradient norm is not finite: "stop" the run (naming the step, its
    # groups and the last good checkpoint) or "skip" it (no update; counted in the metrics).
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # Resume from a checkpoint written under other settings (data, model, objective,
    # optimisation): refused unless this is set; the changes are logged and recorded.
    resume_with_changes: bool = False


@dataclass(frozen=True)
class ClusterConfig:
    workers: int = 1
    address: str | None = None  # Ray cluster to attach to; None: an embedded local one
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0
    zero_stage: int = 0
    offload_optimizer: bool = False
    activation_checkpointing: bool = False
    deepspeed_config: str | None = None  # raw DeepSpeed JSON that overrides the built one
    max_failures: int = 0


@dataclass(frozen=True)
class StageConfig:
    """One stage of a multi-stage run (e.g. preference-model pre-training, then fine-tuning).

    Each section is merged key by key over the run's own section; the stage starts from
    the previous stage's model folder. ``lr_scale``: the stage's train.lr is the run's
    train.lr times this (the paper: PMP at 0.1x, fine-tuning at 0.01x).
    """

    name: str = ""
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    objective: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    lr_scale: float | None = None


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    stages: list[StageConfig] = field(default_factory=list)  # empty: one stage, this config

    def validate(self) -> "RunConfig":
        for key, ok, expected in RANGES:
            value = _lookup(self, key)
            if value is not None and not _holds(ok, value):
                raise ConfigError(f"{key}: got {value!r}, expected {expected}")
        s = self.data.synthetic
        if s is not None and s.k_max < s.k_min:
            raise ConfigError(f"data.synthetic.k_max: got {s.k_max}, expected >= data.synthetic.k_min ({s.k_min})")
        if self.objective.name == "imitation" and self.objective.lm_loss:
            raise ConfigError("objective.lm_loss: got True, but objective.name='imitation' is already "
                              "a language-model loss; use name=ranked or binary for PM + LM")
        if self.model.freeze_backbone and (self.objective.name == "imitation" or self.objective.lm_loss):
            raise ConfigError(f"model.freeze_backbone: got True, but objective.name={self.objective.name!r}"
                              f"{' with objective.lm_loss' if self.objective.lm_loss else ''} trains the backbone's "
                              f"LM head; a frozen backbone trains the score head only (name=ranked or binary, "
                              f"lm_loss=false)")
        if self.objective.lm_loss and self.objective.pm_weight == 0 and self.objective.lm_weight == 0:
            raise ConfigError("objective.pm_weight and objective.lm_weight: both 0, so the loss is 0; "
                              "give at least one a positive weight")
        if self.train.on_nonfinite == "skip" and (self.cluster.workers > 1 or self.cluster.address):
            raise ConfigError("train.on_nonfinite: 'skip' needs one local process; DeepSpeed ranks cannot drop a "
                              "step's gradients, so on Ray workers a non-finite step stops the run ('stop')")
        labels = self.objective.labels
        if not labels.good or not labels.bad or labels.good == labels.bad:
            raise ConfigError(f"objective.labels: good={labels.good!r} and bad={labels.bad!r} must be two "
                              f"different, non-empty strings")
        if self.objective.name == "distill" and not self.stages:
            if self.data.synthetic is not None or len(self.data.train) != 1:
                raise ConfigError("data.train: objective.name='distill' trains on one logit cache folder (what "
                                  "`rankpm cache-logits` wrote, its distill.out_dir); got "
                                  f"{'data.synthetic' if self.data.synthetic is not None else list(self.data.train)}")
            if len(self.data.eval) > 1:
                raise ConfigError(f"data.eval: objective.name='distill' evaluates on one held-out logit cache "
                                  f"folder; got {list(self.data.eval)}")
        if self.stages:
            from rankpm.engine.train.stages import stage_configs
            stage_configs(self)  # every stage must be a valid run config on its own
            return self
        if not self.data.train and self.data.synthetic is None:
            raise ConfigError("data.train: empty; give input files, a prepared folder, or data.synthetic")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _finite(x) -> bool:
    return math.isfinite(x)


# Every numeric key with the range it must lie in: (dotted key, predicate, what is expected).
# None (an optional key left unset) always passes.
RANGES = [
    ("model.dropout", lambda x: 0 <= x < 1, "a number in [0, 1)"),
    ("data.max_length", lambda x: x >= 8, "an integer >= 8"),
    ("data.batch_groups", lambda x: x >= 1, "an integer >= 1"),
    ("data.tokens_per_batch", lambda x: x >= 1, "an integer >= 1, or null"),
    ("data.prefetch", lambda x: x >= 0, "an integer >= 0"),
    ("data.shuffle_buffer", lambda x: x >= 1, "an integer >= 1"),
    ("data.eval_batch_groups", lambda x: x >= 1, "an integer >= 1"),
    ("data.synthetic.train_groups", lambda x: x >= 1, "an integer >= 1"),
    ("data.synthetic.eval_groups", lambda x: x >= 1, "an integer >= 1"),
    ("data.synthetic.seed", lambda x: x >= 0, "an integer >= 0"),
    ("data.synthetic.k_min", lambda x: x >= 2, "an integer >= 2"),
    ("objective.rating_margin", lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
    ("objective.pm_weight", lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
    ("objective.lm_weight", lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
    ("objective.distill_weight", lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
    ("train.seed", lambda x: x >= 0, "an integer >= 0"),
    ("train.lr", lambda x: _finite(x) and x > 0, "a finite number > 0"),
    ("train.weight_decay", lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
    ("train.betas", lambda b: all(_finite(x) and 0 <= x < 1 for x in b), "two numbers in [0, 1)"),
    ("train.warmup_steps", lambda x: x >= 0, "an integer >= 0"),
    ("train.min_lr_ratio", lambda x: _finite(x) and 0 <= x <= 1, "a number in [0, 1]"),
    ("train.max_steps", lambda x: x >= 1, "an integer >= 1, or null (derived from train.epochs)"),
    ("train.epochs", lambda x: _finite(x) and x > 0, "a finite number > 0"),
    ("train.grad_accum", lambda x: x >= 1, "an integer >= 1"),
    ("train.grad_clip", lambda x: _finite(x) and x >= 0, "a finite number > 0, or 0 for no clipping"),
    ("train.eval_every", lambda x: x >= 0, "an integer >= 0 (0: only at the end)"),
    ("train.save_every", lambda x: x >= 0, "an integer >= 0 (0: only at the end)"),
    ("train.keep_last", lambda x: x >= 1, "an integer >= 1"),
    ("train.log_every", lambda x: x >= 1, "an integer >= 1"),
    ("cluster.workers", lambda x: x >= 1, "an integer >= 1"),
    ("cluster.cpus_per_worker", lambda x: x >= 1, "an integer >= 1"),
    ("cluster.gpus_per_worker", lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
    ("cluster.zero_stage", lambda x: x in (0, 1, 2, 3), "0, 1, 2 or 3"),
    ("cluster.max_failures", lambda x: x >= 0, "an integer >= 0"),
]


def _holds(ok, value) -> bool:
    try:
        return bool(ok(value))
    except (TypeError, ValueError):
        return False


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file (or defaults when path is None) and apply KEY=VALUE overrides."""
    return from_dict(read_raw_config(path, overrides))


def read_raw_config(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """The mapping of a YAML file (empty when path is None) with KEY=VALUE overrides set in it;
    what ``build_config`` turns into any config dataclass."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            raw = _parse_yaml(f.read(), str(path)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
        _set_dotted(raw, key.strip(), _parse_yaml(text, f"override {item!r}"))
    return raw


def _parse_yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}{at}: YAML syntax error: {problem}") from None


def from_dict(raw: dict) -> RunConfig:
    return _build(RunConfig, raw, prefix="").validate()


def build_config(cls, raw: dict, ranges: list = ()):
    """Any frozen config dataclass from a raw mapping, every key checked as for RunConfig, then
    the numeric keys against ``ranges`` ((dotted key, predicate, what is expected) each)."""
    cfg = _build(cls, raw, prefix="")
    for key, ok, expected in ranges:
        value = _lookup(cfg, key)
        if value is not None and not _holds(ok, value):
            raise ConfigError(f"{key}: got {value!r}, expected {expected}")
    return cfg


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[leaf] = value


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known keys: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(hint, value: Any, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: got {value!r}, expected one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(items)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: got {value!r}, expected a list of {len(args)} values")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}, expected a mapping")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}), expected {getattr(hint, '__name__', hint)}")


def _lookup(cfg, key: str):
    node: Any = cfg
    for part in key.split("."):
        if node is None:  # inside an optional section that is not set
            return None
        node = getattr(node, part)
    return node
