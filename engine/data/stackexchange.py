"""StackExchange-style rows: one question, its answers, each scored as the paper's PMP data was.

    {"question": "...", "answers": [{"text": "...", "pm_score": 3}, {"text": "...", "score": 12, "accepted": true}]}

Each answer's score (a rating, higher is better) is its ``pm_score`` when the row has one
(HuggingFaceH4/stack-exchange-preferences ships them), else computed from its votes as
Askell et al. (2021) did: ``round(log2(1 + upvotes))``, plus 1 if the answer was accepted
(``accepted`` or ``selected``). The votes are ``upvotes``, or ``score``. An answer voted below
zero, where log2(1 + upvotes) is undefined, scores -1 (+1 if accepted): below every answer
with no negative votes. Answers with equal scores tie; a question needs two distinct scores.

The question becomes a one-turn dialogue context, ``"\\n\\nHuman: QUESTION\\n\\nAssistant:"``,
and each answer a response after it (``" " + text``), like every other format's.
"""
from __future__ import annotations

import math

from rankpm.engine.data.errors import DataError, Where


def answer_score(upvotes: int, accepted: bool) -> int:
    """The paper's preference score of one answer (see the module docstring for negative votes)."""
    base = round(math.log2(1 + upvotes)) if upvotes >= 0 else -1
    return base + (1 if accepted else 0)


def parse_stackexchange(row: dict, where: Where) -> tuple[str, list[str], list[float]]:
    """(context, responses, ratings) of one question row; DataError naming the field otherwise."""
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(where, "question", f"expected the question's text, got {question!r}")
    answers = row.get("answers")
    if not isinstance(answers, list) or len(answers) < 2:
        raise DataError(where, "answers", f"expected a list of at least two answers, got "
                        f"{len(answers) if isinstance(answers, list) else type(answers).__name__}"
                        f"{' answer' if isinstance(answers, list) else ''}")
    responses, ratings = [], []
    for k, answer in enumerate(answers):
        name = f"answers[{k}]"
        if not isinstance(answer, dict):
            raise DataError(where, name, f"expected an object with text and pm_score (or score/upvotes), got {answer!r}")
        text = answer.get("text")
        if not isinstance(text, str):
            raise DataError(where, f"{name}.text", f"expected a string, got {text!r}")
        responses.append(" " + text)
        ratings.append(float(_score(answer, name, where)))
    if len(set(ratings)) < 2:
        raise DataError(where, "answers", f"every answer scores {ratings[0]:g}: the question forms no pair")
    return f"\n\nHuman: {question}\n\nAssistant:", responses, ratings


def _score(answer: dict, name: str, where: Where) -> int:
    if "pm_score" in answer:
        value = answer["pm_score"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(where, f"{name}.pm_score", f"expected a finite number, got {value!r}")
        return value
    key = "upvotes" if "upvotes" in answer else "score"
    votes = answer.get(key)
    if isinstance(votes, bool) or not isinstance(votes, int):
        raise DataError(where, f"{name}.{key}", f"expected an integer vote count (or a pm_score), got {votes!r}")
    accepted = answer.get("accepted", answer.get("selected", False))
    if not isinstance(accepted, bool):
        raise DataError(where, f"{name}.accepted", f"expected true or false, got {accepted!r}")
    return answer_score(votes, accepted)
