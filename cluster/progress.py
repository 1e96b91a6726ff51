"""The driver's view of a Ray run: one progress bar, an event log, and what happened on restarts.

Rank 0 writes OUT_DIR/metrics.jsonl itself (the run folder is on storage every node
sees); the rows it records are also relayed here, where they drive the single progress
bar (step, loss, pair accuracy, pairs/s, tokens/s). Worker starts and restarts go to the
log and to OUT_DIR/cluster_events.jsonl.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("rankpm.cluster")


class DriverProgress:
    def __init__(self, out_dir: Path, *, max_failures: int, show_bar: bool = True, on_record=None):
        self.out_dir = Path(out_dir)
        self.max_failures = max_failures
        self.show_bar = show_bar
        self.on_record = on_record
        self.attempt = -1  # a rank-0 "worker" row starts an attempt
        self.restarts = 0
        self.summaries: dict[int, dict] = {}  # run index -> rank 0's summary
        self.pids: dict[int, int] = {}
        self._bar = None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._events = open(self.out_dir / "cluster_events.jsonl", "a", encoding="utf-8")

    def consume(self, rows: list[dict]) -> None:
        for row in rows:
            kind = row.get("kind")
            if kind == "worker":
                self._worker(row)
            elif kind == "config":
                self._started(row)
            elif kind == "train":
                self._train(row)
            elif kind == "eval":
                log.info("step %d eval: %s", row["step"], _fmt(row, ("eval_accuracy", "eval_loss")))
            elif kind == "summary":
                self.summaries[row["run"]] = {k: v for k, v in row.items() if k not in ("kind", "run")}
            if self.on_record is not None and kind != "summary":
                self.on_record(row)

    def _event(self, **values) -> None:
        self._events.write(json.dumps({"time": round(time.time(), 3), **values}) + "\n")
        self._events.flush()

    def _worker(self, row: dict) -> None:
        if row["rank"] == 0:
            self.attempt += 1
            if self.attempt > 0:
                self.restarts += 1
                log.warning("a worker failed; Ray Train restarted the worker group (restart %d of at most %d); "
                            "the ranks resume from the latest checkpoint", self.restarts, self.max_failures)
                self._event(event="restart", restart=self.restarts, max_failures=self.max_failures)
        self.pids[row["rank"]] = row["pid"]
        log.info("rank %d/%d is pid %d on %s (attempt %d)", row["rank"], row["world_size"], row["pid"],
                 row["host"], max(self.attempt, 0))
        self._event(event="worker", attempt=max(self.attempt, 0), **{k: row[k] for k in ("rank", "pid", "host")})

    def _started(self, row: dict) -> None:
        step, total = row["step"], row["total_steps"]
        if step:
            log.info("attempt %d resumed from the checkpoint at step %d of %d", self.attempt, step, total)
        self._event(event="start", attempt=self.attempt, step=step, total_steps=total,
                    world_size=row.get("world_size"))
        if self.show_bar:
            from tqdm import tqdm
            if self._bar is None:
                self._bar = tqdm(total=total, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
            self._bar.n = step
            self._bar.refresh()

    def _train(self, row: dict) -> None:
        if self._bar is not None:
            self._bar.n = row["step"]
            self._bar.set_postfix({"loss": f"{row.get('loss', float('nan')):.4f}",
                                   "acc": f"{row.get('pair_accuracy', float('nan')):.3f}",
                                   "pairs/s": f"{row.get('pairs_per_s', 0):.0f}",
                                   "tok/s": f"{row.get('tokens_per_s', 0):.0f}"})
        else:
            log.info("step %d: %s", row["step"], _fmt(row, ("loss", "pair_accuracy", "pairs_per_s", "tokens_per_s")))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._events.close()


def _fmt(row: dict, keys) -> str:
    return ", ".join(f"{k}={row[k]:.4g}" for k in keys if isinstance(row.get(k), (int, float)))
