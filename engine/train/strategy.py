"""How one training step is executed: the loop calls a strategy, never an optimizer directly.

LocalStrategy runs one process with plain PyTorch. The DeepSpeed strategy
(engine/train/deepspeed_strategy.py, the one module that imports deepspeed) has the same
methods, so the training loop in engine/train/loop.py is the same in both cases.

Semantics shared by every strategy (they mirror DeepSpeed's engine):
- ``backward(loss)`` is called once per micro-batch and scales by 1 / grad_accum;
- ``step(nonfinite)`` is called once per micro-batch and updates the weights only at the
  accumulation boundary (clip, optimizer step, scheduler step, zero grads). It returns
  "accumulating" before the boundary and "updated" at it, unless the step is not finite
  (``nonfinite``, the boundary micro-batch's flag that some loss of the step was not
  finite, or a non-finite gradient norm): then the weights are left as they were and it
  returns "skipped" (the gradients are dropped, the schedule advances) or, where the step
  cannot be dropped, "nonfinite".
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn


def attention_backends():
    """Scaled-dot-product attention without the cuDNN backend, which builds a plan for each
    new input shape: preference batches change shape every step (group sizes, lengths), so
    planning dominated (bf16 quickstart on an H100: 244 pairs/s with it, 1058 without).
    Flash, memory-efficient and math attention remain."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class LocalStrategy:
    rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, *, device: torch.device, grad_accum: int = 1, grad_clip: float = 0.0,
                 precision: str = "fp32"):
        self.device = device
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self.precision = precision
        self.micro_steps = 0
        self.last_grad_norm: torch.Tensor | None = None
        self.model: nn.Module | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> nn.Module:
        self.model, self.optimizer, self.scheduler = model.to(self.device), optimizer, scheduler
        return self.model

    def autocast(self):
        """The context of every forward: bf16 autocast when asked, and on CUDA the attention
        backends that suit variable batch shapes (see attention_backends)."""
        stack = contextlib.ExitStack()
        if self.precision == "bf16":
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=torch.bfloat16))
        if self.device.type == "cuda":
            stack.enter_context(attention_backends())
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self, nonfinite: torch.Tensor | None = None) -> str:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return "accumulating"
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = nn.utils.get_total_norm([p.grad for p in params])
        self.last_grad_norm = norm
        finite = torch.isfinite(norm) if nonfinite is None else torch.isfinite(norm) & ~nonfinite
        updated = bool(finite)  # the one host sync of a step: nothing non-finite may reach the weights
        if updated:
            if self.grad_clip > 0:
                nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return "updated" if updated else "skipped"

    def current_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj):
        return obj

    def gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        return [obj]

    def unwrapped_model(self) -> nn.Module:
        return self.model

    def export_state_dict(self) -> dict:
        """Full (consolidated) model weights; the same on every strategy."""
        return self.model.state_dict()

    def save(self, directory: Path) -> None:
        """Write optimizer and scheduler state into an existing folder. The weights are not stored
        twice: the checkpoint's model/ folder (written first) holds them."""
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "micro_steps": self.micro_steps}, directory / "training_state.pt")

    def resize_refusal(self, directory: Path) -> str | None:
        """Why this process cannot load a checkpoint written by another number of ranks."""
        return ("one local process loads only the state one local process wrote, not DeepSpeed's; resume on "
                "Ray with --workers 2 or more (cluster.zero_stage=0 allows another number of workers)")

    def load(self, directory: Path) -> None:
        path = directory / "training_state.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no training_state.pt (written by another strategy?)")
        from rankpm.engine.model.preference_model import PreferenceModel

        weights = PreferenceModel.load(directory / "model", with_lm_head=self.model.has_lm_head).state_dict()
        self.model.load_state_dict(weights)
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = state["micro_steps"]
