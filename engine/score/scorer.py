"""The one way rankpm scores: a model's judge over (context, responses), batched.

    scorer = RewardScorer.from_folder("runs/quickstart/model")
    scorer.score("\\n\\nHuman: How do I boil an egg?\\n\\nAssistant:", [" Put it in boiling water.", " No."])
    scorer.score_groups([(context_a, [r1, r2]), (context_b, [r3])])   # one batched pass

A score means what the model was trained to output: its judge (rankpm.engine.score.judges)
is applied, so a preference model gives r(x), a binary discriminator the logit of P(GOOD)
(x + GOOD against x + BAD), an imitation model the mean per-token log-probability of the
response. Normalisation uses the score statistics saved with the model, which are in the
same units, and only on request. Texts are tokenized and cut to the model's length exactly
as training did (rankpm.engine.data.prepare.truncate), laid out as in training, sorted by
length and scored in batches of at most ``tokens_per_batch`` tokens (by default sized for
the device) under inference mode,
on CPU or CUDA, in fp32 or bf16. Evaluation on prepared data (``rankpm eval``, the loop)
runs the same judge on the same batches (rankpm.engine.score.evaluate).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from rankpm.engine.data.collate import collate, layout_tokens
from rankpm.engine.data.errors import DataError, Where
from rankpm.engine.data.prepare import truncate
from rankpm.engine.data.tokenizer import load_tokenizer
from rankpm.engine.data.transforms import Labels
from rankpm.engine.fingerprint import MismatchError, require_same, tokenizer_key
from rankpm.engine.model.attention import choose_layout
from rankpm.engine.model.reading import framing_for, specials_for
from rankpm.engine.model.preference_model import MODEL_FILE, PreferenceModel, folder_tokenizer, tokenizer_dir
from rankpm.engine.model.reward_folder import is_reward_folder
from rankpm.engine.score.judges import JUDGES, batch_targets, judge, judge_for_objective

MANIFEST = "manifest.json"
NORMALIZE = ("none", "center", "standardize")
# Tokens per scoring batch by device: a CPU is fastest on batches that stay in its caches
# (benchmarks/bench_scoring.py: 48 pairs/s at 512-2,048, 29 at 16,384); a GPU wants them large.
TOKENS_PER_BATCH = {"cpu": 2048, "cuda": 16384}


class RewardScorer:
    def __init__(self, model: PreferenceModel, tokenizer, *, judge: str = "score", max_length: int,
                 truncation: str = "left", labels: Labels = Labels(), device="cpu", dtype: str = "fp32",
                 tokens_per_batch: int | None = None, score_stats: dict | None = None):
        if judge not in JUDGES:
            raise ValueError(f"judge={judge!r}: expected one of {JUDGES}")
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype={dtype!r}: expected 'fp32' or 'bf16'")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer, self.judge, self.labels = tokenizer, judge, labels
        self.max_length, self.truncation, self.dtype = max_length, truncation, dtype
        self.tokens_per_batch = tokens_per_batch or TOKENS_PER_BATCH.get(self.device.type, 16384)
        self.score_stats = score_stats or {}  # score_mean / score_std of the judge on the evaluation set
        self.layout = model_layout(model)
        self.framing = framing_for(model.reading, tokenizer)

    @classmethod
    def from_folder(cls, directory: str | Path, device: str = "cpu", *, dtype: str = "fp32", judge: str | None = None,
                    tokens_per_batch: int | None = None) -> "RewardScorer":
        directory = resolve_model_folder(directory)
        meta = PreferenceModel.read_meta(directory)
        config = meta["config"]
        objective = config.get("objective", {})
        judge = judge or judge_for_objective(objective.get("name", "ranked"))
        folder_tokenizer(directory)  # the tokenizer it was saved with, unchanged
        model = PreferenceModel.load(directory, with_lm_head=True if judge == "logprob" else None)
        tokenizer = load_tokenizer(str(tokenizer_dir(directory)))
        embeddings = model.transformer.get_input_embeddings().num_embeddings
        if tokenizer.vocab_size > embeddings:
            raise MismatchError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                                f"{embeddings} token embeddings")
        return cls(model, tokenizer, judge=judge, max_length=config["data"]["max_length"],
                   truncation=config["data"]["truncation"], labels=Labels(**objective.get("labels", {})),
                   device=device, dtype=dtype, tokens_per_batch=tokens_per_batch, score_stats=meta.get("score_stats"))

    def score(self, context: str, responses: list[str], normalize: str = "none") -> list[float]:
        """One score per response; higher means preferred. ``normalize`` (only on request):
        "center" subtracts the evaluation-set mean stored with the model, "standardize" also
        divides by its standard deviation."""
        return self.score_groups([(context, responses)], normalize=normalize)[0]

    def score_groups(self, groups: list[tuple[str, list[str]]], normalize: str = "none") -> list[list[float]]:
        """The scores of every (context, responses) pair, in order, from one batched pass."""
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize={normalize!r}: expected one of {NORMALIZE}")
        if not isinstance(groups, (list, tuple)):
            raise TypeError(f"groups: expected a list of (context, responses) pairs, got {type(groups).__name__}")
        for context, responses in groups:
            check_inputs(context, responses)
        rows = self._rows(groups)
        scores: list[list[float] | None] = [None] * len(rows)
        for batch_rows in self._batches(rows):
            batch = collate([rows[i] for i in batch_rows], self.tokenizer.pad_id, self.tokenizer.eoc_id,
                            layout=self.layout, targets=batch_targets(self.judge), framing=self.framing).to(self.device)
            with torch.inference_mode(), self._autocast():
                judged = judge(self.model, batch, self.judge).scores.float().cpu()
            offsets = (batch.group_offsets // (2 if self.judge == "binary" else 1)).tolist()
            for g, i in enumerate(batch_rows):
                scores[i] = judged[offsets[g]:offsets[g + 1]].tolist()
        return [self.normalize_scores(s, normalize) for s in scores]

    def _rows(self, groups) -> list[dict]:
        """Shard-schema rows of the groups, tokenized and cut as training cut them."""
        texts = []
        for context, responses in groups:
            if self.judge == "binary":  # each response twice: x + GOOD, x + BAD
                responses = [r + label for r in responses for label in (self.labels.good, self.labels.bad)]
            texts.append((context, list(responses)))
        flat = [t for context, responses in texts for t in (context, *responses)]
        ids = iter(self.tokenizer.encode_batch(flat))
        rows = []
        for i, (context, responses) in enumerate(texts):
            ctx, resp = next(ids), [next(ids) for _ in responses]
            try:
                ctx, resp, _ = truncate(ctx, resp, self.max_length, self.truncation, where=Where("<request>", i, "group"),
                                        specials=self.framing.specials)
            except DataError as err:
                raise ValueError(f"group {i}: {err.reason}") from None
            rows.append({"id": str(i), "source": "", "turns": 1, "margin": None, "ratings": None,
                         "ranks": list(range(len(resp))), "context_ids": ctx, "response_ids": resp})
        return rows

    def _batches(self, rows: list[dict]):
        """Row indices, longest first, in batches of at most tokens_per_batch layout tokens."""
        sizes = layout_tokens(np.array([len(r["context_ids"]) for r in rows], dtype=np.int64),
                              [np.array([len(x) for x in r["response_ids"]]) for r in rows], self.layout,
                              self.framing)
        batch, used = [], 0
        for i in np.argsort(-sizes, kind="stable").tolist():
            if batch and used + sizes[i] > self.tokens_per_batch:
                yield batch
                batch, used = [], 0
            batch.append(i)
            used += int(sizes[i])
        if batch:
            yield batch

    def _autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def normalize_scores(self, raw: list[float], normalize: str) -> list[float]:
        """Scores centred (or standardised) by the statistics saved with the model."""
        if normalize == "none":
            return raw
        if "score_mean" not in self.score_stats or "score_std" not in self.score_stats:
            raise ValueError(f"normalize={normalize!r}: this model folder stores no score statistics "
                             f"(it was saved without an evaluation set)")
        mean, std = self.score_stats["score_mean"], self.score_stats["score_std"]
        scale = std if normalize == "standardize" and std > 0 else 1.0
        return [(r - mean) / scale for r in raw]


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
    if is_reward_folder(path):  # a transformers reward model (TRL, OpenRLHF, rankpm export)
        return path
    raise FileNotFoundError(f"{path} is neither a model folder ({MODEL_FILE}), a checkpoint "
                            f"(OUT_DIR/checkpoints/step_N), a run folder (OUT_DIR) nor a transformers reward model "
                            f"(a ForSequenceClassification folder with one label)")


def check_data_for_model(model_dir: Path, data_dir: Path) -> None:
    """Prepared data must carry the model's token ids and fit its positions; never an accuracy
    computed on the wrong token ids."""
    manifest = json.loads((Path(data_dir) / MANIFEST).read_text())
    require_same("the tokenizer", f"model folder {model_dir}", tokenizer_key(folder_tokenizer(model_dir)),
                 f"prepared data {data_dir}", tokenizer_key(manifest["tokenizer"]))
    meta = PreferenceModel.read_meta(model_dir)
    require_same("the special tokens per sequence", f"model folder {model_dir} (reading {meta.get('reading', 'end')!r})",
                 {"specials": specials_for(meta.get("reading", "end"))}, f"prepared data {data_dir}",
                 {"specials": manifest.get("specials", 1)})
    limit = meta["config"]["data"]["max_length"]
    if manifest["max_length"] > limit:
        raise MismatchError(f"prepared data {data_dir} has sequences of up to max_length={manifest['max_length']} "
                            f"tokens, model folder {model_dir} was trained with max_length={limit}; prepare the data "
                            f"again with --max-length {limit}, or give the input files")
