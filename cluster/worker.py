"""What each Ray worker runs: the engine's training loop with a DeepSpeed strategy.

Ray Train has already set RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT and joined
the process group (gloo on CPU, nccl on GPU), as torchrun would; DeepSpeed adopts that
group. Rows the loop records on rank 0 are forwarded to the driver through a relay actor.
"""
from __future__ import annotations

import dataclasses
import os
import socket

import torch


def run_rank(config: dict) -> None:
    """Ray Train's per-worker function: the runs in ``config["run_configs"]``, one after another.

    More than one run shares the worker group and its process group (a benchmark or a
    parity sweep over ZeRO stages); each run builds its own DeepSpeed engine.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    from rankpm.engine.config import from_dict
    from rankpm.engine.train.deepspeed_strategy import DeepSpeedStrategy, init_distributed
    from rankpm.engine.train.loop import train

    relay = config.get("relay")

    def forward(row: dict) -> None:
        if relay is not None:
            relay.push.remote(row)  # fire and forget: never blocks a training step

    init_distributed()
    import torch.distributed as dist
    forward({"kind": "worker", "rank": dist.get_rank(), "world_size": dist.get_world_size(),
             "pid": os.getpid(), "host": socket.gethostname()})
    for index, raw in enumerate(config["run_configs"]):
        cfg = from_dict(raw)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False))  # the driver draws it
        strategy = DeepSpeedStrategy.from_config(cfg)
        summary = train(cfg, strategy, on_record=forward if strategy.is_main else None)
        if strategy.is_main:
            forward({"kind": "summary", "run": index, **summary})
        strategy.barrier()
