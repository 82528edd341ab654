"""The chart's Argo CD health check (``health/embedshift.io_EmbeddingMigration/health.lua``) run
as Argo CD runs it (a Lua 5.1 interpreter, the resource as ``obj``) on EmbeddingMigrations read
back from the real API server, after the operator's own code wrote their status: the statuses
are what ``decide`` makes of each phase, written by the Kubernetes adapter's ``patch_status``
with ``observedGeneration`` as the kopf handler sets it. Flux's kstatus reads the same objects:
``observedGeneration``, a ``Stalled`` condition and a ``Ready`` condition."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import lupa.lua51  # type: ignore[import-untyped]  # Argo CD's gopher-lua speaks Lua 5.1
import pytest
import pytest_asyncio
from kubernetes import client

from embedshift_operator.adapters.kube import patch_spec, patch_status
from embedshift_operator.core import decide
from embedshift_operator.core.allowlist import (
    ENDPOINT_NOT_ALLOWED,
    IMAGE_NOT_ALLOWED,
    Allowlist,
    refusals,
)
from embedshift_operator.core.model import Observations
from embedshift_operator.handlers import held_status
from embedshift_operator.resource import (
    GROUP,
    PLURAL,
    VERSION,
    ConditionType,
    EmbeddingMigrationStatus,
    Phase,
)
from tests.chart.helm import ROOT
from tests.cluster.apiserver import apply_crd, create_migration, namespace, real_client
from tests.operator.core.builders import T0, make_spec, status_at
from tests.operator.e2e.target import Target

HEALTH_LUA = (
    ROOT / "charts" / "embedshift" / "health" / "embedshift.io_EmbeddingMigration" / "health.lua"
)
UNREACHABLE = "cannot connect to the database (host=db port=5432 dbname=rag)"

# Argo CD's verdict for each phase the operator writes.
EXPECTED = {
    Phase.PENDING: "Progressing",
    Phase.PREPARING: "Progressing",
    Phase.MIGRATING: "Progressing",
    Phase.INDEXING: "Progressing",
    Phase.VERIFYING: "Progressing",
    Phase.PROGRESSING: "Progressing",
    Phase.PROMOTED: "Progressing",
    Phase.PAUSED: "Suspended",
    Phase.SUCCEEDED: "Healthy",
    Phase.ROLLED_BACK: "Degraded",
    Phase.FAILED: "Degraded",
}


def decided(phase: Phase) -> EmbeddingMigrationStatus:
    """The status the operator's core writes for a resource in ``phase`` (one tick from there,
    nothing observed; Paused from a paused spec, Pending from a fresh resource)."""
    now = T0 + timedelta(minutes=1)
    if phase is Phase.PENDING:
        # A new resource whose database cannot be reached yet: the handler holds the phase and
        # writes the decision's Ready and Stalled conditions (handlers.held_status).
        decision = decide(
            make_spec(), EmbeddingMigrationStatus(), Observations(database_error=UNREACHABLE), now,
            name="docs",
        )  # fmt: skip
        return held_status(
            EmbeddingMigrationStatus(),
            decision,
            message=f"{UNREACHABLE}; retrying",
            generation=None,
        )
    if phase is Phase.PAUSED:
        spec = make_spec(rollout={"paused": True})
        start = status_at(spec, Phase.PROGRESSING)
    else:
        spec = make_spec()
        start = status_at(spec, phase)
    status = decide(spec, start, Observations(), now, name="docs").status
    assert status.phase is phase, f"{phase.value}: the core moved on to {status.phase.value}"
    return status


def health(obj: dict[str, Any]) -> tuple[str, str]:
    """(hs.status, hs.message) of the chart's script for ``obj``, as Argo CD evaluates it."""
    lua = lupa.lua51.LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(HEALTH_LUA.read_text())
    return str(result["status"]), str(result["message"])


@pytest.fixture(scope="module")
def api(kube_cluster: Target) -> Iterator[client.ApiClient]:
    with real_client(kube_cluster) as api:
        apply_crd(api)
        yield api


@pytest_asyncio.fixture()
async def ns(api: client.ApiClient) -> AsyncIterator[str]:
    with namespace(api, "embedshift-health") as name:
        yield name


def read(api: client.ApiClient, ns: str, name: str) -> dict[str, Any]:
    raw = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name
    )
    assert isinstance(raw, dict)  # the client types custom objects as object
    return raw


async def written(
    api: client.ApiClient, ns: str, name: str, status: EmbeddingMigrationStatus
) -> dict[str, Any]:
    """``status`` written as the operator writes it, the object read back from the server."""
    generation = create_migration(api, ns, name)["metadata"]["generation"]
    status = status.model_copy(update={"observed_generation": generation})
    await patch_status(api=api, namespace=ns, name=name, status=status)
    return read(api, ns, name)


async def test_every_phase_has_its_argo_cd_health(api: client.ApiClient, ns: str) -> None:
    for phase, wanted in EXPECTED.items():
        obj = await written(api, ns, phase.value.lower(), decided(phase))
        assert obj["status"]["phase"] == phase.value  # the server kept what the operator wrote
        status, message = health(obj)
        assert status == wanted, (phase, message)
        ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
        assert message.startswith(f"{phase.value} at {obj['status']['percentage']}% to v2"), message
        assert ready["message"] in message, message
        if ready["reason"] != phase.value:
            assert f"({ready['reason']})" in message, message


