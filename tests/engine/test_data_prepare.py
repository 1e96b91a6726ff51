"""prepare: tokenized shards of bounded size, the manifest, the length policy, the CLI."""
import json

import pyarrow as pa
import pytest

from rankpm.engine.data.collate import collate
from rankpm.engine.data.errors import DataError, Where
from rankpm.engine.data.prepare import main, prepare, truncate
from rankpm.engine.data.schema import SCHEMA_VERSION, SHARD_SCHEMA
from rankpm.engine.data.synthetic import generate
from rankpm.engine.data.tokenizer import load_tokenizer

HERE = Where("f.jsonl", 7)


def read_shards(out):
    manifest = json.loads((out / "manifest.json").read_text())
    rows = []
    for shard in manifest["shards"]:
        table = pa.ipc.open_file(pa.memory_map(str(out / shard["file"]))).read_all()
        assert table.schema.equals(SHARD_SCHEMA) and table.num_rows == shard["rows"]
        rows += table.to_pylist()
    return manifest, rows


def test_truncate_left_keeps_the_end_of_the_context_then_of_the_response():
    ctx, r1, r2 = list(range(10)), [20, 21, 22], [30]
    assert truncate(ctx, [r1, r2], 14, "left", where=HERE) == (ctx, [r1, r2], False)  # 10 + 3 + 1 = 14 fits
    # max_length 8: room for the longest response (3) + eoc leaves 4 context tokens, its last 4
    assert truncate(ctx, [r1, r2], 8, "left", where=HERE) == ([6, 7, 8, 9], [r1, r2], True)
    # max_length 3: no context at all, the long response keeps its last 2 tokens, the short one is whole
    assert truncate(ctx, [r1, r2], 3, "left", where=HERE) == ([], [[21, 22], [30]], True)


def test_truncate_error_names_the_longest_response():
    with pytest.raises(DataError, match=r"f.jsonl:7: field 'rejected': sequence of 14 tokens .* max_length=8"):
        truncate(list(range(10)), [[1], [2, 3, 4]], 8, "error", where=HERE, fmt="pairwise")


def test_prepare_writes_shards_manifest_and_tokenizer(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "ab", "responses": ["cde", "f", "gh"], "ranks": [0, 1, 1],
                               "margin": 1.5, "source": "s1", "id": "g1"}) + "\n"
                   + json.dumps({"prompt": "xyz", "chosen": "1", "rejected": "22"}) + "\n")
    manifest = prepare([src], tmp_path / "out", "bytes", max_length=16)
    manifest_file, rows = read_shards(tmp_path / "out")
    assert manifest == manifest_file
    assert rows[0] == {"id": "g1", "source": "s1", "turns": 1, "margin": 1.5, "ratings": None, "ranks": [0, 1, 1],
                       "context_ids": [97, 98], "response_ids": [[99, 100, 101], [102], [103, 104]]}
    assert rows[1]["id"] == "in:2" and rows[1]["margin"] is None and rows[1]["response_ids"] == [[49], [50, 50]]
    assert manifest["schema_version"] == SCHEMA_VERSION and len(manifest["fingerprint"]) == 64
    # pairs: (cde > f), (cde > gh) in the first group, (1 > 22) in the second
    assert manifest["counts"] == {"groups": 2, "sequences": 5, "pairs": 3, "skipped": 0}
    # sequence lengths: 2+3+1, 2+1+1, 2+2+1, 3+1+1, 3+2+1 = 6, 4, 5, 5, 6
    assert manifest["lengths"]["sequence"] == {"count": 5, "mean": 5.2, "p50": 5, "p95": 6, "max": 6}
    assert manifest["lengths"]["context"] == {"count": 2, "mean": 2.5, "p50": 2, "p95": 3, "max": 3}
    assert manifest["sources"] == {"": 1, "s1": 1} and manifest["formats"] == {"pairwise": 1, "ranked": 1}
    assert manifest["tokenizer"] == load_tokenizer("bytes").identity()
    assert manifest["max_length"] == 16 and manifest["truncation"]["policy"] == "left"
    assert load_tokenizer(tmp_path / "out" / "tokenizer").identity() == manifest["tokenizer"]


