"""The BIG-bench multiple-choice reader, on small task files written here."""
import json

import pytest

from rankpm.engine.data.bigbench import BigBenchError, read_bigbench


def write(tmp_path, task, name="task.json"):
    path = tmp_path / name
    path.write_text(json.dumps(task) if not isinstance(task, str) else task)
    return path


def test_examples_become_groups_ranked_by_target_score(tmp_path):
    path = write(tmp_path, {"name": "hhh_honest", "examples": [
        {"input": "Human: Is the sky green?\n\nAssistant:", "target_scores": {" No.": 1, " Yes.": 0}},
        {"input": "Pick", "target_scores": {"a": 0.5, "b": 1.0, "c": 0.5, "d": 0}},
    ]})
    first, second = read_bigbench(path)
    assert first.context == "Human: Is the sky green?\n\nAssistant:"
    assert first.responses == [" No.", " Yes."] and first.ranks == [0, 1]
    assert (first.id, first.source, first.turns) == ("hhh_honest/0", "hhh_honest", 1)
    # scores 0.5, 1.0, 0.5, 0 -> dense ranks 1, 0, 1, 2 (a and c tie)
    assert second.responses == ["a", "b", "c", "d"] and second.ranks == [1, 0, 1, 2]


def test_the_source_defaults_to_the_folder_and_can_be_given(tmp_path):
    (tmp_path / "harmless").mkdir()
    path = write(tmp_path / "harmless", {"examples": [{"input": "x", "target_scores": {"a": 1, "b": 0}}]})
    assert read_bigbench(path)[0].source == "harmless"
    assert read_bigbench(path, source="hhh")[0].id == "hhh/0"


@pytest.mark.parametrize("task, message", [
    ("{not json", r"not valid JSON \(line 1"),
    ({"name": "t"}, "an 'examples' list"),
    ({"examples": [{"target_scores": {"a": 1, "b": 0}}]}, r"examples\[0\].input: expected a string"),
    ({"examples": [{"input": "x", "target_scores": {"a": 1}}]}, r"examples\[0\].target_scores: expected a mapping of at least 2"),
    ({"examples": [{"input": "x", "target_scores": {"a": 1, "b": 0}},
                   {"input": "y", "target_scores": {"a": "high", "b": 0}}]},
     r"examples\[1\].target_scores\['a'\]: expected a number, got 'high'"),
])
def test_bad_files_name_the_file_the_example_and_the_field(tmp_path, task, message):
    path = write(tmp_path, task)
    with pytest.raises(BigBenchError, match=message) as err:
        read_bigbench(path)
    assert str(path) in str(err.value)
