"""One input row (a dict) -> one ComparisonGroup, whatever the row's format.

The format is detected from the row's fields:

    ranked      responses, ranks            context in ``prompt`` (or ``context``); optional
                                            margin, source, id, turns, and ``ratings`` (one
                                            number per response, higher is better: per-pair
                                            margins from their gaps; with ratings, ``ranks``
                                            may be left out and follow from them)
    pairwise    prompt, chosen, rejected    strings, or message lists (below)
    messages    chosen, rejected            lists of {role, content}: whole conversations that
                                            agree up to the final assistant message
    transcript  chosen, rejected            strings: whole HH-RLHF dialogues
                                            ("\\n\\nHuman: ...\\n\\nAssistant: ...") that agree up to
                                            the final assistant turn
    labelled    prompt, response, label     one response judged on its own: label true/false,
                                            "good"/"bad" or 1/0; a LabelledResponse, which only
                                            the binary objective's transforms turn into a pair
    stackexchange  question, answers        answers scored as the paper's PMP data (pm_score,
                                            or round(log2(1 + upvotes)) + 1 if accepted): the
                                            scores are the group's ratings (rankpm.engine.data.stackexchange)

Message lists are rendered to the same text format as the transcripts: each message as
``"\\n\\nHuman: ..."`` / ``"\\n\\nAssistant: ..."`` (system messages as ``"\\n\\nSystem: ..."``),
the context ending in ``"\\n\\nAssistant:"`` and each response starting with the space that
follows it. Every problem raises DataError naming the row and the field.
"""
from __future__ import annotations

import itertools
import math
import re

from rankpm.engine.data.errors import DataError, Where
from rankpm.engine.data.schema import ComparisonGroup, LabelledResponse
from rankpm.engine.data.stackexchange import parse_stackexchange

ASSISTANT = "\n\nAssistant:"
ROLES = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}
_HUMAN_TURN = re.compile(r"(?:^|\n\n)Human:")


def count_turns(context: str) -> int:
    """Human turns in a context (at least 1: a bare prompt is one turn)."""
    return max(1, len(_HUMAN_TURN.findall(context)))


def parse_row(row, where: Where, default_id: str) -> tuple[str, ComparisonGroup | LabelledResponse]:
    """(format name, group) for one row; DataError on anything unusable."""
    if not isinstance(row, dict):
        raise DataError(where, "<row>", f"expected a JSON object, got {type(row).__name__}")
    ratings = None
    if "responses" in row or "ranks" in row:
        fmt, context, responses, ranks, ratings = "ranked", *_ranked(row, where)
    elif "answers" in row and "question" in row:
        fmt, (context, responses, ratings) = "stackexchange", parse_stackexchange(row, where)
        levels = sorted(set(ratings), reverse=True)
        ranks = [levels.index(r) for r in ratings]
    elif "chosen" in row or "rejected" in row:
        chosen, rejected = _require(row, "chosen", where), _require(row, "rejected", where)
        if "prompt" in row:
            fmt = "pairwise"
            context = _context(row["prompt"], "prompt", where)
            responses = [_response(chosen, "chosen", where), _response(rejected, "rejected", where)]
        elif isinstance(chosen, list) and isinstance(rejected, list):
            fmt, (context, responses) = "messages", _split_conversations(chosen, rejected, where)
        elif isinstance(chosen, str) and isinstance(rejected, str):
            fmt, (context, responses) = "transcript", split_transcripts(chosen, rejected, where)
        else:
            raise DataError(where, "rejected", f"chosen is {type(chosen).__name__} but rejected is "
                            f"{type(rejected).__name__}; expected two strings or two message lists")
        ranks = [0, 1]
    elif "response" in row or "label" in row:
        fmt, ranks = "labelled", None
        context = _prompt(row, where)
        responses = [_response(_require(row, "response", where), "response", where)]
        good = _label(_require(row, "label", where), where)
        if row.get("margin") is not None:
            raise DataError(where, "margin", "a labelled response forms no ranked pair to carry a margin")
    else:
        raise DataError(where, "<row>", f"unrecognised row with fields {sorted(row)}: expected "
                        "prompt/chosen/rejected, chosen/rejected transcripts, prompt/responses/ranks, "
                        "prompt/response/label, or question/answers")
    # An empty response is a legitimate answer (HH-RLHF's harmless-base prefers saying nothing
    # at times): it is scored at the end-of-context token right after the context.
    if len(responses) >= 2 and len(set(responses)) == 1:
        what = "chosen and rejected are identical" if fmt not in ("ranked", "stackexchange") else f"all {len(responses)} responses are identical"
        raise DataError(where, response_field(fmt, len(responses) - 1), f"{what}: the group compares nothing")

    group_id = row.get("id", default_id)
    if group_id is None:
        group_id = default_id
    if not isinstance(group_id, (str, int)) or isinstance(group_id, bool):
        raise DataError(where, "id", f"expected a string, got {group_id!r}")
    source = row.get("source") or ""
    if not isinstance(source, str):
        raise DataError(where, "source", f"expected a string, got {source!r}")
    margin = row.get("margin")
    if margin is not None and not _is_stored_float(margin):
        raise DataError(where, "margin", f"expected a finite number (|x| < {FLOAT32_MAX:.3g}) or null, got {margin!r}")
    turns = row.get("turns")
    if turns is None:
        turns = count_turns(context)
    elif isinstance(turns, bool) or not isinstance(turns, int) or not 1 <= turns <= INT32_MAX:
        raise DataError(where, "turns", f"expected an integer in [1, {INT32_MAX}], got {turns!r}")
    if fmt == "labelled":
        return fmt, LabelledResponse(id=str(group_id), context=context, response=responses[0], good=good,
                                     source=source, turns=turns)
    group = ComparisonGroup(id=str(group_id), context=context, responses=responses, ranks=ranks,
                            margin=None if margin is None else float(margin), source=source, turns=turns,
                            ratings=ratings)
    return fmt, group


