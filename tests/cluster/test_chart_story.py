"""The whole story on the real API server, as a platform team runs it: ``helm install`` of
``charts/embedshift``, the operator as the Pod the chart's Deployment creates (run by the Pod
runner, acting as the chart's ServiceAccount, so RBAC is Kubernetes' own), ``kubectl apply``
of a migration, its Jobs run to completion by the real Job controller, the chart's search
service (the Pod runner's processes) scraped by a real Prometheus that promotes 10 → 100 %,
a breach, a retry, a manual rollback in the spec, an Alertmanager webhook, ``helm upgrade`` with
the migration in flight, the standby taking over, ``kubectl delete`` and the garbage collector,
and ``helm uninstall`` keeping the data.

Every ``kubectl`` and ``helm`` command here is one the README shows. Ports are the chart's
defaults: each Pod has a network of its own (:mod:`tests.pod_network`).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge

from embedshift_operator.resource import parse_migration
from rag_service.testing.corpus import create_corpus
from rag_service.testing.prometheus import PrometheusProcess, running_prometheus, serving_metrics
from tests import pod_network
from tests.api_calls import record_operator_calls
from tests.chart.helm import CHART, HELM, KUBECTL
from tests.helpers import eventually, routed_percentage
from tests.kubelet import Api, PodRunner
from tests.operator.e2e.target import Target

EMBEDSHIFT = Path(sys.executable).with_name("embedshift")
NAME = "docs"
RELEASE = "embedshift"
INTERVAL = 1.0  # analysis.interval
STEPS = [10, 25, 50, 75, 100]
PIPELINE = 180.0  # setup, 2 shards, index, verify: a Pod each
WITHIN = 30.0  # a status to change, a Pod to become Ready
SEARCH_PORT, RECEIVER_PORT = 8080, 8081  # the chart's defaults (search.port, operator.ports)


def run(tool: Path, *args: str, kubeconfig: str, check: bool = True) -> str:
    assert tool.exists(), f"{tool} is missing: run `make helm` (scripts/install-helm.sh)"
    done = subprocess.run(
        [str(tool), *args, "--kubeconfig", kubeconfig],  # last: embedshift's flags follow NAME
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if check:
        assert done.returncode == 0, f"{tool.name} {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


@dataclass
class Story:
    """The release, its namespace, the database and what the test drives."""

    target: Target
    api: Api
    runner: PodRunner
    namespace: str
    database_url: str
    prometheus: PrometheusProcess
    breach: Gauge
    token: str
    workdir: Path
    values: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.key_of(NAME)

    def key_of(self, name: str) -> str:
        return f"{self.namespace}/{name}"

    def kubectl(self, *args: str, check: bool = True) -> str:
        return run(
            KUBECTL, "-n", self.namespace, *args, kubeconfig=self.target.kubeconfig, check=check
        )

    def helm(self, *args: str) -> str:
        return run(HELM, "-n", self.namespace, *args, kubeconfig=self.target.kubeconfig)

    def get(self, path: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.api.request("GET", path, ok=(404,))
        return found

    def resource(self, name: str = NAME) -> dict[str, Any]:
        found = self.get(
            f"/apis/embedshift.io/v1alpha1/namespaces/{self.namespace}/embeddingmigrations/{name}"
        )
        return found or {}

    def status(self, name: str = NAME) -> dict[str, Any]:
        status: dict[str, Any] = self.resource(name).get("status") or {}
        return status

    def routing(self, name: str = NAME) -> int | None:
        return routed_percentage(self.database_url, self.key_of(name))

    def pods(self, component: str) -> list[dict[str, Any]]:
        listed = self.get(
            f"/api/v1/namespaces/{self.namespace}/pods?labelSelector="
            f"app.kubernetes.io/component%3D{component}"
        )
        return [
            p for p in (listed or {}).get("items", []) if not p["metadata"].get("deletionTimestamp")
        ]

    def ready_ips(self, component: str) -> list[str]:
        ips = []
        for pod in self.pods(component):
            conditions = pod.get("status", {}).get("conditions") or []
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                ips.append(pod["status"]["podIP"])
        return ips

    def jobs(self) -> list[str]:
        return sorted(self.job_objects())

    def job_objects(self, selector: str = "") -> dict[str, dict[str, Any]]:
        """The namespace's Jobs (``selector``: a label selector), by name."""
        query = f"?labelSelector={selector}" if selector else ""
        listed = self.get(f"/apis/batch/v1/namespaces/{self.namespace}/jobs{query}") or {}
        return {j["metadata"]["name"]: j for j in listed.get("items", [])}

    def breach_shown(self) -> float | None:
        """The test's breach series as Prometheus shows it now (None: not scraped yet)."""
        query = f'max(embedshift_test_breach{{migration="{self.key}"}})'
        answer = httpx.get(f"{self.prometheus.url}/api/v1/query", params={"query": query})
        result = answer.json()["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def seconds_to_zero(self, started: float, within: float) -> float:
        """Seconds from ``started`` until the routing row (what every search replica follows)
        says 0 %, polled every 20 ms."""
        while self.routing() != 0:
            assert time.monotonic() - started < within, f"not routed 0 % within {within} s"
            time.sleep(0.02)
        return time.monotonic() - started

    def wait_phase(
        self, phase: str, percentage: int, within: float = WITHIN, name: str = NAME
    ) -> dict[str, Any]:
        """The status of ``name`` once in ``phase`` with the routing row at ``percentage``; a
        failure shows where the rollout stood and its last check."""
        deadline = time.monotonic() + within
        while True:
            status = self.status(name)
            routed = self.routing(name)
            if status.get("phase") == phase and routed == percentage:
                return status
            if time.monotonic() > deadline:
                last = {k: status.get(k) for k in ("phase", "percentage", "stepIndex", "message")}
                analysis = (status.get("analysis") or {}).get("results")
                history = status.get("history", [])[-3:]
                raise AssertionError(
                    f"not {phase} at {percentage} % within {within} s: routed {routed}, "
                    f"status {last}, last check {analysis}, history {history}"
                )
            time.sleep(0.1)


def manifest(story_namespace: str, table: str, prometheus: str) -> dict[str, Any]:
    """``examples/migration.yaml``'s shape with the offline models, a small table, 1 s checks
    and short steps, judged by a real Prometheus on the search service's own metrics, and a
    rollback threshold on a series the test controls."""
    return {
        "apiVersion": "embedshift.io/v1alpha1",
        "kind": "EmbeddingMigration",
        "metadata": {"name": NAME, "namespace": story_namespace},
        "spec": {
            "database": {
                "urlSecretRef": {"name": "rag-db", "key": "url"},
                "table": f"public.{table}",
                "idColumn": "id",
                "textColumn": "content",
                "categoryColumn": "category",
                "sourceEmbeddingColumn": "embedding",
            },
            "source": {"provider": "local", "model": "hash", "dimensions": 1536},
            "target": {"provider": "local", "model": "hash", "dimensions": 256},
            "migration": {"shards": 2, "parallelism": 2, "batchSize": 50},
            "rollout": {
                "steps": [
                    {"percentage": p, "minDuration": "1h" if p == 100 else "1s"} for p in STEPS
                ]
            },
            "analysis": {
                "prometheus": {"url": f"http://{prometheus}"},
                "interval": "1s",
                "window": "30s",
                "minRequests": 3,
                "successfulChecks": 1,
                "successCriteria": [
                    {"name": "v2-serves", "metric": "requests", "min": 1},
                    {"name": "error-rate", "metric": "error_rate", "max": 0.5},
                ],
                "rollbackThresholds": [
                    {
                        "name": "test-breach",
                        "query": 'max(embedshift_test_breach{migration="{{ migration }}"})',
                        "max": 0,
                    }
                ],
            },
        },
    }


class Traffic:
    """Users searching through the chart's search service (each Ready Pod), keyed by user."""

    def __init__(self, story: Story) -> None:
        self.story = story
        self.stop = threading.Event()
        self.answers: dict[str, int] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10) as http:
            n = 0
            while not self.stop.is_set():
                for ip in self.story.ready_ips("search"):
                    n += 1
                    try:
                        answer = http.post(
                            f"http://{ip}:{SEARCH_PORT}/api/rag/search",
                            json={"query": f"library opening hours {n % 7}", "k": 3},
                            headers={"X-User-Id": f"user-{n % 500}"},
                        )
                        version = (
                            answer.json()["version"]
                            if answer.status_code == 200
                            else str(answer.status_code)
                        )
                    except httpx.HTTPError as exc:
                        version = type(exc).__name__
                    self.answers[version] = self.answers.get(version, 0) + 1
                self.stop.wait(0.1)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def story(
    kube_cluster: Target,
    pod_runner: PodRunner,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[Story]:
    """The chart installed in a namespace of its own, as its README says, with the Secrets it
    references, a corpus table, and a real Prometheus scraping the search service's Pods."""
    api = Api(kube_cluster.kubeconfig)
    namespace = f"rag-{uuid.uuid4().hex[:6]}"
    kubeconfig = kube_cluster.kubeconfig
    # The README's commands (On a cluster → Install with Helm), as a user types them.
    run(KUBECTL, "create", "namespace", namespace, kubeconfig=kubeconfig)
    pod_runner.serve(namespace)
    token = secrets.token_hex(24)
    for name, literals in {
        "embedshift-alert-webhook": [f"token={token}"],
        "embedshift-search": [f"DATABASE_URL={database_url}"],
        "rag-db": [f"url={database_url}"],
    }.items():
        flags = [f"--from-literal={literal}" for literal in literals]
        run(KUBECTL, "-n", namespace, "create", "secret", "generic", name, *flags,
            kubeconfig=kubeconfig)  # fmt: skip
    registry = CollectorRegistry()
    breach = Gauge("embedshift_test_breach", "set by the test", ["migration"], registry=registry)
    breach.labels(migration=f"{namespace}/{NAME}").set(0)
    workdir = tmp_path_factory.mktemp("story")
    with (
        serving_metrics(registry) as exporter,
        # It listens where the Pods reach the host: the operator Pod queries it.
        running_prometheus(
            targets=[exporter], scrape_interval="1s", host=pod_network.SERVICE_IP
        ) as prometheus,
    ):
        story = Story(
            target=kube_cluster,
            api=api,
            runner=pod_runner,
            namespace=namespace,
            database_url=database_url,
            prometheus=prometheus,
            breach=breach,
            token=token,
            workdir=workdir,
        )
        # The values a user would set: where the image is, and a standby operator.
        story.values = [
            "--set", "image.repository=registry.example.com/embedshift",
            "--set", "image.tag=0.1.0",
            "--set", f"search.migration={story.key}",
            "--set", "operator.standby.enabled=true",
        ]  # fmt: skip
        story.helm("install", RELEASE, str(CHART), *story.values)
        try:
            yield story
            # What the real server was asked, for api-calls.yaml (a refused request fails).
            operator = pod_runner.api_requests(namespace, f"{RELEASE}-operator")
            record_operator_calls(request.config, operator)
        finally:
            story.helm("uninstall", RELEASE, "--ignore-not-found")
            api.request("DELETE", f"/api/v1/namespaces/{namespace}", ok=(404,))
            api.close()


def test_the_operator_runs_as_the_charts_pod_and_the_standby_stands_by(story: Story) -> None:
    def both_ready() -> bool:
        return len(story.ready_ips("operator")) == 2

    eventually(both_ready, "the operator and its standby Ready", within=60)
    logs = story.runner.logs(story.namespace, f"{RELEASE}-operator")
    assert logs, "no operator log"


def test_a_migration_from_kubectl_apply_to_kubectl_delete(story: Story) -> None:
    table = f"story_{story.namespace.replace('-', '_')}"
    create_corpus(story.database_url, table=table, count=60)
    prometheus = story.prometheus.url.removeprefix("http://")
    path = story.workdir / "migration.yaml"
    path.write_text(yaml.safe_dump(manifest(story.namespace, table, prometheus)))

    # kubectl apply -f migration.yaml; kubectl wait --for=condition=Verified
    story.kubectl("apply", "-f", str(path))
    for condition in ("Migrated", "Verified"):
        story.kubectl(
            "wait", f"em/{NAME}", f"--for=condition={condition}", f"--timeout={int(PIPELINE)}s"
        )
    progressing = story.wait_phase("Progressing", 10)
    # The API server kept how the progress was counted (the CRD's schema prunes what it lacks).
    migrated = progressing["migration"]
    assert migrated["counts"] == "maintained" and migrated["countedSince"], migrated
    assert migrated["migrated"] == migrated["total"] > 0, migrated

    # The follower (a Deployment's Pod running `migrate follow`) embeds what the application
    # writes from now on: a new document reaches the side table.
    spec = parse_migration(yaml.safe_load(path.read_text()), where="story").spec.data_plane
    with psycopg.connect(story.database_url, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {table} (id, content, category) VALUES (1000001, %s, 'events')",
            ["the library opens a new reading room"],
        )

    def followed() -> bool:
        with psycopg.connect(story.database_url) as conn:
            row = conn.execute(
                f"SELECT count(*) FROM {spec.target_table.name} WHERE id = 1000001"
            ).fetchone()
        return bool(row and row[0] == 1)

    eventually(followed, "the new document embedded by the follower", 60)
    assert [p["status"]["phase"] for p in story.pods("follower")] == ["Running"]
    jobs = story.jobs()
    kinds = {name.split("-")[1] for name in jobs}
    assert kinds == {"setup", "migrate", "index", "verify"}, jobs

    # The search service reads what setup recorded; Prometheus scrapes each of its Pods.
    eventually(lambda: len(story.ready_ips("search")) == 2, "both search Pods Ready", 60)
    story.prometheus.add_targets(*(f"{ip}:{SEARCH_PORT}" for ip in story.ready_ips("search")))
    traffic = Traffic(story)
    try:
        # 10 → 25 → 50 → 75 → 100 %, each step judged by Prometheus on real searches.
        story.wait_phase("Promoted", 100, within=120)
        assert traffic.answers.get("v1", 0) > 0 and traffic.answers.get("v2", 0) > 0, (
            traffic.answers
        )
        percentages = [h["percentage"] for h in story.status()["history"]]
        assert [p for p in STEPS if p in percentages] == STEPS
        # embedshift rollout status NAME -n NS: the same view as for a local run.
        shown = run(EMBEDSHIFT, "rollout", "status", NAME, "-n", story.namespace,
                    kubeconfig=story.target.kubeconfig)  # fmt: skip
        assert "Promoted" in shown and "100" in shown, shown

        # A breach of a rollback threshold: 0 % within one interval (+ 1 s) of Prometheus
        # showing it (its scrape interval is 1 s).
        story.breach.labels(migration=story.key).set(1)
        # Prometheus shows it within its 1 s scrape interval; then one interval + 1 s.
        assert story.seconds_to_zero(time.monotonic(), within=15) <= 1.0 + INTERVAL + 1.0
        status = story.wait_phase("RolledBack", 0)
        assert status["history"][-1]["reason"] == "ThresholdBreached"

        # A retry is a spec edit (a Git commit), once the cause is mended and Prometheus shows
        # it (a retry judged on the old breach would roll back at once, as it should).
        story.breach.labels(migration=story.key).set(0)
        eventually(lambda: story.breach_shown() == 0.0, "Prometheus showing the breach cleared")
        story.kubectl(
            "patch", f"em/{NAME}", "--type=merge", "-p", '{"spec":{"analysis":{"window":"20s"}}}'
        )
        story.wait_phase("Progressing", 25, within=60)

        # maxPercentage: 0 in the spec → 0 % within 2 s.
        story.kubectl(
            "patch", f"em/{NAME}", "--type=merge", "-p", '{"spec":{"rollout":{"maxPercentage":0}}}'
        )
        assert story.seconds_to_zero(time.monotonic(), within=10) <= 2.0
        story.wait_phase("RolledBack", 0)
        assert story.status()["history"][-1]["reason"] == "ManualRollback"

        # Raised again: a retry; then an Alertmanager webhook to the operator → 0 % within 1 s.
        story.kubectl(
            "patch",
            f"em/{NAME}",
            "--type=merge",
            "-p",
            '{"spec":{"rollout":{"maxPercentage":100}}}',
        )
        story.wait_phase("Progressing", 10, within=60)
        (working,) = [p["status"]["podIP"] for p in _working(story)]
        started = time.monotonic()
        answer = httpx.post(
            f"http://{working}:{RECEIVER_PORT}/alerts",
            json=_alert(story.key),
            headers={"Authorization": f"Bearer {story.token}"},
            timeout=5,
        )
        assert answer.status_code < 300, answer.text
        assert story.seconds_to_zero(started, within=10) <= 1.0
        story.wait_phase("RolledBack", 0)
        assert story.status()["history"][-1]["reason"] == "AlertFiring"
    finally:
        traffic.close()

    # What a person reads: kubectl get -o wide, describe (Events tell the story).
    wide = story.kubectl("get", "em", "-o", "wide")
    assert "RolledBack" in wide.splitlines()[1], wide
    described = story.kubectl("describe", "em", NAME)
    for reason in ("ThresholdBreached", "ManualRollback", "AlertFiring"):
        assert reason in described, described

    # helm upgrade with a changed value, the migration in flight: undisturbed, no Job twice.
    before = story.jobs()
    phase = story.status()["phase"]
    story.helm("upgrade", RELEASE, str(CHART), *story.values, "--set", "operator.verbose=true")
    eventually(lambda: _operators_verbose(story), "the operator Pods replaced", within=90)
    time.sleep(3 * INTERVAL)
    assert story.jobs() == before
    assert story.status()["phase"] == phase

    # The working operator's Pod deleted: the standby takes over at once (kopf's peering), and
    # nothing is done twice.
    (standby,) = [p for p in story.pods("operator") if "standby" in p["metadata"]["name"]]
    standby_ip = standby["status"]["podIP"]
    standby_ticks = _ticks(standby_ip)
    (working,) = _working(story)
    assert "standby" not in working["metadata"]["name"]
    story.kubectl("delete", "pod", working["metadata"]["name"], "--wait=false")
    eventually(lambda: _ticks(standby_ip) > standby_ticks, "the standby ticking", 30)
    story.kubectl(
        "patch", f"em/{NAME}", "--type=merge", "-p", '{"spec":{"rollout":{"paused":true}}}'
    )
    eventually(lambda: _observed(story), "the edit observed by a working operator", 60)
    assert story.jobs() == before

    # kubectl delete em: the finalizer routes 0 %, the garbage collector removes what it owned.
    story.kubectl("delete", "em", NAME, "--timeout=60s")
    assert story.routing() == 0

    def owned_gone() -> bool:
        ns = story.namespace
        left = [
            story.get(f"/apis/batch/v1/namespaces/{ns}/jobs"),
            story.get(
                f"/apis/apps/v1/namespaces/{ns}/deployments?labelSelector=app.kubernetes.io/component%3Dfollower"
            ),
            story.get(
                f"/api/v1/namespaces/{ns}/configmaps?labelSelector=app.kubernetes.io/component%3Dconfig"
            ),
        ]
        return all(not (lst or {}).get("items") for lst in left)

    eventually(owned_gone, "the Jobs, the follower and the ConfigMap garbage-collected", 60)

    # RBAC was Kubernetes' own: nothing the operator asked for was refused.
    for name, log in story.runner.logs(story.namespace, f"{RELEASE}-operator").items():
        assert " 403" not in log and "Forbidden" not in log, (name, log[-3000:])


def _ticks(ip: str) -> float:
    """How many ticks this operator Pod has made (its own metrics); 0 when it only stands by."""
    try:
        metrics = httpx.get(f"http://{ip}:9100/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0.0
    counts = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("embedshift_operator_tick_seconds_count")
    ]
    return sum(counts)


def _working(story: Story) -> list[dict[str, Any]]:
    """The operator Pods ticking now (kopf's peering: the others stand by): their tick counts
    grow over three intervals."""
    pods = story.pods("operator")
    before = [_ticks(p["status"].get("podIP", "")) for p in pods]
    time.sleep(3 * INTERVAL)
    return [p for p, b in zip(pods, before, strict=True) if _ticks(p["status"]["podIP"]) > b]


def _operators_verbose(story: Story) -> bool:
    pods = story.pods("operator")
    return len(pods) == 2 and all(
        "--verbose" in p["spec"]["containers"][0]["args"]
        and any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p["status"].get("conditions") or []
        )
        for p in pods
    )


