"""Training as a Ray job: ``rankpm submit`` and ``rankpm jobs status|logs|stop``.

    rankpm submit configs/quickstart.yaml train.out_dir=/shared/runs/q --workers 2 --address http://HEAD:8265
    rankpm jobs logs JOB_ID --follow --address http://HEAD:8265

The job's runtime_env carries the working directory (default: the current one; it must
hold the config file) and the run's command line; the job's driver runs
``rankpm train`` on the cluster, which attaches to that cluster's Ray (RAY_ADDRESS is set
inside a job) and starts the workers there. rankpm must be installed on every node.
Ray is imported only when a command runs, so ``rankpm --help`` stays fast.
"""
from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from pathlib import Path

# Never uploaded with the working directory: run folders, environments, VCS data.
UPLOAD_EXCLUDES = ["runs/", ".git/", ".venv/", "venv/", "**/__pycache__/", ".pytest_cache/", ".benchmarks/",
                   "*.pt", "*.safetensors", "*.arrow"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobError(RuntimeError):
    pass


def add_submit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config inside the working directory")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.out_dir=/shared/runs/a")
    p.add_argument("--address", help="the Ray dashboard/Jobs API, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument("--workers", type=int, help="data-parallel ranks (cluster.workers)")
    p.add_argument("--working-dir", default=".", help="folder uploaded with the job (default: the current one)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs and exit with its outcome")
    p.add_argument("--job-id", help="a submission id to use instead of a generated one")


def add_jobs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["status", "logs", "stop"])
    p.add_argument("job_id")
    p.add_argument("--address", help="the Ray dashboard/Jobs API, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")


def client(address: str | None):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise JobError(f"the Ray cluster at {address or 'RAY_ADDRESS'} requires token authentication: "
                       f"export RAY_AUTH_MODE=token and make the head's token available (RAY_AUTH_TOKEN, "
                       f"or ~/.ray/auth_token copied from the head)") from None
    except (ConnectionError, ValueError, RuntimeError) as err:
        where = address or "RAY_ADDRESS"
        raise JobError(f"cannot reach the Ray Jobs API at {where} ({err}); is the head running "
                       f"(ray start --head) and is its dashboard port reachable?") from None


def build_submission(config: str, overrides: list[str], *, workers: int | None, working_dir: str) -> dict:
    """The entrypoint and runtime_env of a training job; checks what would only fail on the cluster."""
    from rankpm.engine.config import load_config

    root = Path(working_dir).resolve()
    config_path = Path(config).resolve()
    if not config_path.is_file():
        raise FileNotFoundError(f"config file not found: {config}")
    try:
        relative = config_path.relative_to(root)
    except ValueError:
        raise JobError(f"{config} is outside the working directory {root}, which is what the job uploads; "
                       f"move it there or pass --working-dir") from None
    extra = list(overrides) + ([f"cluster.workers={workers}"] if workers is not None else [])
    cfg = load_config(config_path, extra)  # a bad config fails here, not on the cluster
    if not Path(cfg.train.out_dir).is_absolute():
        raise JobError(f"train.out_dir={cfg.train.out_dir!r} is relative; a job runs in a temporary copy of the "
                       f"working directory, so give a folder on storage every node shares, e.g. "
                       f"train.out_dir=/shared/runs/{Path(cfg.train.out_dir).name}")
    args = ["python", "-m", "rankpm.engine.cli", "train", str(relative), *extra]
    return {
        "entrypoint": " ".join(shlex.quote(a) for a in args),
        "runtime_env": {"working_dir": str(root), "excludes": UPLOAD_EXCLUDES,
                        "env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}},
        "metadata": {"rankpm_config": str(relative), "rankpm_out_dir": cfg.train.out_dir},
    }


def run_submit(args) -> int:
    spec = build_submission(args.config, args.overrides, workers=args.workers, working_dir=args.working_dir)
    jobs = client(args.address)
    job_id = jobs.submit_job(submission_id=args.job_id, **spec)
    print(job_id, flush=True)
    print(f"submitted {job_id}: {spec['entrypoint']}\n  follow: rankpm jobs logs {job_id} --follow"
          f"{_address_flag(args.address)}", file=sys.stderr)
    if args.follow:
        return follow(jobs, job_id)
    return 0


def run_jobs(args) -> int:
    jobs = client(args.address)
    if args.action == "status":
        info = jobs.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""), flush=True)
        return 0
    if args.action == "stop":
        stopped = jobs.stop_job(args.job_id)
        print(f"{args.job_id}: {'stop requested' if stopped else 'not running'}", flush=True)
        return 0
    if args.follow:
        return follow(jobs, args.job_id)
    sys.stdout.write(jobs.get_job_logs(args.job_id))
    return 0


def follow(jobs, job_id: str) -> int:
    """Stream a job's logs until it ends; 0 when it succeeded, 1 otherwise."""
    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    status = wait(jobs, job_id, timeout_s=60)  # the log stream closes just before the status settles
    print(f"job {job_id}: {status}", file=sys.stderr, flush=True)
    return 0 if status == "SUCCEEDED" else 1


def wait(jobs, job_id: str, *, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    status = str(jobs.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(jobs.get_job_status(job_id))
    return status.split(".")[-1]


def _address_flag(address: str | None) -> str:
    return f" --address {address}" if address else ""
