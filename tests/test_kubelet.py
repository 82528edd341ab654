"""The test Pod runner (:mod:`tests.kubelet`) on the real control plane: what it reports is what
the real Job and ReplicaSet controllers act on, so these tests read the controllers' answers."""

from __future__ import annotations

import base64
import functools
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chart.helm import KUBECTL
from tests.helpers import eventually
from tests.kubelet import Api, PodRunner, _translate, expand
from tests.operator.e2e.target import Target


@pytest.fixture(scope="module")
def api(kube_cluster: Target) -> Iterator[Api]:
    client = Api(kube_cluster.kubeconfig)
    yield client
    client.close()


@pytest.fixture(scope="module")
def namespace(api: Api, pod_runner: PodRunner) -> Iterator[str]:
    name = f"runner-{uuid.uuid4().hex[:6]}"
    api.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    pod_runner.serve(name)
    # Pods need the namespace's default ServiceAccount, which a controller creates.
    eventually(
        lambda: api.request("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default", ok=(404,)),
        "the default ServiceAccount",
    )
    yield name
    api.request("DELETE", f"/api/v1/namespaces/{name}", ok=(404,))


def pod(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "example.test/any:1", "command": command}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }


def read_pod(api: Api, namespace: str, name: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = api.request(
        "GET", f"/api/v1/namespaces/{namespace}/pods/{name}", ok=(404,)
    )
    return found


def gone(api: Api, namespace: str, name: str) -> bool:
    return read_pod(api, namespace, name) is None


def terminated(api: Api, namespace: str, name: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        found = read_pod(api, namespace, name)
        if found and found["status"].get("phase") in ("Succeeded", "Failed"):
            return found
        return None

    result: dict[str, Any] = eventually(done, f"pod {name} finished")
    return result


def test_expand_and_translate_are_what_kubernetes_and_the_mounts_say() -> None:
    env = {"A": "one", "B": "two"}
    assert expand("$(A)-$(B)-$(C)-$$(A)", env) == "one-two-$(C)-$(A)"
    mounts = {"/etc/embedshift": Path("/x/config"), "/tmp": Path("/x/tmp")}
    assert _translate("--config=/etc/embedshift/m.yaml", mounts) == "--config=/x/config/m.yaml"
    assert _translate("/tmp/.s.PGSQL.5432", mounts) == "/tmp/.s.PGSQL.5432"  # TMPDIR instead
    assert _translate("/tmpfoo /etc/embedshiftx", mounts) == "/tmpfoo /etc/embedshiftx"


def test_a_pod_runs_with_its_secrets_config_and_volumes_and_reports_its_exit(
    api: Api, namespace: str
) -> None:
    secret = base64.b64encode(b"s3cret").decode()
    api.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/secrets",
        {"metadata": {"name": "creds"}, "data": {"token": secret, "USER": secret}},
    )
    api.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"metadata": {"name": "settings"}, "data": {"file.txt": "from a volume", "MODE": "fast"}},
    )
    script = (
        'echo "token=$TOKEN mode=$MODE cfg_USER=$CFG_USER name=$POD_NAME greeting=$GREETING"; '
        "cat /etc/settings/file.txt; echo; "
        'test -d "$TMPDIR" && echo tmp-ok; '
        'test -z "$DATABASE_URL" && echo no-test-env; '
        "echo 'embedshift: error: the last line'; exit 3"
    )
    manifest = pod(
        "exits-3",
        ["sh", "-c", script],
        volumes=[
            {"name": "settings", "configMap": {"name": "settings"}},
            {"name": "tmp", "emptyDir": {}},
        ],
        container={
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "envFrom": [
                {"configMapRef": {"name": "settings"}},
                {"secretRef": {"name": "creds"}, "prefix": "CFG_"},
            ],
            "env": [
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "GREETING", "value": "hello $(MODE)"},
            ],
            "volumeMounts": [
                {"name": "settings", "mountPath": "/etc/settings"},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        },
    )
    api.request("POST", f"/api/v1/namespaces/{namespace}/pods", manifest)
    finished = terminated(api, namespace, "exits-3")
    assert finished["status"]["phase"] == "Failed"
    assert finished["spec"]["nodeName"] == "embedshift-test-node"
    (container,) = finished["status"]["containerStatuses"]
    state = container["state"]["terminated"]
    assert (state["exitCode"], state["reason"]) == (3, "Error")
    message = state["message"]
    assert "token=s3cret mode=fast cfg_USER=s3cret name=exits-3 greeting=hello fast" in message
    assert "from a volume" in message
    assert "tmp-ok" in message and "no-test-env" in message
    assert message.rstrip().endswith("embedshift: error: the last line")


def test_a_missing_secret_holds_the_pod_until_it_exists(api: Api, namespace: str) -> None:
    manifest = pod(
        "waits",
        ["sh", "-c", 'test "$KEY" = late'],
        container={
            "env": [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "late", "key": "k"}}}]
        },
    )
    api.request("POST", f"/api/v1/namespaces/{namespace}/pods", manifest)

    def waiting() -> bool:
        found = read_pod(api, namespace, "waits")
        statuses = (found or {}).get("status", {}).get("containerStatuses") or []
        return any(
            s["state"].get("waiting", {}).get("reason") == "CreateContainerConfigError"
            for s in statuses
        )

    eventually(waiting, "CreateContainerConfigError")
    late = base64.b64encode(b"late").decode()
    api.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/secrets",
        {"metadata": {"name": "late"}, "data": {"k": late}},
    )
    assert terminated(api, namespace, "waits")["status"]["phase"] == "Succeeded"


