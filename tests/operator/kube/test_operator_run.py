"""``embedshift operator run`` as a user runs it: a real process with a kubeconfig pointing at
the API-server emulator, a real PostgreSQL behind the Secret, its liveness endpoint, metrics and
alert receiver on real ports; SIGTERM ends it. Jobs are completed by the test (no kubelet)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from kubernetes import client

from embedshift_operator.adapters.alerts import PATH as ALERTS_PATH
from embedshift_operator.handlers import USER_AGENT
from rag_service.alerts import WEBHOOK_SECRET_ENV
from rag_service.testing.corpus import create_corpus
from tests.helpers import PYTHON, cli, cli_subprocess
from tests.operator.kube.conftest import Cluster
from tests.operator.kube.harness import (
    GROUP,
    IMAGE,
    KEY,
    NAME,
    NS,
    PLURAL,
    TABLE,
    VERSION,
    Operator,
    call,
    eventually,
    json_object,
    manifest,
    name_of,
)

PEERING = "embedshift"
TOKEN = "am-webhook-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OperatorProcess:
    """``embedshift operator run`` in a process of its own, its log in a file."""

    def __init__(self, *, log: Path, argv: list[str], env: dict[str, str]) -> None:
        self.log_path = log
        self.liveness = free_port()
        self.metrics = free_port()
        self.receiver = free_port()
        command = [PYTHON, "-m", "embedshift_operator.cli", "operator", "run", *argv]
        ports = {
            "--liveness-port": self.liveness,
            "--metrics-port": self.metrics,
            "--receiver-port": self.receiver,
        }
        for flag, number in ports.items():
            if flag not in argv:
                command += [flag, str(number)]
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_until(self, check: Callable[[], Any], *, within: float = 30.0) -> Any:
        """``eventually``, failing at once with the log if the process ended."""

        async def alive_and() -> Any:
            code = self.process.poll()
            if code is not None:
                raise AssertionError(f"the operator exited ({code}):\n{self.log()[-4000:]}")
            return await check()

        alive_and.__doc__ = check.__doc__
        try:
            return await eventually(alive_and, within=within)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- operator log ---\n{self.log()[-4000:]}") from None

    async def get(self, port: int, path: str) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}{path}") as response,
        ):
            return response.status, await response.text()

    async def healthy(self) -> bool:
        """/healthz answers 200"""
        try:
            status, _ = await self.get(self.liveness, "/healthz")
        except aiohttp.ClientError:
            return False
        return status == 200

    async def terminate(self) -> int:
        """SIGTERM, then the exit code (a hung process fails the test rather than the run)."""
        self.process.send_signal(signal.SIGTERM)
        return await call(self.process.wait, 20)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture()
def kubeconfig(cluster: Cluster, tmp_path: Path) -> Path:
    """A kubeconfig naming the emulator, with a token (kmock takes any) as a real one has."""
    path = tmp_path / "kubeconfig"
    server = str(cluster.emulator.url).rstrip("/")
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emulator", "cluster": {"server": server}}],
                "users": [{"name": "operator", "user": {"token": "sa-token"}}],
                "contexts": [
                    {"name": "emulator", "context": {"cluster": "emulator", "user": "operator"}}
                ],
                "current-context": "emulator",
            }
        )
    )
    return path


@pytest_asyncio.fixture()
async def start(kubeconfig: Path, tmp_path: Path) -> AsyncIterator[Callable[..., OperatorProcess]]:
    """Start ``operator run`` processes (killed at the end if a test left one running)."""
    started: list[OperatorProcess] = []

    def run(*argv: str, env: dict[str, str] | None = None) -> OperatorProcess:
        environ = {k: v for k, v in os.environ.items() if k != WEBHOOK_SECRET_ENV}
        environ.update(env or {})
        process = OperatorProcess(
            log=tmp_path / f"operator-{len(started)}.log",
            # The harness's migrations name IMAGE; `operator run` runs only its own by default.
            argv=["--kubeconfig", str(kubeconfig), "--allowed-image", IMAGE, *argv],
            env=environ,
        )
        started.append(process)
        return process

    yield run
    for process in started:
        process.kill()


@pytest.fixture()
def kube(cluster: Cluster, database_url: str) -> Operator:
    """The harness's steps through the API (its in-process operator is not started here)."""
    create_corpus(database_url, table=TABLE, count=5)
    return Operator(cluster=cluster, database_url=database_url)


async def create_namespace(kube: Operator, name: str) -> None:
    """A Namespace as a cluster has it (kopf lists them to serve ``--namespace``)."""
    body = client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
    await call(kube.core.create_namespace, body)


async def create_peering(kube: Operator, namespace: str) -> None:
    """The KopfPeering object the operator's replicas meet in (the chart creates it)."""
    body = {
        "apiVersion": "kopf.dev/v1",
        "kind": "KopfPeering",
        "metadata": {"name": PEERING, "namespace": namespace},
    }
    await call(
        kube.objects.create_namespaced_custom_object,
        "kopf.dev",
        "v1",
        namespace,
        "kopfpeerings",
        body,
    )


