"""Atomic writes and their temporaries: unique per process, and cleaned up after a crash."""
import subprocess
import sys

import pytest

from rankpm.engine.data.prepare import prepare
from rankpm.engine.data.synthetic import generate
from rankpm.engine.io import atomic_dir, remove_stale_temporaries, temporary_sibling


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temporaries_are_unique_per_process_and_call(tmp_path):
    a, b = temporary_sibling(tmp_path / "out"), temporary_sibling(tmp_path / "out")
    assert a != b and a.parent == tmp_path and a.name.startswith(".out.tmp-")


def test_a_prepare_killed_midway_leaves_no_temporary_behind_on_the_next_run(tmp_path):
    import socket

    src = generate(tmp_path / "syn.jsonl", groups=10, seed=0)
    left = tmp_path / f".out.tmp-{dead_pid()}-0123abcd@{socket.gethostname()}"  # what a SIGKILL leaves
    left.mkdir()
    (left / "shard_00000.arrow").write_bytes(b"half")
    busy = tmp_path / f".out.tmp-1-0123abcd@{socket.gethostname()}"  # a live process (pid 1): not ours to remove
    busy.mkdir()
    prepare([src], tmp_path / "out", "bytes")
    assert not left.exists() and busy.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([busy.name, "out", "syn.jsonl"])


def test_a_failed_write_removes_its_temporary(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "part").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_under_a_run_lock_every_temporary_in_the_folder_is_stale(tmp_path):
    other_host = tmp_path / ".step_00000004.tmp-12-0123abcd@elsewhere"
    other_host.mkdir()
    assert remove_stale_temporaries(tmp_path) == []  # another host's: cannot tell it is dead
    assert remove_stale_temporaries(tmp_path, all_stale=True) == [other_host]