def _observed(story: Story) -> bool:
    resource = story.resource()
    return (
        bool(resource)
        and resource.get("status", {}).get("observedGeneration")
        == resource["metadata"]["generation"]
    )


def _alert(key: str) -> dict[str, Any]:
    labels = {
        "alertname": "EmbeddingV2ErrorRate",
        "migration": key,
        "namespace": key.partition("/")[0],  # the receiver takes alerts of its own namespace
        "severity": "critical",
    }
    return {
        "version": "4",
        "groupKey": '{}:{alertname="EmbeddingV2ErrorRate"}',
        "status": "firing",
        "receiver": "embedshift-operator",
        "groupLabels": {"alertname": "EmbeddingV2ErrorRate"},
        "commonLabels": labels,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": [
            {
                "status": "firing",
                "labels": labels,
                "annotations": {"summary": "v2 error rate above 10 %"},
                "startsAt": "2026-01-01T00:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "fingerprint": "4f1a9f0c2b7e1d3a",
            }
        ],
    }


PIPELINE_PHASES = ["Preparing", "Migrating", "Indexing", "Verifying", "Progressing"]


def test_operator_pods_deleted_in_every_phase_are_replaced_and_carry_on(story: Story) -> None:
    """Both operator Pods (the working one and the standby) deleted as the migration enters
    each phase of its pipeline: the Deployment's new Pods carry it on from its status, no Job
    is created or run twice. Then a re-migration (a data-plane edit) replaces the follower, and
    a second migration, refused by its own Job, fails once with the CLI's line (read from the
    Pod: the chart's RBAC lets the operator get Pods)."""
    name, refused = "restarts", "refused"
    prometheus = story.prometheus.url.removeprefix("http://")
    bodies = []
    for migration in (name, refused):
        table = f"{migration}_{story.namespace.replace('-', '_')}"
        create_corpus(story.database_url, table=table, count=40)
        body = manifest(story.namespace, table, prometheus)
        body["metadata"]["name"] = migration
        bodies.append(body)
    # `migrate run` refuses a category no row has (exit 2): its Job fails at once, not retried.
    bodies[1]["spec"]["migration"].update(
        {"categories": ["no-such-category"], "shards": 1, "parallelism": 1}
    )
    path = story.workdir / "restarts.yaml"
    path.write_text(yaml.safe_dump_all(bodies))
    created_before = _jobs_created(story)
    story.kubectl("apply", "-f", str(path))

    # Each phase entered: every operator Pod deleted; the next phase needs their replacements.
    seen: list[str] = []
    uids: dict[str, str] = {}
    deadline = time.monotonic() + 2 * PIPELINE
    while seen[-1:] != ["Progressing"]:
        assert time.monotonic() < deadline, f"phases seen {seen}: {story.status(name)}"
        phase = story.status(name).get("phase")
        if phase in PIPELINE_PHASES and phase not in seen:
            seen.append(phase)
            story.kubectl("delete", "pod", "-l", "app.kubernetes.io/component=operator",
                          "--wait=false")  # fmt: skip
        for job, obj in story.job_objects(f"embedshift.io/migration%3D{name}").items():
            assert uids.setdefault(job, obj["metadata"]["uid"]) == obj["metadata"]["uid"], job
        time.sleep(0.1)
    assert seen == PIPELINE_PHASES, seen
    story.wait_phase("Progressing", 10, within=60, name=name)
    jobs = story.job_objects(f"embedshift.io/migration%3D{name}")
    assert set(jobs) == set(uids), (sorted(jobs), sorted(uids))
    for job, obj in jobs.items():  # each ran once: one Pod succeeded, none failed
        assert obj["status"].get("succeeded") == 1 and not obj["status"].get("failed"), (job, obj)

    # The refused migration: Failed once, with the line its Pod's CLI wrote.
    status = story.wait_phase("Failed", 0, within=PIPELINE, name=refused)
    assert status["history"][-1]["reason"] == "JobFailed", status["history"]
    message = str(status["message"])
    assert message.count("spec.migration.categories: no row of ") == 1, message
    assert "not retried" in message, message
    refused_jobs = story.job_objects(f"embedshift.io/migration%3D{refused}")
    assert sorted(j.split("-")[1] for j in refused_jobs) == ["migrate", "setup"], refused_jobs
    # No Job created twice, across every restart: one accepted create per Job.
    assert _jobs_created(story) - created_before == len(jobs) + len(refused_jobs)

    # A data-plane edit (another target: a Git commit) re-migrates into a new side table, and
    # the follower of the old data plane is replaced by one of the new.
    (old_follower,) = _followers(story, name)
    story.kubectl("patch", f"em/{name}", "--type=merge",
                  "-p", '{"spec":{"target":{"dimensions":128}}}')  # fmt: skip

    def re_migrating() -> bool:
        history = story.status(name).get("history") or []
        return "DataPlaneChanged" in [h["reason"] for h in history]

    eventually(re_migrating, "the data-plane edit re-migrating", WITHIN)
    story.wait_phase("Progressing", 10, within=PIPELINE, name=name)

    def follower_replaced() -> bool:
        followers = _followers(story, name)
        return len(followers) == 1 and followers != [old_follower]

    eventually(follower_replaced, "the old follower replaced by the new data plane's", 60)
    story.kubectl("delete", "em", name, refused, "--timeout=60s")


def _jobs_created(story: Story) -> int:
    """Jobs the operator Pods created in the story's namespace (the real server said 201)."""
    return sum(
        1
        for r in story.runner.api_requests(story.namespace, f"{RELEASE}-operator")
        if r.call is not None
        and (r.call.verb, r.call.resource) == ("create", "jobs")
        and r.request.status == 201
    )


def _followers(story: Story, name: str) -> list[str]:
    listed = story.get(
        f"/apis/apps/v1/namespaces/{story.namespace}/deployments?labelSelector="
        f"app.kubernetes.io/component%3Dfollower,embedshift.io/migration%3D{name}"
    )
    return sorted(
        d["metadata"]["name"]
        for d in (listed or {}).get("items", [])
        if not d["metadata"].get("deletionTimestamp")
    )


def test_helm_uninstall_keeps_the_data_and_the_crds(story: Story) -> None:
    out = story.helm("uninstall", RELEASE)
    assert "uninstalled" in out
    assert story.get(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/embeddingmigrations.embedshift.io"
    )
    with psycopg.connect(story.database_url) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE 'embedshift_story%'"
            )
        ]
    assert tables, "the side table went with the release"
    assert json.dumps(tables)
