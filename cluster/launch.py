"""Run the engine's training loop on N Ray workers as DeepSpeed data-parallel ranks.

    summary = train_on_ray(cfg)          # what ``rankpm train CONFIG --workers N`` calls

Ray Train's TorchTrainer starts the workers (ScalingConfig: workers, CPUs and GPUs per
worker from ``cluster.*``), makes them look like torchrun ranks and restarts the whole
group after a worker dies, up to ``cluster.max_failures`` times (FailureConfig). Each
restart re-enters the same loop, which resumes from OUT_DIR/checkpoints/latest.

Checkpoints are the engine's own (written atomically into OUT_DIR on storage every node
sees), not Ray Train's reported checkpoints: reporting them would copy every checkpoint
into Ray's storage a second time, and resume needs the engine's ``latest`` pointer anyway.

Without ``cluster.address`` (or RAY_ADDRESS) an embedded local Ray instance is started and
stopped here; nothing has to be started by hand.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from pathlib import Path

import ray
import torch

from rankpm.cluster.progress import DriverProgress
from rankpm.engine.config import RunConfig
from rankpm.engine.data.run_data import resolve_run_data
from rankpm.engine.data.stream import UNEVEN_BATCHES
from rankpm.engine.train.checkpoint import latest_checkpoint, read_trainer_state
from rankpm.engine.train.deepspeed_strategy import resize_refusal
from rankpm.engine.train.resume import check_resume
from rankpm.engine.train.run_lock import run_lock
from rankpm.engine.train.strategy import LocalStrategy

log = logging.getLogger(__name__)


class ClusterRunError(RuntimeError):
    """Training on Ray failed for good (beyond cluster.max_failures, or could not start)."""


@ray.remote(num_cpus=0)
class MetricsRelay:
    """Collects rows from the ranks; the driver drains them. Holds no resources."""

    def __init__(self):
        self.rows: list[dict] = []

    def push(self, row: dict) -> None:
        self.rows.append(row)

    def drain(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Workers may run in another directory (or node): make every local path absolute."""
    def fix(path: str) -> str:  # "gpt2" or "bytes" are names, not paths, unless such a folder exists
        return str(Path(path).resolve()) if Path(path).exists() else path

    data = dataclasses.replace(cfg.data, train=[fix(p) for p in cfg.data.train], eval=[fix(p) for p in cfg.data.eval],
                               tokenizer=fix(cfg.data.tokenizer))
    model = dataclasses.replace(cfg.model, backbone=fix(cfg.model.backbone))
    train = dataclasses.replace(cfg.train, out_dir=str(Path(cfg.train.out_dir).resolve()))
    cluster = cfg.cluster
    if cluster.deepspeed_config:
        cluster = dataclasses.replace(cluster, deepspeed_config=str(Path(cluster.deepspeed_config).resolve()))
    return dataclasses.replace(cfg, data=data, model=model, train=train, cluster=cluster)