def test_the_messages_say_why() -> None:
    """What a person sees in Argo CD for the phases that need them, spelled out."""
    paused = decided(Phase.PAUSED)
    obj = {"metadata": {"generation": 1}, "status": paused.model_dump(mode="json", by_alias=True)}
    assert health(obj) == (
        "Suspended",
        f"Paused at {paused.percentage}% to v2: {paused.conditions[0].message}",
    )
    pending = decided(Phase.PENDING).model_dump(mode="json", by_alias=True, exclude_none=True)
    assert health({"metadata": {"generation": 1}, "status": pending}) == (
        "Progressing",
        f"Pending at 0% to v2 (DatabaseUnreachable): {UNREACHABLE}",
    )


@pytest.mark.parametrize(
    ("parts", "allowlist", "reason"),
    [
        (
            {"migration": {"image": "evil.example/x:1"}},
            Allowlist(images=("ghcr.io/embedshift/embedshift",)),
            IMAGE_NOT_ALLOWED,
        ),
        (
            {},
            Allowlist(images=("*",), endpoints=("prometheus.monitoring.svc",)),
            ENDPOINT_NOT_ALLOWED,
        ),
    ],
)
@pytest.mark.parametrize("phase", [Phase.PENDING, Phase.PROGRESSING, Phase.SUCCEEDED])
def test_a_spec_the_allowlists_refuse_is_degraded_saying_why(
    parts: dict[str, Any], allowlist: Allowlist, reason: str, phase: Phase
) -> None:
    """The operator holds a spec naming an image or a host outside its allowlists (Stalled True
    with the refusal's reason) in whatever phase it was: Degraded, whatever that phase, with
    the Stalled condition's reason and message (what to change), not Progressing for ever."""
    spec = make_spec(**parts)
    start = EmbeddingMigrationStatus() if phase is Phase.PENDING else status_at(spec, phase)
    refused = Observations(refusals=refusals(spec, allowlist, operator_image="ghcr.io/e/e:1"))
    status = decide(spec, start, refused, T0 + timedelta(minutes=1), name="docs").status
    assert status.phase is phase  # held where it was
    stalled = next(c for c in status.conditions if c.type is ConditionType.STALLED)
    assert (stalled.status, stalled.reason) == ("True", reason)
    obj = {"metadata": {"generation": 1}, "status": status.model_dump(mode="json", by_alias=True)}
    assert health(obj) == (
        "Degraded",
        f"{phase.value} at {status.percentage}% to v2 ({reason}): {stalled.message}",
    )


def test_failed_and_rolled_back_say_ready_not_stalled() -> None:
    """Stalled is True in Failed and RolledBack too: still Degraded, and the message is the
    Ready condition's, as before (Stalled repeats it with the phase)."""
    for phase in (Phase.FAILED, Phase.ROLLED_BACK):
        status = decided(phase)
        ready = next(c for c in status.conditions if c.type is ConditionType.READY)
        stalled = next(c for c in status.conditions if c.type is ConditionType.STALLED)
        assert stalled.status == "True"
        obj = {
            "metadata": {"generation": 1},
            "status": status.model_dump(mode="json", by_alias=True),
        }
        verdict, message = health(obj)
        assert verdict == "Degraded" and message.endswith(f": {ready.message}"), message
        assert stalled.message not in message, message


async def test_a_status_older_than_the_spec_is_progressing(api: client.ApiClient, ns: str) -> None:
    obj = await written(api, ns, "docs", decided(Phase.SUCCEEDED))
    assert health(obj)[0] == "Healthy"
    await patch_spec(api=api, namespace=ns, name="docs", spec={"migration": {"batchSize": 50}})
    edited = read(api, ns, "docs")
    assert edited["metadata"]["generation"] == obj["metadata"]["generation"] + 1
    assert health(edited) == (
        "Progressing",
        f"waiting for the operator to observe generation {edited['metadata']['generation']}",
    )


async def test_a_resource_without_status_is_progressing(api: client.ApiClient, ns: str) -> None:
    obj = create_migration(api, ns, "fresh")
    assert "status" not in obj
    assert health(obj) == ("Progressing", "waiting for the operator to write a status")


async def test_flux_kstatus_reads_observed_generation_stalled_and_ready(
    api: client.ApiClient, ns: str
) -> None:
    """kstatus: Failed when Stalled is True (Failed, RolledBack: only a commit moves them on);
    else Current when observedGeneration is the generation and Ready is True, InProgress while
    Ready is False (the phase then says more)."""
    for phase in (Phase.PENDING, Phase.MIGRATING, Phase.FAILED, Phase.ROLLED_BACK, Phase.SUCCEEDED):
        obj = await written(api, ns, f"k-{phase.value.lower()}", decided(phase))
        assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
        conditions = {c["type"]: c for c in obj["status"]["conditions"]}
        assert len(conditions) == len(obj["status"]["conditions"])
        ready, stalled = conditions["Ready"], conditions["Stalled"]
        assert ready["status"] == ("True" if phase is Phase.SUCCEEDED else "False")
        assert stalled["status"] == (
            "True" if phase in (Phase.FAILED, Phase.ROLLED_BACK) else "False"
        )
        for condition in (ready, stalled):
            assert condition["reason"] and condition["lastTransitionTime"]
