"""Stop cleanly on SIGTERM (maintenance events, spot preemption): finish the step, save, exit 0.

On one host a signal handler raises a flag that the loop reads after each step. On several hosts
every host must stop at the *same* step, so the decision goes through JAX's preemption sync
point (the coordinator agrees a step once any host got the notice) when it is available.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging


class PreemptionGuard:
    """Context manager: `guard.should_stop(step)` is True once a stop was requested."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._signals = signals
        self._requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "PreemptionGuard":
        # With several processes JAX's preemption service owns SIGTERM; replacing its handler
        # would leave the other hosts waiting at a collective.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        logging.warning("received signal %d: stopping after this step with a checkpoint", signum)
        self._requested = True

    def request(self) -> None:
        """Ask for a stop as a signal would (tests, or a caller with its own notice)."""
        self._requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    return True
            except RuntimeError:  # no preemption service in this runtime: local notice only
                pass
        return self._requested
