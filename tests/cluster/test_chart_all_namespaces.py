"""The chart with ``operator.allNamespaces=true`` on a real API server: the operator, in its own
namespace, under the chart's ClusterRole (Kubernetes' own authorizer), carries a migration of
another namespace through its Jobs to its first step and lets it go on ``kubectl delete``.

A control plane of this module's own: an operator serving every namespace would act on the
resources other modules leave in the session's cluster.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml

from rag_service.testing.corpus import create_corpus
from tests.api_calls import record_operator_calls
from tests.chart.helm import CHART, HELM, KUBECTL
from tests.cluster.test_chart_story import NAME, PIPELINE, manifest, run
from tests.helpers import eventually, routed_percentage
from tests.kube_cluster import control_plane
from tests.kubelet import Api, PodRunner
from tests.operator.e2e.target import Target

RELEASE = "embedshift"


@dataclass
class Cluster:
    target: Target
    api: Api
    runner: PodRunner

    def kubectl(self, *args: str) -> str:
        return run(KUBECTL, *args, kubeconfig=self.target.kubeconfig)


@pytest.fixture(scope="module")
def cluster(kube_cluster: Target, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A fresh control plane (``kube_cluster`` first: it says whether one can be had here)."""
    with (
        control_plane(tmp_path_factory.mktemp("all-namespaces-control-plane")) as target,
        PodRunner(target.kubeconfig, tmp_path_factory.mktemp("all-namespaces-pods")) as runner,
    ):
        api = Api(target.kubeconfig)
        yield Cluster(target=target, api=api, runner=runner)
        api.close()


def test_an_all_namespaces_operator_serves_another_namespace(
    cluster: Cluster,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> None:
    system, team = f"embedshift-{uuid.uuid4().hex[:4]}", f"team-{uuid.uuid4().hex[:4]}"
    for namespace in (system, team):
        cluster.kubectl("create", "namespace", namespace)
        cluster.runner.serve(namespace)
    cluster.kubectl("-n", team, "create", "secret", "generic", "rag-db",
                    f"--from-literal=url={database_url}")  # fmt: skip
    run(HELM, "install", RELEASE, str(CHART), "-n", system,
        "--set", "operator.allNamespaces=true",
        "--set", "search.enabled=false",
        "--set", "alertWebhook.existingSecret=",
        "--set", "operator.ports.receiver=0",
        kubeconfig=cluster.target.kubeconfig)  # fmt: skip

    table = f"allns_{team.replace('-', '_')}"
    create_corpus(database_url, table=table, count=20)
    body = manifest(team, table, prometheus="127.0.0.1:9")  # none: the first step holds
    path = tmp_path_factory.mktemp("all-namespaces") / "migration.yaml"
    path.write_text(yaml.safe_dump(body))
    cluster.kubectl("apply", "-f", str(path))
    cluster.kubectl("-n", team, "wait", f"em/{NAME}", "--for=condition=Verified",
                    f"--timeout={int(PIPELINE)}s")  # fmt: skip

    def routed(percentage: int) -> bool:
        return routed_percentage(database_url, f"{team}/{NAME}") == percentage

    eventually(lambda: routed(10), "the first step routed", 60)
    cluster.kubectl("-n", team, "delete", "em", NAME, "--timeout=60s")
    assert routed(0)

    logs = cluster.runner.logs(system, f"{RELEASE}-operator")
    assert logs, "no operator Pod ran"
    for name, log in logs.items():  # RBAC: nothing the operator asked for was refused
        assert " 403" not in log and "Forbidden" not in log, (name, log[-3000:])
    # What the real server was asked, for api-calls.yaml (a refused request fails here too).
    record_operator_calls(
        request.config, cluster.runner.api_requests(system, f"{RELEASE}-operator")
    )
    run(HELM, "uninstall", RELEASE, "-n", system, kubeconfig=cluster.target.kubeconfig)
