"""The chart's RBAC is least privilege: exactly the API calls the operator makes, no more.

tests/cluster/api-calls.yaml lists every (verb, group, resource, subresource) the chart's
operator was seen to make on a real API server (its Pods' requests, recorded on their way:
tests/api_calls.py), in namespaced mode (with a standby) and in all-namespaces mode. For each
mode the chart's rules bound to the operator's ServiceAccount must allow every recorded call,
and every verb/resource pair they grant must be one a recorded call uses, but for the peering
objects of the other mode (EXCEPTIONS below). No wildcards anywhere.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import yaml

from tests.chart.helm import NAMESPACE, ROOT, of_kind, render

RECORDED = ROOT / "tests" / "cluster" / "api-calls.yaml"
SERVICE_ACCOUNT = "es-embedshift-operator"


class Call(NamedTuple):
    verb: str
    group: str
    resource: str  # "resource" or "resource/subresource", as RBAC writes it


def _recorded() -> set[Call]:
    calls = set()
    for entry in yaml.safe_load(RECORDED.read_text()):
        resource = entry["resource"]
        if entry.get("subresource"):
            resource = f"{resource}/{entry['subresource']}"
        calls.add(Call(entry["verb"], entry["group"], resource))
    return calls


_PEERING = {"get", "list", "watch", "patch"}

# (mode) -> recorded calls this mode does not make: kopf peers through a KopfPeering in each
# namespace served, and through a ClusterKopfPeering with --all-namespaces.
EXCEPTIONS: dict[str, set[Call]] = {
    "all-namespaces": {Call(verb, "kopf.dev", "kopfpeerings") for verb in _PEERING},
    "namespaced": {Call(verb, "kopf.dev", "clusterkopfpeerings") for verb in _PEERING},
}

MODES = {
    "namespaced": {"operator.watchNamespaces": "{rag,search}"},
    "all-namespaces": {"operator.allNamespaces": "true"},
}


class Grant(NamedTuple):
    call: Call
    namespace: str | None  # None: cluster-wide


def _grants(objects: list[dict[str, Any]]) -> set[Grant]:
    """What the operator's ServiceAccount may do, from the roles its bindings name."""
    roles = {
        (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]): obj
        for obj in objects
        if obj["kind"] in ("Role", "ClusterRole")
    }
    grants = set()
    for binding in of_kind(objects, "RoleBinding") + of_kind(objects, "ClusterRoleBinding"):
        subjects = {(s["kind"], s["name"], s.get("namespace")) for s in binding["subjects"]}
        if ("ServiceAccount", SERVICE_ACCOUNT, NAMESPACE) not in subjects:
            continue
        ref = binding["roleRef"]
        namespace = binding["metadata"].get("namespace")
        role_namespace = namespace if ref["kind"] == "Role" else None
        role = roles[(ref["kind"], role_namespace, ref["name"])]
        for rule in role["rules"]:
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
            for field in ("verbs", "apiGroups", "resources"):
                assert "*" not in rule[field], f"wildcard in {role['metadata']['name']}: {rule}"
            for verb in rule["verbs"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        grants.add(Grant(Call(verb, group, resource), namespace))
    return grants


@pytest.mark.parametrize("mode", MODES)
def test_rbac_allows_exactly_the_recorded_calls(mode: str) -> None:
    objects = render(MODES[mode])
    grants = _grants(objects)
    assert grants, "no rules bound to the operator's ServiceAccount"
    wanted = _recorded() - EXCEPTIONS[mode]
    granted = {grant.call for grant in grants}
    assert wanted - granted == set(), "recorded calls the chart does not allow"
    assert granted - wanted == set(), "rules no recorded call uses"


def test_namespaced_mode_grants_namespaced_calls_only_in_watched_namespaces() -> None:
    objects = render(MODES["namespaced"])
    cluster_wide = {g.call for g in _grants(objects) if g.namespace is None}
    # Only cluster-scoped resources are granted cluster-wide: kopf lists and watches namespaces
    # (to match its namespace patterns) and CRDs (to discover the resources it serves).
    assert {call.resource for call in cluster_wide} == {"namespaces", "customresourcedefinitions"}
    assert {call.verb for call in cluster_wide} == {"list", "watch"}
    per_namespace: dict[str, set[Call]] = {}
    for grant in _grants(objects):
        if grant.namespace is not None:
            per_namespace.setdefault(grant.namespace, set()).add(grant.call)
    assert set(per_namespace) == {"rag", "search"}
    assert per_namespace["rag"] == per_namespace["search"]
    assert per_namespace["rag"] | cluster_wide == _recorded() - EXCEPTIONS["namespaced"]


def test_default_install_serves_the_release_namespace_only() -> None:
    objects = render()
    assert {role["metadata"]["namespace"] for role in of_kind(objects, "Role")} == {NAMESPACE}
    assert {b["metadata"]["namespace"] for b in of_kind(objects, "RoleBinding")} == {NAMESPACE}


def test_rbac_can_be_left_to_the_cluster_admin() -> None:
    objects = render(
        {"rbac.create": "false", "serviceAccount.create": "false", "serviceAccount.name": "ops"}
    )
    assert not [
        o
        for o in objects
        if o["kind"]
        in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ServiceAccount")
    ]
    (operator,) = [
        d for d in of_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-operator")
    ]
    assert operator["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
