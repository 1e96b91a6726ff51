"""How comparison groups become training pairs: text-level transforms, ComparisonGroup -> groups.

Every transform works on text, before tokenization (``rankpm prepare`` sees ordinary
comparison groups), so it is independent of the tokenizer and costs nothing at training
time. The per-pair loss stays in the ranked-loss kernel: a binary pair is a K = 2 group.

    ranked_pairs(g, "all")       [(better, worse), ...] indices; ties form no pair
    binarize(g, labels)          A > B  ->  [A+GOOD > A+BAD], [B+BAD > B+GOOD]
    labelled_pair(c, x, good)    one response with its own label -> one label pair (input rows
                                 prompt/response/label, read as LabelledResponse)
    binary_task(c, right, wrong) C:A > C:B
    label_expand(g, labels)      K responses -> 2K: x1+GOOD, x1+BAD, x2+GOOD, ... (evaluation
                                 of a binary discriminator: P(GOOD) = sigmoid(r(x+GOOD) - r(x+BAD)))

Label strings are appended directly after the response text, so they should begin with a
separator (the default labels start with a space); with a subword tokenizer the label then
tokenizes the same way after every response. Truncation at prepare time keeps the end of
the response, so the label always survives.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from rankpm.engine.data.schema import ComparisonGroup, LabelledResponse


@dataclass(frozen=True)
class Labels:
    good: str = " GOOD"
    bad: str = " BAD"

    def __post_init__(self):
        if not self.good or not self.bad or self.good == self.bad:
            raise ValueError(f"labels: good={self.good!r} and bad={self.bad!r} must be two different, "
                             f"non-empty strings")


def ranked_pairs(group: ComparisonGroup, pairs: Literal["all", "adjacent"] = "all") -> list[tuple[int, int]]:
    """Ordered (better, worse) response indices of a group; lower rank is better, ties no pair.

    ``adjacent``: only pairs whose worse member is at the next distinct rank level after
    the better one (ranks [0, 1, 1, 2] give (0,1), (0,2), (1,3), (2,3)) - the kernel's rule.
    """
    if pairs not in ("all", "adjacent"):
        raise ValueError(f"pairs={pairs!r}: expected 'all' or 'adjacent'")
    levels = sorted(set(group.ranks))
    next_level = {a: b for a, b in zip(levels, levels[1:])}
    out = []
    for i, ri in enumerate(group.ranks):
        for j, rj in enumerate(group.ranks):
            if ri < rj and (pairs == "all" or next_level.get(ri) == rj):
                out.append((i, j))
    return out


def labelled_pair(context: str, response: str, good: bool, labels: Labels = Labels(), *,
                  id: str = "", source: str = "", turns: int = 1) -> ComparisonGroup:
    """A response judged good gives x+GOOD > x+BAD; a bad one gives x+BAD > x+GOOD."""
    first, second = (labels.good, labels.bad) if good else (labels.bad, labels.good)
    return ComparisonGroup(id=id, context=context, responses=[response + first, response + second],
                           ranks=[0, 1], source=source, turns=turns)


def binarize(group: ComparisonGroup, labels: Labels = Labels(),
             pairs: Literal["all", "adjacent"] = "all") -> list[ComparisonGroup]:
    """The paper's binary PMP data: each ranked pair A > B becomes two label pairs.

    Pair p = (A, B) gives ``{id}/p{p}a``: A+GOOD > A+BAD and ``{id}/p{p}b``: B+BAD > B+GOOD,
    so the number of pairs doubles. The margin (a property of A vs B) is not carried over.
    """
    out = []
    for p, (a, b) in enumerate(ranked_pairs(group, pairs)):
        common = dict(source=group.source, turns=group.turns)
        out.append(labelled_pair(group.context, group.responses[a], True, labels, id=f"{group.id}/p{p}a", **common))
        out.append(labelled_pair(group.context, group.responses[b], False, labels, id=f"{group.id}/p{p}b", **common))
    return out


def binary_task(context: str, correct: str, wrong: str, *, id: str = "", source: str = "",
                turns: int = 1) -> ComparisonGroup:
    """A context with a correct answer A and a wrong answer B: C:A > C:B."""
    return ComparisonGroup(id=id, context=context, responses=[correct, wrong], ranks=[0, 1],
                           source=source, turns=turns)


def label_expand(group: ComparisonGroup, labels: Labels = Labels()) -> ComparisonGroup:
    """Each response twice, with GOOD then BAD appended; ranks repeated (2K responses).

    Scores s of the expanded group give P(GOOD | x_k) = sigmoid(s[2k] - s[2k+1]); see
    rankpm.engine.judges.binary_logits.
    """
    responses, ranks = [], []
    for text, rank in zip(group.responses, group.ranks):
        responses += [text + labels.good, text + labels.bad]
        ranks += [rank, rank]
    ratings = None if group.ratings is None else [r for r in group.ratings for _ in range(2)]
    return replace(group, responses=responses, ranks=ranks, ratings=ratings)


TRANSFORMS = ("none", "binarize", "label_expand")


def apply_transform(groups, name: str, labels: Labels = Labels(), pairs: str = "all"):
    """Yield the transformed groups of an iterable of groups (``name`` in TRANSFORMS).

    A LabelledResponse becomes its one label pair under both binary transforms: for
    training that is the pair, and for evaluation P(GOOD) > 1/2 on the labelled side is
    what the pair's accuracy counts.
    """
    if name not in TRANSFORMS:
        raise ValueError(f"transform={name!r}: expected one of {TRANSFORMS}")
    for group in groups:
        if isinstance(group, LabelledResponse):
            if name == "none":
                raise ValueError(f"labelled response {group.id!r}: forms no pair without the binary transforms")
            yield labelled_pair(group.context, group.response, group.good, labels, id=group.id,
                                source=group.source, turns=group.turns)
        elif name == "none":
            yield group
        elif name == "binarize":
            yield from binarize(group, labels, pairs)
        else:
            yield label_expand(group, labels)


def run_transforms(objective) -> tuple[str, str]:
    """(training, evaluation) transforms a run applies for its objective config."""
    if objective.name == "binary":
        return "binarize", "label_expand"
    return "none", "none"


def transform_files(inputs: list[str], out_file: str | Path, name: str, labels: Labels = Labels(),
                    pairs: str = "all", *, skip_bad: bool = False, skipped: list | None = None) -> Path:
    """Read comparison files (any format the readers know, labelled responses too), transform,
    write ranked-list JSONL. Bad rows skipped under ``skip_bad`` are appended to ``skipped``
    (so that the prepared folder's manifest lists them) or, without a list, logged."""
    from rankpm.engine.data.synthetic_pmp import write_jsonl

    for item in inputs:
        if (Path(item) / "manifest.json").is_file():
            raise ValueError(f"{item}: a prepared (tokenized) folder cannot be {name}d - transforms work on "
                             f"text; give the input files instead, or set data.transform=none if the data "
                             f"is already in the form the objective needs")
    from rankpm.engine.data.readers import read_groups

    groups = read_groups(inputs, skip_bad=skip_bad, skipped=skipped, labelled=True)
    return write_jsonl(apply_transform(groups, name, labels, pairs), out_file)