# Shards store ranks and turns as int32 and margins and ratings as float32.
INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38


def _is_stored_float(value) -> bool:
    """A number that float32 holds finitely (JSON allows NaN and Infinity; Python ints are unbounded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value) and abs(value) < FLOAT32_MAX
    except OverflowError:  # an int beyond any float
        return False


def _require(row: dict, name: str, where: Where):
    if name not in row or row[name] is None:
        raise DataError(where, name, "missing")
    return row[name]


def response_field(fmt: str, k: int) -> str:
    if fmt == "ranked":
        return f"responses[{k}]"
    if fmt == "labelled":
        return "response"
    if fmt == "stackexchange":
        return f"answers[{k}].text"
    return ("chosen", "rejected")[k]


_LABELS = {"good": True, "bad": False}


def _label(value, where: Where) -> bool:
    """true/false, "good"/"bad" (any case) or 1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    raise DataError(where, "label", f"expected true/false, \"good\"/\"bad\" or 1/0, got {value!r}")


def _prompt(row: dict, where: Where) -> str:
    """The context of a row that gives it as ``prompt`` or ``context``."""
    name = "prompt" if "prompt" in row else "context"
    return _context(_require(row, name, where), name, where)


def _ranked(row: dict, where: Where) -> tuple[str, list[str], list[int], list[float] | None]:
    context = _prompt(row, where)
    responses = _require(row, "responses", where)
    if not isinstance(responses, list):
        raise DataError(where, "responses", f"expected a list of strings, got {type(responses).__name__}")
    ratings = _ratings(row.get("ratings"), len(responses), where)
    if ratings is not None and row.get("ranks") is None:  # rank = how many distinct ratings are higher
        levels = sorted(set(ratings), reverse=True)
        ranks = [levels.index(r) for r in ratings]
    else:
        ranks = _require(row, "ranks", where)
    if not isinstance(ranks, list):
        raise DataError(where, "ranks", f"expected a list of integers, got {type(ranks).__name__}")
    for k, text in enumerate(responses):
        if not isinstance(text, str):
            raise DataError(where, f"responses[{k}]", f"expected a string, got {type(text).__name__}")
    for k, rank in enumerate(ranks):
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= INT32_MAX:
            raise DataError(where, f"ranks[{k}]", f"expected an integer in [0, {INT32_MAX}], got {rank!r}")
    if len(ranks) != len(responses):
        raise DataError(where, "ranks", f"{len(ranks)} ranks for {len(responses)} responses")
    if len(set(ranks)) < 2:
        raise DataError(where, "ranks", f"fewer than two distinct ranks ({ranks}): the group forms no pair")
    if ratings is not None:
        for i, j in itertools.permutations(range(len(ranks)), 2):
            if ranks[i] < ranks[j] and ratings[i] < ratings[j]:
                raise DataError(where, "ratings", f"response {i} ranks above response {j} but is rated "
                                f"below it ({ratings[i]} < {ratings[j]}): its margin would be negative")
    return context, list(responses), list(ranks), ratings


