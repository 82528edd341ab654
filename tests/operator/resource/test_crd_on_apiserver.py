"""The CRD on a real kube-apiserver (the session's ``kube_cluster``): the proof of what
Kubernetes does with it. The offline checks of test_crd.py are a fast pre-check of the same.

- The CRD is accepted and Established: structural, every CEL rule within Kubernetes' own cost
  limits.
- Every bad spec of the resource suite (the CEL rules' table, the models' table of
  test_resource.py and the schema-level ones below) is refused at create, naming the field and
  the rule's message, or Kubernetes' own message for a schema constraint.
- Every good manifest (the examples, the rules' edge cases) is stored with the models' defaults,
  exactly the spec the offline defaulting gives.
- ``kubectl explain em.spec.rollout`` and ``kubectl get em [-o wide]`` show what the README says.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes import config as kubeconfig

from embedshift_operator import crd
from embedshift_operator.resource import (
    DURATION_PATTERN,
    GROUP,
    MAX_DURATION_LENGTH,
    MAX_QUERY_LENGTH,
    PLURAL,
    VERSION,
    parse_migration,
)
from rag_service.errors import ConfigError
from tests.operator.e2e.target import Target

from . import apiserver
from .manifests import (
    CEL_BAD,
    CEL_GOOD,
    EXAMPLES,
    REPO,
    Bad,
    criterion,
    edited,
    minimal,
)
from .test_resource import BAD_SPECS

CRD_FILE = REPO / "crds" / crd.FILE_NAME
KUBECTL = REPO / ".venv" / "tools" / "kubectl"
(_VERSION,) = yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))["spec"]["versions"]
SCHEMA: dict[str, Any] = _VERSION["schema"]["openAPIV3Schema"]
WITHIN = 60.0  # seconds, for the CRD to be served


@dataclass(frozen=True)
class Server:
    """The API server with the CRD applied, a namespace of this module's own, and kubectl."""

    api: client.CustomObjectsApi
    namespace: str
    kubectl: Callable[..., str]


