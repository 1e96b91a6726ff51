"""The reward server over real loopback HTTP: every route, OpenRLHF's payload, bad requests,
a bearer token, concurrent load, and a graceful stop."""
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from rankpm.engine.config import from_dict
from rankpm.engine.score.scorer import RewardScorer
from rankpm.engine.train.loop import train

CONTEXT = "\n\nHuman: How do I boil an egg?\n\nAssistant:"
RESPONSES = [" Put it in boiling water for eight minutes.", " No idea."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    summary = train(from_dict({
        "model": {"backbone": "gpt2", "preset": "tiny"},
        "data": {"synthetic": {"train_groups": 48, "eval_groups": 16}, "max_length": 128, "batch_groups": 8},
        "train": {"out_dir": str(root / "run"), "max_steps": 2, "warmup_steps": 1, "progress": False},
    }))
    return Path(summary["model"])


class Server:
    def __init__(self, model_dir, *extra, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "rankpm.engine.cli", "serve", str(model_dir),
                                         "--port", str(self.port), *extra], env=dict(os.environ, **(env or {})),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or its replicas still starting
                pass
            time.sleep(0.3)
        self.process.kill()
        raise RuntimeError(f"the server did not come up: {self.process.stderr.read()[-3000:]}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--max-texts", "16", "--max-text-chars", "2000", "--max-body-mb", "0.05")
    yield s
    s.stop()


def test_score_and_info_answer_with_the_models_own_scores(server, model_dir):
    expected = RewardScorer.from_folder(model_dir).score(CONTEXT, RESPONSES)
    got = requests.post(server.url + "/score", json={"context": CONTEXT, "responses": RESPONSES}, timeout=30)
    assert got.status_code == 200 and got.json()["scores"] == pytest.approx(expected, abs=1e-5)
    info = requests.get(server.url + "/info", timeout=30).json()
    assert info["judge"] == "score" and info["max_length"] == 128 and info["limits"]["max_texts"] == 16
    assert info["tokenizer"]["kind"] == "bytes" and set(info["score_stats"]) == {"score_mean", "score_std"}
    centred = requests.post(server.url + "/score", json={"context": CONTEXT, "responses": RESPONSES,
                                                         "normalize": "center"}, timeout=30).json()["scores"]
    assert centred == pytest.approx([s - info["score_stats"]["score_mean"] for s in expected], abs=1e-5)


def test_openrlhfs_payload_gets_rewards_scores_and_extra_logs(server, model_dir):
    scorer = RewardScorer.from_folder(model_dir)
    payload = {"query": [CONTEXT + r for r in RESPONSES], "prompts": [CONTEXT, CONTEXT], "labels": ["", ""]}
    got = requests.post(server.url + "/get_reward", json=payload, timeout=30)
    assert got.status_code == 200
    body = got.json()
    expected = scorer.score(CONTEXT, RESPONSES)
    assert body["rewards"] == pytest.approx(expected, abs=1e-5) and body["scores"] == body["rewards"]
    assert body["extra_logs"]["rankpm_score"] == pytest.approx(expected, abs=1e-5)
    # without prompts the dialogue is split after its last assistant turn; labels may be absent
    bare = requests.post(server.url + "/get_reward", json={"query": payload["query"]}, timeout=30).json()
    assert bare["rewards"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("send, status, words", [
    (dict(data="{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    (dict(json=["a list"]), 422, "expected a JSON object"),
    (dict(json={"context": CONTEXT, "responses": "one string"}), 422, "expected a list of strings, got one string"),
    (dict(json={"context": CONTEXT, "responses": []}), 422, "the list is empty"),
    (dict(json={"context": CONTEXT, "responses": [3]}), 422, "responses[0]: expected a string, got int"),
    (dict(json={"context": 7, "responses": ["a"]}), 422, "context: expected a string"),
    (dict(json={"context": CONTEXT, "responses": ["a"] * 17}), 413, "17 responses exceed the limit of 16"),
    (dict(json={"context": CONTEXT, "responses": ["a" * 2001]}), 422, "responses[0] has 2001 characters, over the limit of 2000"),
    (dict(json={"context": CONTEXT, "responses": ["a" * 1900] * 30}), 413, "exceeds the limit of 52428"),
    (dict(json={"context": CONTEXT, "responses": ["a"], "normalize": "zscore"}), 422, "normalize: got 'zscore'"),
])
def test_bad_requests_are_4xx_with_a_json_message(server, send, status, words):
    got = requests.post(server.url + "/score", timeout=30, **send)
    assert got.status_code == status and words in got.json()["error"], got.text


def test_bad_openrlhf_payloads_name_the_query(server):
    got = requests.post(server.url + "/get_reward", json={"query": ["no dialogue here"]}, timeout=30)
    assert got.status_code == 422 and "query[0]" in got.json()["error"]
    got = requests.post(server.url + "/get_reward", json={"query": ["a", "b"], "prompts": ["a"]}, timeout=30)
    assert got.status_code == 422 and "prompts: expected a list of 2 strings" in got.json()["error"]
    got = requests.post(server.url + "/get_reward", json={"query": "one string"}, timeout=30)
    assert got.status_code == 422


def test_a_token_guards_every_route_but_health(model_dir):
    s = Server(model_dir, env={"RANKPM_SERVE_TOKEN": "s3cret"})
    try:
        assert requests.get(s.url + "/health", timeout=10).status_code == 200
        for method, route in (("get", "/info"), ("post", "/score"), ("post", "/get_reward")):
            assert getattr(requests, method)(s.url + route, timeout=10).status_code == 401
            wrong = getattr(requests, method)(s.url + route, headers={"Authorization": "Bearer nope"}, timeout=10)
            assert wrong.status_code == 403 and wrong.json()["error"] == "wrong token"
        ok = requests.post(s.url + "/score", json={"context": CONTEXT, "responses": RESPONSES},
                           headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert ok.status_code == 200 and len(ok.json()["scores"]) == 2
    finally:
        assert s.stop() == 0  # SIGTERM: a graceful stop


def test_concurrent_load_merges_requests_and_never_errs(server):
    """16 clients x 200 requests each: every answer a 200 with the right number of scores."""
    def client(i):
        session, latencies, failures = requests.Session(), [], 0
        for j in range(200):
            responses = RESPONSES[: 1 + (i + j) % 2]
            t0 = time.perf_counter()
            got = session.post(server.url + "/score", json={"context": CONTEXT, "responses": responses}, timeout=60)
            latencies.append(time.perf_counter() - t0)
            failures += got.status_code != 200 or len(got.json()["scores"]) != len(responses)
        return latencies, failures

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, range(16)))
    wall = time.perf_counter() - t0
    latencies = sorted(x for lat, _ in results for x in lat)
    assert sum(f for _, f in results) == 0 and len(latencies) == 3200
    info = requests.get(server.url + "/info", timeout=30).json()
    assert info["passes"] < info["requests_scored"]  # concurrent requests shared passes
    print(json.dumps({"requests_per_s": len(latencies) / wall, "p50_ms": 1e3 * statistics.median(latencies),
                      "p99_ms": 1e3 * latencies[int(0.99 * len(latencies))],
                      "requests_per_pass": info["requests_scored"] / info["passes"]}))


@pytest.mark.slow
def test_ray_serve_replicas_answer_behind_one_endpoint(model_dir):
    """The same app as two Ray Serve replicas on CPU: both answer, with the same scores."""
    s = Server(model_dir, "--replicas", "2")
    try:
        expected = RewardScorer.from_folder(model_dir).score(CONTEXT, RESPONSES)
        pids = set()
        deadline = time.time() + 60
        while len(pids) < 2 and time.time() < deadline:  # requests spread over the replicas
            with ThreadPoolExecutor(8) as pool:
                for got in pool.map(lambda _: requests.get(s.url + "/info", timeout=30).json(), range(16)):
                    pids.add(got["pid"])
        assert len(pids) == 2
        got = requests.post(s.url + "/get_reward", json={"query": [CONTEXT + r for r in RESPONSES]}, timeout=60)
        assert got.json()["rewards"] == pytest.approx(expected, abs=1e-5)
    finally:
        s.stop()