def connect(cfg: RunConfig, *, dashboard: bool = False) -> bool:
    """Attach to cluster.address / RAY_ADDRESS, or start an embedded instance. True when we started it."""
    if ray.is_initialized():
        return False
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("attaching to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return False
    needed = cfg.cluster.workers * cfg.cluster.cpus_per_worker
    num_cpus = max(os.cpu_count() or 1, needed)
    ray.init(num_cpus=num_cpus, include_dashboard=dashboard,  # GPUs: Ray detects them
             dashboard_host="127.0.0.1", log_to_driver=True)
    if dashboard:
        log.info("Ray dashboard: http://%s", ray.get_runtime_context().dashboard_url or "127.0.0.1:8265")
    return True


def train_on_ray(cfg: RunConfig, *, dashboard: bool = False, on_record=None) -> dict:
    """Train with ``cluster.workers`` ranks; return rank 0's summary (train()'s keys plus ``restarts``)."""
    return train_many_on_ray([cfg], dashboard=dashboard, on_record=on_record)[0]


def train_many_on_ray(cfgs: list[RunConfig], *, dashboard: bool = False, on_record=None) -> list[dict]:
    """Several runs, one after another, in one worker group (sweeps, parity tests, benchmarks).

    They must agree on the ``cluster`` section (it shapes the worker group), except
    ``zero_stage``, ``offload_optimizer``, ``activation_checkpointing`` and ``deepspeed_config``,
    which each run's DeepSpeed engine takes for itself.
    """
    cfgs = [absolute_paths(cfg) for cfg in cfgs]
    c = cfgs[0].cluster
    with contextlib.ExitStack() as locks:
        for cfg in cfgs:  # the driver holds each run folder for the workers' whole life
            locks.enter_context(run_lock(cfg.train.out_dir))
        for cfg in cfgs:
            shape = ("workers", "cpus_per_worker", "gpus_per_worker", "max_failures")
            if any(getattr(cfg.cluster, k) != getattr(c, k) for k in shape):
                raise ValueError(f"runs sharing a worker group must agree on cluster.{', cluster.'.join(shape)}")
            preflight(cfg)
        return _fit(cfgs, dashboard=dashboard, on_record=on_record)


def _fit(cfgs: list[RunConfig], *, dashboard: bool, on_record) -> list[dict]:
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rankpm.cluster.worker import run_rank

    c = cfgs[0].cluster
    started = connect(cfgs[0], dashboard=dashboard)
    out_dir = Path(cfgs[0].train.out_dir)
    try:
        relay = MetricsRelay.remote()
        use_gpu = c.gpus_per_worker > 0
        resources = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if use_gpu else {})}
        trainer = TorchTrainer(
            run_rank,
            train_loop_config={"run_configs": [cfg.to_dict() for cfg in cfgs], "relay": relay},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=600),
            scaling_config=ScalingConfig(num_workers=c.workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RayRunConfig(name="rankpm", storage_path=str(out_dir / "ray"),
                                    failure_config=FailureConfig(max_failures=c.max_failures)),
        )
        progress = DriverProgress(out_dir, max_failures=c.max_failures, show_bar=cfgs[0].train.progress,
                                  on_record=on_record)
        log.info("training on %d Ray workers (ZeRO stage %d, %s CPU%s per worker), run folder %s",
                 c.workers, c.zero_stage, c.cpus_per_worker,
                 f" + {c.gpus_per_worker} GPU" if use_gpu else "", out_dir)
        outcome: dict = {}

        def fit() -> None:
            try:
                outcome["result"] = trainer.fit()
            except BaseException as err:  # re-raised in the driver thread below
                outcome["error"] = err

        thread = threading.Thread(target=fit, name="rankpm-ray-fit", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.2)
            progress.consume(ray.get(relay.drain.remote()))
        progress.consume(ray.get(relay.drain.remote()))
        progress.close()
        error = outcome.get("error") or getattr(outcome.get("result"), "error", None)
        if error is not None:
            raise ClusterRunError(_failure_message(error, progress, c.max_failures, out_dir)) from error
        missing = [i for i in range(len(cfgs)) if i not in progress.summaries]
        if missing:
            raise ClusterRunError(f"the Ray workers finished without rank 0's summary of run(s) {missing}; "
                                  f"see the worker log above")
        if progress.restarts:
            log.info("run completed after %d worker restart(s) (cluster.max_failures=%d)",
                     progress.restarts, c.max_failures)
        return [dict(progress.summaries[i], restarts=progress.restarts) for i in range(len(cfgs))]
    finally:
        if started:
            ray.shutdown()


def preflight(cfg: RunConfig) -> None:
    """Refuse, before any worker starts, what every worker would refuse (and Ray would retry):
    a checkpoint of another run, data that does not match, a layout that cannot resume.
    The data is prepared here, once; the workers find it ready."""
    last = latest_checkpoint(cfg.train.out_dir)
    state = read_trainer_state(last) if last is not None else None
    if state is not None:
        check_resume(last, state["config"], cfg.to_dict(), allowed=cfg.train.resume_with_changes)
    resolve_run_data(cfg, LocalStrategy(device=torch.device("cpu")), keep_prepared=last is not None)
    if state is None:
        return
    written = state["world_size"]
    if written == cfg.cluster.workers:
        return
    reason = resize_refusal(last)
    if reason is None and cfg.data.tokens_per_batch is not None:
        reason = f"{UNEVEN_BATCHES}; resume with --workers {written}"
    if reason:
        raise ClusterRunError(f"{last}: written by {written} data-parallel ranks, resuming with cluster.workers="
                              f"{cfg.cluster.workers}: {reason}")
    log.info("resuming %s, written by %d ranks, with %d: every rank continues from the first group the old "
             "ranks had not read (the log of rank 0 gives the position)", last, written, cfg.cluster.workers)


def _failure_message(error: BaseException, progress, max_failures: int, out_dir: Path) -> str:
    try:
        last = latest_checkpoint(out_dir)
    except Exception as err:  # an unreadable pointer must not hide the training error
        last = f"unreadable ({err})"
    detail = str(error).strip().splitlines()
    first = next((line for line in detail if line.strip()), type(error).__name__)
    return (f"training on Ray failed after {progress.restarts} worker restart(s) "
            f"(cluster.max_failures={max_failures}): {type(error).__name__}: {first[:500]}. "
            f"Last complete checkpoint: {last or 'none'}; rerun the same command to resume from it.")
