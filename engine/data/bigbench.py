"""Multiple-choice evaluation sets in the BIG-bench task format, read as comparison groups.

A BIG-bench JSON task (e.g. the HHH alignment evaluation, ``hhh_alignment/*/task.json``)::

    {"name": "...", "examples": [{"input": "...", "target_scores": {"answer A": 1, "answer B": 0}}]}

Each example becomes one ComparisonGroup: the input is the context, each answer a
response, ranked by target score (higher score = better = lower rank; equal scores tie).
The source tag is the task's ``name`` (or the file name); ids are ``{source}/{index}``.
"""
from __future__ import annotations

import json
from pathlib import Path

from rankpm.engine.data.schema import ComparisonGroup


class BigBenchError(ValueError):
    pass


def read_bigbench(path: str | Path, *, source: str | None = None) -> list[ComparisonGroup]:
    path = Path(path)
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BigBenchError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
        raise BigBenchError(f"{path}: expected a JSON object with an 'examples' list (BIG-bench task format)")
    source = source or str(task.get("name") or path.parent.name or path.stem)
    groups = []
    for i, example in enumerate(task["examples"]):
        where = f"{path}: examples[{i}]"
        if not isinstance(example, dict):
            raise BigBenchError(f"{where}: expected an object, got {type(example).__name__}")
        context = example.get("input")
        if not isinstance(context, str):
            raise BigBenchError(f"{where}.input: expected a string, got {context!r}")
        scores = example.get("target_scores")
        if not isinstance(scores, dict) or len(scores) < 2:
            raise BigBenchError(f"{where}.target_scores: expected a mapping of at least 2 answers to "
                                f"scores, got {scores!r}")
        for answer, score in scores.items():
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise BigBenchError(f"{where}.target_scores[{answer!r}]: expected a number, got {score!r}")
        levels = sorted(set(scores.values()), reverse=True)
        ranks = [levels.index(score) for score in scores.values()]  # dense: best score -> rank 0
        groups.append(ComparisonGroup(id=f"{source}/{i}", context=context, responses=list(scores),
                                      ranks=ranks, source=source, turns=max(1, context.count("Human:"))))
    return groups
