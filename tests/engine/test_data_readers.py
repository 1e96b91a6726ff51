"""Readers: every input format becomes the same ComparisonGroup; bad rows are named or counted."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rankpm.engine.data.errors import DataError
from rankpm.engine.data.prepare import prepare
from rankpm.engine.data.readers import iter_groups, read_groups
from rankpm.engine.data.schema import LabelledResponse


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_pairwise_prompt_chosen_rejected(tmp_path):
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q?", "chosen": " good", "rejected": " bad"}])
    [(where, fmt, g)] = list(iter_groups([f]))
    assert fmt == "pairwise" and where.line == 1
    assert (g.id, g.context, g.responses, g.ranks, g.margin, g.source, g.turns) == (
        "pairs:1", "Q?", [" good", " bad"], [0, 1], None, "", 1)


def test_hh_transcripts_split_at_the_final_assistant_turn(tmp_path):
    shared = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant:"
    f = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": shared + " Paris.", "rejected": shared + " Rome."},
                                            # the responses share their first word: the cut stays at the turn
                                            {"chosen": shared + " It is Paris.", "rejected": shared + " It is Rome."}])
    groups = list(read_groups([f]))
    for g in groups:
        assert g.context == shared and g.turns == 2 and g.ranks == [0, 1]
    assert groups[0].responses == [" Paris.", " Rome."]
    assert groups[1].responses == [" It is Paris.", " It is Rome."]
    assert [g.id for g in groups] == ["hh:1", "hh:2"]


def test_ranked_lists_with_margin_source_and_id(tmp_path):
    f = write_jsonl(tmp_path / "ranked.jsonl", [
        {"prompt": "P", "responses": ["a", "b", "c"], "ranks": [1, 0, 1], "margin": 0.5, "source": "web",
         "id": "x7"},
        {"context": "C", "responses": ["a", "b"], "ranks": [0, 1], "turns": 3},  # synthetic_pmp's spelling
    ])
    a, b = read_groups([f])
    assert (a.id, a.context, a.responses, a.ranks, a.margin, a.source) == ("x7", "P", ["a", "b", "c"], [1, 0, 1],
                                                                            0.5, "web")
    assert (b.id, b.context, b.turns) == ("ranked:2", "C", 3)


def test_ratings_give_per_pair_margins_and_the_ranks_when_none_are_given(tmp_path):
    f = write_jsonl(tmp_path / "rated.jsonl", [
        {"prompt": "P", "responses": ["a", "b", "c", "d"], "ratings": [7, 9.5, 7, 2]},  # UltraFeedback-style
        {"prompt": "P", "responses": ["a", "b"], "ranks": [0, 1], "ratings": [3, 3]},  # a rating tie: margin 0
    ])
    a, b = read_groups([f])
    assert (a.ranks, a.ratings) == ([1, 0, 1, 2], [7.0, 9.5, 7.0, 2.0])
    assert (b.ranks, b.ratings) == ([0, 1], [3.0, 3.0])


def test_message_lists_render_to_the_transcript_format(tmp_path):
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "Capital of France?"}]
    text = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant:"
    f = write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Paris."}],
         "rejected": [{"role": "assistant", "content": "Rome."}]},
        {"chosen": prompt + [{"role": "assistant", "content": "Paris."}],
         "rejected": prompt + [{"role": "assistant", "content": "Rome."}]},
        {"prompt": prompt, "responses": ["x", "y"], "ranks": [1, 0]},
    ])
    rows = list(iter_groups([f]))
    assert [fmt for _, fmt, _ in rows] == ["pairwise", "messages", "ranked"]
    for _, _, g in rows:
        assert g.context == text and g.turns == 2
    assert rows[0][2].responses == rows[1][2].responses == [" Paris.", " Rome."]
    # and the same text as an HH transcript pair gives the same group
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": text + " Paris.", "rejected": text + " Rome."}])
    [g] = read_groups([hh])
    assert (g.context, g.responses) == (rows[1][2].context, rows[1][2].responses)


def test_parquet_rows(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["P1", "P2"], "chosen": ["a", "b"], "rejected": ["c", "d"]}), path)
    groups = list(read_groups([path]))
    assert [g.id for g in groups] == ["pairs:0", "pairs:1"] and groups[1].responses == ["b", "d"]


def test_gzipped_json_lines_read_like_plain_ones_and_errors_name_the_line(tmp_path):
    import gzip

    rows = [{"prompt": "P", "chosen": "a", "rejected": "b"}, {"prompt": "P", "chosen": "a"}]
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert [g.responses for g in read_groups([path], skip_bad=True, skipped=[])] == [["a", "b"]]
    with pytest.raises(DataError, match=r"train.jsonl.gz:2: field 'rejected': missing"):
        list(read_groups([path]))


def test_blank_lines_hold_no_row(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "P", "chosen": "a", "rejected": "b"}, "", "  "])
    assert len(list(read_groups([f]))) == 1


SHARED = "\n\nHuman: Hi\n\nAssistant:"
BAD_ROWS = [  # (row, field named in the error, words of the reason)
    ("{not json", "<json>", "invalid JSON"),
    ({"prompt": "P", "chosen": "a"}, "rejected", "missing"),
    ({"prompt": "P", "chosen": "b", "rejected": "b"}, "rejected", "chosen and rejected are identical"),
    ({"prompt": "P", "chosen": 3, "rejected": "b"}, "chosen", "expected a string"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, "prompt", "expected a string"),
    ({"prompt": "P", "responses": ["a", "b"], "ranks": [1, 1]}, "ranks", "fewer than two distinct ranks"),
    ({"prompt": "P", "responses": ["a", "b", "c"], "ranks": [0, 1]}, "ranks", "2 ranks for 3 responses"),
    ({"prompt": "P", "responses": ["a", "a", "a"], "ranks": [0, 1, 2]}, "responses[2]",
     "all 3 responses are identical"),
    ({"prompt": "P", "responses": ["a", "b"], "ranks": [0, 10**30]}, "ranks[1]", "expected an integer in [0, 2147483647]"),
    ({"prompt": "P", "responses": ["a", "b"], "ranks": [-1, 0]}, "ranks[0]", "expected an integer in [0, 2147483647]"),
    ('{"prompt": "P", "chosen": "a", "rejected": "b", "margin": NaN}', "margin", "expected a finite number"),
    ({"prompt": "P", "chosen": "a", "rejected": "b", "margin": 1e39}, "margin", "expected a finite number"),
    ('{"prompt": "P", "responses": ["a", "b"], "ratings": [1, Infinity]}', "ratings[1]", "expected a finite number"),
    ({"prompt": "P", "chosen": "a", "rejected": "b", "turns": 10**30}, "turns", "expected an integer in [1, 2147483647]"),
    ({"prompt": "P", "responses": ["a", 7], "ranks": [0, 1]}, "responses[1]", "expected a string"),
    ({"prompt": "P", "responses": ["a", "b"], "ranks": [0, "1"]}, "ranks[1]", "expected an integer"),
    ({"chosen": "no dialogue here", "rejected": "another text"}, "chosen", "unsplittable"),
    ({"chosen": "\n\nHuman: A\n\nAssistant: x\n\nHuman: B\n\nAssistant: y",
      "rejected": "\n\nHuman: A\n\nAssistant: z\n\nHuman: C\n\nAssistant: w"}, "chosen", "unsplittable"),
    ({"chosen": SHARED + " same", "rejected": SHARED + " same"}, "rejected", "identical"),
    ({"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]}, "rejected",
     "differ before the final assistant message"),
    ({"prompt": [{"role": "robot", "content": "A"}], "chosen": "a", "rejected": "b"}, "prompt[0].role", "robot"),
    ({"text": "hello"}, "<row>", "unrecognised row"),
    ({"prompt": "P", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "expected a finite number"),
    ({"prompt": "P", "response": "a", "label": True}, "label", "objective.name=binary"),
    ({"prompt": "P", "responses": ["a", "b"], "ratings": [1]}, "ratings", "expected a list of 2 numbers"),
    ({"prompt": "P", "responses": ["a", "b"], "ratings": [1, "x"]}, "ratings[1]", "expected a finite number"),
    ({"prompt": "P", "responses": ["a", "b"], "ratings": [2, 2]}, "ranks", "fewer than two distinct ranks"),
    ({"prompt": "P", "responses": ["a", "b"], "ranks": [0, 1], "ratings": [1, 3]}, "ratings",
     "margin would be negative"),
]


@pytest.mark.parametrize("row,field,reason", BAD_ROWS, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD_ROWS)])
def test_a_bad_row_names_file_line_and_field(tmp_path, row, field, reason):
    good = {"prompt": "P", "chosen": "a", "rejected": "b"}
    f = write_jsonl(tmp_path / "input.jsonl", [good, good, row])
    with pytest.raises(DataError) as info:
        list(read_groups([f]))
    err = info.value
    assert (err.file, err.line, err.field) == (str(f), 3, field)
    assert f"{f}:3: field {field!r}:" in str(err) and reason in str(err)


def test_responses_with_their_own_label_are_read_only_for_the_binary_transforms(tmp_path):
    rows = [{"prompt": "P", "response": " yes", "label": True}, {"prompt": "P", "response": " no", "label": "BAD"},
            {"id": "x", "context": "Q", "response": " ok", "label": 1, "source": "s"}]
    f = write_jsonl(tmp_path / "labelled.jsonl", rows)
    assert list(read_groups([f], labelled=True)) == [
        LabelledResponse("labelled:1", "P", " yes", True, "", 1),
        LabelledResponse("labelled:2", "P", " no", False, "", 1),
        LabelledResponse("x", "Q", " ok", True, "s", 1)]
    assert [fmt for _, fmt, _ in iter_groups([f], labelled=True)] == ["labelled"] * 3


LABELLED_BAD_ROWS = [
    ({"prompt": "P", "response": "a", "label": "maybe"}, "label", "expected true/false"),
    ({"prompt": "P", "response": "a", "label": 2}, "label", "expected true/false"),
    ({"prompt": "P", "response": "a"}, "label", "missing"),
    ({"response": "a", "label": False}, "context", "missing"),
    ({"prompt": "P", "response": "a", "label": False, "margin": 1.0}, "margin", "no ranked pair"),
]


@pytest.mark.parametrize("row,field,reason", LABELLED_BAD_ROWS, ids=[b[1] for b in LABELLED_BAD_ROWS])
def test_a_bad_labelled_row_names_its_field(tmp_path, row, field, reason):
    f = write_jsonl(tmp_path / "input.jsonl", [row])
    with pytest.raises(DataError, match=rf"input.jsonl:1: field '{field}': .*{reason}"):
        list(read_groups([f], labelled=True))


def test_parquet_errors_name_the_row_index(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["P", "P"], "chosen": ["a", "c"], "rejected": ["b", "c"]}), path)
    with pytest.raises(DataError, match=r"bad.parquet: row 1: field 'rejected': chosen and rejected are identical"):
        list(read_groups([path]))


def test_an_empty_response_is_a_response(tmp_path):
    """HH-RLHF's harmless-base prefers an empty final assistant turn at times: saying nothing."""
    shared = "\n\nHuman: How do I pick a lock?\n\nAssistant:"
    f = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": shared, "rejected": shared + " Take a tension wrench."},
                                            {"prompt": "P", "responses": ["", " a", " b"], "ranks": [0, 1, 2]}])
    a, b = read_groups([f])
    assert (a.context, a.responses) == (shared, ["", " Take a tension wrench."])
    assert b.responses == ["", " a", " b"]


