"""SIGTERM and SIGINT as an ``asyncio.Event``: how a long command learns it should wind down.

Kubernetes stops a pod with SIGTERM and, ``terminationGracePeriodSeconds`` later, SIGKILL. A
worker or follower that lets SIGTERM kill it at once throws away the batches it has embedded
(and paid for) but not yet written; one that sets an event instead stops taking new batches and
writes those first.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest(asyncio.Event):
    """Set by the first stop signal; ``signum`` says which (None until then)."""

    signum: signal.Signals | None = None

    def receive(self, signum: signal.Signals) -> None:
        self.signum = self.signum or signum
        self.set()

    @property
    def exit_code(self) -> int:
        """The shell's code for a process the signal ended: 128 + its number (143 for SIGTERM)."""
        return 128 + int(self.signum or signal.SIGTERM)


@contextlib.asynccontextmanager
async def stop_on_signals() -> AsyncIterator[StopRequest]:
    """An event set by SIGTERM or SIGINT while the block runs (handlers removed after it).

    Off the main thread (no handlers can be installed there) the event is never set.
    """
    stop = StopRequest()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    try:
        for signum in STOP_SIGNALS:
            try:
                loop.add_signal_handler(signum, stop.receive, signum)
                installed.append(signum)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        yield stop
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
