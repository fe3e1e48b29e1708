"""Pre-emption handling: SIGTERM/SIGUSR1 only set a flag; ranks agree on it at step boundaries.

A handler that checkpointed or exited directly would leave the other ranks hung in a collective. Instead
the loop calls ``StopSignal.agreed()`` once per optimizer step (one all-reduce); when any rank got a
signal, every rank sees True at the same step, all checkpoint together and exit with
``EXIT_REQUEUE`` (75, EX_TEMPFAIL: "checkpointed after a signal, requeue me").
"""

from __future__ import annotations

import signal
from types import FrameType

from dskd_scale.engine.distributed import any_rank

EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """Install with ``install()``; ``received`` is local, ``agreed()`` is the collective decision."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def install(self) -> StopSignal:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self) -> bool:
        """True on every rank iff some rank received a stop signal (one all-reduce; call it on all ranks)."""
        return any_rank(self.received is not None)
