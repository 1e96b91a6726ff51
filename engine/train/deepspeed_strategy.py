"""DeepSpeed behind the strategy interface: the one engine module that imports deepspeed.

    strategy = DeepSpeedStrategy.from_config(cfg)    # after RANK/WORLD_SIZE/MASTER_* are set
    summary = train(cfg, strategy)                    # the same loop as one local process

Semantics are LocalStrategy's (engine/train/strategy.py), which were chosen to be DeepSpeed's:
``backward`` once per micro-batch (DeepSpeed scales by 1 / gradient_accumulation_steps),
``step`` once per micro-batch (DeepSpeed clips, steps the optimizer and the scheduler only
at the accumulation boundary). Gradients are averaged over ranks, so N ranks with
accumulation A see the same update as 1 rank with accumulation N * A on the same groups.

The DeepSpeed config is built from the rankpm config in one function,
``build_deepspeed_config``; ``cluster.deepspeed_config`` names a raw DeepSpeed JSON whose
keys override the built ones.
"""
from __future__ import annotations

import contextlib
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from rankpm.engine.config import ConfigError, RunConfig
from rankpm.engine.io import atomic_write_json
from rankpm.engine.train.strategy import attention_backends

CHECKPOINT_TAG = "deepspeed"  # DeepSpeed's own folder inside a rankpm checkpoint
STATE_FILE = "strategy.json"
# The loop owns these; a raw DeepSpeed JSON may not redefine them.
_OWNED_BY_RANKPM = ("optimizer", "scheduler")
_REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN", "avg": "AVG"}


def build_deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config for a rankpm run: ZeRO stage, precision, accumulation, clipping, offload.

    ``train_micro_batch_size_per_gpu`` counts comparison groups; DeepSpeed only uses the
    batch sizes for bookkeeping (the loop builds the batches), but it checks that
    train_batch_size = micro * accumulation * world_size.
    """
    c, t = cfg.cluster, cfg.train
    zero: dict = {"stage": c.zero_stage}
    if c.zero_stage >= 1:
        # Bucket sizes sized for small models; large buckets waste memory and hide nothing.
        zero.update(reduce_bucket_size=int(5e7), allgather_bucket_size=int(5e7), overlap_comm=False,
                    contiguous_gradients=True)
    if c.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=int(5e7),
                    stage3_gather_16bit_weights_on_model_save=False)
    if c.offload_optimizer:
        if c.zero_stage == 0:
            raise ConfigError("cluster.offload_optimizer: needs cluster.zero_stage >= 1 (got 0)")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    micro = cfg.data.batch_groups
    ds = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": micro * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip if t.grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": False},
        # The loop's torch AdamW is the client optimizer, offloaded or not: same maths everywhere.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the loop logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if c.deepspeed_config:
        ds = merge_raw_config(ds, c.deepspeed_config, grad_accum=t.grad_accum)
    return ds


def merge_raw_config(built: dict, path: str, *, grad_accum: int) -> dict:
    """Overlay a user's DeepSpeed JSON on the built config (nested sections merge key by key)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"cluster.deepspeed_config: file not found: {file}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"cluster.deepspeed_config: {file} is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"cluster.deepspeed_config: {file} must hold a JSON object")
    for key in _OWNED_BY_RANKPM:
        if key in raw:
            raise ConfigError(f"cluster.deepspeed_config: {file} sets {key!r}; rankpm builds the "
                              f"{key} from the train section (train.lr, train.warmup_steps, ...)")
    merged = _deep_merge(built, {k: v for k, v in raw.items() if v != "auto"})
    if merged["gradient_accumulation_steps"] != grad_accum:
        raise ConfigError(f"cluster.deepspeed_config: {file} sets gradient_accumulation_steps="
                          f"{merged['gradient_accumulation_steps']}, but the loop runs train.grad_accum="
                          f"{grad_accum} micro-batches per step; set train.grad_accum instead")
    # Keep DeepSpeed's batch-size identity true when the user changed one of its terms.
    if "train_batch_size" not in raw:
        world = built["train_batch_size"] // (built["train_micro_batch_size_per_gpu"] * grad_accum)
        merged["train_batch_size"] = merged["train_micro_batch_size_per_gpu"] * grad_accum * world
    return merged


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def init_distributed(backend: str | None = None, timeout_s: int = 600) -> None:
    """Join (or reuse) the process group the torchrun way: RANK, WORLD_SIZE, MASTER_ADDR/PORT."""
    import deepspeed

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if dist.is_initialized():  # Ray Train already set it up; DeepSpeed adopts it
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        return
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"cannot join the process group: {', '.join(missing)} not set "
                           f"(launch through rankpm.cluster or torchrun)")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s))


