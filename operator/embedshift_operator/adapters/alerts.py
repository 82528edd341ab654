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

**Namespaces.** One Alertmanager usually serves every team, so the token alone does not say whose
rule fired. An alert is accepted for ``ns/name`` only when its ``namespace`` label is ``ns``: the
label the Prometheus Operator forces onto the alerts of a namespace's own PrometheusRules
(``enforcedNamespaceLabel``), so a rule in one namespace cannot roll back a migration in another.
``trust_across_namespaces`` (``operator run --trust-alerts-across-namespaces``) turns the check
off, for one team's cluster or rules that carry no ``namespace`` label.

**Bounded state.** Alerts are held only for the migrations the operator serves: those whose loop
called :meth:`subscribe` and has not called :meth:`forget`; alerts for any other are ignored
(Alertmanager re-sends a firing alert, so one that arrives before its loop starts is held at the
next re-send). At most
``max_firing`` firing alerts are held in all: past it, the oldest alert of the migration holding
the most is dropped, so a flood for one migration cannot evict another's only alert. Every alert
refused or dropped is counted by reason (:data:`REFUSALS`; ``embedshift_operator_alerts_refused
_total`` with a registry) and logged in one line per request, never one per alert.

The receiver must run on the event loop of its subscribers (:class:`asyncio.Event` is not
thread-safe). The token and the ``Authorization`` header are never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as MetricCounter

from rag_service.alerts import Alert, AlertStatus, check_bearer, is_emergency, parse_alerts

__all__ = [
    "DEFAULT_MAX_FIRING",
    "DEFAULT_TTL",
    "PATH",
    "REFUSALS",
    "AlertReceiver",
    "in_own_namespace",
    "targets",
]

log = logging.getLogger(__name__)

PATH = "/alerts"
# Seconds a firing alert is held without being received again (see the module's docstring).
DEFAULT_TTL = 300.0
# Firing alerts held in all, over every migration served (see the module's docstring).
DEFAULT_MAX_FIRING = 10_000
# Why an alert for a migration was not held: its namespace label names another namespace; the
# operator serves no such migration; it was dropped to stay within ``max_firing``.
REFUSALS = ("namespace", "unserved", "capacity")
_EXAMPLES = 3  # alerts named in a refusal's log line
_SHOWN = 80  # characters of a label value in a log line

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


def in_own_namespace(migration: str, labels: Mapping[str, str]) -> bool:
    """Whether an alert with ``labels`` comes from ``migration``'s namespace: its ``namespace``
    label is the migration's. Pure."""
    return labels.get("namespace", "").strip() == migration.partition("/")[0]