def test_ratings_reach_the_shards(tmp_path):
    src = tmp_path / "rated.jsonl"
    src.write_text(json.dumps({"prompt": "ab", "responses": ["c", "d", "e"], "ratings": [1, 8.5, 1]}) + "\n")
    prepare([src], tmp_path / "out", "bytes", max_length=16)
    _, rows = read_shards(tmp_path / "out")
    assert (rows[0]["ranks"], rows[0]["ratings"]) == ([1, 0, 1], [1.0, 8.5, 1.0])


def test_truncation_is_counted_or_an_error(tmp_path):
    src = tmp_path / "long.jsonl"
    rows = [{"prompt": "c" * 50, "chosen": "a" * 10, "rejected": "b" * 5},  # 61 > 32: truncated
            {"prompt": "c", "chosen": "a", "rejected": "b"},
            {"prompt": "c", "chosen": "a" * 40, "rejected": "b"}]  # the response alone is too long
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = prepare([src], tmp_path / "left", "bytes", max_length=32)
    _, stored = read_shards(tmp_path / "left")
    assert stored[0]["context_ids"] == [ord("c")] * 21 and stored[0]["response_ids"] == [[97] * 10, [98] * 5]
    assert stored[2]["context_ids"] == [] and stored[2]["response_ids"] == [[97] * 31, [98]]
    assert manifest["truncation"] == {"policy": "left", "truncated_groups": 2, "truncated_sequences": 4,
                                      "contexts_cut_away": 1}
    assert manifest["lengths"]["sequence"]["max"] == 32
    assert manifest["lengths_before_truncation"]["sequence"]["max"] == 61
    with pytest.raises(DataError, match=r"long.jsonl:1: field 'chosen': sequence of 61 tokens"):
        prepare([src], tmp_path / "strict", "bytes", max_length=32, truncation="error")
    skipped = prepare([src], tmp_path / "skip", "bytes", max_length=32, truncation="error", skip_bad=True)
    assert skipped["counts"]["groups"] == 1
    assert [(s["line"], s["field"]) for s in skipped["skipped"]] == [(1, "chosen"), (3, "chosen")]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_an_empty_response_is_stored_and_scored_right_after_the_context(tmp_path):
    src = write_rows(tmp_path / "hh.jsonl", [{"prompt": "ab", "chosen": "", "rejected": "c"}])
    prepare([src], tmp_path / "out", "bytes", max_length=16)
    _, [row] = read_shards(tmp_path / "out")
    assert row["context_ids"] == [97, 98] and row["response_ids"] == [[], [99]]
    batch = collate([row], pad_id=256, eoc_id=257)
    assert batch.score_index.tolist() == [2, 4 + 3] and batch.input_ids[0, :3].tolist() == [97, 98, 257]


