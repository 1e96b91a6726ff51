"""Shared pieces of the experiments: run one training config, count parameters, write results."""
from __future__ import annotations

import json
import time
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
    pos = getattr(model.transformer, "wpe", None) or getattr(getattr(model.transformer, "transformer", None), "wpe", None)
    embed += sum(p.numel() for p in pos.parameters()) if pos is not None else 0
    return {"parameters": total, "non_embedding_parameters": total - embed}


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))


def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot
