"""SIGTERM, what cloud TPUs send before a preemption, as "save and stop after this step"."""

from __future__ import annotations

import signal

import jax


class PreemptionGuard:
    """Turns SIGTERM into a request to stop that the loop reads after every step.

    The pipeline runner holds one guard for all its stages, so a request made during one stage
    also keeps the later ones from starting. With several processes, JAX's own preemption service
    decides, so that all hosts stop at the same step
    (`multihost_utils.reached_preemption_sync_point`).
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._depth = 0
        self._polls = 0

    def __enter__(self):
        self._depth += 1
        if self._depth == 1 and jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0 and self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def poll(self) -> bool:
        """`should_stop` for loops that count no steps of their own (the batches of evaluation
        and sampling): each call is one more step. With several processes every process must
        call it at the same points of the same work, so that all stop after the same batch."""
        self._polls += 1
        return self.should_stop(self._polls)