async def peers(kube: Operator) -> dict[str, Any]:
    """the operators alive in the peering object"""
    body = await call(
        kube.objects.get_namespaced_custom_object, "kopf.dev", "v1", NS, "kopfpeerings", PEERING
    )
    return dict(json_object(body).get("status") or {})


@pytest.mark.asyncio
async def test_operator_run_serves_its_namespace_and_stops_on_sigterm(
    kube: Operator, start: Callable[..., OperatorProcess]
) -> None:
    await create_namespace(kube, NS)
    await create_namespace(kube, "elsewhere")
    await create_peering(kube, NS)
    await kube.create_secret()
    operator = start("--namespace", NS, "--receiver-port", "0")
    await operator.wait_until(operator.healthy)

    await kube.create_migration()
    elsewhere = manifest()
    elsewhere["metadata"]["namespace"] = "elsewhere"
    await call(
        kube.objects.create_namespaced_custom_object,
        GROUP,
        VERSION,
        "elsewhere",
        PLURAL,
        elsewhere,
    )

    async def setup_job() -> list[client.V1Job]:
        """the setup Job in rag"""
        return await kube.jobs("setup")

    (job,) = await operator.wait_until(setup_job)
    assert job.metadata.owner_references[0].name == NAME
    # The operator's own API calls carry its User-Agent (kopf's carry kopf's); iterating a
    # kmock handler gives the requests it received.
    created = [
        r
        for r in kube.cluster.emulator
        if r.method == "POST" and r.resource is not None and r.resource.plural == "jobs"
    ]
    assert created
    assert all(r.headers.get("User-Agent") == USER_AGENT for r in created)

    # Its metrics: the operator's series on a registry of its own (no process_/python_ ones
    # of prometheus_client's global registry).
    async def percentage_series() -> str:
        """embedshift_operator_percentage for rag/docs on /metrics"""
        status, text = await operator.get(operator.metrics, "/metrics")
        return text if status == 200 and f'migration="{KEY}"' in text else ""

    exposition = await operator.wait_until(percentage_series)
    assert f'embedshift_operator_percentage{{migration="{KEY}"}} 0.0' in exposition
    assert "embedshift_operator_tick_seconds_count" in exposition
    assert "python_info" not in exposition and "process_cpu" not in exposition

    # The other namespace is not served: a few ticks later, no Job, no status, no finalizer.
    await asyncio.sleep(2.0)
    other = json_object(
        await call(
            kube.objects.get_namespaced_custom_object, GROUP, VERSION, "elsewhere", PLURAL, NAME
        )
    )
    assert "status" not in other
    assert not other["metadata"].get("finalizers")
    assert (await call(kube.batch.list_namespaced_job, "elsewhere")).items == []

    assert await operator.terminate() == 0
    assert "Traceback" not in operator.log()


def alertmanager_payload(*, status: str = "firing") -> dict[str, Any]:
    """An Alertmanager (v4) webhook body with one critical alert for rag/docs."""
    labels = {
        "alertname": "EmbeddingV2ErrorRate",
        "migration": KEY,
        "namespace": KEY.partition("/")[0],  # the receiver takes alerts of its own namespace
        "severity": "critical",
    }
    return {
        "version": "4",
        "groupKey": '{}:{alertname="EmbeddingV2ErrorRate"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "embedshift-operator",
        "groupLabels": {"alertname": "EmbeddingV2ErrorRate"},
        "commonLabels": labels,
        "commonAnnotations": {"summary": "v2 error rate above 10 %"},
        "externalURL": "http://alertmanager:9093",
        "alerts": [
            {
                "status": status,
                "labels": labels,
                "annotations": {"summary": "v2 error rate above 10 %", "value": "0.12"},
                "startsAt": "2026-01-01T00:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus:9090/graph",
                "fingerprint": "4f1a9f0c2b7e1d3a",
            }
        ],
    }


