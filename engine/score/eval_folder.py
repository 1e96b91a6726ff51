"""``rankpm eval``: a saved model on comparison data, in one scoring pass.

    evaluate_model_folder("runs/quickstart/model", ["hh_test.jsonl"], report_dir="runs/quickstart/eval")

The data is a prepared folder (checked against the model's tokenizer and length) or input
files, prepared here with the model's own tokenizer and length policy (a binary
discriminator's inputs label-expanded first). The pair accuracy, loss, score statistics and
the report (accuracy by source and turns, calibration, PNGs) all come from the same pass.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from rankpm.engine.data.tokenizer import load_tokenizer
from rankpm.engine.io import ensure_folder
from rankpm.engine.model.reading import framing_for, specials_for
from rankpm.engine.model.preference_model import PreferenceModel, tokenizer_dir
from rankpm.engine.score.evaluate import evaluate
from rankpm.engine.score.judges import batch_targets, judge_for_objective
from rankpm.engine.score.scorer import MANIFEST, check_data_for_model, model_layout, resolve_model_folder
from rankpm.engine.train.strategy import LocalStrategy


def evaluate_model_folder(model_dir: str | Path, data: list[str], *, out_dir: str | Path | None = None,
                          batch_groups: int = 64, skip_bad: bool = False, report_dir: str | Path | None = None,
                          judge: str | None = None) -> dict:
    """Pair accuracy, loss and score statistics of a saved model on comparison data.

    ``judge``: how responses are compared (rankpm.engine.score.judges); None: the one of the
    objective the model was trained with. ``report_dir``: also write the report folder.
    """
    from rankpm.engine.data.prepare import prepare
    from rankpm.engine.data.stream import ComparisonStream

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
            prepare(inputs, data_dir, str(tokenizer_dir(model_dir)), max_length=meta["config"]["data"]["max_length"],
                    truncation=meta["config"]["data"]["truncation"], skip_bad=skip_bad, skipped_before=skipped,
                    specials=specials_for(meta.get("reading", "end")))
        model = PreferenceModel.load(model_dir, with_lm_head=True if judge == "logprob" else None)
        strategy = LocalStrategy(device=torch.device("cpu"))
        strategy.setup(model, None, None)
        stream = ComparisonStream(data_dir, shuffle=False, batch_groups=batch_groups, loop=False,
                                  layout=model_layout(model), targets=batch_targets(judge),
                                  framing=framing_for(model.reading, load_tokenizer(str(tokenizer_dir(model_dir)))))
        result = evaluate(model, stream, strategy=strategy, judge=judge, collect=report_dir is not None)
        report = dict(result.metrics, judge=judge, skipped_rows=len(stream.manifest.get("skipped", [])),
                      checkpoint_score_stats=meta.get("score_stats", {}))
        if report_dir is not None:  # the same pass's pairs
            from rankpm.engine.score.report import analyse, write_report
            section = analyse(result.pairs, name="eval")
            write_report(report_dir, [section], title=f"rankpm eval: {model_dir}",
                         extra={"model": str(model_dir), "data": [str(d) for d in data],
                                "checkpoint_score_stats": meta.get("score_stats", {})})
            report["report"] = str(report_dir)
            if section["calibration"]:
                report["ece"] = section["calibration"]["ece"]
        return {"model": str(model_dir), "data": [str(d) for d in data], **report}
