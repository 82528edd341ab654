"""The kopf operator at scale on a real API server: memory, tick time, API requests per
resource, and its rollback latencies.

    .venv/bin/python benchmarks/operator.py [--resources 50] [--repeats 5] [--interval 5s]
        [--wave 10] [--kubeconfig PATH]

Real parts throughout: ``embedshift operator run`` as shipped (a subprocess: the real kopf and
the real ``kubernetes`` client) against a real Kubernetes control plane (etcd, kube-apiserver
and kube-controller-manager v1.36.2: ``../shared/kube/control-plane.sh`` started on free ports
with its state in this run's directory, by ``tests/kube_cluster.py``; or the cluster
``--kubeconfig`` names), the CRD from ``crds/`` applied and Established, a private
PostgreSQL + pgvector with one tiny table per migration, and a real Prometheus scraping (every
0.5 s) an exporter of the metric contract with steady healthy traffic for every migration
(:class:`rag_service.testing.traffic.ContractTraffic`).

Jobs run for real: the control plane has no kubelet, so the test Pod runner
(``tests/kubelet.py``) plays it, running each Pod's ``embedshift migrate …`` as a local process
with the Pod's environment (the database URL from the Secret); the Job controller completes the
Jobs, the ReplicaSet controller keeps each migration's follower Pod (``migrate follow``) running.
Nothing here writes ``jobs/status``. Migrations are created in waves of ``--wave`` (each wave
carried to Progressing before the next), so at most a wave's pipelines start Python at once on
a small machine; the set-up time is reported.

1. Memory. The operator's resident set (``VmRSS`` from ``/proc``) idle with no resource (the
   baseline, same run), then with ``--resources`` EmbeddingMigrations all carried to Progressing
   at 10 % and checked against Prometheus every ``--interval`` (7 success criteria and 2
   rollback thresholds each: 9 queries per check). Goal ≤ 150 MB with 50. Also the peak
   (``VmHWM``) and the growth per resource.
2. Tick time per resource: the operator's own ``embedshift_operator_tick_seconds`` histogram
   (read → observe: Jobs, the routing row and progress, an analysis check when due → decide →
   act → patch status), its mean and p50/p95 from the buckets, over the steady phase only
   (the counts before it are subtracted).
3. API requests, counted by the API server (its ``/metrics``: ``apiserver_request_total`` by
   verb and resource, the control plane's own components left out by their ``system_client``
   label; see ``benchmarks/kube_requests.py``) over the steady phase, minus a window of the
   same length after the operator has stopped (the Pod runner's heartbeats and Pod watch);
   per resource per minute. A LIST per tick is flagged with what it returns and what the
   server walked to answer it (``apiserver_cache_list_*``). Goal: no per-tick list whose
   answer grows with the namespace.
4. Latencies, with all ``--resources`` ticking, each repeat on a resource of its own, the
   routing row polled every 10 ms on an open connection:
   (b) ``maxPercentage: 0`` merge-patched through the API → row 0 %. Goal ≤ 2 s.
   (w) an Alertmanager webhook (v4 payload, bearer token) for the resource → row 0 %. Goal ≤ 1 s.
   (a) v2's error share set to 50 % for the resource; Prometheus polled (20 ms) with the very
       PromQL the criterion uses until it shows the breach; from that query to row 0 %.
       Goal ≤ one interval + 1 s.
   Baseline, measured in the same run: a direct ``UPDATE … ; SELECT pg_notify(…)`` on an open
   connection then a read-back (the floor of any controller).

``--kubeconfig``: a cluster of your own instead (kind, k3d; it must let its user read
``/metrics`` and create the CRD). The Pod runner still plays the kubelet for the benchmark's
namespace, binding its Pods to a node of its own; on a cluster whose scheduler binds them first,
that cluster's kubelet runs them in ``spec.migration.image`` (``--image``), which must then
reach this machine's PostgreSQL.

Exit status 0 means every goal was met.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
from kubernetes import client
from kubernetes import config as kube_config
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the control plane and the Pod runner are the test suite's

from benchmarks.kube_requests import ApiServerMetrics, Window  # noqa: E402
from embedshift_operator.adapters.kube import LABEL_KIND  # noqa: E402
from embedshift_operator.resource import GROUP, PLURAL, VERSION, parse_migration  # noqa: E402
from rag_service.criteria import metric_query  # noqa: E402
from rag_service.schema import setup  # noqa: E402
from rag_service.testing.corpus import create_corpus  # noqa: E402
from rag_service.testing.postgres import create_database, drop_database, postgres_server  # noqa: E402
from rag_service.testing.prometheus import running_prometheus, serving_metrics  # noqa: E402
from rag_service.testing.rollout import manifest  # noqa: E402
from rag_service.testing.service_process import free_port  # noqa: E402
from rag_service.testing.traffic import ContractTraffic, VersionTraffic  # noqa: E402
from tests.cluster.apiserver import apply_crd  # noqa: E402
from tests.kube_cluster import control_plane  # noqa: E402
from tests.kubelet import PodRunner  # noqa: E402

T = TypeVar("T")

NS = "bench"
WINDOW = "5s"
SCRAPE = "500ms"
TOKEN = "bench-alert-token"  # noqa: S105 (a throwaway token for a loopback receiver)
HEALTHY = VersionTraffic(
    provider="local", model="hash", requests_per_second=20, cost_usd_per_request=0.0
)
DEGRADED = replace(HEALTHY, error_share=0.5)
ROW_POLL = 0.01
PROMETHEUS_POLL = 0.02
MB = 1024 * 1024
GOAL_RSS_MB = 150.0
GOAL_EDIT = 2.0
GOAL_WEBHOOK = 1.0
IMAGE = "ghcr.io/embedshift/embedshift:bench"  # the Pod runner runs this venv's embedshift
FLOOR_TABLE = "docs_floor"
# Each migration's follower and the operator hold connections of their own: 50 migrations
# exceed PostgreSQL's default 100 (the Jobs of the fourth wave failed with "too many clients").
MAX_CONNECTIONS = 400


def name_of(index: int) -> str:
    return f"em-{index:03d}"


def key_of(index: int) -> str:
    return f"{NS}/{name_of(index)}"


def table_of(index: int) -> str:
    return f"docs_{index:03d}"


def document(
    index: int, *, prometheus_url: str, interval: str, image: str = IMAGE
) -> dict[str, Any]:
    """The test suite's fast manifest, one long step (no promotion during the run), over a
    table of its own (the Jobs of two migrations never share a side table)."""
    doc = manifest(
        name=name_of(index),
        prometheus_url=prometheus_url,
        table=table_of(index),
        steps=((10, "1h"), (100, "1h")),
        shards=1,
        analysis={"interval": interval, "window": WINDOW, "successfulChecks": 3},
    )
    doc["metadata"]["namespace"] = NS
    doc["spec"]["migration"]["image"] = image
    doc["spec"]["database"]["urlSecretRef"] = {"name": "rag-db", "key": "url"}
    return doc


# ---- the cluster: a real control plane, or the user's -------------------------------------------


@contextmanager
def api_server(kubeconfig: str | None, workdir: Path) -> Iterator[str]:
    """The path of the kubeconfig of the API server the run uses: the user's, else a fresh
    control plane (``tests/kube_cluster.py``) with its state under ``workdir``, stopped after."""
    if kubeconfig:
        yield kubeconfig
        return
    started = time.monotonic()
    with control_plane(workdir / "control-plane") as target:
        print(f"control plane up in {time.monotonic() - started:.1f} s", flush=True)
        yield target.kubeconfig


@contextmanager
def database_server() -> Iterator[str]:
    """The admin URL of a private PostgreSQL + pgvector allowing ``MAX_CONNECTIONS`` clients
    (``DATABASE_URL``'s server instead when set: its own limit then applies)."""
    if os.environ.get("DATABASE_URL"):
        with postgres_server() as admin_url:
            yield admin_url
        return
    data_dir = Path(tempfile.mkdtemp(prefix="embedshift-pg-")) / "data"
    try:
        # max_connections is read at start only: set it, then start the server again.
        with (
            postgres_server(data_dir) as admin_url,
            psycopg.connect(admin_url, autocommit=True) as conn,
        ):
            conn.execute(f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS}")
        with postgres_server(data_dir) as admin_url:
            yield admin_url
    finally:
        shutil.rmtree(data_dir.parent, ignore_errors=True)


# ---- the operator as shipped ---------------------------------------------------------------------


@dataclass
class OperatorProcess:
    process: subprocess.Popen[bytes]
    metrics_url: str
    receiver_url: str
    log_path: Path

    def rss_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MB."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024 / MB
        return fields["VmRSS"], fields["VmHWM"]

    def cpu_seconds(self) -> float:
        """User + system CPU time the operator has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
            raise SystemExit(
                f"the operator exited ({self.process.returncode}):\n" + "\n".join(tail)
            )


@contextmanager
def running_operator(kubeconfig: Path, workdir: Path) -> Iterator[OperatorProcess]:
    metrics_port, receiver_port, liveness_port = free_port(), free_port(), free_port()
    log_path = workdir / "operator.log"
    command = [
        str(ROOT / ".venv" / "bin" / "embedshift"),
        "operator",
        "run",
        "--all-namespaces",
        "--standalone",
        "--kubeconfig",
        str(kubeconfig),
        "--metrics-port",
        str(metrics_port),
        "--receiver-port",
        str(receiver_port),
        "--liveness-port",
        str(liveness_port),
    ]
    env = {**os.environ, "ALERT_WEBHOOK_SECRET": TOKEN}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    operator = OperatorProcess(
        process=process,
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        receiver_url=f"http://127.0.0.1:{receiver_port}/alerts",
        log_path=log_path,
    )
    try:
        wait_until(
            "the operator's metrics endpoint",
            lambda: _answers(operator.metrics_url),
            timeout=60,
            alive=operator.check_alive,
        )
        yield operator
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def tick_histogram(metrics_url: str) -> dict[str, Any]:
    """The operator's tick histogram summed over resources: count, sum and cumulative buckets."""
    text = httpx.get(metrics_url, timeout=10).text
    count, total = 0.0, 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "embedshift_operator_tick_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return {"count": count, "sum": total, "buckets": buckets}


def quantile(q: float, before: dict[str, Any], after: dict[str, Any]) -> float:
    """``histogram_quantile`` over the difference of two readings (linear within a bucket)."""
    bounds = sorted(after["buckets"])
    counts = [after["buckets"][b] - before["buckets"].get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return float("nan")
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower_bound
            share = (rank - lower_count) / max(cumulative - lower_count, 1e-12)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, cumulative
    return bounds[-1]


# ---- the cluster side: resources and their Jobs --------------------------------------------------


class Cluster:
    def __init__(self, kubeconfig: str, database_url: str) -> None:
        self.api = kube_config.new_client_from_config(config_file=kubeconfig)
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.objects = client.CustomObjectsApi(self.api)
        self.database_url = database_url

    def apply_crd(self) -> None:
        """``kubectl apply -f crds/`` and ``kubectl wait --for=condition=Established``."""
        apply_crd(self.api)

    def create_namespace(self) -> None:
        self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))

        def service_account() -> bool:
            # The Job controller cannot create Pods before the namespace's default account.
            accounts = self.core.list_namespaced_service_account(NS).items
            return "default" in [meta(a).name for a in accounts]

        wait_until("the default ServiceAccount", service_account, timeout=60, alive=lambda: None)

    def create_secret(self) -> None:
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(name="rag-db", namespace=NS),
            data={"url": base64.b64encode(self.database_url.encode()).decode()},
        )
        self.core.create_namespaced_secret(NS, body)

    def create(self, doc: dict[str, Any]) -> None:
        self.objects.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, doc)

    def phases(self) -> dict[str, str]:
        listed = self.objects.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
        return {
            item["metadata"]["name"]: (item.get("status") or {}).get("phase", "")
            for item in listed["items"]
        }

    def failed_jobs(self) -> list[str]:
        """Jobs the Job controller failed, with its reason (a Pod that could not run)."""
        failed = []
        for job in self.batch.list_namespaced_job(NS).items:
            for c in (job.status.conditions if job.status else None) or []:
                if c.type == "Failed" and c.status == "True":
                    failed.append(f"{meta(job).name}: {c.reason}: {c.message}")
        return failed

    def job_kinds(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for job in self.batch.list_namespaced_job(NS).items:
            kind = (job.metadata.labels or {}).get(LABEL_KIND, "?")
            kinds[kind] = kinds.get(kind, 0) + 1
        return kinds

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.objects.patch_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL, name, {"spec": spec}
        )

    def history(self, name: str) -> list[dict[str, Any]]:
        raw = self.objects.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
        history: list[dict[str, Any]] = (raw.get("status") or {}).get("history") or []
        return history