@pytest.mark.asyncio
async def test_an_alertmanager_webhook_routes_zero_within_one_second(
    kube: Operator, start: Callable[..., OperatorProcess]
) -> None:
    await create_namespace(kube, NS)
    await kube.create_secret()
    operator = start("--namespace", NS, "--standalone", env={WEBHOOK_SECRET_ENV: TOKEN})
    await operator.wait_until(operator.healthy)
    await kube.create_migration()
    await kube.drive_to_progressing()

    # An hour between ticks: what acts below is the alert waking the loop, not a tick.
    await kube.patch_spec({"analysis": {"interval": "1h"}})

    async def settled() -> bool:
        """the interval change handled: Progressing at 10 %, observedGeneration current"""
        body = await kube.resource()
        status = body.get("status") or {}
        return (
            status.get("observedGeneration") == body["metadata"]["generation"]
            and status.get("phase") == "Progressing"
            and await kube.routing_percentage() == 10
        )

    await operator.wait_until(settled)
    url = f"http://127.0.0.1:{operator.receiver}{ALERTS_PATH}"
    payload = alertmanager_payload()
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=payload) as response:
            assert response.status == 401  # no token: refused, nothing acted on
        wrong = {"Authorization": "Bearer not-the-token"}
        async with session.post(url, json=payload, headers=wrong) as response:
            assert response.status == 403
        await asyncio.sleep(0.5)
        assert await kube.routing_percentage() == 10

        started = time.monotonic()
        right = {"Authorization": f"Bearer {TOKEN}"}
        async with session.post(url, json=payload, headers=right) as response:
            assert response.status == 200
            assert (await response.json())["migrations"] == [KEY]

        async def routed_zero() -> bool:
            """0 % in the routing row"""
            return await kube.routing_percentage() == 0

        await eventually(routed_zero, within=1.0)
        assert time.monotonic() - started < 1.0

    async def rolled_back() -> dict[str, Any]:
        """RolledBack (AlertFiring) in status"""
        status = await kube.status()
        return status if status.get("phase") == "RolledBack" else {}

    status = await operator.wait_until(rolled_back, within=2.0)
    last = status["history"][-1]
    assert (last["phase"], last["reason"], last["percentage"]) == ("RolledBack", "AlertFiring", 0)
    assert "EmbeddingV2ErrorRate" in last["message"]
    assert TOKEN not in operator.log()
    assert await operator.terminate() == 0


@pytest.mark.asyncio
async def test_a_second_replica_stands_by_until_the_first_stops(
    kube: Operator, start: Callable[..., OperatorProcess]
) -> None:
    await create_namespace(kube, NS)
    await create_peering(kube, NS)
    await kube.create_secret()
    common = ("--namespace", NS, "--peering", PEERING, "--receiver-port", "0")
    first = start(*common, "--priority", "10")
    await first.wait_until(first.healthy)
    await first.wait_until(lambda: peers(kube))
    second = start(*common)  # priority 0: outranked while the first is alive

    async def both_peers() -> bool:
        """both replicas in the peering object"""
        return len(await peers(kube)) == 2

    # Mandatory peering starts paused (kopf logs no "Pausing" then) until the peering object
    # shows no live peer outranking it; here one does, so the second stays paused.
    await second.wait_until(both_peers)
    await second.wait_until(second.healthy)  # standing by is alive: not restarted by its probe

    await kube.create_migration()
    job = await kube.job("setup")
    await asyncio.sleep(1.5)  # ticks of the first; the second still does nothing
    assert f"{KEY}: created Job {name_of(job)}" in first.log()
    # kopf.objects: kopf's log of handling a resource; the second handled none.
    assert "kopf.objects" in first.log()
    assert "kopf.objects" not in second.log() and KEY not in second.log()
    assert len(await kube.jobs()) == 1

    assert await first.terminate() == 0  # it leaves the peering object as it goes

    async def resumed() -> bool:
        """the second replica resuming"""
        return "Resuming operations" in second.log()

    await second.wait_until(resumed)
    await kube.set_up()
    await kube.complete(job)

    async def shards() -> list[client.V1Job]:
        """shard Jobs created by the second replica"""
        return await kube.jobs("migrate") if "created Job" in second.log() else []

    await second.wait_until(shards)
    assert await second.terminate() == 0


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--namespace", "rag", "--all-namespaces"], "not allowed with argument"),
        ([], "one of the arguments --namespace --all-namespaces is required"),
        (["--all-namespaces", "--peering", "x", "--standalone"], "not allowed with argument"),
        (["--all-namespaces", "--deletion-timeout", "5 minutes"], "is not a duration"),
        (["--all-namespaces", "--deletion-timeout", "0s"], "must be longer than zero"),
        (["--all-namespaces", "--metrics-port", "70000"], "is not a port number"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(capsys, "operator", "run", *argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], errors


def test_the_receiver_refuses_to_start_without_a_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WEBHOOK_SECRET_ENV, raising=False)
    result = cli(capsys, "operator", "run", "--all-namespaces")
    assert result.code == 2
    (line,) = result.err.splitlines()
    assert line.startswith("embedshift: error: ALERT_WEBHOOK_SECRET is not set")
    assert "--receiver-insecure" in line and "--receiver-port 0" in line


@pytest.mark.asyncio
async def test_a_missing_peering_object_is_one_line_not_a_silent_pause(
    kube: Operator, kubeconfig: Path
) -> None:
    """Without the KopfPeering object kopf would wait for it, handling nothing."""
    await create_namespace(kube, NS)
    argv = ["operator", "run", "--kubeconfig", str(kubeconfig), "--namespace", NS]
    result = await call(cli_subprocess, [*argv, "--receiver-port", "0"])
    assert result.code == 2
    errors = [line for line in result.err.splitlines() if "error:" in line]
    assert errors == [
        f"embedshift: error: --peering {PEERING}: KopfPeering {NS}/{PEERING} not found (install "
        "kopf's peering CRDs and create the object, or pass --standalone for a single replica)"
    ]


def test_migrate_and_serve_never_load_kopf() -> None:
    """The console script registers ``operator run`` without importing kopf or the client."""
    code = (
        "import sys; from embedshift_operator.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('kopf', 'kubernetes') if m in sys.modules))"
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
