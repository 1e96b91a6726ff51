"""Use a trained model: score responses from Python, or evaluate a model folder on data.

    scorer = RewardScorer.from_folder("runs/quickstart/model")
    scorer.score("Human: How do I boil an egg?\\n\\nAssistant:", ["Put it in boiling water ...", "No."])
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from rankpm.engine.data.collate import collate
from rankpm.engine.data.tokenizer import load_tokenizer
from rankpm.engine.fingerprint import MismatchError, require_same, tokenizer_key
from rankpm.engine.io import ensure_folder
from rankpm.engine.model.attention import choose_layout
from rankpm.engine.model.preference_model import MODEL_FILE, PreferenceModel, folder_tokenizer
from rankpm.engine.score.evaluate import evaluate
from rankpm.engine.score.judges import batch_targets, forward
from rankpm.engine.train.strategy import LocalStrategy

MANIFEST = "manifest.json"


class RewardScorer:
    def __init__(self, model: PreferenceModel, tokenizer, *, max_length: int, device="cpu",
                 score_stats: dict | None = None):
        self.score_stats = score_stats or {}  # score_mean / score_std on the evaluation set
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = torch.device(device)

    @classmethod
    def from_folder(cls, directory: str | Path, device: str = "cpu") -> "RewardScorer":
        directory = resolve_model_folder(directory)
        meta = PreferenceModel.read_meta(directory)
        max_length = meta["config"]["data"]["max_length"]
        folder_tokenizer(directory)  # the tokenizer it was saved with, unchanged
        model, tokenizer = PreferenceModel.load(directory), load_tokenizer(str(directory / "tokenizer"))
        embeddings = model.transformer.get_input_embeddings().num_embeddings
        if tokenizer.vocab_size > embeddings:
            raise MismatchError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                                f"{embeddings} token embeddings")
        return cls(model, tokenizer, max_length=max_length, device=device, score_stats=meta.get("score_stats"))

    @torch.no_grad()
    def score(self, context: str, responses: list[str], normalize: str = "none") -> list[float]:
        """One score per response; higher means preferred. Over-long inputs keep the end of
        each response and cut the context from the left, as training does.

        ``normalize`` (only on request): "center" subtracts the evaluation-set score mean
        stored with the model, "standardize" also divides by its std."""
        if normalize not in ("none", "center", "standardize"):
            raise ValueError(f"normalize={normalize!r}: expected 'none', 'center' or 'standardize'")
        check_inputs(context, responses)
        raw = self._raw_scores(context, responses)
        if normalize == "none":
            return raw
        if "score_mean" not in self.score_stats or "score_std" not in self.score_stats:
            raise ValueError(f"normalize={normalize!r}: this model folder stores no score statistics "
                             f"(it was saved without an evaluation set)")
        mean, std = self.score_stats["score_mean"], self.score_stats["score_std"]
        scale = std if normalize == "standardize" and std > 0 else 1.0
        return [(r - mean) / scale for r in raw]

    @torch.no_grad()
    def _raw_scores(self, context: str, responses: list[str]) -> list[float]:
        ctx = self.tokenizer.encode(context)
        resp = [self.tokenizer.encode(r) for r in responses]
        room = self.max_length - 1 - max(len(r) for r in resp)
        resp = [r[-(self.max_length - 1):] for r in resp]
        ctx = ctx[len(ctx) - max(room, 0):] if room < len(ctx) else ctx
        row = {"id": "", "source": "", "turns": 1, "margin": None, "ratings": None, "ranks": list(range(len(resp))),
               "context_ids": ctx, "response_ids": resp}
        batch = collate([row], pad_id=self.tokenizer.pad_id, eoc_id=self.tokenizer.eoc_id,
                        layout=model_layout(self.model)).to(self.device)
        return forward(self.model, batch).scores.tolist()


def model_layout(model: PreferenceModel) -> str:
    """The layout a saved model scores in: shared on causal backbones, packed on encoders, as in training."""
    return choose_layout("auto", model.causal, model.attention_implementation)[0]


def check_inputs(context, responses) -> None:
    """A context string and a non-empty list of response strings; a bare string would be scored
    character by character, so it is a TypeError that says so."""
    if not isinstance(context, str):
        raise TypeError(f"context: expected a string, got {type(context).__name__}")
    if isinstance(responses, str):
        raise TypeError("responses: expected a list of strings, got one string; score a single response as "
                        "score(context, [response])")
    if not isinstance(responses, (list, tuple)):
        raise TypeError(f"responses: expected a list of strings, got {type(responses).__name__}")
    if not responses:
        raise ValueError("responses: the list is empty; give at least one response to score")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise TypeError(f"responses[{i}]: expected a string, got {type(response).__name__}")


def resolve_model_folder(path: str | Path) -> Path:
    """A model folder as given, or the one inside a checkpoint or a run folder."""
    path = Path(path)
    for candidate in (path, path / "model"):  # model folder; checkpoint or run folder
        if (candidate / MODEL_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{path} is neither a model folder ({MODEL_FILE}), a checkpoint "
                            f"(OUT_DIR/checkpoints/step_N) nor a run folder (OUT_DIR)")


def check_data_for_model(model_dir: Path, data_dir: Path) -> None:
    """Prepared data must carry the model's token ids and fit its positions; never an accuracy
    computed on the wrong token ids."""
    manifest = json.loads((Path(data_dir) / MANIFEST).read_text())
    require_same("the tokenizer", f"model folder {model_dir}", tokenizer_key(folder_tokenizer(model_dir)),
                 f"prepared data {data_dir}", tokenizer_key(manifest["tokenizer"]))
    limit = PreferenceModel.read_meta(model_dir)["config"]["data"]["max_length"]
    if manifest["max_length"] > limit:
        raise MismatchError(f"prepared data {data_dir} has sequences of up to max_length={manifest['max_length']} "
                            f"tokens, model folder {model_dir} was trained with max_length={limit}; prepare the data "
                            f"again with --max-length {limit}, or give the input files")


def evaluate_model_folder(model_dir: str | Path, data: list[str], *, out_dir: str | Path | None = None,
                          batch_groups: int = 64, skip_bad: bool = False, report_dir: str | Path | None = None,
                          judge: str | None = None) -> dict:
    """Pair accuracy, loss and score statistics of a saved model on comparison data.

    ``judge``: how responses are compared (rankpm.engine.score.judges); None: the one of the
    objective the model was trained with. A binary-discrimination model's text inputs are
    label-expanded before tokenization. ``report_dir``: also write the report folder
    (accuracy by source and turns, calibration, score statistics, PNGs).
    """
    from rankpm.engine.data.prepare import prepare
    from rankpm.engine.data.stream import ComparisonStream
    from rankpm.engine.score.judges import judge_for_objective

    model_dir = resolve_model_folder(model_dir)
    for folder, option in ((out_dir, "--out"), (report_dir, "--report")):  # before any scoring
        if folder is not None:
            ensure_folder(folder, key=option)
    meta = PreferenceModel.read_meta(model_dir)
    objective = meta["config"].get("objective", {})
    judge = judge or judge_for_objective(objective.get("name", "ranked"))
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(data[0]) if len(data) == 1 and (Path(data[0]) / MANIFEST).is_file() else None
        if data_dir is not None:
            check_data_for_model(model_dir, data_dir)
        else:
            data_dir = Path(out_dir or scratch) / "data"
            inputs, skipped = list(data), []
            if judge == "binary":
                from rankpm.engine.data.transforms import Labels, transform_files
                labels = Labels(**objective.get("labels", {}))
                inputs = [str(transform_files(inputs, Path(out_dir or scratch) / "label_expanded.jsonl",
                                              "label_expand", labels, skip_bad=skip_bad, skipped=skipped))]
            prepare(inputs, data_dir, str(model_dir / "tokenizer"), max_length=meta["config"]["data"]["max_length"],
                    truncation=meta["config"]["data"]["truncation"], skip_bad=skip_bad, skipped_before=skipped)
        model = PreferenceModel.load(model_dir, with_lm_head=True if judge == "logprob" else None)
        strategy = LocalStrategy(device=torch.device("cpu"))
        strategy.setup(model, None, None)
        options = dict(shuffle=False, batch_groups=batch_groups, loop=False, layout=model_layout(model),
                       targets=batch_targets(judge))
        stream = ComparisonStream(data_dir, **options)
        report = evaluate(model, stream, strategy=strategy, judge=judge)
        report["judge"] = judge
        report["skipped_rows"] = len(stream.manifest.get("skipped", []))
        report["checkpoint_score_stats"] = meta.get("score_stats", {})
        if report_dir is not None:
            from rankpm.engine.score.report import analyse, collect_pairs, write_report
            stream = ComparisonStream(data_dir, **options)
            section = analyse(collect_pairs(model, stream, judge=judge), name="eval")
            write_report(report_dir, [section], title=f"rankpm eval: {model_dir}",
                         extra={"model": str(model_dir), "data": [str(d) for d in data],
                                "checkpoint_score_stats": meta.get("score_stats", {})})
            report["report"] = str(report_dir)
            if section["calibration"]:
                report["ece"] = section["calibration"]["ece"]
        return {"model": str(model_dir), "data": [str(d) for d in data], **report}
