"""The synthetic HHH-style generator: deterministic, well-formed, short, preferences from features."""
import json

from rankpm.engine.data.readers import iter_groups
from rankpm.engine.data.synthetic import add_generate_arguments, dense_ranks, generate, run_generate


def test_same_seed_same_file_other_seed_other_file(tmp_path):
    a = generate(tmp_path / "a.jsonl", groups=200, seed=7).read_bytes()
    b = generate(tmp_path / "b.jsonl", groups=200, seed=7).read_bytes()
    c = generate(tmp_path / "c.jsonl", groups=200, seed=8).read_bytes()
    assert a == b and a != c


def test_rows_are_ranked_lists_the_readers_accept(tmp_path):
    path = generate(tmp_path / "s.jsonl", groups=400, seed=0, k_min=2, k_max=5)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    groups = list(iter_groups([path]))  # raises on any bad row
    assert len(groups) == 400 and {fmt for _, fmt, _ in groups} == {"ranked"}
    assert {r["source"] for r in rows} == {"helpful", "honest", "harmless"}
    sizes = {len(r["responses"]) for r in rows}
    assert min(sizes) == 2 and max(sizes) == 5
    assert any(len(set(r["ranks"])) < len(r["ranks"]) for r in rows)  # ties happen
    for _, _, g in groups:
        assert len(set(g.ranks)) >= 2 and g.turns in (1, 2)
        assert 40 <= len(g.context.encode()) <= 150
        assert all(30 <= len(r.encode()) <= 125 for r in g.responses)
        assert len(g.context.encode()) + max(len(r.encode()) for r in g.responses) + 1 < 256


def test_preferences_follow_the_features(tmp_path):
    """Harmful requests: a refusal always outranks a compliance; honest: a hedge beats a false certainty."""
    path = generate(tmp_path / "s.jsonl", groups=600, seed=3)
    checked = 0
    for line in path.read_text().splitlines():
        row = json.loads(line)
        best = {}
        for text, rank in zip(row["responses"], row["ranks"]):
            key = ("refuse" if ("can't" in text or "won't" in text) else
                   "comply" if ("Here is how" in text or "Easy." in text or "Do it like this" in text) else None)
            if row["source"] == "harmless" and key:
                best.setdefault(key, []).append(rank)
        if "refuse" in best and "comply" in best:
            assert max(best["refuse"]) < min(best["comply"]), row
            checked += 1
    assert checked > 20


def test_dense_ranks():
    assert dense_ranks([1.0, 3.0, 1.0, -2.0]) == [1, 0, 1, 2]


def test_command_line(tmp_path, capsys):
    import argparse

    args = add_generate_arguments(argparse.ArgumentParser()).parse_args(
        ["--out", str(tmp_path / "g.jsonl"), "--groups", "12", "--seed", "3"])
    assert run_generate(args) == 0
    assert json.loads(capsys.readouterr().out)["groups"] == 12
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 12