def meta(obj: Any) -> client.V1ObjectMeta:
    """A client model's metadata (the API server always sets it on what it returns)."""
    metadata = obj.metadata
    assert isinstance(metadata, client.V1ObjectMeta)
    return metadata


def wait_until(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout: float,
    alive: Callable[[], None],
    every: float = 0.05,
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        alive()
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# ---- measurements --------------------------------------------------------------------------------


@dataclass
class Results:
    resources: int
    interval: float
    rss_idle: tuple[float, float] = (0.0, 0.0)
    rss_loaded: list[tuple[float, float]] = field(default_factory=list)
    ticks: int = 0
    tick_mean: float = 0.0
    tick_p50: float = 0.0
    tick_p95: float = 0.0
    steady_seconds: float = 0.0
    cpu: float = 0.0  # the operator's CPU seconds over the steady phase
    edit: list[float] = field(default_factory=list)
    webhook: list[float] = field(default_factory=list)
    breach: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    load: tuple[float, float] = (0.0, 0.0)
    wave: int = 0
    setup_seconds: float = 0.0  # created → all Progressing, every Job run by the Pod runner
    waves: list[float] = field(default_factory=list)
    jobs: dict[str, int] = field(default_factory=dict)
    connections: dict[str, int] = field(default_factory=dict)  # by application_name
    operator_window: Window | None = None  # API requests over the steady phase
    baseline_window: Window | None = None  # the same length, the operator stopped


class Rows:
    """Reads and writes of the routing rows on open connections."""

    def __init__(self, url: str) -> None:
        self.poller = psycopg.connect(url, autocommit=True)
        self.writer = psycopg.connect(url, autocommit=True)

    def close(self) -> None:
        self.poller.close()
        self.writer.close()

    def percentage(self, key: str) -> int | None:
        row = self.poller.execute(
            "SELECT percentage FROM embedshift_rollout WHERE migration = %s", [key]
        ).fetchone()
        return None if row is None else int(row[0])

    def time_to_zero(self, key: str, started: float, *, timeout: float) -> float:
        deadline = started + timeout
        while self.percentage(key) != 0:
            if time.perf_counter() > deadline:
                # A miss to report with the rest, not a reason to lose the run's numbers.
                print(f"{key}: the routing row did not reach 0 % within {timeout} s", flush=True)
                return float("inf")
            time.sleep(ROW_POLL)
        return time.perf_counter() - started

    def connections(self) -> dict[str, int]:
        """The database's client connections by application name (the follower's, ...)."""
        found = self.poller.execute(
            "SELECT coalesce(nullif(application_name, ''), '(unnamed)'), count(*) "
            "FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND datname = current_database() GROUP BY 1 ORDER BY 2 DESC"
        ).fetchall()
        return {str(name): int(count) for name, count in found}

    def floor(self) -> float:
        """A direct write + NOTIFY on an open connection, until another reads it back."""
        started = time.perf_counter()
        with self.writer.transaction():
            self.writer.execute(
                "UPDATE embedshift_rollout SET percentage = 0 WHERE migration = 'bench/floor'"
            )
            self.writer.execute("SELECT pg_notify('embedshift_rollout', 'bench/floor')")
        while self.percentage("bench/floor") != 0:
            time.sleep(0.0005)
        elapsed = time.perf_counter() - started
        self.writer.execute(
            "UPDATE embedshift_rollout SET percentage = 10 WHERE migration = 'bench/floor'"
        )
        return elapsed


def rolled_back(cluster: Cluster, name: str) -> Callable[[], dict[str, Any] | None]:
    """A probe: the last history entry once it is the rollback (the row is written first)."""

    def probe() -> dict[str, Any] | None:
        last = cluster.history(name)[-1:]
        return last[0] if last and last[0]["phase"] == "RolledBack" else None

    return probe


def alert_payload(key: str) -> dict[str, Any]:
    """Alertmanager's webhook body (version 4) with one firing alert for ``key``."""
    labels = {
        "alertname": "EmbedshiftV2ErrorRate",
        "severity": "critical",
        "migration": key,  # what the receiver matches (adapters.alerts.targets)
    }
    return {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="{labels["alertname"]}"}}',
        "status": "firing",
        "receiver": "embedshift-operator",
        "groupLabels": {"alertname": labels["alertname"]},
        "commonLabels": labels,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.invalid",
        "alerts": [
            {
                "status": "firing",
                "labels": labels,
                "annotations": {"summary": "v2 error rate above 10 %"},
                "startsAt": "2026-11-24T00:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus.invalid",
                "fingerprint": f"{abs(hash(key)) % 10**16:016x}",
            }
        ],
    }


