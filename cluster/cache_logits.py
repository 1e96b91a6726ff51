"""``rankpm cache-logits --workers N``: the cache's shards split over Ray workers.

Worker w of N writes the shards j with j % N == w (engine/distill/cache.py ``run_part``),
each loading the teacher and computing the prompt's keys/values once; the driver writes the
manifest when all are done. A worker that dies leaves complete shards or none (each is
renamed into place), so rerunning the command, with any number of workers, finishes the rest.
Without RAY_ADDRESS an embedded local Ray instance is started and stopped here.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import ray

from rankpm.engine.distill.config import CacheLogitsConfig


@ray.remote(num_cpus=1)
def _part(cfg: CacheLogitsConfig, request: dict, part: int, parts: int) -> dict:
    from rankpm.engine.distill.cache import run_part

    return run_part(cfg, request, part, parts)


def absolute(cfg: CacheLogitsConfig) -> CacheLogitsConfig:
    """Workers may start in another directory: local paths made absolute."""
    def fix(path: str) -> str:
        return str(Path(path).resolve()) if Path(path).exists() else path

    teacher = dataclasses.replace(cfg.teacher, model=fix(cfg.teacher.model), tokenizer=fix(cfg.teacher.tokenizer))
    corpus = dataclasses.replace(cfg.corpus, files=[fix(p) for p in cfg.corpus.files])
    distill = dataclasses.replace(cfg.distill, out_dir=str(Path(cfg.distill.out_dir).resolve()),
                                  prompt=fix(cfg.distill.prompt) if cfg.distill.prompt not in ("hhh", "none")
                                  else cfg.distill.prompt)
    return dataclasses.replace(cfg, teacher=teacher, corpus=corpus, distill=distill)


def run_parts_on_ray(cfg: CacheLogitsConfig, request: dict, workers: int) -> list[dict]:
    started = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 **({} if address else {"num_cpus": workers}))
        started = True
    try:
        cfg = absolute(cfg)
        return ray.get([_part.remote(cfg, request, w, workers) for w in range(workers)])
    finally:
        if started:
            ray.shutdown()