def _kubectl(target: Target, cache: Path) -> Callable[..., str]:
    if not KUBECTL.exists():
        raise AssertionError(f"{KUBECTL} is missing: run `make helm` (scripts/install-helm.sh)")

    def run(*args: str) -> str:
        done = subprocess.run(
            [
                str(KUBECTL),
                f"--kubeconfig={target.kubeconfig}",
                f"--context={target.context}",
                f"--cache-dir={cache}",  # discovery of this cluster, not the user's ~/.kube
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
        return done.stdout

    return run


@pytest.fixture(scope="module")
def server(kube_cluster: Target, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    kubectl = _kubectl(kube_cluster, tmp_path_factory.mktemp("kubectl-cache"))
    # As a user installs it; server-side, since the CRD is too big for the last-applied
    # annotation of a client-side apply. The server refuses a CRD it cannot use here.
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    configuration = client.Configuration()
    kubeconfig.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=kube_cluster.kubeconfig,
        context=kube_cluster.context,
        client_configuration=configuration,
    )
    namespace = f"crd-{uuid.uuid4().hex[:8]}"
    with client.ApiClient(configuration) as api:
        # Not `kubectl wait`: it fails on a CRD whose status has no conditions yet.
        extensions = client.ApiextensionsV1Api(api)

        def established() -> bool:
            status = extensions.read_custom_resource_definition(f"{PLURAL}.{GROUP}").status
            conditions = (status.conditions if status else None) or []
            return any(c.type == "Established" and c.status == "True" for c in conditions)

        _until(established, "the CRD to be Established")
        # kubectl apply cached the discovery of a cluster without the resource; api-resources
        # refreshes it, once the server's discovery serves the short name.
        _until(
            lambda: (
                re.search(
                    rf"^{PLURAL}\s+em\s", kubectl("api-resources", f"--api-group={GROUP}"), re.M
                )
                is not None
            ),
            "discovery to serve em",
        )
        core = client.CoreV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        try:
            yield Server(client.CustomObjectsApi(api), namespace, kubectl)
        finally:
            core.delete_namespace(namespace)


def _until(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WITHIN
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {WITHIN} s for {what}")
        time.sleep(0.2)


def _create(server: Server, manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """``manifest`` created as ``name`` in the module's namespace, as kubectl sends it (unknown
    fields refused, not dropped); the object the server stored."""
    manifest = {**manifest, "metadata": {"name": name, "namespace": server.namespace}}
    created = server.api.create_namespaced_custom_object(
        GROUP, VERSION, server.namespace, PLURAL, manifest, field_validation="Strict"
    )
    assert isinstance(created, dict)
    return created


def _name(case: str) -> str:
    return re.sub(r"[^a-z0-9-]", "", case.lower())[:63].strip("-")


# ---- bad specs -----------------------------------------------------------------------------


def _without(*path: str) -> Callable[[], dict[str, Any]]:
    def manifest() -> dict[str, Any]:
        done = minimal()
        node = done
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return done

    return manifest


def _pattern(pattern: str) -> str:
    return f"should match '{pattern}'"


_AT_LEAST_1 = "should be greater than or equal to 1"

# The models' table (test_resource.py), by id: what the server names and says. The models name
# a model-level check at the model (spec.target), the server at its fieldPath; the models'
# messages for schema constraints are their own, the server's are Kubernetes'.
ON_THE_SERVER: dict[str, tuple[str, str]] = {
    "steps-not-increasing": ("spec.rollout.steps", "above the one before"),
    "step-of-0": ("spec.rollout.steps[0].percentage", _AT_LEAST_1),
    "step-of-101": ("spec.rollout.steps[1].percentage", "should be less than or equal to 100"),
    "steps-not-ending-at-100": ("spec.rollout.steps", "the last step must be 100"),
    "more-than-20-steps": ("spec.rollout.steps", "must have at most 20 items"),
    "min-and-max": ("spec.analysis.successCriteria[0]", "exactly one of min, max"),
    "no-bound": ("spec.analysis.successCriteria[0]", "exactly one of min, max"),
    "ratio-with-custom-query": (
        "spec.analysis.successCriteria[0].maxRatioToV1",
        "use min or max with a custom query",
    ),
    "unknown-metric": (
        "spec.analysis.successCriteria[0].metric",
        'supported values: "requests", "avg_latency_seconds"',
    ),
    "metric-and-query": ("spec.analysis.successCriteria[0]", "exactly one of metric"),
    "neither-metric-nor-query": ("spec.analysis.successCriteria[0]", "exactly one of metric"),
    "empty-query": ("spec.analysis.successCriteria[0].query", "should be at least 1 chars long"),
    "blank-query": (
        "spec.analysis.successCriteria[0].query",
        "write a PromQL expression or use metric",
    ),
    "duration-in-words": ("spec.analysis.interval", _pattern(DURATION_PATTERN)),
    "negative-duration": ("spec.rollout.steps[0].minDuration", _pattern(DURATION_PATTERN)),
    "duration-in-days": ("spec.cleanup.retainSourceFor", _pattern(DURATION_PATTERN)),
    "zero-interval": ("spec.analysis.interval", "longer than zero"),
    "vector-over-2000-dims": ("spec.target.dimensions", "index.halfvec: true (up to 4000)"),
    "halfvec-over-4000-dims": ("spec.target.dimensions", "halfvec column of at most 4000"),
    "typo-in-a-field-name": ("spec.rollout.stpes", 'unknown field "spec.rollout.stpes"'),
    "duplicate-criterion-name": (
        "spec.analysis",
        "names must be unique across successCriteria and rollbackThresholds",
    ),
    "bad-criterion-name": ("spec.analysis.successCriteria[0].name", "should match '^[a-z0-9]"),
    "for-0": ("spec.analysis.successCriteria[0].for", _AT_LEAST_1),
    "no-data-maybe": ("spec.analysis.noData", 'supported values: "hold", "fail"'),
    "on-error-explode": ("spec.analysis.onError", 'supported values: "hold", "rollback"'),
    "max-percentage-150": ("spec.rollout.maxPercentage", "should be less than or equal to 100"),
    "prometheus-url-without-scheme": ("spec.analysis.prometheus.url", "should match '^https?://"),
    "sticky-key-with-a-space": ("spec.rollout.stickyKey", "should match '^[A-Za-z0-9-]+$'"),
    "negative-min-requests": (
        "spec.analysis.minRequests",
        "should be greater than or equal to 0",
    ),
    "zero-successful-checks": ("spec.analysis.successfulChecks", _AT_LEAST_1),
    "retired-model": ("spec.target.model", "use gemini-embedding-001"),
    "batch-size-0": ("spec.migration.batchSize", _AT_LEAST_1),
    "table-not-an-identifier": ("spec.database.table", "write table or schema.table"),
    "table-with-a-final-newline": ("spec.database.table", "write table or schema.table"),
    "bad-quantity": ("spec.migration.resources.limits.memory", "should match '^(\\+|-)?"),
    "interval-beyond-timedelta": ("spec.analysis.interval", "too long a duration"),
    "dimensions-in-words": ("spec.target.dimensions", "must be of type integer"),
    "paused-yes": ("spec.rollout.paused", "must be of type boolean"),
    "paused-true-in-quotes": ("spec.rollout.paused", "must be of type boolean"),
    "halfvec-as-1": ("spec.target.index.halfvec", "must be of type boolean"),
    "min-requests-in-quotes": ("spec.analysis.minRequests", "must be of type integer"),
    "dimensions-in-quotes": ("spec.target.dimensions", "must be of type integer"),
    "max-percentage-true": ("spec.rollout.maxPercentage", "must be of type integer"),
    "batch-size-fractional": ("spec.migration.batchSize", "must be of type integer"),
    "max-in-quotes": ("spec.analysis.successCriteria[0].max", "must be of type number"),
    "budget-in-quotes": ("spec.migration.budgetUSD", "must be of type number"),
}
# Not a schema violation: kubectl's (and here the client's) fieldValidation=Strict makes the
# decoder refuse it before validation, as a Bad Request naming the field.
BAD_REQUESTS = {"typo-in-a-field-name"}

# What only the schema says (types, enums, bounds, required fields): refused by the server
# before any rule runs, and by the models with their own messages.
SCHEMA_BAD = [
    Bad("no-spec", _without("spec"), "spec", "Required value"),
    Bad("no-target", _without("spec", "target"), "spec.target", "Required value"),
    Bad("no-table", _without("spec", "database", "table"), "spec.database.table", "Required"),
    Bad(
        "unknown-provider",
        edited({"target": {"provider": "cohere"}}),
        "spec.target.provider",
        'supported values: "openai", "google", "local"',
    ),
    Bad(
        "unknown-index-type",
        edited({"target": {"index": {"type": "flat"}}}),
        "spec.target.index.type",
        'supported values: "hnsw", "ivfflat"',
    ),
    Bad(
        "dimensions-over-16000",
        edited({"target": {"provider": "local", "model": "hash", "dimensions": 16001}}),
        "spec.target.dimensions",
        "should be less than or equal to 16000",
    ),
    Bad(
        "steps-not-a-list",
        edited({"rollout": {"steps": "10,25,100"}}),
        "spec.rollout.steps",
        "must be of type array",
    ),
    Bad("no-steps", edited({"rollout": {"steps": []}}), "spec.rollout.steps", "at least 1"),
    Bad(
        "step-without-percentage",
        edited({"rollout": {"steps": [{"minDuration": "1h"}]}}),
        "spec.rollout.steps[0].percentage",
        "Required value",
    ),
    Bad(
        "paused-maybe",
        edited({"rollout": {"paused": "maybe"}}),
        "spec.rollout.paused",
        "must be of type boolean",
    ),
    Bad(
        "duration-over-the-length",
        edited({"rollout": {"steps": [{"percentage": 100, "minDuration": "1h" * 17}]}}),
        "spec.rollout.steps[0].minDuration",
        f"may not be more than {MAX_DURATION_LENGTH} bytes",
    ),
    Bad(
        "33-criteria",
        edited({"analysis": {"successCriteria": [criterion(query="up", max=1)] * 33}}),
        "spec.analysis.successCriteria",
        "must have at most 32 items",
    ),
    Bad(
        "query-over-the-length",
        edited({"analysis": {"successCriteria": [criterion(query="u" * 4097, max=1)]}}),
        "spec.analysis.successCriteria[0].query",
        f"may not be more than {MAX_QUERY_LENGTH} bytes",
    ),
    Bad(
        "ratio-of-0",
        edited({"analysis": {"successCriteria": [criterion(metric="error_rate", maxRatioToV1=0)]}}),
        "spec.analysis.successCriteria[0].maxRatioToV1",
        "should be greater than 0",
    ),
    Bad(
        "secret-without-a-name",
        edited({"database": {"urlSecretRef": {"name": "", "key": "url"}}}),
        "spec.database.urlSecretRef.name",
        "should be at least 1 chars long",
    ),
    Bad(
        "percentage-as-text",
        edited({"rollout": {"steps": [{"percentage": "100%"}]}}),
        "spec.rollout.steps[0].percentage",
        "must be of type integer",
    ),
]


def _from_the_models_table() -> list[Bad]:
    cases = []
    for id_, edit, _, _ in BAD_SPECS:
        path, fragment = ON_THE_SERVER[id_]
        status = 400 if id_ in BAD_REQUESTS else 422
        cases.append(Bad(f"model-{id_}", edited(edit), path, fragment, status))
    return cases


REFUSED = [
    *(replace(b, id=f"rule-{b.id}") for b in CEL_BAD),
    *_from_the_models_table(),
    *(replace(b, id=f"schema-{b.id}") for b in SCHEMA_BAD),
]


def test_every_bad_spec_of_the_models_table_says_what_the_server_says() -> None:
    # A bad spec added to test_resource.py must say here how the server refuses it.
    assert sorted(ON_THE_SERVER) == sorted(id_ for id_, *_ in BAD_SPECS)
    distinct = {json.dumps(r.manifest(), sort_keys=True) for r in REFUSED}
    assert len(distinct) >= 35, len(distinct)


@pytest.mark.parametrize("bad", REFUSED, ids=[r.id for r in REFUSED])
def test_bad_spec_is_refused_by_the_api_server(server: Server, bad: Bad) -> None:
    manifest = bad.manifest()
    with pytest.raises(client.ApiException) as refused:
        _create(server, manifest, _name(bad.id))
    assert refused.value.status == bad.status, refused.value.body
    body = json.loads(refused.value.body or "{}")
    if bad.status == 422:
        causes = [(c.get("field"), c.get("message", "")) for c in body["details"]["causes"]]
        assert any(f == bad.path and bad.fragment in m for f, m in causes), causes
        # What kubectl prints: the field, then the message, on the object's one line.
        assert f"{bad.path}: " in body["message"]
    else:
        assert bad.fragment in body["message"], body
    # The models refuse what the server refuses: the operator never sees a spec it rejects.
    with pytest.raises(ConfigError):
        parse_migration(manifest, where=bad.id)


# ---- good manifests ------------------------------------------------------------------------


def _example(path: Path) -> Callable[[], dict[str, Any]]:
    def manifest() -> dict[str, Any]:
        loaded: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
        return loaded

    return manifest


GOOD: list[tuple[str, Callable[[], dict[str, Any]]]] = [
    *(
        (f"example-{path.stem}", _example(path))
        for path in EXAMPLES
        if (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("kind")
        == "EmbeddingMigration"
    ),
    *((f"edge-{name}", manifest) for name, manifest in CEL_GOOD),
]


def test_every_example_migration_is_among_the_good_manifests() -> None:
    assert {"example-migration", "example-local-demo"} <= {name for name, _ in GOOD}


@pytest.mark.parametrize(("name", "manifest"), GOOD, ids=[g[0] for g in GOOD])
def test_good_manifest_is_stored_with_the_models_defaults(
    server: Server, name: str, manifest: Callable[[], dict[str, Any]]
) -> None:
    written = manifest()
    stored = _create(server, written, _name(name))
    # What the operator reads back is what the user meant, defaults and all.
    assert parse_migration(stored, where=name).spec == parse_migration(written, where=name).spec
    # The offline defaulting (the pre-check of test_crd.py) is the server's, field for field.
    assert stored["spec"] == apiserver.default(SCHEMA, written)["spec"]


def test_api_server_defaults_are_the_models_defaults(server: Server) -> None:
    stored = _create(server, minimal(), "defaults")
    spec = stored["spec"]
    assert spec["rollout"]["steps"] == [
        {"percentage": p, "minDuration": "72h"} for p in (10, 25, 50, 75)
    ] + [{"percentage": 100, "minDuration": "48h"}]
    assert (spec["rollout"]["maxPercentage"], spec["rollout"]["paused"]) == (100, False)
    assert (spec["analysis"]["interval"], spec["analysis"]["window"]) == ("30s", "5m")
    assert spec["cleanup"] == {"retainSourceFor": "168h", "dropSource": False}
    # All of it: kubectl get -o yaml shows the spec the models give a minimal manifest.
    expected = parse_migration(minimal(), where="x").spec
    assert spec == expected.model_dump(mode="json", by_alias=True, exclude_none=True)


# ---- kubectl -------------------------------------------------------------------------------


def test_kubectl_explain_shows_the_rollout_fields(server: Server) -> None:
    out = server.kubectl("explain", "em.spec.rollout")
    flat = " ".join(out.split())  # kubectl wraps descriptions at its width
    rollout = SCHEMA["properties"]["spec"]["properties"]["rollout"]
    assert " ".join(rollout["description"].split()) in flat
    for field in ("maxPercentage", "paused", "steps", "stickyKey"):
        assert re.search(rf"^\s+{field}\s+<", out, re.MULTILINE), out
        assert " ".join(rollout["properties"][field]["description"].split()) in flat, field


def _table(out: str) -> dict[str, str]:
    """kubectl's table of one row as {header: cell}; cells may be empty, headers have spaces."""
    header, row = out.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+(?: \S+)*", header)]
    bounds = zip(starts, [*starts[1:], None], strict=True)
    return {header[a:b].strip(): row[a:b].strip() for a, b in bounds}


def test_kubectl_get_shows_the_printer_columns(server: Server) -> None:
    name = "printed"
    _create(server, minimal(), name)
    checked = (datetime.now(UTC) - timedelta(minutes=100)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {
        "phase": "Progressing",
        "percentage": 25,
        "stepIndex": 1,
        "migration": {"total": 2000, "migrated": 1234},
        "analysis": {"time": checked},
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "Analysing",
                "lastTransitionTime": checked,
            }
        ],
    }
    server.api.patch_namespaced_custom_object_status(
        GROUP, VERSION, server.namespace, PLURAL, name, {"status": status}
    )
    columns = crd.printer_columns()
    wanted = {
        "NAME": name,
        "PHASE": "Progressing",
        "PERCENTAGE": "25",
        "STEP": "1",
        "MIGRATED": "1234",
        "AGE": r"\d+s",
        "LAST ANALYSIS": r"1\d\dm",  # a date column shows its age: 100 minutes
        "REASON": "Analysing",
    }
    for wide in (False, True):
        out = server.kubectl("get", "em", name, "-n", server.namespace, *(["-o", "wide"] * wide))
        shown = _table(out)
        assert list(shown) == ["NAME"] + [
            c["name"].upper() for c in columns if wide or not c.get("priority")
        ]
        for header, cell in shown.items():
            assert re.fullmatch(wanted[header], cell), (header, cell, out)
