"""StackExchange-style rows (question, answers) scored as the paper's PMP data:
round(log2(1 + upvotes)) + 1 if accepted, or the row's own pm_score."""
import json

import pytest

from rankpm.engine.data.errors import DataError
from rankpm.engine.data.readers import read_groups
from rankpm.engine.data.stackexchange import answer_score


@pytest.mark.parametrize("upvotes, accepted, score", [
    (0, False, 0),    # log2(1) = 0
    (1, False, 1),    # log2(2) = 1
    (3, False, 2),    # log2(4) = 2
    (12, False, 4),   # log2(13) = 3.70 -> 4
    (12, True, 5),    # +1 for the accepted answer
    (2, True, 3),     # log2(3) = 1.58 -> 2, +1
    (-4, False, -1),  # below zero votes: log2 undefined, below every non-negative answer
    (-4, True, 0),
])
def test_an_answer_scores_the_rounded_log2_of_one_plus_its_upvotes_plus_one_if_accepted(upvotes, accepted, score):
    assert answer_score(upvotes, accepted) == score


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_question_becomes_a_dialogue_with_its_answers_ranked_by_score(tmp_path):
    path = _write(tmp_path / "se.jsonl", [
        {"question": "How do I sort a dict?", "answers": [
            {"text": "Use sorted().", "score": 12, "accepted": False},   # 4
            {"text": "You can't.", "score": 0},                          # 0
            {"text": "sorted(d.items())", "score": 3, "accepted": True},  # 2 + 1 = 3
            {"text": "Same as the first.", "upvotes": 15}]},             # log2(16) = 4: ties with the first
        {"question": "Why?", "answers": [{"text": "Because.", "pm_score": 2}, {"text": "No.", "pm_score": -1}]},
    ])
    first, second = read_groups([path])
    assert first.context == "\n\nHuman: How do I sort a dict?\n\nAssistant:"
    assert first.responses == [" Use sorted().", " You can't.", " sorted(d.items())", " Same as the first."]
    assert first.ratings == [4.0, 0.0, 3.0, 4.0]
    assert first.ranks == [0, 2, 1, 0]
    assert second.ratings == [2.0, -1.0] and second.ranks == [0, 1]


@pytest.mark.parametrize("answers, field", [
    ([{"text": "a", "score": 1}], "answers"),                                   # one answer: no pair
    ([{"text": "a", "score": 1}, {"text": "b", "score": 1}], "answers"),        # equal scores: no pair
    ([{"text": "a", "score": 1}, {"text": 7, "score": 0}], "answers[1].text"),
    ([{"text": "a", "score": 1}, {"text": "b", "score": "many"}], "answers[1].score"),
    ([{"text": "a", "score": 1}, {"text": "b", "score": 0, "accepted": "yes"}], "answers[1].accepted"),
    ([{"text": "a", "pm_score": float("nan")}, {"text": "b", "pm_score": 0}], "answers[0].pm_score"),
])
def test_a_bad_question_row_names_its_line_and_field(tmp_path, answers, field):
    path = _write(tmp_path / "se.jsonl", [{"question": "Q?", "answers": answers}])
    with pytest.raises(DataError) as err:
        list(read_groups([path]))
    assert (err.value.line, err.value.field) == (1, field)
    assert str(err.value).startswith(f"{path}:1: field '{field}'")
