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

    # Deleted: the finalizer cannot route 0 % through such a URL, and says so (in the log).
    namespace.kubectl("delete", "em", "--all", "--wait=false")
    time.sleep(3)

    # The sentinel, anywhere the namespace shows: objects, Events, Pods, logs.
    shown = namespace.kubectl(
        "get", "embeddingmigrations,events,pods,jobs,deployments,replicasets,configmaps",
        "-o", "yaml",
    )  # fmt: skip
    logs = namespace.runner.logs(namespace.name)
    assert logs, "no Pod ran"
    for where, text in [("objects", shown), *logs.items()]:
        for piece in (SENTINEL, SENTINEL[:8], SENTINEL[8:]):
            assert piece not in text, (
                f"{piece!r} in {where}: {text[text.find(piece) - 300 :][:600]}"
            )
    # Mended, the deletions finish: the finalizer, retrying with back-off while the URL was
    # unusable, routes 0 % now. (Its retry state lives in an annotation named after the handler:
    # the real server refused the name kopf took from the function, `_deleted`, so a deletion
    # that had to wait never finished.)
    for i in range(len(database_urls(SENTINEL))):
        namespace.secret(f"db-{i}", database_url, replace=True)

    def left() -> list[str]:
        listed = namespace.api.request(
            "GET", f"/apis/embedshift.io/v1alpha1/namespaces/{namespace.name}/embeddingmigrations"
        )
        return [i["metadata"]["name"] for i in listed["items"]]

    deadline = time.monotonic() + 180  # the finalizer's retries back off to a minute
    while left() and time.monotonic() < deadline:
        time.sleep(1)
    operator_log = "".join(namespace.runner.logs(namespace.name, f"{RELEASE}-operator").values())
    assert not left(), f"not deleted once mended: {left()}\n{operator_log[-4000:]}"