def test_a_byte_order_mark_opens_a_file_like_any_other(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "P", "chosen": "a", "rejected": "b"}).encode() + b"\n")
    assert [g.responses for g in read_groups([path])] == [["a", "b"]]


def test_a_truncated_gzip_file_names_the_file_and_where_it_ends(tmp_path):
    import gzip

    rows = "".join(json.dumps({"prompt": f"P{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(2000))
    whole = gzip.compress(rows.encode())
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"train.jsonl.gz:\d+: field '<gzip>': truncated or corrupt gzip file"):
        list(read_groups([path], skip_bad=True, skipped=[]))  # not a row to skip
    path.write_bytes(b"plain text, not gzip\n")
    with pytest.raises(DataError, match=r"train.jsonl.gz:1: field '<gzip>': truncated or corrupt gzip file"):
        list(read_groups([path]))


def test_a_corrupt_parquet_file_is_named(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["P"] * 100, "chosen": ["a"] * 100, "rejected": ["b"] * 100}), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"pairs.parquet: row 0: field '<parquet>': unreadable Parquet"):
        list(read_groups([path]))


def test_skip_bad_counts_and_lists_every_bad_row_in_the_manifest(tmp_path):
    rows = [{"prompt": "P", "chosen": "a", "rejected": "b"}] * 3 + [row for row, _, _ in BAD_ROWS]
    f = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError):
        prepare([f], tmp_path / "strict", "bytes")
    assert not (tmp_path / "strict").exists()  # nothing half-written
    manifest = prepare([f], tmp_path / "out", "bytes", skip_bad=True)
    assert manifest["counts"]["groups"] == 3
    assert manifest["counts"]["skipped"] == len(BAD_ROWS) == len(manifest["skipped"])
    assert [(s["line"], s["field"]) for s in manifest["skipped"]] == [(4 + i, b[1]) for i, b in enumerate(BAD_ROWS)]
    assert all(s["file"] == str(f) and s["reason"] for s in manifest["skipped"])
    assert manifest["inputs"] == [{"file": str(f), "groups": 3, "skipped": len(BAD_ROWS)}]
