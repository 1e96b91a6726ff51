"""Use a trained model: score responses from Python, or evaluate a model folder on data.

    scorer = RewardScorer.from_folder("runs/quickstart/model")
    scorer.score("Human: How do I boil an egg?\\n\\nAssistant:", ["Put it in boiling water ...", "No."])
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from rankpm.engine.data.collate import collate
from rankpm.engine.data.tokenizer import load_tokenizer
from rankpm.engine.evaluate import evaluate
from rankpm.engine.model import PreferenceModel
from rankpm.engine.strategy import LocalStrategy

MANIFEST = "manifest.json"


class RewardScorer:
    def __init__(self, model: PreferenceModel, tokenizer, *, max_length: int, device="cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = torch.device(device)

    @classmethod
    def from_folder(cls, directory: str | Path, device: str = "cpu") -> "RewardScorer":
        directory = Path(directory)
        meta = PreferenceModel.read_meta(directory)
        max_length = meta["config"]["data"]["max_length"]
        return cls(PreferenceModel.load(directory), load_tokenizer(str(directory / "tokenizer")),
                   max_length=max_length, device=device)

    @torch.no_grad()
    def score(self, context: str, responses: list[str]) -> list[float]:
        """One score per response; higher means preferred. Over-long inputs keep the end of
        each response and cut the context from the left, as training does."""
        ctx = self.tokenizer.encode(context)
        resp = [self.tokenizer.encode(r) for r in responses]
        room = self.max_length - 1 - max(len(r) for r in resp)
        resp = [r[-(self.max_length - 1):] for r in resp]
        ctx = ctx[len(ctx) - max(room, 0):] if room < len(ctx) else ctx
        row = {"id": "", "source": "", "turns": 1, "margin": None, "ranks": list(range(len(resp))),
               "context_ids": ctx, "response_ids": resp}
        batch = collate([row], pad_id=self.tokenizer.pad_id, eoc_id=self.tokenizer.eoc_id).to(self.device)
        return self.model(batch.input_ids, batch.attention_mask, batch.score_index).scores.tolist()


def evaluate_model_folder(model_dir: str | Path, data: list[str], *, out_dir: str | Path | None = None,
                          batch_groups: int = 64, skip_bad: bool = False) -> dict:
    """Pair accuracy, loss and score statistics of a saved model on comparison data."""
    from rankpm.engine.data.prepare import prepare
    from rankpm.engine.data.stream import ComparisonStream

    model_dir = Path(model_dir)
    meta = PreferenceModel.read_meta(model_dir)
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(data[0]) if len(data) == 1 and (Path(data[0]) / MANIFEST).is_file() else None
        if data_dir is None:
            data_dir = Path(out_dir or scratch) / "data"
            prepare(data, data_dir, str(model_dir / "tokenizer"), max_length=meta["config"]["data"]["max_length"],
                    truncation=meta["config"]["data"]["truncation"], skip_bad=skip_bad)
        model = PreferenceModel.load(model_dir)
        strategy = LocalStrategy(device=torch.device("cpu"))
        strategy.setup(model, None, None)
        stream = ComparisonStream(data_dir, shuffle=False, batch_groups=batch_groups, loop=False)
        report = evaluate(model, stream, strategy=strategy)
        report["skipped_rows"] = len(stream.manifest.get("skipped", []))
        return {"model": str(model_dir), "data": [str(d) for d in data], **report}