class AlertReceiver:
    """Alertmanager's webhook receiver: which emergencies fire for which migration.

    ``token``: the bearer token senders must present (401 without one, 403 with another);
    ``None`` accepts every sender (only behind a NetworkPolicy); an empty token is refused, as
    an unset Secret key must not open the endpoint. ``clock``: monotonic seconds (tests inject
    one). ``ttl``: seconds a firing alert is held without a re-send. ``trust_across_namespaces``:
    accept an alert for a migration whatever its ``namespace`` label says. ``max_firing``: firing
    alerts held in all. ``registry``: where the refusal counter and the held gauge live.
    """

    def __init__(
        self,
        *,
        token: str | None,
        clock: Callable[[], float] = time.monotonic,
        ttl: float = DEFAULT_TTL,
        trust_across_namespaces: bool = False,
        max_firing: int = DEFAULT_MAX_FIRING,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if token is not None and not token.strip():
            raise ValueError("token is empty: pass None to accept unauthenticated alerts")
        if ttl <= 0:
            raise ValueError(f"ttl must be positive; got {ttl}")
        if max_firing < 1:
            raise ValueError(f"max_firing must be at least 1; got {max_firing}")
        self._token = token
        self._clock = clock
        self._ttl = ttl
        self._trust = trust_across_namespaces
        self._max = max_firing
        # Served migrations only; each one's alerts oldest first (a re-send moves one to the end).
        self._firing: dict[str, dict[_Key, _Firing]] = {}
        self._held = 0
        self._events: dict[str, asyncio.Event] = {}
        self._refused: Counter[str] = Counter({reason: 0 for reason in REFUSALS})
        self._runner: web.AppRunner | None = None
        self._metric: MetricCounter | None = None
        if registry is not None:
            self._metric = MetricCounter(
                "embedshift_operator_alerts_refused_total",
                "Alerts for a migration the receiver did not hold, by reason: namespace (the "
                "alert's namespace label is not the migration's), unserved (no such migration "
                "is served), capacity (dropped past the cap of firing alerts held).",
                ["reason"],
                registry=registry,
            )
            for reason in REFUSALS:
                self._metric.labels(reason)
            held = Gauge(
                "embedshift_operator_alerts_held",
                "Firing alerts the receiver holds, over every migration served.",
                registry=registry,
            )
            held.set_function(lambda: self._held)

    def __repr__(self) -> str:  # never the token
        return (
            f"AlertReceiver(auth={self._token is not None}, ttl={self._ttl:g}, "
            f"trust_across_namespaces={self._trust}, max_firing={self._max})"
        )

    # ---- what the drivers read ------------------------------------------------------------------

    def firing(self, migration: str) -> tuple[str, ...]:
        """The names of the emergencies firing for ``migration``, sorted, without duplicates."""
        alerts = self._firing.get(migration)
        if not alerts:
            return ()
        now = self._clock()
        for key in [k for k, a in alerts.items() if a.expires <= now]:
            log.info("alert %s for %s expired after %gs", alerts[key].name, migration, self._ttl)
            self._drop(migration, key)
        return tuple(sorted({a.name for a in alerts.values()}))

    @property
    def held(self) -> int:
        """Firing alerts held, over every migration served (expired ones until next read)."""
        return self._held

    @property
    def refused(self) -> Mapping[str, int]:
        """Alerts for a migration not held since start, by reason (:data:`REFUSALS`)."""
        return dict(self._refused)

    def subscribe(self, migration: str) -> asyncio.Event:
        """Serve ``migration``: hold its alerts from now on. Returns the event set when one is
        received (the same one each call).

        The resource's loop waits on it between ticks and clears it before reading
        :meth:`firing`.
        """
        self._firing.setdefault(migration, {})
        return self._events.setdefault(migration, asyncio.Event())

    def forget(self, migration: str) -> None:
        """Stop serving ``migration``: drop its alerts and event (its resource is gone)."""
        self._held -= len(self._firing.pop(migration, {}))
        self._events.pop(migration, None)

    def receive(self, alerts: Iterable[Alert]) -> list[str]:
        """Apply parsed alerts; the migrations they targeted, sorted. Wakes their subscribers."""
        now = self._clock()
        touched: set[str] = set()
        refused: dict[str, list[str]] = {reason: [] for reason in REFUSALS}
        untargeted: list[str] = []
        for alert in alerts:
            labels = dict(alert.labels)
            named = targets(labels)
            aimed = []
            for migration in sorted(named):
                if not self._trust and not in_own_namespace(migration, labels):
                    refused["namespace"].append(_example(alert, migration, labels))
                elif migration not in self._firing:
                    refused["unserved"].append(_example(alert, migration, labels))
                else:
                    aimed.append(migration)
            emergency = is_emergency(alert)
            ignored = alert.status is AlertStatus.FIRING and not emergency
            if not named:
                untargeted.append(_one_line(alert.type[:_SHOWN]))
            elif aimed:
                log.info(
                    "alert %s %s for %s%s",
                    alert.type,
                    alert.status.value,
                    ", ".join(aimed),
                    f" (severity {alert.severity}: not an emergency, ignored)" if ignored else "",
                )
            for migration in aimed:
                held = self._firing[migration]
                if emergency:
                    if held.pop(alert.labels, None) is None:
                        self._make_room(refused["capacity"])
                        self._held += 1
                    held[alert.labels] = _Firing(alert.type, now + self._ttl)
                elif alert.status is AlertStatus.RESOLVED:
                    if held.pop(alert.labels, None) is not None:
                        self._held -= 1
                else:
                    continue
                touched.add(migration)
        self._count(refused)
        if untargeted:
            shown = ", ".join(untargeted[:_EXAMPLES]) + (
                ", …" if len(untargeted) > _EXAMPLES else ""
            )
            log.info("%d alert(s) name no migration, none acted on (%s)", len(untargeted), shown)
        for migration in touched:
            event = self._events.get(migration)
            if event is not None:
                event.set()
        return sorted(touched)

    def _drop(self, migration: str, key: _Key) -> None:
        if self._firing[migration].pop(key, None) is not None:
            self._held -= 1

    def _make_room(self, dropped: list[str]) -> None:
        """Before one more alert is held at the cap: drop the expired, then the oldest alert of
        the migration holding the most."""
        if self._held < self._max:
            return
        for migration in list(self._firing):
            self.firing(migration)  # drops its expired alerts
        while self._held >= self._max:
            fullest = max(self._firing, key=lambda m: len(self._firing[m]))
            alerts = self._firing[fullest]
            oldest = next(iter(alerts))
            dropped.append(f"{alerts[oldest].name} for {fullest}")
            self._drop(fullest, oldest)

    def _count(self, refused: Mapping[str, list[str]]) -> None:
        """Count and log (one line per reason) the alerts this request could not place."""
        for reason, examples in refused.items():
            if not examples:
                continue
            self._refused[reason] += len(examples)
            if self._metric is not None:
                self._metric.labels(reason).inc(len(examples))
            shown = "; ".join(examples[:_EXAMPLES]) + ("; …" if len(examples) > _EXAMPLES else "")
            if reason == "namespace":
                log.warning(
                    "refused %d alert(s) for a migration outside the namespace their namespace "
                    "label names (%s): a rule in one namespace cannot roll back a migration in "
                    "another unless the operator runs with --trust-alerts-across-namespaces",
                    len(examples),
                    shown,
                )
            elif reason == "unserved":
                log.info(
                    "ignored %d alert(s) for migrations this operator does not serve (%s)",
                    len(examples),
                    shown,
                )
            else:
                log.warning(
                    "dropped %d held alert(s) to stay within %d firing alerts (%s)",
                    len(examples),
                    self._max,
                    shown,
                )

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
        before = sum(self._refused[reason] for reason in ("namespace", "unserved"))
        migrations = self.receive(received)
        refused = sum(self._refused[reason] for reason in ("namespace", "unserved")) - before
        return web.json_response(
            {"accepted": len(received), "migrations": migrations, "refused": refused}
        )


def _error(status: int, message: str, *, headers: Mapping[str, str] | None = None) -> web.Response:
    # One line: a multi-line parse message would split the sender's log entry.
    line = " ".join(message.split())
    return web.json_response({"error": line}, status=status, headers=headers)


def _example(alert: Alert, migration: str, labels: Mapping[str, str]) -> str:
    """``alertname for ns/name (namespace label: …)`` for a log line: sender-chosen text,
    shortened and on one line."""
    where = labels.get("namespace")
    label = "none" if where is None else repr(where[:_SHOWN])
    return _one_line(
        f"{alert.type[:_SHOWN]} for {migration[: 2 * _SHOWN]} (namespace label {label})"
    )


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)
