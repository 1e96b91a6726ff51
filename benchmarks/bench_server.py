"""The reward server under load: requests/s and latency, with and without merging requests.

    python benchmarks/bench_server.py MODEL_DIR [--clients 16] [--requests 200]

Starts ``rankpm serve`` twice on loopback, once as shipped (concurrent requests merged into
one scoring pass, up to 5 ms of waiting) and once with merging off (``--batch-chars 0``: one
request per pass), and drives each with the same load: ``--clients`` threads, each sending
``--requests`` /score requests of one context and one or two responses, back to back.
Prints requests/s, p50/p99 latency, requests per pass and errors, as a markdown table.
"""
import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "engine"))
from test_server import CONTEXT, RESPONSES, Server  # noqa: E402  (the tests' real-HTTP server harness)


def load(url: str, clients: int, per_client: int) -> dict:
    def client(i):
        session, latencies, errors = requests.Session(), [], 0
        for j in range(per_client):
            t0 = time.perf_counter()
            got = session.post(url + "/score", json={"context": CONTEXT, "responses": RESPONSES[: 1 + (i + j) % 2]},
                               timeout=120)
            latencies.append(time.perf_counter() - t0)
            errors += got.status_code != 200
        return latencies, errors

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    latencies = sorted(x for lat, _ in results for x in lat)
    info = requests.get(url + "/info", timeout=30).json()
    return {"requests_per_s": len(latencies) / wall, "p50_ms": 1e3 * statistics.median(latencies),
            "p99_ms": 1e3 * latencies[int(0.99 * len(latencies))], "errors": sum(e for _, e in results),
            "requests_per_pass": info["requests_scored"] / max(info["passes"], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=200)
    args = p.parse_args()
    print("| server | requests/s | p50 ms | p99 ms | requests per pass | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, extra in (("merging (default)", ()), ("one request per pass", ("--batch-chars", "0"))):
        server = Server(args.model, *extra)
        try:
            r = load(server.url, args.clients, args.requests)
        finally:
            server.stop()
        print(f"| {name} | {r['requests_per_s']:.0f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['requests_per_pass']:.1f} | {r['errors']} |", flush=True)


if __name__ == "__main__":
    main()
