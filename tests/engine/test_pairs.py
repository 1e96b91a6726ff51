"""Pair construction: ranked pairs, binarization, binary tasks, label expansion (worked by hand)."""
import pytest

from rankpm.engine.data.schema import ComparisonGroup, LabelledResponse
from rankpm.engine.data.transforms import (Labels, apply_transform, binarize, binary_task, label_expand,
                                           labelled_pair, ranked_pairs)


def group(ranks, responses=None, **kw):
    responses = responses or [chr(ord("A") + i) for i in range(len(ranks))]
    return ComparisonGroup(id="g", context="C:", responses=responses, ranks=ranks, source="s", turns=2, **kw)


def test_all_pairs_of_a_ranked_group_and_ties_form_no_pair():
    # ranks [0, 1, 1, 2]: B and C tie -> (B, C) is no pair; 5 of the 6 ordered pairs remain.
    assert ranked_pairs(group([0, 1, 1, 2]), "all") == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]


def test_adjacent_pairs_link_each_rank_level_to_the_next_only():
    # levels 0 -> 1 -> 2: A beats B and C (level 1), B and C beat D (level 2); A vs D is not adjacent.
    assert ranked_pairs(group([0, 1, 1, 2]), "adjacent") == [(0, 1), (0, 2), (1, 3), (2, 3)]


def test_ranks_need_not_be_sorted_or_contiguous():
    assert ranked_pairs(group([5, 0, 9]), "all") == [(0, 2), (1, 0), (1, 2)]
    assert ranked_pairs(group([5, 0, 9]), "adjacent") == [(0, 2), (1, 0)]


def test_binarization_turns_each_ranked_pair_into_two_label_pairs():
    # A > B  ->  A GOOD > A BAD   and   B BAD > B GOOD
    out = binarize(group([1, 0], responses=["worse", "better"]), Labels(" GOOD", " BAD"))
    assert [(g.responses, g.ranks) for g in out] == [
        (["better GOOD", "better BAD"], [0, 1]),
        (["worse BAD", "worse GOOD"], [0, 1]),
    ]
    assert all(g.context == "C:" and g.source == "s" and g.turns == 2 for g in out)
    assert [g.id for g in out] == ["g/p0a", "g/p0b"]


def test_binarization_doubles_the_pairs_and_puts_labels_at_the_end():
    g = group([0, 1, 2, 2])  # 5 ranked pairs: AB AC AD BC BD
    out = binarize(g, Labels("<good>", "<bad>"))
    assert len(ranked_pairs(g)) == 5
    assert len(out) == 10 and all(len(x.responses) == 2 for x in out)
    for better_pair, worse_pair in zip(out[0::2], out[1::2]):
        better_text = better_pair.responses[0][: -len("<good>")]
        worse_text = worse_pair.responses[0][: -len("<bad>")]
        assert better_pair.responses == [better_text + "<good>", better_text + "<bad>"]
        assert worse_pair.responses == [worse_text + "<bad>", worse_text + "<good>"]
        assert g.ranks[g.responses.index(better_text)] < g.ranks[g.responses.index(worse_text)]


def test_binarizing_adjacent_pairs_only():
    assert len(binarize(group([0, 1, 2]), pairs="adjacent")) == 4  # AB, BC -> 2 x 2


def test_a_response_with_its_own_label_is_one_pair():
    assert labelled_pair("C:", "x", True).responses == ["x GOOD", "x BAD"]
    assert labelled_pair("C:", "x", False).responses == ["x BAD", "x GOOD"]
    assert labelled_pair("C:", "x", False).ranks == [0, 1]


def test_labelled_responses_become_their_label_pair_for_training_and_evaluation():
    rows = [LabelledResponse("u", "C:", "x", True, "s", 2), LabelledResponse("v", "C:", "y", False)]
    for name in ("binarize", "label_expand"):
        out = list(apply_transform(rows, name, Labels("+", "-")))
        assert [(g.id, g.responses, g.ranks) for g in out] == [("u", ["x+", "x-"], [0, 1]),
                                                               ("v", ["y-", "y+"], [0, 1])]
        assert (out[0].source, out[0].turns) == ("s", 2)
    with pytest.raises(ValueError, match="'u': forms no pair"):
        list(apply_transform(rows, "none"))


def test_binary_task_is_correct_over_wrong_in_the_same_context():
    g = binary_task("Q: 2+2=", " 4", " 5", id="t1")
    assert (g.context, g.responses, g.ranks) == ("Q: 2+2=", [" 4", " 5"], [0, 1])


def test_label_expansion_scores_every_response_with_both_labels():
    g = label_expand(group([1, 0], responses=["x", "y"], ratings=[2.0, 7.0]))
    assert g.responses == ["x GOOD", "x BAD", "y GOOD", "y BAD"]
    assert g.ranks == [1, 1, 0, 0] and g.ratings == [2.0, 2.0, 7.0, 7.0]


def test_labels_must_differ_and_transforms_must_be_known():
    with pytest.raises(ValueError, match="good=' X' and bad=' X'"):
        Labels(" X", " X")
    with pytest.raises(ValueError, match="transform='shuffle'"):
        list(apply_transform([group([0, 1])], "shuffle"))
    assert len(list(apply_transform([group([0, 1]), group([0, 1, 2])], "binarize"))) == 2 + 6