def run(args: argparse.Namespace) -> Results:
    interval = float(args.interval.removesuffix("s"))
    results = Results(resources=args.resources, interval=interval, wave=args.wave)
    workdir = Path(tempfile.mkdtemp(prefix="embedshift-bench-operator-"))
    keys = [key_of(i) for i in range(args.resources)]
    registry = CollectorRegistry()
    traffic_of = {key: {"v1": HEALTHY, "v2": HEALTHY} for key in keys}
    rng = random.Random(args.seed)
    with (
        database_server() as admin_url,
        ContractTraffic(registry, traffic_of) as traffic,
        serving_metrics(registry) as target,
        running_prometheus(targets=[target], scrape_interval=SCRAPE) as prometheus,
        api_server(args.kubeconfig, workdir) as kubeconfig_path,
        PodRunner(kubeconfig_path, workdir / "pods") as runner,
    ):
        name, url = create_database(admin_url, prefix="bench_operator")
        metrics = ApiServerMetrics(kubeconfig_path)
        try:
            for i in range(args.resources):
                create_corpus(url, table=table_of(i), count=args.rows, source_dimensions=32)
            # The floor's routing row: a row of its own, beside no migration's.
            create_corpus(url, table=FLOOR_TABLE, count=args.rows, source_dimensions=32)
            floor = document(0, prometheus_url=prometheus.url, interval=args.interval)
            floor["spec"]["database"]["table"] = FLOOR_TABLE
            data_plane = parse_migration(floor, where="bench").spec.data_plane
            asyncio.run(setup(url, data_plane, migration="bench/floor"))
            prometheus.wait_for_scrape(scrapes=2)
            kubeconfig = Path(kubeconfig_path)
            cluster = Cluster(kubeconfig_path, url)
            cluster.apply_crd()
            cluster.create_namespace()
            cluster.create_secret()
            runner.serve(NS)
            rows = Rows(url)
            try:
                with running_operator(kubeconfig, workdir) as operator:
                    measure(
                        args,
                        results,
                        cluster,
                        operator,
                        prometheus.url,
                        traffic,
                        rows,
                        rng,
                        runner,
                        metrics,
                    )
                # The same window with the operator gone: what the rest asks (the Pod
                # runner's heartbeats and Pod watch), to subtract.
                time.sleep(5)
                before = metrics.read()
                started = time.monotonic()
                time.sleep(args.steady)
                results.baseline_window = Window.between(
                    before, metrics.read(), time.monotonic() - started
                )
            finally:
                rows.close()
                _report_runner_errors(runner)
        finally:
            metrics.close()
            drop_database(admin_url, name)
    return results


