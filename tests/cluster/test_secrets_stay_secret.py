"""No Secret's value leaks through what the chart's operator writes, on the real API server.

Whoever may create an EmbeddingMigration names Secrets of its namespace (``urlSecretRef``,
``apiKeySecretRef``, ``bearerTokenSecretRef``); the operator reads them as its ServiceAccount.
Each Secret here holds a value carrying a random sentinel in a malformed shape
(:mod:`tests.secret_shapes`): the database URL in every shape, an API key and a Prometheus
bearer token no HTTP header can carry. Once each migration has said what is wrong, the
sentinel appears nowhere: not in any EmbeddingMigration (status included), Event, Pod
(termination messages included), Job, Deployment or ConfigMap of the namespace, nor in any
Pod's log (the operator's, the Jobs').
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import yaml

from rag_service.testing.corpus import create_corpus
from tests.chart.helm import CHART, HELM, KUBECTL
from tests.cluster.test_chart_story import PIPELINE, manifest, run
from tests.helpers import eventually
from tests.kubelet import Api, PodRunner
from tests.operator.e2e.target import Target
from tests.rag_service.test_redaction import PROBLEMS
from tests.secret_shapes import database_urls, header_values, sentinel

RELEASE = "embedshift"
SENTINEL = sentinel()
DELETION_TIMEOUT = 20


@dataclass
class Namespace:
    name: str
    target: Target
    api: Api
    runner: PodRunner

    def kubectl(self, *args: str, check: bool = True) -> str:
        return run(KUBECTL, "-n", self.name, *args, kubeconfig=self.target.kubeconfig, check=check)

    def secret(self, name: str, value: str, *, replace: bool = False) -> None:
        # Through the API, not `kubectl --from-literal`: a value may hold any byte.
        body = {
            "metadata": {"name": name},
            "data": {"value": base64.b64encode(value.encode()).decode()},
        }
        path = f"/api/v1/namespaces/{self.name}/secrets"
        if replace:
            self.api.request("PUT", f"{path}/{name}", body)
        else:
            self.api.request("POST", path, body)

    def operator_pods(self) -> list[dict[str, Any]]:
        listed = self.api.request(
            "GET",
            f"/api/v1/namespaces/{self.name}/pods"
            "?labelSelector=app.kubernetes.io/component%3Doperator",
        )
        return [p for p in listed["items"] if p.get("status", {}).get("podIP")]

    def events(self) -> dict[str, list[str]]:
        """Reason → the EmbeddingMigrations an Event of that reason is about."""
        listed = self.api.request("GET", f"/api/v1/namespaces/{self.name}/events")
        reasons: dict[str, list[str]] = {}
        for event in listed["items"]:
            about = event["involvedObject"]
            if about.get("kind") == "EmbeddingMigration":
                reasons.setdefault(event["reason"], []).append(about["name"])
        return reasons

    def status(self, name: str) -> dict[str, Any]:
        found = self.api.request(
            "GET",
            f"/apis/embedshift.io/v1alpha1/namespaces/{self.name}/embeddingmigrations/{name}",
            ok=(404,),
        )
        status: dict[str, Any] = (found or {}).get("status") or {}
        return status


@pytest.fixture(scope="module")
def namespace(kube_cluster: Target, pod_runner: PodRunner) -> Iterator[Namespace]:
    api = Api(kube_cluster.kubeconfig)
    ns = Namespace(f"secrets-{uuid.uuid4().hex[:6]}", kube_cluster, api, pod_runner)
    run(KUBECTL, "create", "namespace", ns.name, kubeconfig=kube_cluster.kubeconfig)
    pod_runner.serve(ns.name)
    # The operator alone (the search service is another story's).
    run(HELM, "install", RELEASE, str(CHART), "-n", ns.name,
        "--set", "search.enabled=false",
        "--set", "alertWebhook.existingSecret=",
        "--set", "operator.ports.receiver=0",
        # Short, so the finalizers that cannot route 0 % let go with their Warning in this test.
        "--set", f"operator.deletionTimeout={DELETION_TIMEOUT}s",
        kubeconfig=kube_cluster.kubeconfig)  # fmt: skip
    try:
        yield ns
    finally:
        run(HELM, "uninstall", RELEASE, "-n", ns.name, kubeconfig=kube_cluster.kubeconfig)
        api.request("DELETE", f"/api/v1/namespaces/{ns.name}", ok=(404,))
        api.close()


def test_no_secret_value_appears_in_anything_the_operator_writes(
    namespace: Namespace, database_url: str, request: pytest.FixtureRequest
) -> None:
    table = f"secrets_{namespace.name.replace('-', '_')}"
    create_corpus(database_url, table=table, count=10)
    namespace.secret("rag-db", database_url)
    bodies: dict[str, dict[str, Any]] = {}
    for i, (shape, url) in enumerate(database_urls(SENTINEL).items()):
        namespace.secret(f"db-{i}", url)
        body = manifest(namespace.name, table, prometheus="127.0.0.1:9")
        body["metadata"]["name"] = f"url-{shape}"
        body["spec"]["database"]["urlSecretRef"] = {"name": f"db-{i}", "key": "value"}
        bodies[f"url-{shape}"] = body
    # An API key no header can carry: the shard Job's `migrate run` refuses it (exit 5).
    namespace.secret("api-key", header_values(SENTINEL)["inner-newline"])
    body = manifest(namespace.name, table, prometheus="127.0.0.1:9")
    body["metadata"]["name"] = "api-key"
    body["spec"]["database"]["urlSecretRef"] = {"name": "rag-db", "key": "value"}
    body["spec"]["target"] = {
        "provider": "openai",
        "model": "text-embedding-3-small",
        "dimensions": 256,
        "baseURL": "http://127.0.0.1:1/v1",
        "apiKeySecretRef": {"name": "api-key", "key": "value"},
    }
    bodies["api-key"] = body
    # A Prometheus bearer token no header can carry: the analysis says so, every check.
    namespace.secret("prom-token", header_values(SENTINEL)["carriage-return"])
    body = manifest(namespace.name, table + "_t", prometheus="127.0.0.1:9")
    create_corpus(database_url, table=table + "_t", count=10)
    body["metadata"]["name"] = "prometheus-token"
    body["spec"]["database"]["urlSecretRef"] = {"name": "rag-db", "key": "value"}
    body["spec"]["analysis"]["prometheus"]["bearerTokenSecretRef"] = {
        "name": "prom-token",
        "key": "value",
    }
    bodies["prometheus-token"] = body
    path = request.config.rootpath / ".pytest-secrets.yaml"
    try:
        path.write_text(yaml.safe_dump_all(bodies.values()))
        namespace.kubectl("apply", "-f", str(path))
    finally:
        path.unlink(missing_ok=True)

    # Each says what is wrong, in its status, without the value.
    for shape, problem in PROBLEMS.items():
        wanted = "does not hold a usable PostgreSQL URL" if problem else "cannot connect"

        def said(name: str = f"url-{shape}", wanted: str = wanted) -> bool:
            return wanted in str(namespace.status(name).get("message", ""))

        eventually(said, f"url-{shape} saying {wanted!r}", 60)

    def key_refused() -> bool:
        status = namespace.status("api-key")
        return status.get("phase") == "Failed" and "cannot be sent" in status.get("message", "")

    eventually(key_refused, "the api-key migration Failed, saying the key cannot be sent", PIPELINE)

    def token_refused() -> bool:
        results = (namespace.status("prometheus-token").get("analysis") or {}).get("results")
        return "bearer token cannot be sent" in str(results)

    eventually(token_refused, "the analysis saying the bearer token cannot be sent", PIPELINE)

    # The operator's metrics: their labels name migrations and error kinds, never a value.
    metrics = {
        f"metrics of {pod['metadata']['name']}": httpx.get(
            f"http://{pod['status']['podIP']}:9100/metrics", timeout=5
        ).text
        for pod in namespace.operator_pods()
    }
    assert any("embedshift_operator_errors_total{" in m for m in metrics.values()), metrics

    # Deleted: the finalizers cannot route 0 % through such URLs; they retry, then let go
    # with a RoutingNotReset Warning naming the row to reset. One Secret mended meanwhile lets
    # its finalizer route 0 % on a retry (RoutedToV1): retry state survives between attempts.
    namespace.kubectl("delete", "em", "--all", "--wait=false")
    namespace.secret("db-0", database_url, replace=True)
    broken = [f"url-{shape}" for shape in list(database_urls(SENTINEL))[1:]]

    def left() -> list[str]:
        listed = namespace.api.request(
            "GET", f"/apis/embedshift.io/v1alpha1/namespaces/{namespace.name}/embeddingmigrations"
        )
        return [i["metadata"]["name"] for i in listed["items"]]

    deadline = time.monotonic() + DELETION_TIMEOUT + 90  # the last retry's back-off included
    while left() and time.monotonic() < deadline:
        time.sleep(1)
    operator_log = "".join(namespace.runner.logs(namespace.name, f"{RELEASE}-operator").values())
    assert not left(), f"not deleted: {left()}\n{operator_log[-4000:]}"
    events = namespace.events()
    assert sorted(events.get("RoutingNotReset", [])) == sorted(broken), events
    assert "url-not-a-url" in events.get("RoutedToV1", []), events

    # The sentinel, anywhere the namespace shows: objects, Events, Pods, logs, metrics.
    shown = namespace.kubectl(
        "get", "embeddingmigrations,events,pods,jobs,deployments,replicasets,configmaps",
        "-o", "yaml",
    )  # fmt: skip
    logs = namespace.runner.logs(namespace.name)
    assert logs, "no Pod ran"
    for where, text in [("objects", shown), *logs.items(), *metrics.items()]:
        for piece in (SENTINEL, SENTINEL[:8], SENTINEL[8:]):
            assert piece not in text, (
                f"{piece!r} in {where}: {text[text.find(piece) - 300 :][:600]}"
            )
