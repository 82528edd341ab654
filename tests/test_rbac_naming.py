"""How an HTTP request to the API server is named as RBAC names it (:func:`tests.api_calls.
rbac_call`, the API server's RequestInfo): the names ``api-calls.yaml`` and the chart's RBAC use.
Pure; a table of cases."""

from __future__ import annotations

import pytest

from tests.api_calls import rbac_call

CASES = [
    # method, path, (verb, group, resource, subresource, namespace, name)
    ("GET", "/api/v1/namespaces", ("list", "", "namespaces", None, None, None)),
    ("GET", "/api/v1/namespaces?watch=true&resourceVersion=5",
     ("watch", "", "namespaces", None, None, None)),
    ("GET", "/api/v1/namespaces/rag", ("get", "", "namespaces", None, None, "rag")),
    ("GET", "/api/v1/namespaces/rag/secrets/rag-db", ("get", "", "secrets", None, "rag", "rag-db")),
    ("POST", "/api/v1/namespaces/rag/events", ("create", "", "events", None, "rag", None)),
    ("GET", "/apis/batch/v1/namespaces/rag/jobs?labelSelector=app%3Dx",
     ("list", "batch", "jobs", None, "rag", None)),
    ("GET", "/apis/batch/v1/jobs?watch=1", ("watch", "batch", "jobs", None, None, None)),
    ("GET", "/apis/batch/v1/watch/namespaces/rag/jobs",
     ("watch", "batch", "jobs", None, "rag", None)),
    ("PATCH", "/apis/embedshift.io/v1alpha1/namespaces/rag/embeddingmigrations/docs/status",
     ("patch", "embedshift.io", "embeddingmigrations", "status", "rag", "docs")),
    ("DELETE", "/apis/apps/v1/namespaces/rag/deployments/f",
     ("delete", "apps", "deployments", None, "rag", "f")),
    ("DELETE", "/apis/apps/v1/namespaces/rag/deployments",
     ("deletecollection", "apps", "deployments", None, "rag", None)),
    ("PUT", "/apis/coordination.k8s.io/v1/namespaces/rag/leases/l",
     ("update", "coordination.k8s.io", "leases", None, "rag", "l")),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "expected"), CASES)
def test_a_request_is_named_as_rbac_names_it(
    method: str, path: str, expected: tuple[str, str, str, str | None, str | None, str | None]
) -> None:
    call = rbac_call(method, path, "kopf/1.0")
    assert call is not None
    named = (call.verb, call.group, call.resource, call.subresource, call.namespace, call.name)
    assert named == expected


@pytest.mark.parametrize("path", ["/api", "/apis", "/apis/batch/v1", "/version", "/openapi/v3"])
def test_discovery_is_no_resource_call(path: str) -> None:
    assert rbac_call("GET", path) is None
