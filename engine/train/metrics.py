"""Where training metrics go: a JSONL file, TensorBoard when installed, a progress bar.

Only the main rank writes; every rank may call (the others are no-ops).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, out_dir: str | Path, *, enabled: bool, total_steps: int, progress: bool,
                 initial_step: int = 0, on_record=None):
        self.enabled = enabled
        self.on_record = on_record
        self._file = self._tb = self._bar = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
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
