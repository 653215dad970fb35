"""Builds the next batches in a background thread while the current step runs.

`Prefetcher(build, start, stop, depth)` calls `build(step)` for step = start, start + 1, ...,
stop - 1, in that order and never beyond, at most `depth` batches ahead of the consumer, and
hands them out through `get(step)`, which must ask for the steps in the same order. Batches are a
pure function of the step (batching.py), so prefetching changes when a batch is built, never what
it holds. depth 0 builds each batch in `get`, on the calling thread, as the loop did before.

An exception raised by `build` is re-raised by the `get` that asks for that step, with the
producer's traceback. `close()` (also on `with` exit) stops the thread promptly, even while it
waits on a full queue; a `build` already under way is finished first.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from absl import logging

_POLL_SECONDS = 0.05
_JOIN_SECONDS = 30.0


class Prefetcher:
    """`get(step)` for steps start..stop-1 in order; builds up to `depth` of them ahead in a daemon thread."""

    def __init__(self, build: Callable[[int], Any], start: int, stop: int, depth: int = 2):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self._build, self._next, self._stop_step, self.depth = build, start, stop, depth
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if depth and start < stop:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._produce, args=(start,), name="bixse-prefetch", daemon=True)
            self._thread.start()

    def _put(self, item: tuple) -> bool:
        """Waits for room in the queue; False once closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, start: int) -> None:
        for step in range(start, self._stop_step):
            if self._stop.is_set():
                return
            try:
                item = (step, self._build(step), None)
            except BaseException as e:  # pylint: disable=broad-except  # handed to the consumer
                self._put((step, None, e))
                return
            if not self._put(item):
                return

    def get(self, step: int) -> Any:
        """The batch of `step`, which must be the next one; re-raises a failure to build it."""
        if step != self._next or step >= self._stop_step:
            raise ValueError(f"asked for batch {step}; the next is {self._next} (of {self._stop_step})")
        if self._stop.is_set():
            raise RuntimeError("the prefetcher is closed")
        self._next += 1
        if self._thread is None:
            return self._build(step)
        while True:
            try:
                got, batch, error = self._queue.get(timeout=_POLL_SECONDS)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"the prefetch thread ended before building batch {step}") from None
        if error is not None:
            self.close()
            raise error
        assert got == step, (got, step)
        return batch

    def timed_get(self, step: int) -> tuple[Any, float]:
        """(get(step), seconds it waited): the host stall of this step."""
        tick = time.perf_counter()
        batch = self.get(step)
        return batch, time.perf_counter() - tick

    def close(self) -> None:
        """Stops the thread; drops batches built ahead. Idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        while True:  # free the queue's slots (and the device buffers they hold)
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        thread.join(_JOIN_SECONDS)
        if thread.is_alive():
            logging.warning("the prefetch thread is still building a batch after %.0f s; leaving it (daemon)",
                            _JOIN_SECONDS)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
