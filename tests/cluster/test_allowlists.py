"""The operator's allowlists on the real API server, with the chart's operator Pod.

``helm install`` with ``operator.allowedImages`` left at its default (the chart's repository) and
``operator.allowedEndpoints`` set; two refused migrations, each beside its control:

- ``image-refused`` names an image outside: Ready False ``ImageNotAllowed``, a Warning Event, and
  no Job; ``image-allowed`` (the operator's own image) gets its setup Job meanwhile.
- ``prom-refused`` is Progressing (so an analysis check is due every second) with a Prometheus
  whose host is outside, and a bearer token: Ready False ``EndpointNotAllowed``, a Warning
  Event, and its listener never sees a connection; ``prom-allowed``, the same with a host inside,
  receives its token on every check.

Both Progressing statuses are written before the operator starts (as a restarted operator finds
them), so its very first tick of each is one that would ask Prometheus.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from embedshift_operator.resource import (
    EmbeddingMigrationStatus,
    Phase,
    VerificationStatus,
    parse_migration,
    spec_hash,
)
from tests import pod_network
from tests.chart.helm import CHART, HELM, KUBECTL
from tests.cluster.test_chart_story import manifest, run
from tests.helpers import eventually
from tests.kubelet import Api, PodRunner
from tests.operator.e2e.target import Target

RELEASE = "embedshift"
EM = "/apis/embedshift.io/v1alpha1/namespaces/{ns}/embeddingmigrations"
# A second address of the host, which the Pods reach as they reach 10.0.0.1 (their default
# route leads to the host); the only IP in allowedEndpoints.
ALLOWED_IP = "10.254.0.1"
REFUSED_IP = pod_network.SERVICE_IP  # every Pod reaches it: the API server's address
OUTSIDE_IMAGE = "docker.io/someone/embedshift:latest"
WITHIN = 90.0  # the operator's Pod to start and tick (two cores, other tests beside)


class Listener:
    """A Prometheus-shaped HTTP server that counts connections and keeps Authorization headers."""

    def __init__(self, host: str) -> None:
        self.connections = 0
        self.authorizations: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.authorizations.append(self.headers.get("Authorization"))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                return None

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request: Any, client_address: Any) -> None:
                outer.connections += 1
                super().process_request(request, client_address)

        self.server = Server((host, 0), Handler)
        self.address = f"{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def allowed_address() -> Iterator[str]:
    """``ALLOWED_IP`` on the host's loopback link, for this module."""
    added = _ip("addr", "add", f"{ALLOWED_IP}/32", "dev", "lo")
    assert added.returncode == 0 or "already assigned" in added.stderr, added.stderr
    try:
        yield ALLOWED_IP
    finally:
        if added.returncode == 0:
            _ip("addr", "del", f"{ALLOWED_IP}/32", "dev", "lo")


def _migration(ns: str, name: str, prometheus: str) -> dict[str, Any]:
    body = manifest(ns, "documents", prometheus=prometheus)
    body["metadata"]["name"] = name
    return body


def _progressing(api: Api, ns: str, name: str) -> None:
    """Write ``name``'s status as the operator does once verified: step 1, 10 %."""
    raw = api.request("GET", f"{EM.format(ns=ns)}/{name}")
    now = datetime.now(UTC)
    status = EmbeddingMigrationStatus(
        phase=Phase.PROGRESSING,
        percentage=10,
        step_started_at=now,
        phase_started_at=now,
        spec_hash=spec_hash(parse_migration(raw, where=name).spec),
        verification=VerificationStatus(ok=True, time=now),
    )
    api.request(
        "PATCH",
        f"{EM.format(ns=ns)}/{name}/status",
        {"status": status.model_dump(mode="json", by_alias=True, exclude_none=True)},
        content_type="application/merge-patch+json",
    )


def _ready(api: Api, ns: str, name: str, reason: str) -> dict[str, Any]:
    """``name``'s Ready condition once its reason is ``reason`` ({} until then)."""
    status = api.request("GET", f"{EM.format(ns=ns)}/{name}").get("status") or {}
    found = [c for c in status.get("conditions") or [] if c["type"] == "Ready"]
    return found[0] if found and found[0]["reason"] == reason else {}


def _jobs(api: Api, ns: str, migration: str) -> list[str]:
    listed = api.request(
        "GET",
        f"/apis/batch/v1/namespaces/{ns}/jobs",
        params={"labelSelector": f"embedshift.io/migration={migration}"},
    )
    return [j["metadata"]["name"] for j in listed["items"]]


def _warnings(api: Api, ns: str, reason: str) -> list[dict[str, Any]]:
    listed = api.request("GET", f"/api/v1/namespaces/{ns}/events")
    return [e for e in listed["items"] if e["reason"] == reason and e["type"] == "Warning"]