def test_responses_that_truncation_makes_identical_are_a_bad_row(tmp_path):
    src = write_rows(tmp_path / "long.jsonl", [{"prompt": "p", "chosen": "A" + "x" * 40, "rejected": "B" + "x" * 40},
                                               {"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"long.jsonl:1: field 'rejected': the responses are identical once "
                                        r"truncated to max_length=32"):
        prepare([src], tmp_path / "out", "bytes", max_length=32)
    manifest = prepare([src], tmp_path / "out", "bytes", max_length=32, skip_bad=True)
    assert manifest["counts"]["groups"] == 1 and manifest["skipped"][0]["line"] == 1


def test_inputs_without_a_usable_row_are_an_error_not_an_empty_folder(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty.jsonl: no usable comparison groups \(no rows\)"):
        prepare([empty], tmp_path / "out", "bytes")
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a"}] * 3)
    with pytest.raises(ValueError, match=r"bad.jsonl: no usable comparison groups \(all 3 rows were bad, "
                                         r"e.g. .*bad.jsonl:1: field 'rejected': missing\)"):
        prepare([bad], tmp_path / "out", "bytes", skip_bad=True)
    assert not (tmp_path / "out").exists()


def test_a_file_that_contributes_nothing_is_said_loudly(tmp_path, caplog):
    good = write_rows(tmp_path / "good.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a"}])
    manifest = prepare([good, bad], tmp_path / "out", "bytes", skip_bad=True)
    assert manifest["inputs"][1] == {"file": str(bad), "groups": 0, "skipped": 1}
    assert f"{bad}: contributes no groups (1 bad rows skipped)" in caplog.text


def test_a_max_length_that_cuts_every_context_away_is_an_error(tmp_path, caplog):
    long_response = {"prompt": "a long context", "chosen": "x" * 15, "rejected": "y"}  # 15 + eoc = 16: no room
    alone = write_rows(tmp_path / "alone.jsonl", [long_response])
    with pytest.raises(ValueError, match=r"max_length=16 leaves no context in any of the 1 groups"):
        prepare([alone], tmp_path / "out", "bytes", max_length=16)
    mixed = write_rows(tmp_path / "mixed.jsonl", [long_response, {"prompt": "ctx", "chosen": "x", "rejected": "y"}])
    manifest = prepare([mixed], tmp_path / "out", "bytes", max_length=16)  # one of two: said and counted
    assert manifest["truncation"]["contexts_cut_away"] == 1
    assert "max_length=16 leaves no context in 1 of 2 groups" in caplog.text


def test_shards_stay_within_their_size_and_row_limits(tmp_path):
    src = generate(tmp_path / "syn.jsonl", groups=600, seed=1)
    limit_mb = 0.03
    manifest = prepare([src], tmp_path / "out", "bytes", max_length=256, shard_size_mb=limit_mb)
    assert len(manifest["shards"]) > 3
    for shard in manifest["shards"]:
        size = (tmp_path / "out" / shard["file"]).stat().st_size
        assert size == shard["bytes"] <= limit_mb * 2**20
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["counts"]["groups"] == 600
    by_rows = prepare([src], tmp_path / "rows", "bytes", max_length=256, rows_per_shard=250)
    assert [s["rows"] for s in by_rows["shards"]] == [250, 250, 100]
    # the same rows in the same order either way
    assert read_shards(tmp_path / "out")[1] == read_shards(tmp_path / "rows")[1]


def test_bpe_prepare_is_deterministic_and_stores_its_tokenizer(tmp_path):
    src = generate(tmp_path / "syn.jsonl", groups=150, seed=2)
    a = prepare([src], tmp_path / "a", "bpe:400", max_length=128)
    b = prepare([src], tmp_path / "b", "bpe:400", max_length=128)
    assert a["fingerprint"] == b["fingerprint"] and a["tokenizer"]["kind"] == "bpe"
    tok = load_tokenizer(tmp_path / "a" / "tokenizer")
    _, rows = read_shards(tmp_path / "a")
    first = json.loads(src.read_text().splitlines()[0])
    assert rows[0]["context_ids"] == tok.encode(first["prompt"])
    # evaluation data prepared with the training folder's tokenizer: the same identity
    c = prepare([src], tmp_path / "c", str(tmp_path / "a" / "tokenizer"), max_length=128)
    assert c["tokenizer"] == a["tokenizer"] and c["fingerprint"] == a["fingerprint"]


def test_prepare_refuses_to_replace_an_unrelated_folder(tmp_path):
    src = generate(tmp_path / "syn.jsonl", groups=5, seed=0)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to replace"):
        prepare([src], tmp_path / "busy", "bytes")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    prepare([src], tmp_path / "out", "bytes", max_length=256)
    prepare([src], tmp_path / "out", "bytes", max_length=128)  # a prepared folder is replaced, whole
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["max_length"] == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "out", "syn.jsonl"]  # no temporary left


def test_command_line(tmp_path, capsys):
    src = generate(tmp_path / "syn.jsonl", groups=20, seed=0)
    assert main([str(src), "--out", str(tmp_path / "out"), "--tokenizer", "bytes", "--max-length", "64",
                 "--truncation", "left", "--skip-bad"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["groups"] == 20 and summary["skipped"] == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["max_length"] == 64