def _report_runner_errors(runner: PodRunner) -> None:
    for message in runner.errors:
        if not message.startswith("watch:"):  # a watch that ends is re-opened; others matter
            print(f"pod runner: {message}", file=sys.stderr, flush=True)


def measure(
    args: argparse.Namespace,
    results: Results,
    cluster: Cluster,
    operator: OperatorProcess,
    prometheus_url: str,
    traffic: ContractTraffic,
    rows: Rows,
    rng: random.Random,
    runner: PodRunner,
    metrics: ApiServerMetrics,
) -> None:
    n = args.resources
    time.sleep(3)  # let the idle operator settle (imports done, watches open)
    results.rss_idle = operator.rss_mb()
    print(f"idle: RSS {results.rss_idle[0]:.1f} MB", flush=True)

    started = time.monotonic()
    for first in range(0, n, args.wave):
        wave = range(first, min(first + args.wave, n))
        wave_started = time.monotonic()
        for i in wave:
            cluster.create(
                document(i, prometheus_url=prometheus_url, interval=args.interval, image=args.image)
            )

        def progressing(wave: range = wave) -> bool:
            failed = cluster.failed_jobs()
            if failed:
                raise SystemExit("Jobs failed:\n" + "\n".join(failed))
            phases = cluster.phases()
            return all(phases.get(name_of(i)) == "Progressing" for i in wave)

        wait_until(
            f"resources {wave.start}-{wave.stop - 1} at Progressing",
            progressing,
            timeout=120 + 30 * len(wave),
            alive=operator.check_alive,
            every=0.5,
        )
        results.waves.append(time.monotonic() - wave_started)
        print(
            f"wave {len(results.waves)}: {len(wave)} resources at Progressing in "
            f"{results.waves[-1]:.1f} s",
            flush=True,
        )

    def followers_running() -> bool:
        return len(runner.running(NS)) >= n

    wait_until(
        f"{n} follower Pods running",
        followers_running,
        timeout=60 + 2 * n,
        alive=operator.check_alive,
        every=0.5,
    )
    results.setup_seconds = time.monotonic() - started
    results.jobs = cluster.job_kinds()
    print(
        f"{n} resources carried to Progressing in {results.setup_seconds:.1f} s, their "
        f"followers running (Jobs: {results.jobs}, completed by the Job controller)",
        flush=True,
    )
    results.load = (os.getloadavg()[0], 0.0)

    # Steady state: every resource checked against Prometheus each interval.
    time.sleep(2 * results.interval)
    before = tick_histogram(operator.metrics_url)
    requests_before = metrics.read()
    cpu_before = operator.cpu_seconds()
    steady_started = time.monotonic()
    for _ in range(args.samples):
        time.sleep(args.steady / args.samples)
        operator.check_alive()
        results.rss_loaded.append(operator.rss_mb())
    after = tick_histogram(operator.metrics_url)
    results.cpu = operator.cpu_seconds() - cpu_before
    results.steady_seconds = time.monotonic() - steady_started
    results.operator_window = Window.between(
        requests_before, metrics.read(), results.steady_seconds
    )
    results.connections = rows.connections()
    results.ticks = int(after["count"] - before["count"])
    if results.ticks:
        results.tick_mean = (after["sum"] - before["sum"]) / results.ticks
        results.tick_p50 = quantile(0.5, before, after)
        results.tick_p95 = quantile(0.95, before, after)
    print(
        f"steady: RSS {max(r[0] for r in results.rss_loaded):.1f} MB; "
        f"{results.ticks} ticks, mean {results.tick_mean * 1000:.1f} ms",
        flush=True,
    )

    # Latencies, one resource each (they stay at 0 % afterwards).
    victims = iter(range(n))
    http = httpx.Client(timeout=10)
    try:
        for repeat in range(args.repeats):
            for _ in range(3):
                results.floor.append(rows.floor())
            # (b) the spec edit.
            i = next(victims)
            time.sleep(rng.uniform(0, results.interval))
            t0 = time.perf_counter()
            cluster.patch_spec(name_of(i), {"rollout": {"maxPercentage": 0}})
            results.edit.append(rows.time_to_zero(key_of(i), t0, timeout=30))
            # (w) the webhook.
            i = next(victims)
            time.sleep(rng.uniform(0, results.interval))
            t0 = time.perf_counter()
            answer = http.post(
                operator.receiver_url,
                json=alert_payload(key_of(i)),
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            if answer.status_code >= 300:
                raise SystemExit(f"the receiver answered {answer.status_code}: {answer.text}")
            results.webhook.append(rows.time_to_zero(key_of(i), t0, timeout=30))
            # (a) the breach Prometheus shows.
            i = next(victims)
            time.sleep(rng.uniform(0, results.interval))
            traffic.set_traffic(key_of(i), "v2", DEGRADED)
            query = metric_query("error_rate", version="v2", migration=key_of(i), window=WINDOW)
            while True:
                t0 = time.perf_counter()
                answer = http.get(f"{prometheus_url}/api/v1/query", params={"query": query})
                result = answer.json()["data"]["result"]
                if result and float(result[0]["value"][1]) > 0.10:
                    break
                time.sleep(PROMETHEUS_POLL)
            results.breach.append(rows.time_to_zero(key_of(i), t0, timeout=results.interval + 30))
            if results.breach[-1] == float("inf"):
                continue
            last = wait_until(
                f"{key_of(i)}: RolledBack in status",
                rolled_back(cluster, name_of(i)),
                timeout=10,
                alive=operator.check_alive,
            )
            if last.get("reason") != "ThresholdBreached":
                raise SystemExit(f"{key_of(i)}: rolled back for {last}, not the breach")
            print(
                f"repeat {repeat + 1}: edit {results.edit[-1] * 1000:.0f} ms, "
                f"webhook {results.webhook[-1] * 1000:.0f} ms, "
                f"breach {results.breach[-1] * 1000:.0f} ms",
                flush=True,
            )
    finally:
        http.close()
    results.load = (results.load[0], os.getloadavg()[0])


def report(results: Results) -> bool:
    def ms(values: list[float]) -> str:
        if not values:
            return "—"
        return (
            f"median {statistics.median(values) * 1000:.0f} ms, "
            f"max {max(values) * 1000:.0f} ms (n={len(values)})"
        )

    floor = statistics.median(results.floor) if results.floor else float("nan")
    rss = max(r[0] for r in results.rss_loaded)
    peak = max(r[1] for r in results.rss_loaded)
    per_resource = (rss - results.rss_idle[0]) / results.resources
    goals = {
        "RSS": rss <= GOAL_RSS_MB,
        "edit": bool(results.edit) and max(results.edit) <= GOAL_EDIT,
        "webhook": bool(results.webhook) and max(results.webhook) <= GOAL_WEBHOOK,
        "breach": bool(results.breach) and max(results.breach) <= results.interval + 1.0,
    }
    print()
    print(f"resources: {results.resources}; analysis interval {results.interval:g} s")
    print(
        f"RSS idle {results.rss_idle[0]:.1f} MB; with {results.resources}: {rss:.1f} MB "
        f"(peak {peak:.1f} MB; ×{rss / results.rss_idle[0]:.2f} idle; "
        f"+{per_resource:.2f} MB per resource). Goal ≤ {GOAL_RSS_MB:.0f} MB: "
        f"{'met' if goals['RSS'] else 'MISSED'}"
    )
    print(
        f"ticks: {results.ticks} in {results.steady_seconds:.0f} s "
        f"({results.ticks / max(results.steady_seconds, 1e-9):.1f}/s); per tick mean "
        f"{results.tick_mean * 1000:.1f} ms, p50 {results.tick_p50 * 1000:.1f} ms, "
        f"p95 {results.tick_p95 * 1000:.1f} ms (wall, waits on the API server included)"
    )
    print(
        f"operator CPU: {results.cpu / max(results.steady_seconds, 1e-9) * 100:.0f} % of a core; "
        f"{results.cpu / max(results.ticks, 1) * 1000:.1f} ms per tick"
    )
    print(f"floor (direct UPDATE + NOTIFY, read back): median {floor * 1000:.2f} ms")
    for label, values, goal, key in (
        ("(b) maxPercentage: 0 → 0 %", results.edit, GOAL_EDIT, "edit"),
        ("(w) webhook → 0 %", results.webhook, GOAL_WEBHOOK, "webhook"),
        ("(a) breach → 0 %", results.breach, results.interval + 1.0, "breach"),
    ):
        ratio = statistics.median(values) / floor if values and floor else float("nan")
        print(
            f"{label}: {ms(values)}; ×{ratio:.0f} the floor. Goal ≤ {goal:g} s: "
            f"{'met' if goals[key] else 'MISSED'}"
        )
    goals["lists"] = report_requests(results)
    waves = ", ".join(f"{w:.0f}" for w in results.waves)
    print(
        f"set-up: {results.resources} resources created → Progressing, followers running, in "
        f"{results.setup_seconds:.0f} s (waves of {results.wave}: {waves} s); Jobs {results.jobs}"
    )
    connections = ", ".join(f"{k} {v}" for k, v in results.connections.items())
    print(
        f"database connections at steady state: {sum(results.connections.values())} ({connections})"
    )
    print(f"load average (1 min) before/after: {results.load[0]:.2f} / {results.load[1]:.2f}")
    return all(goals.values())


def report_requests(results: Results) -> bool:
    """API requests per resource per minute, the operator's (its window minus the baseline's);
    True when no per-tick list answers with more than one migration's objects."""
    window, baseline = results.operator_window, results.baseline_window
    if window is None or baseline is None:
        print("API requests: not measured")
        return False
    n = results.resources
    ticks = results.ticks * 60.0 / window.seconds / n  # per resource per minute
    ours = {k: v / n for k, v in window.minus(baseline).items()}
    print(
        f"API requests (server-side, apiserver_request_total; {window.seconds:.0f} s with the "
        f"operator minus {baseline.seconds:.0f} s without it), per resource per minute "
        f"({ticks:.1f} ticks per resource per minute):"
    )
    total = 0.0
    per_migration = {"jobs.batch": sum(results.jobs.values()) / n, "deployments.apps": 1.0}
    lists_ok = True
    for key, rate in sorted(ours.items(), key=lambda kv: -abs(kv[1])):
        if abs(rate) < 0.05:
            continue
        total += rate
        verb, resource, scope = key
        note = ""
        if verb == "LIST" and rate >= 0.5 * ticks:
            note = "  ← a LIST per tick" if rate < 1.5 * ticks else "  ← LISTs per tick"
            lists = window.cache_lists.get(resource, 0.0)
            if lists:
                fetched = window.cache_fetched.get(resource, 0.0) / lists
                returned = window.cache_returned.get(resource, 0.0) / lists
                bound = per_migration.get(resource)
                grows = bound is None or returned > bound + 0.5
                lists_ok = lists_ok and not grows
                note += (
                    f" (label-selected: returns {returned:.1f} objects per list, one migration's "
                    f"{bound if bound is not None else '?'}; the watch cache walked "
                    f"{fetched:.1f} to find them{': GROWS with the namespace' if grows else ''})"
                )
            else:
                lists_ok = False
                note += " (not served from the watch cache: size unknown)"
        print(f"  {verb:<7} {resource:<32} {scope:<9} {rate:7.2f}{note}")
    print(f"  total {total:.1f} requests per resource per minute")
    others = ", ".join(
        f"{verb} {resource} {rate:.1f}"
        for (verb, resource, _), rate in sorted(baseline.per_minute().items())
    )
    print(f"  baseline without the operator (the Pod runner), per minute: {others}")
    print(f"per-tick lists that grow with the namespace: {'none' if lists_ok else 'SOME'}")
    return lists_ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resources", type=int, default=50, help="EmbeddingMigrations (50)")
    parser.add_argument("--repeats", type=int, default=5, help="latency repeats (5)")
    parser.add_argument("--interval", default="5s", help="analysis interval, seconds (5s)")
    parser.add_argument("--steady", type=float, default=30.0, help="steady phase, s (30)")
    parser.add_argument("--samples", type=int, default=10, help="RSS samples in it (10)")
    parser.add_argument("--rows", type=int, default=5, help="rows per migration's table (5)")
    parser.add_argument(
        "--wave",
        type=int,
        default=10,
        help="migrations created at once, carried to Progressing before the next wave (10)",
    )
    parser.add_argument(
        "--kubeconfig",
        help="a cluster of your own (kind, k3d) instead of a fresh control plane",
    )
    parser.add_argument(
        "--image",
        default=IMAGE,
        help="spec.migration.image (a cluster's own "
        "kubelet pulls it; the Pod runner runs this venv's embedshift)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (1)")
    args = parser.parse_args()
    if args.resources < 3 * args.repeats:
        parser.error("--resources must be at least 3 × --repeats (one resource per latency)")
    return 0 if report(run(args)) else 1


if __name__ == "__main__":
    sys.exit(main())
