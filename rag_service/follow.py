"""``embedshift migrate follow``: keep the side table current while the application writes.

From Migrating on, the application keeps inserting and re-wording documents; the trigger that
``setup`` installed queues each changed id and notifies ``FOLLOW_CHANNEL`` with the side table's
name as payload. The follower drains that queue with the worker's own catch-up
(:meth:`rag_service.migrate.Worker.catch_up`: the same hash guard, status rows and ``(id, seq)``
deletion as ``migrate run``), then sleeps until a notification for its target, the next sweep or
a stop, whichever comes first:

- **LISTEN** makes a committed change reach the side table in well under a second.
- **the periodic sweep** (every ``sweep_seconds``) drains whatever a notification did not
  announce: one lost with a dropped connection, or a queue entry written without the trigger.
- **the lag** is :func:`rag_service.progress.oldest_pending_seconds` (the age of the oldest queued
  change), reported by ``migrate status --json`` as ``oldestPendingSeconds``.

One follower per target drains at a time: each holds the advisory lock ``embedshift:<target>:
follow`` for as long as it runs (see :func:`rag_service.migrate.lock_key`). A second one **stands
by** instead of failing: it retries the lock every few seconds and takes over when the first one
exits or dies. A Deployment's rolling update starts the new pod before the old one stops; a
follower that failed on the busy lock would crash-loop and come back only after Kubernetes'
growing restart delay, while a standby takes over within seconds. Running the two side by side
would not be wrong, only wasteful: the catch-up is safe under concurrency.

A lost database connection (an unreachable server, a restart, a failover) is logged as one line
without the connection string's secrets and retried with capped exponential backoff; errors a
retry cannot fix (setup not run, a side table that holds another embedding identity's vectors,
budget exceeded, an embedding API that keeps failing) end the follower with an EmbedshiftError,
so the CLI exits non-zero and its supervisor restarts it.

The command line (wired by the CLI package; this module parses no flags)::

    embedshift migrate follow [the spec flags of `migrate run`: --config, --database-url,
                               --table, --target, --migration, --price, --halfvec, ...]
                              [--sweep-seconds 30] [--batch-size N] [--concurrency N] [--json]

    --sweep-seconds  seconds between sweeps when no notification came (float > 0, default 30)
    --batch-size     rows per transaction (default spec.migration.batchSize, 100)
    --concurrency    batches embedding at once (default spec.migration.concurrency, 4)
    --json           JSON lines on stdout (``started``, one ``batch`` per commit, ``finished``)
                     instead of log lines on stderr

and its handler is::

    spec, migration, url, prices = resolve(args)
    return await follow_command(url, spec, migration=migration, prices=prices,
                                sweep_seconds=args.sweep_seconds, batch_size=args.batch_size,
                                concurrency=args.concurrency, json_lines=args.json)

It runs until SIGTERM or SIGINT, finishes the batch in flight and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import psycopg
from psycopg import sql

from rag_service.errors import ConfigError, DatabaseUnavailable, WorkerBusy
from rag_service.migrate import (
    ProgressSink,
    RunOptions,
    RunReport,
    Worker,
    worker_session,
)
from rag_service.progress import count_rows, fold_batch_rows
from rag_service.providers import api_key_from_env, make_provider
from rag_service.providers.base import EmbeddingProvider
from rag_service.providers.pricing import PriceTable
from rag_service.schema import FOLLOW_CHANNEL, connect
from rag_service.signals import stop_on_signals
from rag_service.spec import DataPlaneSpec

log = logging.getLogger(__name__)

DEFAULT_SWEEP_SECONDS = 30.0
_BACKOFF_FIRST_SECONDS = 0.5
_BACKOFF_MAX_SECONDS = 30.0
# Between two folds of the batch rows (rag_service.progress.fold_batch_rows).
FOLD_EVERY_SECONDS = 600.0
# A standby retries the lock this often (or every sweep, if sweeps are more frequent).
_STANDBY_POLL_SECONDS = 5.0


@dataclass(frozen=True)
class FollowReport:
    """What one follower did between its start and its stop."""

    target: str
    embedded: int  # rows whose vector was stored
    settled_from_queue: int  # queue entries served (embedded, refreshed, or gone)
    tokens: int
    cost_usd: float
    passes: int  # drains of the queue: one per wake-up (start, notification, sweep)
    reconnects: int  # sessions lost to the database and opened again
    seconds: float


async def follow_changes(
    url: str,
    spec: DataPlaneSpec,
    *,
    provider: EmbeddingProvider,
    migration: str,
    prices: PriceTable | None = None,
    stop: asyncio.Event,
    sweep_seconds: float = DEFAULT_SWEEP_SECONDS,
    batch_size: int | None = None,
    concurrency: int | None = None,
    progress: ProgressSink | None = None,
) -> FollowReport:
    """Drain ``spec``'s change queue as it fills until ``stop`` is set; see the module docstring.

    ``batch_size``/``concurrency`` default to ``spec.migration``'s; its ``categories`` and
    ``budgetUSD`` apply as they do to ``migrate run``. When ``stop`` is set, the batches already
    embedding are written (each commits whole or not at all) and nothing more is started.
    Raises EmbedshiftError for what retrying cannot fix; never for a lost connection.
    """
    if not sweep_seconds > 0:
        raise ConfigError(f"--sweep-seconds: must be more than 0, not {sweep_seconds}")
    options = RunOptions(
        categories=tuple(spec.migration.categories),
        batch_size=batch_size or spec.migration.batch_size,
        concurrency=concurrency or spec.migration.concurrency,
        budget_usd=spec.migration.budget_usd,
    )
    follower = _Follower(
        url=url,
        spec=spec,
        provider=provider,
        migration=migration,
        prices=prices or PriceTable(),
        options=options,
        stop=stop,
        sweep_seconds=sweep_seconds,
        progress=progress,
    )
    return await follower.run()


async def follow_command(
    url: str,
    spec: DataPlaneSpec,
    *,
    migration: str,
    prices: PriceTable | None = None,
    sweep_seconds: float = DEFAULT_SWEEP_SECONDS,
    batch_size: int | None = None,
    concurrency: int | None = None,
    json_lines: bool = False,
    stdout: TextIO | None = None,
) -> int:
    """``embedshift migrate follow``: follow until SIGTERM/SIGINT, then return exit code 0.

    Builds the target provider from the environment as ``migrate run`` does, but without
    ``bulk``: the follower embeds what changed, mostly small batches, and no worker process
    means a signal reaches exactly one process (the pod's PID 1), with nothing to clean up.
    """
    from rag_service.terminal import JsonLinesProgress  # rich: only when a sink is wanted

    prices = prices or PriceTable()
    async with stop_on_signals() as stop:
        provider = make_provider(
            spec.target,
            api_key=api_key_from_env(spec.target, "target"),
            prices=prices,
            concurrency=concurrency or spec.migration.concurrency,
        )
        try:
            report = await follow_changes(
                url,
                spec,
                provider=provider,
                migration=migration,
                prices=prices,
                stop=stop,
                sweep_seconds=sweep_seconds,
                batch_size=batch_size,
                concurrency=concurrency,
                progress=(
                    JsonLinesProgress(
                        stdout or sys.stdout,
                        priced=prices.knows(spec.target),
                    )
                    if json_lines
                    else None
                ),
            )
        finally:
            await provider.aclose()
    log.info(
        "follow: stopped after %.0fs: %d rows embedded, %d queued changes settled, %d passes, "
        "%d reconnects, %d tokens, $%.4f",
        report.seconds,
        report.embedded,
        report.settled_from_queue,
        report.passes,
        report.reconnects,
        report.tokens,
        report.cost_usd,
    )
    return 0


class _Follower:
    """The state of one ``follow_changes`` call across its database sessions."""

    def __init__(
        self,
        *,
        url: str,
        spec: DataPlaneSpec,
        provider: EmbeddingProvider,
        migration: str,
        prices: PriceTable,
        options: RunOptions,
        stop: asyncio.Event,
        sweep_seconds: float,
        progress: ProgressSink | None,
    ) -> None:
        self.url = url
        self.spec = spec
        self.provider = provider
        self.migration = migration
        self.prices = prices
        self.options = options
        self.stop = stop
        self.sweep_seconds = sweep_seconds
        self.progress = progress
        self.totals = RunReport(target=spec.target.descriptor)
        self.passes = 0
        self.reconnects = 0
        self._announced = False
        self._folded_at: float | None = None  # time.monotonic() of the last fold

    async def run(self) -> FollowReport:
        started = time.monotonic()
        delay = _BACKOFF_FIRST_SECONDS
        standing_by = False
        poll = min(_STANDBY_POLL_SECONDS, self.sweep_seconds)
        while not self.stop.is_set():
            passes_before = self.passes
            try:
                async with worker_session(
                    self.url,
                    self.spec,
                    provider=self.provider,
                    options=self.options,
                    migration=self.migration,
                    prices=self.prices,
                    progress=self.progress,
                    role="follow",
                ) as worker:
                    if standing_by:
                        log.info("follow: the follower lock is free; taking over")
                        standing_by = False
                    try:
                        await self._session(worker)
                    finally:
                        self._add(worker.report)
            except WorkerBusy as exc:
                if not standing_by:
                    log.info("follow: %s; standing by, retrying every %gs", exc, poll)
                    standing_by = True
                await _sleep_or_stop(self.stop, poll)
            except DatabaseUnavailable as exc:
                if self.passes > passes_before:
                    delay = _BACKOFF_FIRST_SECONDS  # that session worked: a new outage
                self.reconnects += 1
                wait = delay * random.uniform(0.5, 1.0)
                # The messages name host, port and database at most, never the password.
                log.warning("follow: database unavailable (%s); reconnecting in %.1fs", exc, wait)
                await _sleep_or_stop(self.stop, wait)
                delay = min(delay * 2, _BACKOFF_MAX_SECONDS)
        totals = self.totals
        totals.seconds = time.monotonic() - started
        totals.stopped_by = "stop"
        if self.progress is not None:
            self.progress.finished(totals)
        return FollowReport(
            target=totals.target,
            embedded=totals.embedded,
            settled_from_queue=totals.settled_from_queue,
            tokens=totals.tokens,
            cost_usd=totals.cost_usd,
            passes=self.passes,
            reconnects=self.reconnects,
            seconds=totals.seconds,
        )

    async def _session(self, worker: Worker) -> None:
        """Listen, then drain and wait in turn until ``stop``; raises when a connection is lost."""
        target = str(worker.layout.target)
        listener = await connect(self.url, autocommit=True)
        try:
            # LISTEN before the first drain: a change committed in between is then either
            # drained or announced, never neither.
            await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(FOLLOW_CHANNEL)))
            wake = asyncio.Event()
            listening = asyncio.create_task(_listen(listener, target, wake))
            try:
                if not self._announced:
                    self._announce(target, await count_rows(worker.reader, worker.layout.queue))
                while not self.stop.is_set():
                    # Cleared before the drain, so a change committed during it wakes the next.
                    wake.clear()
                    await self._drain(worker)
                    if self.stop.is_set():
                        break
                    await self._fold(worker)
                    await self._wait(wake, listening)
            finally:
                listening.cancel()
                with contextlib.suppress(asyncio.CancelledError, psycopg.Error):
                    await listening
        finally:
            await listener.close()

    def _announce(self, target: str, queued: int) -> None:
        self._announced = True
        log.info(
            "follow: following %s (%d queued changes; sweep every %gs)",
            target,
            queued,
            self.sweep_seconds,
        )
        if self.progress is not None:
            self.progress.started(total=queued, target=self.totals.target, phase="catchup")

    async def _drain(self, worker: Worker) -> None:
        report = worker.report
        embedded, settled, began = report.embedded, report.settled_from_queue, time.monotonic()
        await worker.catch_up(self.stop)
        self.passes += 1
        if report.settled_from_queue > settled:
            log.info(
                "follow: %d rows embedded, %d queued changes settled in %.2fs",
                report.embedded - embedded,
                report.settled_from_queue - settled,
                time.monotonic() - began,
            )

    async def _fold(self, worker: Worker) -> None:
        """Every ``FOLD_EVERY_SECONDS`` (and once a session starts), fold the target's batch rows
        of more than an hour ago: the follower is the one part that runs for the whole two weeks
        and writes a row per batch all along."""
        now = time.monotonic()
        if self._folded_at is not None and now - self._folded_at < FOLD_EVERY_SECONDS:
            return
        self._folded_at = now
        await fold_batch_rows(worker.writer, worker.layout)

    async def _wait(self, wake: asyncio.Event, listening: asyncio.Task[None]) -> None:
        """Until a notification for this target, the next sweep, or ``stop``."""
        waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(self.stop.wait())]
        try:
            await asyncio.wait(
                [*waiters, listening],
                timeout=self.sweep_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        if listening.done():
            listening.result()  # the connection's error, if it was lost
            raise DatabaseUnavailable("the LISTEN connection ended")

    def _add(self, report: RunReport) -> None:
        totals = self.totals
        totals.embedded += report.embedded
        totals.changed_while_embedding += report.changed_while_embedding
        totals.settled_from_queue += report.settled_from_queue
        totals.tokens += report.tokens
        totals.cost_usd += report.cost_usd
        totals.batches += report.batches


async def _listen(conn: psycopg.AsyncConnection[Any], target: str, wake: asyncio.Event) -> None:
    """Set ``wake`` on every notification for ``target``; others are for other targets."""
    async for note in conn.notifies():
        if note.payload == target:
            wake.set()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
