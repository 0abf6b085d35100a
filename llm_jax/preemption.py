"""SIGTERM handling: finish the current step, save, wait until durable, exit 75.

On multi-host jobs every process must save at the same step, so the decision goes
through JAX's preemption sync point (all hosts agree on the first step at which any of
them was notified).
"""
from __future__ import annotations

import signal
import threading

import jax

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the job is incomplete but safe to restart


class Preempted(RuntimeError):
    """The run stopped after saving a checkpoint because it was asked to."""


class Watcher:
    """Context manager that turns SIGTERM into a flag checked once per step."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def __enter__(self) -> "Watcher":
        # Multi-process jobs leave SIGTERM to JAX's preemption notifier (see should_stop).
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self._event.set()

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            try:  # the service exists when jax.distributed was initialized
                if multihost_utils.reached_preemption_sync_point(step):
                    return True
            except RuntimeError:
                pass
        return self._event.is_set()