def test_the_job_controller_retries_a_failed_pod_and_completes_the_job(
    api: Api, namespace: str, tmp_path: Path
) -> None:
    marker = tmp_path / "failed-once"
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "flaky"},
        "spec": {
            "backoffLimit": 2,
            "template": {
                "spec": pod(
                    "ignored", ["sh", "-c", f"test -e {marker} && exit 0; touch {marker}; exit 1"]
                )["spec"]
            },
        },
    }
    api.request("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", job)

    def complete() -> dict[str, Any] | None:
        found = api.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/flaky")
        conditions = found.get("status", {}).get("conditions") or []
        done = any(c["type"] == "Complete" and c["status"] == "True" for c in conditions)
        return found if done else None

    status = eventually(complete, "Job flaky Complete", within=60)["status"]
    assert (status["succeeded"], status["failed"]) == (1, 1)


def test_a_job_past_its_backoff_limit_fails(api: Api, namespace: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "broken"},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": pod("ignored", ["sh", "-c", "exit 7"])["spec"]},
        },
    }
    api.request("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", job)

    def failed() -> dict[str, Any] | None:
        found = api.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/broken")
        conditions = found.get("status", {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "Failed"), None)

    condition = eventually(failed, "Job broken Failed", within=60)
    assert condition["reason"] == "BackoffLimitExceeded"


def test_a_deleted_pod_gets_sigterm_then_goes(
    api: Api, namespace: str, tmp_path: Path, pod_runner: PodRunner
) -> None:
    marker = tmp_path / "got-sigterm"
    script = f"trap 'touch {marker}; exit 0' TERM; while true; do sleep 0.1; done"
    manifest = pod("sleeper", ["sh", "-c", script], terminationGracePeriodSeconds=10)
    api.request("POST", f"/api/v1/namespaces/{namespace}/pods", manifest)
    eventually(
        lambda: (
            (read_pod(api, namespace, "sleeper") or {}).get("status", {}).get("phase") == "Running"
        ),
        "sleeper Running",
    )
    api.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/sleeper")
    eventually(lambda: read_pod(api, namespace, "sleeper") is None, "sleeper deleted")
    assert marker.exists()
    assert "sleeper" not in pod_runner.running(namespace)


def test_a_restart_always_pod_is_restarted(api: Api, namespace: str) -> None:
    manifest = pod("crashes", ["sh", "-c", "exit 1"], restartPolicy="Always")
    api.request("POST", f"/api/v1/namespaces/{namespace}/pods", manifest)

    def restarted() -> bool:
        found = read_pod(api, namespace, "crashes") or {}
        statuses = found.get("status", {}).get("containerStatuses") or []
        return any(s["restartCount"] >= 2 for s in statuses)

    eventually(restarted, "two restarts")
    found = read_pod(api, namespace, "crashes")
    assert found is not None and found["status"]["phase"] == "Running"
    api.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/crashes")


def test_pods_are_ready_when_their_probes_pass_each_on_its_own_network(
    api: Api, namespace: str
) -> None:
    """Two Pods listening on one port (each has its own network namespace and IP)."""
    script = "sleep 2; exec python3 -m http.server 8080"

    def web(name: str) -> dict[str, Any]:
        return pod(
            name,
            ["sh", "-c", script],
            container={
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
            },
        )

    def status(name: str) -> dict[str, Any]:
        found: dict[str, Any] = (read_pod(api, namespace, name) or {}).get("status", {})
        return found

    def ready(name: str) -> bool:
        conditions = status(name).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    for name in ("web-a", "web-b"):
        api.request("POST", f"/api/v1/namespaces/{namespace}/pods", web(name))
    eventually(lambda: status("web-a").get("phase") == "Running", "web-a Running")
    assert not ready("web-a")  # the server sleeps 2 s before it listens
    for name in ("web-a", "web-b"):
        eventually(functools.partial(ready, name), f"{name} Ready")
    addresses = {status(name)["podIP"] for name in ("web-a", "web-b")}
    assert len(addresses) == 2
    for address in addresses:  # what a Service's endpoints would be
        assert httpx.get(f"http://{address}:8080/", timeout=5).status_code == 200
    for name in ("web-a", "web-b"):
        api.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}")
        eventually(functools.partial(gone, api, namespace, name), f"{name} deleted")


def test_a_pod_acts_as_its_service_account_under_rbac(
    api: Api, namespace: str, pod_runner: PodRunner
) -> None:
    assert KUBECTL.exists(), f"{KUBECTL} missing: run scripts/install-helm.sh"
    api.request(
        "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": "reader"}}
    )
    api.request(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
        {
            "metadata": {"name": "read-configmaps"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
        },
    )
    api.request(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
        {
            "metadata": {"name": "reader"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "read-configmaps",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    script = f"{KUBECTL} get configmaps -o name; {KUBECTL} get secrets -o name"
    manifest = pod(
        "as-reader",
        ["sh", "-c", script],
        serviceAccountName="reader",
        container={"terminationMessagePolicy": "FallbackToLogsOnError"},
    )
    api.request("POST", f"/api/v1/namespaces/{namespace}/pods", manifest)
    finished = terminated(api, namespace, "as-reader")
    (container,) = finished["status"]["containerStatuses"]
    message = container["state"]["terminated"]["message"]
    assert "configmap/kube-root-ca.crt" in message  # allowed by the Role
    assert f'"system:serviceaccount:{namespace}:reader" cannot list resource "secrets"' in message
    # The node's recorder saw both calls on their way, with the real server's answers.
    answered = {
        (r.call.verb, r.call.resource): r.request.status
        for r in pod_runner.api_requests(namespace, "as-reader")
        if r.call is not None
    }
    assert answered == {("list", "configmaps"): 200, ("list", "secrets"): 403}, answered
