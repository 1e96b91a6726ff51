"""`rankpm submit` / `rankpm jobs` against a real local Ray head (ray start --head on 127.0.0.1).

The head gets free ports and its own temporary folder, and runs under ``ray start --block``
in a new session, so stopping it (SIGTERM, then SIGKILL of its process group) touches no
other Ray on the machine; the fixture stops it even when the test fails.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from cluster_helpers import tiny_config

from rankpm.cluster.jobs import JobError, build_submission
from rankpm.engine.train.checkpoint import latest_checkpoint
from rankpm.engine.cli import main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path_factory):
    temp = Path("/tmp") / f"rankpm_head_{os.getpid()}_{free_port()}"  # short: Ray's socket paths are limited
    gcs, dashboard = free_port(), free_port()
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")  # a loopback-only head for one test
    env.pop("RAY_ADDRESS", None)
    command = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
               "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dashboard}", f"--temp-dir={temp}", "--disable-usage-stats",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}"]
    log = open(tmp_path_factory.mktemp("head") / "ray_head.log", "w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except urllib.error.HTTPError:  # it answers (token authentication may refuse us): it is up
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray head did not come up; see {log.name}") from None
                time.sleep(1)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)  # ray start --block stops what it started
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything left in its session
        except ProcessLookupError:
            pass
        log.close()
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def write_job_folder(folder: Path, out_dir: Path) -> Path:
    folder.mkdir()
    raw = tiny_config(out_dir, max_steps=4, save_every=2).to_dict()
    raw["train"]["betas"] = list(raw["train"]["betas"])
    (folder / "job.yaml").write_text(yaml.safe_dump(raw))
    return folder / "job.yaml"


def test_a_relative_run_folder_or_a_config_outside_the_upload_is_refused(tmp_path, monkeypatch):
    config = write_job_folder(tmp_path / "job", tmp_path / "runs" / "x")
    with pytest.raises(JobError, match="outside the working directory"):
        build_submission(str(config), [], workers=2, working_dir=str(tmp_path / "elsewhere"))
    monkeypatch.chdir(tmp_path / "job")
    with pytest.raises(JobError, match="train.out_dir='runs/x' is relative; .*storage every node shares"):
        build_submission("job.yaml", ["train.out_dir=runs/x"], workers=2, working_dir=".")
    spec = build_submission("job.yaml", [], workers=2, working_dir=".")
    assert spec["entrypoint"] == "python -m rankpm.engine.cli train job.yaml cluster.workers=2"
    assert spec["runtime_env"]["working_dir"] == str(tmp_path / "job")


@pytest.mark.slow
def test_submit_follow_and_check_the_checkpoint_on_a_local_head(ray_head, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    out_dir = tmp_path / "shared" / "run"
    config = write_job_folder(tmp_path / "job", out_dir)
    monkeypatch.chdir(config.parent)
    assert main(["submit", "job.yaml", "--workers", "2", "--address", ray_head]) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert job_id.startswith("raysubmit_")

    assert main(["jobs", "logs", job_id, "--follow", "--address", ray_head]) == 0  # returns when it succeeded
    logs = capsys.readouterr().out
    summary = json.loads([line for line in logs.splitlines() if line.startswith('{"')][-1])
    assert summary["steps"] == 4 and summary["world_size"] == 2

    assert main(["jobs", "status", job_id, "--address", ray_head]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    last = latest_checkpoint(out_dir)
    assert last.name == "step_00000004"
    assert json.loads((last / "trainer.json").read_text())["world_size"] == 2
    assert (last / "deepspeed").is_dir() and (out_dir / "model" / "score_head.pt").is_file()