class DeepSpeedStrategy:
    def __init__(self, ds_config: dict, *, device: torch.device, activation_checkpointing: bool = False):
        if not dist.is_initialized():
            raise RuntimeError("DeepSpeedStrategy needs a process group: call init_distributed() first")
        self.ds_config = ds_config
        self.device = device
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.grad_accum = ds_config["gradient_accumulation_steps"]
        self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.activation_checkpointing = activation_checkpointing
        self.last_grad_norm: torch.Tensor | None = None
        self.engine = None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "DeepSpeedStrategy":
        init_distributed()
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        return cls(build_deepspeed_config(cfg, dist.get_world_size()), device=device,
                   activation_checkpointing=cfg.cluster.activation_checkpointing)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def micro_steps(self) -> int:
        return self.engine.micro_steps

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> nn.Module:
        import deepspeed

        if self.activation_checkpointing:
            # Recompute each block's activations in backward; non-reentrant works under ZeRO-3.
            model.transformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = model.to(self.device)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=self.ds_config, dist_init_required=False)
        return self.engine

    def autocast(self):
        # bf16 is DeepSpeed's (bf16 weights, fp32 master copy); attention as LocalStrategy's
        return attention_backends() if self.device.type == "cuda" else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, nonfinite: torch.Tensor | None = None) -> str:
        boundary = self.engine.is_gradient_accumulation_boundary()  # before step() advances it
        if boundary and nonfinite is not None:
            # one rank's non-finite loss makes every rank's averaged gradient non-finite; DeepSpeed
            # has no way to drop a step's gradients, so the loop stops before this update
            if self.all_reduce(nonfinite.float(), op="max").item() > 0:
                return "nonfinite"
        own_norm = None
        if boundary and self.zero_stage == 0 and self.engine.get_global_grad_norm() is None:
            # Stage 0 in fp32 clips without recording the norm; gradients are already
            # averaged over ranks here (backward all-reduces at the boundary).
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            own_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self.engine.step()
        if not boundary:
            return "accumulating"
        norm = own_norm if own_norm is not None else self.engine.get_global_grad_norm()
        self.last_grad_norm = None if norm is None else torch.as_tensor(float(norm))
        if self.last_grad_norm is not None and not torch.isfinite(self.last_grad_norm):
            return "nonfinite"  # already applied: the loop stops, and no checkpoint takes these weights
        return "updated"

    def current_lr(self) -> float:
        return self.engine.get_lr()[0]

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op not in _REDUCE_OPS:
            raise ValueError(f"all_reduce op: got {op!r}, expected one of {sorted(_REDUCE_OPS)}")
        if op == "avg" and dist.get_backend() == "gloo":  # gloo has no AVG
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            return tensor.div_(self.world_size)
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]))
        return tensor

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def unwrapped_model(self) -> nn.Module:
        return self.engine.module

    def export_state_dict(self) -> dict:
        """Full fp32 weights on rank 0 (an empty dict elsewhere). A collective under ZeRO-3.

        Under ZeRO-3 each rank holds a slice of every parameter: they are gathered one at a
        time and copied to the CPU on rank 0, so no rank ever holds the whole model at once;
        every entry of the state dict (the score head included, tied weights under each of
        their names) is filled, or the export fails.
        """
        module = self.engine.module
        if self.zero_stage == 3:
            import deepspeed

            state = {}
            for name, value in module.state_dict(keep_vars=True).items():
                if isinstance(value, nn.Parameter):
                    with deepspeed.zero.GatheredParameters([value], modifier_rank=None):
                        if self.is_main:
                            state[name] = value.detach().float().cpu().clone()
                elif self.is_main:
                    state[name] = value.detach().cpu().clone()
            return state
        if self.ds_config.get("bf16", {}).get("enabled"):
            return self._fp32_master_state() if self.is_main else {}
        return _cpu_fp32(module.state_dict()) if self.is_main else {}

    def _fp32_master_state(self) -> dict:
        """bf16 training keeps fp32 master weights in the optimizer; export those, not the bf16 copy."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = _cpu_fp32(self.engine.module.state_dict())
        for name, param in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(param)
            if full is not None:
                state[name] = full.detach().float().cpu().clone()
        return state

    def save(self, directory: Path) -> None:
        """Every rank writes its part of the DeepSpeed state (model, ZeRO optimizer shards, scheduler)."""
        if self.is_main:  # before DeepSpeed's save, whose barriers then order it before any reader
            atomic_write_json(Path(directory) / STATE_FILE,
                              {"strategy": "deepspeed", "zero_stage": self.zero_stage, "world_size": self.world_size})
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False,
                                    client_state={"rankpm_world_size": self.world_size})

    def resize_refusal(self, directory: Path) -> str | None:
        return resize_refusal(directory)

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        if not (directory / CHECKPOINT_TAG).is_dir():
            raise FileNotFoundError(f"{directory}: no {CHECKPOINT_TAG}/ folder (written by another strategy?)")
        meta = json.loads((directory / STATE_FILE).read_text()) if (directory / STATE_FILE).is_file() else {}
        if meta.get("zero_stage", self.zero_stage) != self.zero_stage:
            raise ValueError(f"{directory}: written with ZeRO stage {meta['zero_stage']}, resuming with "
                             f"cluster.zero_stage={self.zero_stage}; the optimizer shards differ in layout, so "
                             f"resume with stage {meta['zero_stage']} or start a new run from its exported model")
        path, _ = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{directory}/{CHECKPOINT_TAG}: DeepSpeed found no checkpoint to load")


def resize_refusal(directory: Path) -> str | None:
    """Why DeepSpeed ranks cannot load a checkpoint written by another number of ranks, or None.

    ZeRO-0 keeps one full copy of the model and optimizer state, which any number of ranks
    loads; ZeRO 1-3 partition the optimizer state by rank, and DeepSpeed does not repartition
    it ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is
    not currently supported").
    """
    meta_file = Path(directory) / STATE_FILE
    if not meta_file.is_file():
        return ("written by one local process (no DeepSpeed state); resume it with --workers 1, or start a new "
                "run from its exported model")
    meta = json.loads(meta_file.read_text())
    if meta.get("zero_stage", 0) != 0:
        return (f"ZeRO-{meta['zero_stage']} partitions the optimizer state across the {meta.get('world_size')} "
                f"ranks that wrote it and DeepSpeed cannot repartition it; resume with --workers "
                f"{meta.get('world_size')} (runs with cluster.zero_stage=0 can change their number of workers)")
    return None


def _cpu_fp32(state: dict) -> dict:
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone() for k, v in state.items()}
