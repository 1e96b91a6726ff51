"""The streaming reader: rank shares, deterministic shuffle, batching, exact resume; collate."""
import itertools
import json

import pytest
import torch

from rankpm.engine.data.collate import collate
from rankpm.engine.data.prepare import prepare
from rankpm.engine.data.stream import ComparisonStream, ReaderStateError
from rankpm.engine.data.synthetic import generate

GROUPS = 53  # not a multiple of anything below: uneven shares, a short last block and shard


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    src = generate(root / "syn.jsonl", groups=GROUPS, seed=4)
    prepare([src], root / "data", "bytes", max_length=160, rows_per_shard=12)  # 5 shards
    return root / "data"


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("other")
    src = generate(root / "syn.jsonl", groups=GROUPS, seed=5)
    prepare([src], root / "data", "bytes", max_length=160)
    return root / "data"


def ids(batches):
    return [i for b in batches for i in b.ids]


def one_pass(data_dir, **kw):
    return ids(ComparisonStream(data_dir, loop=False, **kw))


def test_rank_shares_are_disjoint_cover_the_data_and_interleave_the_global_order(data_dir):
    everything = one_pass(data_dir, shuffle=False)
    assert len(everything) == len(set(everything)) == GROUPS
    for world in (1, 2, 3, 4):
        order = one_pass(data_dir, seed=1, shuffle_buffer=5)  # the global order of epoch 0
        shares = [one_pass(data_dir, rank=r, world_size=world, seed=1, shuffle_buffer=5, batch_groups=4)
                  for r in range(world)]
        assert sorted(itertools.chain(*shares)) == sorted(everything)
        for r, share in enumerate(shares):
            # rank r takes whole units of batch_groups positions: unit % world == rank
            assert share == [g for p, g in enumerate(order) if (p // 4) % world == r]
            assert ComparisonStream(data_dir, rank=r, world_size=world, batch_groups=4).num_groups == len(share)


def test_one_worker_with_accumulation_sees_what_two_workers_see(data_dir):
    """Micro-batch m of rank r is micro-batch m * world + r of a single rank."""
    single = list(itertools.islice(ComparisonStream(data_dir, seed=2, batch_groups=4, shuffle_buffer=8), 14))
    ranks = [list(itertools.islice(ComparisonStream(data_dir, rank=r, world_size=2, seed=2, batch_groups=4,
                                                    shuffle_buffer=8), 7)) for r in (0, 1)]
    for m in range(7):
        for r in (0, 1):
            assert ranks[r][m].ids == single[2 * m + r].ids


def test_shuffle_is_deterministic_by_seed_and_epoch(data_dir):
    kw = dict(rank=1, world_size=2, shuffle_buffer=8, batch_groups=4)
    a, b = (ids(itertools.islice(ComparisonStream(data_dir, seed=3, **kw), 20)) for _ in range(2))
    assert a == b
    assert ids(itertools.islice(ComparisonStream(data_dir, seed=4, **kw), 20)) != a
    everything = one_pass(data_dir, seed=3, shuffle_buffer=8)
    looped = ids(itertools.islice(ComparisonStream(data_dir, seed=3, shuffle_buffer=8, batch_groups=1), 2 * GROUPS))
    epoch0, epoch1 = looped[:GROUPS], looped[GROUPS:]
    assert epoch0 == everything and sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # a new order each epoch


def test_batches_by_group_count(data_dir):
    batches = list(ComparisonStream(data_dir, shuffle=False, batch_groups=8, loop=False))
    assert [b.num_groups for b in batches] == [8] * 6 + [5]
    looped = list(itertools.islice(ComparisonStream(data_dir, batch_groups=8), 20))
    assert all(b.num_groups == 8 for b in looped)  # batches run on across epoch ends


@pytest.mark.parametrize("layout", ["stacked", "shared"])
def test_batches_by_token_budget(data_dir, layout):
    """Whole groups up to the budget in real tokens of the layout (a shared context once)."""
    budget = 1200
    stream = ComparisonStream(data_dir, seed=2, tokens_per_batch=budget, loop=False, layout=layout)
    batches = list(stream)
    assert sorted(ids(batches)) == sorted(one_pass(data_dir))
    sizes = stream.group_tokens()
    assert all(b.num_tokens <= budget for b in batches) and max(b.num_groups for b in batches) > 1
    # each batch took groups until the next one would not fit
    size_of = {b.ids[0]: b.num_tokens for b in ComparisonStream(data_dir, shuffle=False, batch_groups=1, loop=False,
                                                                layout=layout)}
    for b, following in zip(batches, batches[1:]):
        assert b.num_tokens + size_of[following.ids[0]] > budget
    # a budget below the largest group is refused at once, with the number needed
    with pytest.raises(ValueError, match=rf"tokens_per_batch=10 is smaller than the largest group .* in the "
                                         rf"{layout} layout \({sizes.max()} tokens\); set it to at least {sizes.max()}"):
        ComparisonStream(data_dir, tokens_per_batch=10, loop=False, layout=layout)


def test_loop_runs_forever_and_counts_epochs(data_dir):
    stream = ComparisonStream(data_dir, batch_groups=10)
    got = ids(itertools.islice(stream, 30))  # 300 groups: 5 epochs and then some
    assert len(got) == 300 and stream.epoch == 5 and stream.state_dict()["position"] == 300 - 5 * GROUPS
    for e in range(5):
        assert sorted(got[e * GROUPS:(e + 1) * GROUPS]) == sorted(one_pass(data_dir))


def test_one_pass_stream_starts_the_next_pass_when_iterated_again(data_dir):
    stream = ComparisonStream(data_dir, batch_groups=10, loop=False)
    first, second = ids(stream), ids(stream)
    assert sorted(first) == sorted(second) and first != second and stream.epoch == 2


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("budget", [None, 900])
def test_resume_neither_skips_nor_repeats(data_dir, world, budget):
    """Consume n batches, save, rebuild, load: the concatenation equals an uninterrupted run."""
    kw = dict(world_size=world, seed=11, shuffle_buffer=6, batch_groups=4, tokens_per_batch=budget)
    for rank in range(world):
        straight = ids(itertools.islice(ComparisonStream(data_dir, rank=rank, **kw), 40))
        for n in (1, 7, 13, 22):  # cuts in the first, second and later epochs
            first = ComparisonStream(data_dir, rank=rank, **kw)
            head_batches = list(itertools.islice(iter(first), n))
            head = ids(head_batches)
            state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
            assert state == head_batches[-1].reader_state  # what every batch carries for a reading-ahead consumer
            second = ComparisonStream(data_dir, rank=rank, **kw)
            second.load_state_dict(state)
            tail = ids(itertools.islice(iter(second), 40 - n))
            assert head + tail == straight, (rank, n)


@pytest.mark.parametrize("old,new", [((2, 4), (3, 4)), ((2, 4), (4, 2)), ((3, 2), (2, 5)), ((2, 4), (1, 4)),
                                     ((1, 3), (2, 4))])
def test_resume_with_another_number_of_ranks_reads_every_group_once(data_dir, old, new):
    """Ranks of one layout stop after k steps; another layout (ranks, batch size) resumes.
    Everything read before plus everything read after is the global order, each group once."""
    (w0, b0), (w1, b1) = old, new
    kw = dict(seed=3, shuffle_buffer=7)
    order = ids(itertools.islice(ComparisonStream(data_dir, batch_groups=1, **kw), 6 * GROUPS))  # six epochs
    for steps in (1, 5, 16):  # the last cut lands in the second epoch
        before, states = [], []
        for rank in range(w0):
            stream = ComparisonStream(data_dir, rank=rank, world_size=w0, batch_groups=b0, **kw)
            before += ids(itertools.islice(iter(stream), steps))
            states.append(json.loads(json.dumps(stream.state_dict())))
        after = []
        streams = [ComparisonStream(data_dir, rank=r, world_size=w1, batch_groups=b1, **kw) for r in range(w1)]
        for stream in streams:
            how = stream.resume_from(states)
        assert f"every group before global position {w0 * b0 * steps}" in how
        for stream in streams:
            after += ids(itertools.islice(iter(stream), 9))
        read = before + after
        assert sorted(read) == sorted(order[:len(read)]), (old, new, steps)


def test_resume_from_another_layout_refuses_what_cannot_be_mapped(data_dir, other_dir):
    def states(world, steps, **kw):
        out = []
        for rank in range(world):
            stream = ComparisonStream(data_dir, rank=rank, world_size=world, batch_groups=4, seed=1, **kw)
            list(itertools.islice(iter(stream), steps[rank]))
            out.append(stream.state_dict())
        return out

    with pytest.raises(ReaderStateError, match="rank 1 of 2 stopped at global position 0 with groups of its own "
                                               "unread before 12"):
        ComparisonStream(data_dir, world_size=3, seed=1).resume_from(states(2, [2, 0]))
    with pytest.raises(ReaderStateError, match="token-budget batches"):
        ComparisonStream(data_dir, world_size=3, seed=1).resume_from(states(2, [1, 1], tokens_per_batch=900))
    with pytest.raises(ReaderStateError, match="seed: 1 in the state, 2 here"):
        ComparisonStream(data_dir, world_size=3, seed=2).resume_from(states(2, [1, 1]))
    with pytest.raises(ReaderStateError, match="data: "):
        ComparisonStream(other_dir, world_size=3, seed=1).resume_from(states(2, [1, 1]))
    with pytest.raises(ReaderStateError, match=r"ranks \[0\] do not make one layout of 1"):
        ComparisonStream(data_dir, world_size=3, seed=1).resume_from(states(2, [1, 1])[:1])


def test_resume_of_a_one_pass_stream(data_dir):
    kw = dict(seed=1, shuffle_buffer=5, batch_groups=3, loop=False)
    straight = ids(ComparisonStream(data_dir, **kw))
    first = ComparisonStream(data_dir, **kw)
    head = ids(itertools.islice(iter(first), 4))
    second = ComparisonStream(data_dir, **kw)
    second.load_state_dict(first.state_dict())
    assert head + ids(second) == straight


def test_a_mismatched_state_is_refused_with_what_differs(data_dir, other_dir):
    state = ComparisonStream(data_dir, rank=0, world_size=2, seed=1).state_dict()
    with pytest.raises(ReaderStateError, match=r"world_size: 2 in the state, 4 here"):
        ComparisonStream(data_dir, rank=0, world_size=4, seed=1).load_state_dict(state)
    with pytest.raises(ReaderStateError, match=r"seed: 1 in the state, 2 here"):
        ComparisonStream(data_dir, rank=0, world_size=2, seed=2).load_state_dict(state)
    with pytest.raises(ReaderStateError, match=r"rank: 0 in the state, 1 here"):
        ComparisonStream(data_dir, rank=1, world_size=2, seed=1).load_state_dict(state)
    with pytest.raises(ReaderStateError, match=r"data: '[0-9a-f]{64}' in the state, '[0-9a-f]{64}' here"):
        ComparisonStream(other_dir, rank=0, world_size=2, seed=1).load_state_dict(state)
    with pytest.raises(ReaderStateError, match=r"reader state version 99"):
        ComparisonStream(data_dir, rank=0, world_size=2, seed=1).load_state_dict(dict(state, version=99))
    # with several ranks the batch size decides which groups are whose: refused
    with pytest.raises(ReaderStateError, match=r"interleave: 8 in the state, 3 here"):
        ComparisonStream(data_dir, rank=0, world_size=2, seed=1, batch_groups=3).load_state_dict(state)
    # one rank owns every group: its batch size may change on resume
    single = ComparisonStream(data_dir, seed=1).state_dict()
    ComparisonStream(data_dir, seed=1, batch_groups=3).load_state_dict(single)


def test_manifest_and_argument_checks(data_dir, tmp_path):
    stream = ComparisonStream(data_dir)
    assert stream.manifest["counts"]["groups"] == GROUPS == stream.num_groups
    assert (stream.pad_id, stream.eoc_id) == (256, 257)
    with pytest.raises(ValueError, match="expected 0 <= rank < world_size"):
        ComparisonStream(data_dir, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="not a prepared folder"):
        ComparisonStream(tmp_path)
    with pytest.raises(ValueError, match="rank 60 of 64 has no groups"):
        ComparisonStream(data_dir, rank=60, world_size=64)
    assert ids(ComparisonStream(data_dir, rank=60, world_size=64, loop=False)) == []


@pytest.mark.parametrize("layout", ["stacked", "shared", "packed"])
def test_batches_are_well_formed(data_dir, layout):
    batch = next(iter(ComparisonStream(data_dir, batch_groups=5, layout=layout)))
    S = batch.num_sequences
    assert batch.group_offsets[-1] == S == batch.ranks.numel() and batch.margin.shape == (5,)
    assert (batch.input_ids.reshape(-1)[batch.score_index] == 257).all()
    assert batch.num_tokens == int((batch.segment_ids > 0).sum())
    if layout == "stacked":
        assert batch.input_ids.shape[0] == S
    assert set(batch.sources) <= {"helpful", "honest", "harmless"}


def test_collate_by_hand_with_pad_equal_to_eoc():
    """pad_id == eoc_id: the score position comes from the lengths, never from the ids."""
    rows = [{"id": "a", "source": "s", "turns": 2, "margin": None, "ranks": [0, 1],
             "context_ids": [5, 6], "response_ids": [[7], [8, 9, 10]]},
            {"id": "b", "source": "t", "turns": 1, "margin": 0.5, "ranks": [1, 0],
             "context_ids": [], "response_ids": [[11], [12]]}]
    batch = collate(rows, pad_id=0, eoc_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 0, 0, 0],
                                        [5, 6, 8, 9, 10, 0],
                                        [11, 0, 0, 0, 0, 0],
                                        [12, 0, 0, 0, 0, 0]]
    assert batch.score_index.tolist() == [3, 6 + 5, 12 + 1, 18 + 1]  # flat, into R * T
    assert batch.segment_ids.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert batch.position_ids[1].tolist() == [0, 1, 2, 3, 4, 5]
    assert batch.group_offsets.tolist() == [0, 2, 4] and batch.ranks.tolist() == [0, 1, 1, 0]
    assert batch.margin.tolist() == [0.0, 0.5] and batch.turns.tolist() == [2, 1]
    assert batch.ids == ["a", "b"] and batch.sources == ["s", "t"] and batch.num_tokens == 4 + 6 + 2 + 2
    assert batch.reader_state is None  # only a reader knows its position
    assert batch.ratings.tolist() == [0.0] * 4  # no ratings given: no rating margins
    rows[1]["ratings"] = [1.5, 4.0]
    assert collate(rows, pad_id=0, eoc_id=0).ratings.tolist() == [0.0, 0.0, 1.5, 4.0]
