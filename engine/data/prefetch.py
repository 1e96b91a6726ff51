"""Build batches ahead of the training step in a background thread.

    for batch in Prefetcher(iter(stream), depth=2, pin=device.type == "cuda"):
        ...   # batch.reader_state: the reader's position after this very batch

Reading shards and laying out a batch (Arrow take, numpy) release the GIL for most of
their work, so one thread keeps the next batches ready while the step runs. The reader
runs ahead of the step, so the position a checkpoint must save is the one each batch
carries (``Batch.reader_state``), never the reader's own. An error in the thread is raised
in the consumer, at the batch where it happened; ``close`` stops the thread.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

from rankpm.engine.data.schema import Batch

_DONE = object()


class Prefetcher:
    def __init__(self, batches: Iterator[Batch], *, depth: int = 2, pin: bool = False):
        if depth < 1:
            raise ValueError(f"depth={depth}: expected >= 1")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(batches, pin), name="rankpm-prefetch", daemon=True)
        self._thread.start()

    def _run(self, batches: Iterator[Batch], pin: bool) -> None:
        try:
            for batch in batches:
                if pin:
                    batch = batch.pin_memory()
                if not self._put(batch):
                    return
            self._put(_DONE)
        except BaseException as err:  # handed to the consumer, raised there
            self._put(err)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Batch:
        item = self._queue.get()
        if item is _DONE:
            self._queue.put(_DONE)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