def _ratings(value, count: int, where: Where) -> list[float] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != count:
        raise DataError(where, "ratings", f"expected a list of {count} numbers (one per response), got {value!r}")
    for k, rating in enumerate(value):
        if not _is_stored_float(rating):
            raise DataError(where, f"ratings[{k}]", f"expected a finite number (|x| < {FLOAT32_MAX:.3g}), "
                            f"got {rating!r}")
    return [float(r) for r in value]


def _context(value, name: str, where: Where) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        messages = _messages(value, name, where)
        if not messages or messages[-1][0] == "Assistant":
            raise DataError(where, name, "a message-list prompt must end with a user message")
        return render(messages) + ASSISTANT
    raise DataError(where, name, f"expected a string or a list of messages, got {type(value).__name__}")


def _response(value, name: str, where: Where) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # the assistant's reply as a one-message list
        messages = _messages(value, name, where)
        if len(messages) != 1 or messages[0][0] != "Assistant":
            raise DataError(where, name, "with a prompt, expected one assistant message")
        return " " + messages[0][1]
    raise DataError(where, name, f"expected a string or a list of messages, got {type(value).__name__}")


def _messages(value: list, name: str, where: Where) -> list[tuple[str, str]]:
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(where, f"{name}[{i}]", f"expected a {{role, content}} object, got {message!r}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(where, f"{name}[{i}].role", f"got {role!r}, expected one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise DataError(where, f"{name}[{i}].content", f"expected a string, got {type(content).__name__}")
        out.append((ROLES[role], content))
    return out


def render(messages: list[tuple[str, str]]) -> str:
    return "".join(f"\n\n{role}: {content}" for role, content in messages)


def _split_conversations(chosen: list, rejected: list, where: Where) -> tuple[str, list[str]]:
    a, b = _messages(chosen, "chosen", where), _messages(rejected, "rejected", where)
    for name, conv in (("chosen", a), ("rejected", b)):
        if len(conv) < 2 or conv[-1][0] != "Assistant":
            raise DataError(where, name, "expected a conversation ending with an assistant message")
    if a[:-1] != b[:-1]:
        diverge = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)) - 1)
        raise DataError(where, "rejected", f"conversations differ before the final assistant message "
                        f"(at message {diverge}); cannot split into one context and two responses")
    return render(a[:-1]) + ASSISTANT, [" " + a[-1][1], " " + b[-1][1]]


def split_transcripts(chosen: str, rejected: str, where: Where) -> tuple[str, list[str]]:
    """Split two HH-RLHF dialogues at the final assistant turn they share.

    The context is the common text up to and including the last ``"\\n\\nAssistant:"`` that
    both contain at the same place; what follows is each response. A response that still
    holds a Human turn means the dialogues differ earlier: the pair cannot be split.
    """
    common = 0
    limit = min(len(chosen), len(rejected))
    while common < limit and chosen[common] == rejected[common]:
        common += 1
    cut = chosen.rfind(ASSISTANT, 0, common)  # the marker lies wholly in the shared text
    if cut < 0:
        raise DataError(where, "chosen", "unsplittable transcript pair: no shared '\\n\\nAssistant:' turn "
                        "before the dialogues differ")
    end = cut + len(ASSISTANT)
    context, responses = chosen[:end], [chosen[end:], rejected[end:]]
    for name, text in zip(("chosen", "rejected"), responses):
        if "\n\nHuman:" in text:
            raise DataError(where, name, "unsplittable transcript pair: the dialogues differ before the "
                            "final assistant turn")
    if responses[0] == responses[1]:
        raise DataError(where, "rejected", "chosen and rejected are identical")
    return context, responses
