"""AlertReceiver: Alertmanager's webhook over real HTTP (aiohttp on a free port, httpx).

Payloads have the shape Alertmanager 0.2x sends (version 4, groupKey, alerts with labels,
annotations, startsAt, endsAt, status, generatorURL, fingerprint).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from embedshift_operator.adapters.alerts import (
    DEFAULT_MAX_FIRING,
    AlertReceiver,
    in_own_namespace,
    targets,
)

TOKEN = "s3cret-alert-token"
DOCS = "default/docs"
OTHER = "search/faq"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def alert(
    status: str = "firing",
    *,
    name: str = "EmbeddingV2HighErrorRate",
    severity: str = "critical",
    **labels: str,
) -> dict[str, Any]:
    if "embeddingmigration" not in labels:
        labels = {"migration": DOCS, **labels}
        # As the Prometheus Operator labels a namespace's own rules: their namespace.
        labels.setdefault("namespace", labels["migration"].partition("/")[0])
    return {
        "status": status,
        "labels": {"alertname": name, "severity": severity, "version": "v2", **labels},
        "annotations": {
            "summary": "v2 error rate above 10 %",
            "value": "0.23",
            "threshold": "0.1",
        },
        "startsAt": "2026-01-01T10:00:00.000Z",
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-01-01T10:05:00.000Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=...",
        "fingerprint": "b6f1e7c3a0d2f4e5",
    }


def webhook(*alerts: dict[str, Any]) -> dict[str, Any]:
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    common = alerts[0]["labels"] if alerts else {}
    return {
        "version": "4",
        "groupKey": '{}/{severity="critical"}:{alertname="EmbeddingV2HighErrorRate"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "embedshift-operator",
        "groupLabels": {"alertname": common.get("alertname", "")},
        "commonLabels": common,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts),
    }


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def receiver(clock: Clock) -> AsyncIterator[AlertReceiver]:
    receiver = AlertReceiver(token=TOKEN, clock=clock, ttl=300)
    receiver.subscribe(DOCS)  # the operator serves default/docs: its loop is running
    await receiver.start("127.0.0.1", 0)
    try:
        yield receiver
    finally:
        await receiver.aclose()


@pytest.fixture
async def client(receiver: AlertReceiver) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(headers=headers, timeout=5) as client:
        yield client


async def post(client: httpx.AsyncClient, receiver: AlertReceiver, body: Any) -> httpx.Response:
    return await client.post(receiver.url, json=body)


async def test_a_firing_alert_is_held_and_wakes_the_subscriber_at_once(
    receiver: AlertReceiver, client: httpx.AsyncClient
) -> None:
    woken = receiver.subscribe(DOCS)
    assert receiver.subscribe(DOCS) is woken
    assert receiver.firing(DOCS) == ()

    async def waiter() -> float:
        start = asyncio.get_running_loop().time()
        await asyncio.wait_for(woken.wait(), timeout=1.0)
        return asyncio.get_running_loop().time() - start

    waiting = asyncio.create_task(waiter())
    await asyncio.sleep(0)  # the waiter is waiting before the alert is sent
    response = await post(client, receiver, webhook(alert()))

    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 1, "migrations": [DOCS], "refused": 0}
    assert await waiting < 1.0
    assert receiver.firing(DOCS) == ("EmbeddingV2HighErrorRate",)


async def test_resolved_removes_the_alert(
    receiver: AlertReceiver, client: httpx.AsyncClient
) -> None:
    await post(client, receiver, webhook(alert(), alert(name="EmbeddingV2SlowSearch")))
    assert receiver.firing(DOCS) == ("EmbeddingV2HighErrorRate", "EmbeddingV2SlowSearch")
    woken = receiver.subscribe(DOCS)

    response = await post(client, receiver, webhook(alert("resolved")))

    assert response.status_code == 200, response.text
    assert woken.is_set()
    assert receiver.firing(DOCS) == ("EmbeddingV2SlowSearch",)
    await post(client, receiver, webhook(alert("resolved", name="EmbeddingV2SlowSearch")))
    assert receiver.firing(DOCS) == ()


async def test_the_same_alertname_with_other_labels_is_another_alert(
    receiver: AlertReceiver, client: httpx.AsyncClient
) -> None:
    await post(client, receiver, webhook(alert(pod="a"), alert(pod="b")))
    await post(client, receiver, webhook(alert("resolved", pod="a")))
    assert receiver.firing(DOCS) == ("EmbeddingV2HighErrorRate",)


async def test_a_firing_alert_expires_after_the_ttl_unless_re_sent(
    receiver: AlertReceiver, client: httpx.AsyncClient, clock: Clock
) -> None:
    await post(client, receiver, webhook(alert()))
    clock.now += 200
    await post(client, receiver, webhook(alert()))  # Alertmanager's repeat_interval re-send
    clock.now += 299
    assert receiver.firing(DOCS) == ("EmbeddingV2HighErrorRate",)
    clock.now += 1
    assert receiver.firing(DOCS) == ()


async def test_alerts_target_only_their_migration(
    receiver: AlertReceiver, client: httpx.AsyncClient
) -> None:
    other = receiver.subscribe(OTHER)
    response = await post(
        client, receiver, webhook(alert(namespace="default", embeddingmigration="docs"))
    )
    assert response.json()["migrations"] == [DOCS]
    assert receiver.firing(DOCS) == ("EmbeddingV2HighErrorRate",)
    assert receiver.firing(OTHER) == ()
    assert not other.is_set()

    await post(client, receiver, webhook(alert(migration=OTHER, name="FaqDown")))
    assert receiver.firing(OTHER) == ("FaqDown",)
    assert receiver.firing(DOCS) == ("EmbeddingV2HighErrorRate",)


async def test_only_emergencies_count_and_unlabelled_alerts_target_nothing(
    receiver: AlertReceiver, client: httpx.AsyncClient
) -> None:
    unlabelled = alert()
    del unlabelled["labels"]["migration"]
    guide = {"type": "error_rate", "severity": "critical", "value": 0.5, "threshold": 0.1}
    for body in (webhook(alert(severity="warning")), webhook(unlabelled), guide):
        response = await post(client, receiver, body)
        assert response.status_code == 200, response.text
    assert receiver.firing(DOCS) == ()


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({"migration": "default/docs"}, {"default/docs"}),
        ({"namespace": "default", "embeddingmigration": "docs"}, {"default/docs"}),
        ({"migration": "docs"}, set()),
        ({"migration": "a/b/c"}, set()),
        ({"namespace": "default"}, set()),
        ({"embeddingmigration": "docs"}, set()),
        ({}, set()),
    ],
)
def test_targets(labels: dict[str, str], expected: set[str]) -> None:
    assert targets(labels) == expected


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        pytest.param({}, 401, "missing Authorization: Bearer token", id="no-header"),
        pytest.param({"Authorization": "Basic abc"}, 401, "missing", id="other-scheme"),
        pytest.param({"Authorization": "Bearer nope"}, 403, "wrong token", id="wrong"),
    ],
)
async def test_a_token_is_required(
    receiver: AlertReceiver, headers: dict[str, str], status: int, message: str
) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.post(receiver.url, json=webhook(alert()), headers=headers)
    assert response.status_code == status
    assert message in response.json()["error"]
    assert "\n" not in response.text
    assert receiver.firing(DOCS) == ()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"{not json", "body: not JSON", id="malformed"),
        pytest.param(b"\xff\xfe", "body: not JSON", id="not-utf8"),
        pytest.param(b"[1, 2]", "payload: must be a JSON object; got an array", id="array"),
        pytest.param(
            b'{"version": "4", "alerts": [{"status": "firing", "labels": {}}]}',
            "alerts[0].labels.alertname: required",
            id="no-alertname",
        ),
    ],
)
async def test_a_bad_body_is_400_with_one_line(
    receiver: AlertReceiver, client: httpx.AsyncClient, body: bytes, message: str
) -> None:
    response = await client.post(
        receiver.url, content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json() == {"error": message}


async def test_without_a_token_every_sender_is_accepted(clock: Clock) -> None:
    receiver = AlertReceiver(token=None, clock=clock)
    receiver.subscribe(DOCS)
    await receiver.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(receiver.url, json=webhook(alert()))
        assert response.status_code == 200, response.text
        assert receiver.firing(DOCS) == ("EmbeddingV2HighErrorRate",)
    finally:
        await receiver.aclose()
    await receiver.aclose()  # idempotent


def test_an_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="token is empty"):
        AlertReceiver(token=" ")


async def test_each_accepted_alert_is_one_log_line_and_the_token_is_never_logged(
    receiver: AlertReceiver, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await post(client, receiver, webhook(alert(), alert(name="Low", severity="warning")))
    async with httpx.AsyncClient(timeout=5) as anonymous:
        await anonymous.post(receiver.url, json={}, headers={"Authorization": "Bearer guess"})

    lines = [r.getMessage() for r in caplog.records if r.name.startswith("embedshift")]
    assert f"alert EmbeddingV2HighErrorRate firing for {DOCS}" in lines
    assert f"alert Low firing for {DOCS} (severity warning: not an emergency, ignored)" in lines
    everything = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert TOKEN not in everything
    assert "guess" not in everything
    assert "Authorization" not in everything
    assert TOKEN not in repr(receiver)


# ---- alerts are scoped to their namespace ------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "accepted"),
    [
        pytest.param({"migration": DOCS, "namespace": "default"}, True, id="own-namespace"),
        pytest.param({"migration": DOCS, "namespace": "team-b"}, False, id="other-namespace"),
        pytest.param({"migration": DOCS}, False, id="no-namespace-label"),
        pytest.param({"migration": DOCS, "namespace": ""}, False, id="empty-namespace-label"),
        pytest.param({"namespace": "default", "embeddingmigration": "docs"}, True, id="by-name"),
    ],
)
async def test_an_alert_rolls_back_only_a_migration_of_its_own_namespace(
    receiver: AlertReceiver, client: httpx.AsyncClient, labels: dict[str, str], accepted: bool
) -> None:
    woken = receiver.subscribe(DOCS)
    body = webhook(alert())
    body["alerts"][0]["labels"] = {"alertname": "Breach", "severity": "critical", **labels}

    response = await post(client, receiver, body)

    assert response.status_code == 200, response.text  # Alertmanager must not retry it
    assert response.json()["refused"] == (0 if accepted else 1)
    assert receiver.firing(DOCS) == (("Breach",) if accepted else ())
    assert woken.is_set() is accepted
    assert receiver.refused["namespace"] == (0 if accepted else 1)


async def test_a_rule_naming_two_migrations_reaches_only_the_one_in_its_namespace(
    receiver: AlertReceiver, client: httpx.AsyncClient
) -> None:
    receiver.subscribe(OTHER)
    labels = {"migration": OTHER, "namespace": "default", "embeddingmigration": "docs"}
    response = await post(client, receiver, webhook(alert(**labels)))
    assert response.json()["migrations"] == [DOCS]
    assert receiver.firing(DOCS) == ("EmbeddingV2HighErrorRate",)
    assert receiver.firing(OTHER) == ()


async def test_trusting_alerts_across_namespaces_accepts_any_namespace_label(
    clock: Clock,
) -> None:
    receiver = AlertReceiver(token=TOKEN, clock=clock, trust_across_namespaces=True)
    receiver.subscribe(DOCS)
    await receiver.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            cross = await post(client, receiver, webhook(alert(namespace="monitoring")))
            unlabelled = alert(name="Unlabelled")
            del unlabelled["labels"]["namespace"]
            bare = await post(client, receiver, webhook(unlabelled))
        assert cross.json()["migrations"] == bare.json()["migrations"] == [DOCS]
        assert receiver.firing(DOCS) == ("EmbeddingV2HighErrorRate", "Unlabelled")
        assert receiver.refused["namespace"] == 0
    finally:
        await receiver.aclose()


async def test_a_refused_alert_is_counted_and_logged_once_without_the_token(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, clock: Clock
) -> None:
    registry = CollectorRegistry()
    receiver = AlertReceiver(token=TOKEN, clock=clock, registry=registry)
    receiver.subscribe(DOCS)
    await receiver.start("127.0.0.1", 0)
    caplog.set_level(logging.INFO)
    try:
        intruders = [alert(namespace="team-b", pod=f"p{i}") for i in range(50)]
        response = await post(client, receiver, webhook(*intruders))
    finally:
        await receiver.aclose()

    assert response.json() == {"accepted": 50, "migrations": [], "refused": 50}
    assert receiver.firing(DOCS) == ()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("embedshift")]
    refusals = [line for line in lines if "refused" in line]
    assert len(refusals) == 1, lines  # one line per request, not one per alert
    assert refusals[0].startswith("refused 50 alert(s) for a migration outside the namespace")
    assert "EmbeddingV2HighErrorRate for default/docs (namespace label 'team-b')" in refusals[0]
    assert "--trust-alerts-across-namespaces" in refusals[0]
    assert TOKEN not in caplog.text
    assert sample(registry, "embedshift_operator_alerts_refused_total", reason="namespace") == 50
    assert sample(registry, "embedshift_operator_alerts_refused_total", reason="capacity") == 0


@pytest.mark.parametrize(
    ("migration", "labels", "own"),
    [
        ("default/docs", {"namespace": "default"}, True),
        ("default/docs", {"namespace": " default "}, True),  # as targets() strips them
        ("default/docs", {"namespace": "defaults"}, False),
        ("default/docs", {"namespace": "default/docs"}, False),
        ("default/docs", {}, False),
        ("team-b/docs", {"namespace": "default"}, False),
    ],
)
def test_in_own_namespace(migration: str, labels: dict[str, str], own: bool) -> None:
    assert in_own_namespace(migration, labels) is own


# ---- the receiver's state is bounded -----------------------------------------------------------


async def test_alerts_for_ten_thousand_unknown_migrations_hold_nothing_and_roll_back_nothing(
    receiver: AlertReceiver, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    woken = receiver.subscribe(DOCS)
    unknown = [f"ns{i % 100}/m{i}" for i in range(10_000)]
    for start in range(0, len(unknown), 1_000):  # below aiohttp's 1 MiB body limit
        batch = [alert(migration=m, name=f"A{start}") for m in unknown[start : start + 1_000]]
        response = await post(client, receiver, webhook(*batch))
        assert response.status_code == 200, response.text
        assert response.json()["migrations"] == []

    assert receiver.held == 0
    assert receiver.refused["unserved"] == 10_000
    assert all(receiver.firing(m) == () for m in unknown[::997])
    assert not woken.is_set()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("embedshift")]
    assert len(lines) <= 10, "one line per request, not one per alert"

    # A served migration's alert still rolls it back.
    response = await post(client, receiver, webhook(alert()))
    assert response.json()["migrations"] == [DOCS]
    assert woken.is_set()
    assert receiver.firing(DOCS) == ("EmbeddingV2HighErrorRate",)


async def test_alerts_naming_no_migration_are_one_log_line_per_request(
    receiver: AlertReceiver, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    unlabelled = []
    for i in range(1_000):
        one = alert(name=f"Nameless{i}")
        del one["labels"]["migration"]
        unlabelled.append(one)
    response = await post(client, receiver, webhook(*unlabelled))
    assert response.json() == {"accepted": 1_000, "migrations": [], "refused": 0}
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("embedshift")]
    assert lines == [
        "1000 alert(s) name no migration, none acted on (Nameless0, Nameless1, Nameless2, …)"
    ]
    assert receiver.held == 0


async def test_past_the_cap_the_oldest_alerts_of_the_fullest_migration_are_dropped(
    clock: Clock,
) -> None:
    registry = CollectorRegistry()
    receiver = AlertReceiver(token=TOKEN, clock=clock, max_firing=100, registry=registry)
    receiver.subscribe(DOCS)
    receiver.subscribe(OTHER)
    await receiver.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            await post(client, receiver, webhook(alert(migration=OTHER, name="FaqDown")))
            flood = [alert(name=f"Flood{i:03d}", pod=str(i)) for i in range(500)]
            for start in range(0, 500, 100):
                await post(client, receiver, webhook(*flood[start : start + 100]))
    finally:
        await receiver.aclose()

    assert receiver.held == 100
    assert receiver.refused["capacity"] == 401
    assert receiver.firing(OTHER) == ("FaqDown",)  # another migration's only alert survives
    kept = receiver.firing(DOCS)
    assert len(kept) == 99 and kept[0] == "Flood401" and kept[-1] == "Flood499"  # the newest
    assert sample(registry, "embedshift_operator_alerts_held") == 100
    assert sample(registry, "embedshift_operator_alerts_refused_total", reason="capacity") == 401


async def test_the_default_cap_holds_ten_thousand_firing_alerts(
    receiver: AlertReceiver, client: httpx.AsyncClient
) -> None:
    flood = [alert(name="Flood", pod=str(i)) for i in range(DEFAULT_MAX_FIRING + 500)]
    for start in range(0, len(flood), 1_000):
        await post(client, receiver, webhook(*flood[start : start + 1_000]))
    assert receiver.held == DEFAULT_MAX_FIRING
    assert receiver.refused["capacity"] == 500
    assert receiver.firing(DOCS) == ("Flood",)


async def test_a_forgotten_migration_holds_no_more_alerts(
    receiver: AlertReceiver, client: httpx.AsyncClient
) -> None:
    await post(client, receiver, webhook(alert(), alert(pod="b")))
    assert receiver.held == 2
    receiver.forget(DOCS)  # its resource was deleted: the loop ended
    assert receiver.held == 0
    response = await post(client, receiver, webhook(alert()))
    assert response.json() == {"accepted": 1, "migrations": [], "refused": 1}
    assert receiver.firing(DOCS) == ()
    assert receiver.refused["unserved"] == 1


async def test_expired_alerts_make_room_before_any_is_dropped(clock: Clock) -> None:
    receiver = AlertReceiver(token=None, clock=clock, ttl=300, max_firing=2)
    receiver.subscribe(DOCS)
    await receiver.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient() as client:
            await post(client, receiver, webhook(alert(name="Old1"), alert(name="Old2")))
            clock.now += 301
            await post(client, receiver, webhook(alert(name="New")))
    finally:
        await receiver.aclose()
    assert receiver.firing(DOCS) == ("New",)
    assert receiver.held == 1
    assert receiver.refused["capacity"] == 0


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)
