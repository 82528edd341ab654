"""The operator's alert receiver: Alertmanager's webhook in, per-migration firing alerts out.

``POST /alerts`` takes Alertmanager's webhook payload (and the guide's JSON, which carries no
labels and so targets no migration); the body is parsed, the bearer token checked and the
emergency rule applied by :mod:`rag_service.alerts`, the one place for each of those facts::

    receiver = AlertReceiver(token=token)
    await receiver.start("0.0.0.0", 8081)
    woken = receiver.subscribe("default/docs")      # the resource's loop waits on it
    ...  Observations(alerts=receiver.firing("default/docs"))

An alert targets a migration ("namespace/name") when its labels carry ``migration="ns/name"``
(the contract's metric label, which a Prometheus rule keeps by default) or both ``namespace``
and ``embeddingmigration``. Only emergencies count (:func:`rag_service.alerts.is_emergency`:
critical and firing), as on rag_service's webhook: a warning labelled with a migration is logged,
never a rollback. ``status: resolved`` removes an alert; a firing one expires ``ttl`` seconds
after it was last received, so a lost "resolved" cannot pin a migration at 0 % forever.

Alertmanager re-sends a firing alert every ``repeat_interval`` of its route (checked each
``group_interval``), so the route to this receiver should re-send well within ``ttl``: with the
default ttl of 5 minutes, ``group_interval: 1m`` and ``repeat_interval: 2m`` survive one lost
re-send. Longer would hold a migration whose "resolved" was lost; shorter would forget an alert
still firing (it only matters if a retry is committed in that gap, and the rollback thresholds
still judge v2 then).

The receiver must run on the event loop of its subscribers (:class:`asyncio.Event` is not
thread-safe). The token and the ``Authorization`` header are never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from rag_service.alerts import Alert, AlertStatus, check_bearer, is_emergency, parse_alerts

__all__ = ["DEFAULT_TTL", "PATH", "AlertReceiver", "targets"]

log = logging.getLogger(__name__)

PATH = "/alerts"
# Seconds a firing alert is held without being received again (see the module's docstring).
DEFAULT_TTL = 300.0

_Key = tuple[tuple[str, str], ...]  # an alert's identity: its sorted labels, as Alertmanager's


@dataclass(frozen=True)
class _Firing:
    name: str
    expires: float  # on the receiver's clock


def targets(labels: Mapping[str, str]) -> frozenset[str]:
    """The migrations ("namespace/name") an alert with ``labels`` targets. Pure."""
    found = set()
    migration = labels.get("migration", "").strip()
    namespace, _, name = migration.partition("/")
    if namespace and name and "/" not in name:
        found.add(migration)
    namespace = labels.get("namespace", "").strip()
    name = labels.get("embeddingmigration", "").strip()
    if namespace and name:
        found.add(f"{namespace}/{name}")
    return frozenset(found)


class AlertReceiver:
    """Alertmanager's webhook receiver: which emergencies fire for which migration.

    ``token``: the bearer token senders must present (401 without one, 403 with another);
    ``None`` accepts every sender (only behind a NetworkPolicy); an empty token is refused, as
    an unset Secret key must not open the endpoint. ``clock``: monotonic seconds (tests inject
    one). ``ttl``: seconds a firing alert is held without a re-send.
    """

    def __init__(
        self,
        *,
        token: str | None,
        clock: Callable[[], float] = time.monotonic,
        ttl: float = DEFAULT_TTL,
    ) -> None:
        if token is not None and not token.strip():
            raise ValueError("token is empty: pass None to accept unauthenticated alerts")
        if ttl <= 0:
            raise ValueError(f"ttl must be positive; got {ttl}")
        self._token = token
        self._clock = clock
        self._ttl = ttl
        self._firing: dict[str, dict[_Key, _Firing]] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:  # never the token
        return f"AlertReceiver(auth={self._token is not None}, ttl={self._ttl:g})"

    # ---- what the drivers read ------------------------------------------------------------------

    def firing(self, migration: str) -> tuple[str, ...]:
        """The names of the emergencies firing for ``migration``, sorted, without duplicates."""
        alerts = self._firing.get(migration)
        if not alerts:
            return ()
        now = self._clock()
        for key in [k for k, a in alerts.items() if a.expires <= now]:
            log.info("alert %s for %s expired after %gs", alerts[key].name, migration, self._ttl)
            del alerts[key]
        return tuple(sorted({a.name for a in alerts.values()}))

    def subscribe(self, migration: str) -> asyncio.Event:
        """The event set when an alert for ``migration`` is received (the same one each call).

        The resource's loop waits on it between ticks and clears it before reading
        :meth:`firing`.
        """
        return self._events.setdefault(migration, asyncio.Event())

    def forget(self, migration: str) -> None:
        """Drop ``migration``'s alerts and event (its resource is gone)."""
        self._firing.pop(migration, None)
        self._events.pop(migration, None)

    def receive(self, alerts: Iterable[Alert]) -> list[str]:
        """Apply parsed alerts; the migrations they targeted, sorted. Wakes their subscribers."""
        now = self._clock()
        touched: set[str] = set()
        for alert in alerts:
            labels = dict(alert.labels)
            aimed = sorted(targets(labels))
            emergency = is_emergency(alert)
            ignored = alert.status is AlertStatus.FIRING and not emergency
            log.info(
                "alert %s %s for %s%s",
                alert.type,
                alert.status.value,
                ", ".join(aimed) or "no migration",
                f" (severity {alert.severity}: not an emergency, ignored)" if ignored else "",
            )
            for migration in aimed:
                held = self._firing.setdefault(migration, {})
                if emergency:
                    held[alert.labels] = _Firing(alert.type, now + self._ttl)
                elif alert.status is AlertStatus.RESOLVED:
                    held.pop(alert.labels, None)
                else:
                    continue
                touched.add(migration)
        for migration in touched:
            event = self._events.get(migration)
            if event is not None:
                event.set()
        return sorted(touched)

    # ---- HTTP -----------------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application (``POST /alerts``) over this receiver's state."""
        app = web.Application()
        app.router.add_post(PATH, self._handle)
        return app

    async def start(self, host: str, port: int) -> None:
        """Serve :meth:`app` on ``host:port`` (0: a free port, see :attr:`port`)."""
        if self._runner is not None:
            raise RuntimeError("the alert receiver is already serving")
        runner = web.AppRunner(self.app())
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("alert receiver listening on %s", self.url)

    @property
    def port(self) -> int:
        """The port served on (after :meth:`start`)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the alert receiver is not serving")
        address = self._runner.addresses[0]
        return int(address[1])

    @property
    def url(self) -> str:
        """``http://host:port/alerts`` as served (after :meth:`start`)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the alert receiver is not serving")
        host = str(self._runner.addresses[0][0])
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}{PATH}"

    async def aclose(self) -> None:
        """Stop serving (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        if self._token is not None:
            verdict = check_bearer(request.headers.get("Authorization"), self._token)
            if verdict == "missing":
                return _error(
                    401,
                    "missing Authorization: Bearer token",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            if verdict == "wrong":
                return _error(403, "wrong token")
        try:
            payload = json.loads(await request.read())
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
            return _error(400, "body: not JSON")
        try:
            received = parse_alerts(payload, now=datetime.now(UTC))
        except ValueError as error:
            return _error(400, str(error))
        migrations = self.receive(received)
        return web.json_response({"accepted": len(received), "migrations": migrations})


def _error(status: int, message: str, *, headers: Mapping[str, str] | None = None) -> web.Response:
    # One line: a multi-line parse message would split the sender's log entry.
    line = " ".join(message.split())
    return web.json_response({"error": line}, status=status, headers=headers)
