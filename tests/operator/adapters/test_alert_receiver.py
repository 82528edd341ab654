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

from embedshift_operator.adapters.alerts import AlertReceiver, targets

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
    labels = {"migration": DOCS, **labels} if "namespace" not in labels else labels
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
    assert response.json() == {"accepted": 1, "migrations": [DOCS]}
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