def test_a_migration_outside_the_allowlists_is_held_and_sends_nothing(
    kube_cluster: Target, pod_runner: PodRunner, allowed_address: str
) -> None:
    kubeconfig = kube_cluster.kubeconfig
    api = Api(kubeconfig)
    ns = f"allow-{uuid.uuid4().hex[:6]}"
    allowed, refused = Listener(allowed_address), Listener(REFUSED_IP)
    tokens = {"prom-allowed": secrets.token_hex(12), "prom-refused": secrets.token_hex(12)}
    run(KUBECTL, "create", "namespace", ns, kubeconfig=kubeconfig)
    try:
        # The CRDs first: the migrations (and two statuses) exist before the operator starts.
        run(KUBECTL, "apply", "-f", str(CHART / "crds"), kubeconfig=kubeconfig)
        run(KUBECTL, "wait", "--for=condition=Established", "--timeout=30s",
            "crd/embeddingmigrations.embedshift.io", kubeconfig=kubeconfig)  # fmt: skip
        # A usable URL shape; the refusals come before any database work.
        secret_data = {"rag-db": {"url": "postgresql://u:p@127.0.0.1:1/rag"}}
        secret_data.update({f"{name}-token": {"token": t} for name, t in tokens.items()})
        for name, data in secret_data.items():
            api.request(
                "POST", f"/api/v1/namespaces/{ns}/secrets",
                {"metadata": {"name": name}, "stringData": data},
            )  # fmt: skip
        bodies = {
            "image-refused": _migration(ns, "image-refused", allowed.address),
            "image-allowed": _migration(ns, "image-allowed", allowed.address),
            "prom-allowed": _migration(ns, "prom-allowed", allowed.address),
            "prom-refused": _migration(ns, "prom-refused", refused.address),
        }
        bodies["image-refused"]["spec"]["migration"]["image"] = OUTSIDE_IMAGE
        for name in tokens:
            bodies[name]["spec"]["analysis"]["prometheus"]["bearerTokenSecretRef"] = {
                "name": f"{name}-token",
                "key": "token",
            }
        for body in bodies.values():
            api.request("POST", EM.format(ns=ns), body)
        for name in tokens:
            _progressing(api, ns, name)

        pod_runner.serve(ns)
        run(HELM, "install", RELEASE, str(CHART), "-n", ns,
            "--set", "search.enabled=false",
            "--set", "alertWebhook.existingSecret=",
            "--set", "operator.ports.receiver=0",
            "--set-json", f'operator.allowedEndpoints=["prometheus.monitoring.svc","{ALLOWED_IP}"]',
            kubeconfig=kubeconfig)  # fmt: skip

        # The controls: the operator's own image gets its Job, an allowed host its token.
        eventually(lambda: _jobs(api, ns, "image-allowed"), "image-allowed's setup Job", WITHIN)
        eventually(lambda: allowed.authorizations, "a check of prom-allowed", WITHIN)

        # The refused: a condition naming the field and the fix, and a Warning Event.
        image = eventually(
            partial(_ready, api, ns, "image-refused", "ImageNotAllowed"), "ImageNotAllowed"
        )
        assert image["status"] == "False"
        assert f"spec.migration.image: '{OUTSIDE_IMAGE}'" in image["message"]
        assert "operator.allowedImages" in image["message"]
        prom = eventually(
            partial(_ready, api, ns, "prom-refused", "EndpointNotAllowed"), "EndpointNotAllowed"
        )
        assert prom["status"] == "False"
        assert f"spec.analysis.prometheus.url: host {refused.address} " in prom["message"]
        assert "operator.allowedEndpoints" in prom["message"]
        for name, reason in (
            ("image-refused", "ImageNotAllowed"),
            ("prom-refused", "EndpointNotAllowed"),
        ):
            events = eventually(partial(_warnings, api, ns, reason), f"a {reason} Event")
            assert [e["involvedObject"]["name"] for e in events] == [name]
        # One more check of prom-allowed: prom-refused has ticked beside it all along.
        seen = len(allowed.authorizations)
        eventually(lambda: len(allowed.authorizations) > seen, "a later check of prom-allowed")
        assert set(allowed.authorizations) == {f"Bearer {tokens['prom-allowed']}"}

        # Nothing was run for the one; nothing reached the other's Prometheus, not even a
        # connection, while prom-allowed's checks went on.
        assert _jobs(api, ns, "image-refused") == []
        assert refused.connections == 0 and refused.authorizations == []
        status = api.request("GET", f"{EM.format(ns=ns)}/prom-refused")["status"]
        assert (status["phase"], status["percentage"]) == ("Progressing", 10)
        assert not (status.get("analysis") or {}).get("results")
        pending = api.request("GET", f"{EM.format(ns=ns)}/image-refused")["status"]
        assert pending.get("phase", "Pending") == "Pending"
        # What the operator wrote (statuses, Events, its log) holds no token.
        listed = api.request("GET", EM.format(ns=ns))["items"]
        written = json.dumps([i.get("status") for i in listed])
        written += json.dumps(api.request("GET", f"/api/v1/namespaces/{ns}/events"))
        written += "".join(pod_runner.logs(ns, f"{RELEASE}-operator").values())
        assert "EndpointNotAllowed" in written
        assert not [t for t in tokens.values() if t in written]
    finally:
        run(HELM, "uninstall", RELEASE, "-n", ns, kubeconfig=kubeconfig, check=False)
        # The operator is gone: the migrations go without their finalizer.
        listed = (api.request("GET", EM.format(ns=ns), ok=(404,)) or {"items": []})["items"]
        for item in listed:
            api.request(
                "PATCH", f"{EM.format(ns=ns)}/{item['metadata']['name']}",
                {"metadata": {"finalizers": None}},
                content_type="application/merge-patch+json", ok=(404,),
            )  # fmt: skip
        api.request("DELETE", f"/api/v1/namespaces/{ns}", ok=(404,))
        api.close()
        allowed.close()
        refused.close()
