"""Where training metrics go: a JSONL file, TensorBoard when installed, a progress bar.

Only the main rank writes; every rank may call (the others are no-ops).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from rankpm.engine.io import atomic_write_text


class MetricsLog:
    def __init__(self, out_dir: str | Path, *, enabled: bool, total_steps: int, progress: bool,
                 initial_step: int = 0, on_record=None, keep_rows: int | None = None):
        """``keep_rows``: the rows the file held when the checkpoint a run resumes from was
        saved (``rows``); what a crashed run logged after it is dropped, so every row is
        written once."""
        self.enabled = enabled
        self.on_record = on_record
        self._file = self._tb = self._bar = None
        self.rows = 0
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.jsonl"
        if path.is_file():
            self.rows = _keep_rows(path, keep_rows)
        self._file = open(path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self._tb = None
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                             file=sys.stderr, dynamic_ncols=True)

    def record(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.rows += 1
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)
        if self._bar is not None:
            shown = {k: values[k] for k in ("loss", "pair_accuracy", "eval_accuracy", "pairs_per_s")
                     if k in values}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        if self.on_record is not None:
            self.on_record(row)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def _keep_rows(path: Path, keep: int | None) -> int:
    """Keep the first ``keep`` complete rows (all when None); return how many the file holds."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if line.endswith("\n")]
    if keep is not None and len(lines) != keep:
        atomic_write_text(path, "".join(lines[:keep]))
        return min(keep, len(lines))
    return len(lines)


class Window:
    """Sums of the steps since the last flush, kept on the device (no host sync per step).

    Each step's sums are collected apart and merged only when the step updated the weights,
    so a skipped (non-finite) step leaves no NaN in the logged means and no pairs in the
    counts. ``flush`` reduces over every rank once and returns the row and the counts.
    """

    def __init__(self, device):
        self.device = device
        self._sums: dict[str, list] = {}
        self._step: dict[str, list] = {}
        self.steps = 0

    def add(self, sums: dict, tokens, groups: int) -> None:
        """One micro-batch: the objective's (sum, count) pairs, its real tokens and its groups."""
        for name, (total, count) in {**sums, "_tokens": (tokens, 0.0), "_groups": (float(groups), 0.0)}.items():
            acc = self._step.setdefault(name, [torch.zeros((), device=self.device),
                                               torch.zeros((), device=self.device)])
            acc[0] += torch.as_tensor(total, device=self.device).detach().float()
            acc[1] += torch.as_tensor(count, device=self.device).detach().float()

    def end_step(self, updated: bool) -> None:
        if updated:
            for name, (total, count) in self._step.items():
                acc = self._sums.setdefault(name, [torch.zeros((), device=self.device),
                                                   torch.zeros((), device=self.device)])
                acc[0] += total
                acc[1] += count
            self.steps += 1
        self._step = {}

    def flush(self, strategy) -> tuple[dict, int, int, int] | None:
        """(row of means, pairs, tokens, groups) over every rank since the last flush; None when
        no step was merged. A collective: every rank calls it at the same steps."""
        names = sorted(self._sums)
        if not names:
            return None
        packed = torch.stack([self._sums[n][i] for n in names for i in (0, 1)])
        packed = strategy.all_reduce(packed).tolist()  # the host sync of a logged step
        value = {n: (packed[2 * i], packed[2 * i + 1]) for i, n in enumerate(names)}
        row = {n: total / max(count, 1.0) for n, (total, count) in value.items() if not n.startswith("_")}
        self._sums, self.steps = {}, 0
        return row, int(value["loss"][1]), int(value["_tokens"][0]), int(value["_groups"][0])
