"""``embedshift rollout status NAME``, ``pause``, ``resume`` and ``abort`` as users run them:
the real CLI (in a thread, off the emulator's loop) with a kubeconfig naming the API-server
emulator, the resource and its status created and read through the official client."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml
from kubernetes import client

from embedshift_operator.adapters.kube import patch_status
from embedshift_operator.cli import main
from embedshift_operator.replay import Replayer, parse_series
from embedshift_operator.resource import EmbeddingMigrationStatus, parse_migration
from rag_service.criteria import Verdict
from rag_service.testing.corpus import create_corpus
from tests.helpers import Result
from tests.operator.kube.conftest import Cluster
from tests.operator.kube.harness import (
    GROUP,
    KEY,
    NAME,
    NS,
    PLURAL,
    TABLE,
    VERSION,
    Operator,
    call,
    eventually,
    json_object,
    manifest,
)

RESOURCE_PATH = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}/{NAME}"
STARTED = datetime(2026, 11, 24, 10, tzinfo=UTC)
HEALTHY = {
    "requests": 500,
    "p95-latency": 0.31,
    "p95-latency-critical": 0.31,
    "error-rate": 0.0,
    "error-rate-critical": 0.0,
    "avg-similarity": 0.8,
    "cache-hit-rate": 0.9,
    "critical-errors": 0,
    "cost-vs-v1": 0.0,
    "p95-latency-vs-v1": 0.31,
}


def write_kubeconfig(path: Path, server: str, *, namespace: str | None = NS) -> Path:
    """A kubeconfig as kubectl writes one: one cluster, one user (kmock needs no credentials)."""
    context: dict[str, Any] = {"cluster": "emulator", "user": "tester"}
    if namespace is not None:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {}}],
        "contexts": [{"name": "emulator", "context": context}],
        "current-context": "emulator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture()
def kubeconfig(cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """KUBECONFIG names the emulator, its context's namespace is ``rag``."""
    path = write_kubeconfig(tmp_path / "kubeconfig", str(cluster.emulator.url).rstrip("/"))
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


async def embedshift(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """``embedshift ARGV`` through ``main`` (its own event loop, in a thread), output captured."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def objects(cluster: Cluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.api)


async def create_migration(cluster: Cluster) -> None:
    await call(
        objects(cluster).create_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, manifest()
    )


async def raw_resource(cluster: Cluster) -> dict[str, Any]:
    raw = await call(
        objects(cluster).get_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, NAME
    )
    return json_object(raw)


def progressing_status() -> EmbeddingMigrationStatus:
    """A status the core produces: verified, first step (10 %), two healthy checks done."""
    spec = parse_migration(manifest(), where="test").spec
    replayer = Replayer(spec, STARTED, name=NAME)
    lines = [json.dumps({"at": f"2026-11-24T10:00:0{i}Z", **HEALTHY}) for i in range(2)]
    for point in parse_series(spec, lines):
        replayer.feed(point)
    return replayer.status.model_copy(update={"observed_generation": 1})


async def migration_with_status(cluster: Cluster) -> EmbeddingMigrationStatus:
    """The resource, with the status the operator would have written (through /status)."""
    await create_migration(cluster)
    status = progressing_status()
    await patch_status(api=cluster.api, namespace=NS, name=NAME, status=status)
    return status


# ---- status -------------------------------------------------------------------------------------


async def test_status_reads_the_resource_through_the_api(
    capsys: pytest.CaptureFixture[str], cluster: Cluster, kubeconfig: Path
) -> None:
    status = await migration_with_status(cluster)
    assert status.analysis.results and status.history  # something real to show

    # No -n: the kubeconfig context's namespace (rag) is used, as kubectl does.
    shown = await embedshift(capsys, "rollout", "status", NAME)
    assert shown.code == 0, shown.err
    out = shown.out
    assert KEY in out and "Progressing" in out and "step 1/2" in out and "v2 10 %" in out
    assert "2/3 consecutive passes" in out  # the analysis counters the operator keeps
    for result in status.analysis.results:
        assert result.name in out
    assert "✓ pass" in out
    assert "Verified" in out and "StepPromoted" not in out  # the history's reasons

    as_json = await embedshift(capsys, "rollout", "status", NAME, "-n", NS, "--json")
    assert as_json.code == 0, as_json.err
    document = json.loads(as_json.out)
    # The same shape as `rollout status FILE --json`: the key and the status as the model dumps it.
    assert document == {
        "migration": KEY,
        "status": status.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    assert document["status"]["analysis"]["results"][0]["verdict"] == Verdict.PASS.value


async def test_status_shows_the_spec_switches_and_a_stale_status(
    capsys: pytest.CaptureFixture[str], cluster: Cluster, kubeconfig: Path
) -> None:
    await migration_with_status(cluster)
    await call(
        objects(cluster).patch_namespaced_custom_object,
        GROUP,
        VERSION,
        NS,
        PLURAL,
        NAME,
        {"spec": {"rollout": {"paused": True, "maxPercentage": 5}}},
    )
    shown = await embedshift(capsys, "rollout", "status", NAME)
    assert shown.code == 0, shown.err
    text = " ".join(shown.out.split())  # rich wraps at the terminal's width
    assert "spec.rollout.paused: true" in text
    assert "spec.rollout.maxPercentage: 5" in text
    assert "has not acted on the latest spec yet (generation 2, status reflects 1)" in text


async def test_status_of_a_resource_the_operator_has_not_touched(
    capsys: pytest.CaptureFixture[str], cluster: Cluster, kubeconfig: Path
) -> None:
    await create_migration(cluster)
    shown = await embedshift(capsys, "rollout", "status", NAME)
    assert shown.code == 0, shown.err
    assert shown.out.startswith(f"{KEY}: no status yet: the operator has not acted on it")
    as_json = await embedshift(capsys, "rollout", "status", NAME, "--json")
    assert json.loads(as_json.out) == {"migration": KEY, "status": None}


@pytest.mark.parametrize("command", [["status"], ["pause"], ["resume"], ["abort"]])
async def test_a_missing_resource_is_one_line_naming_it_and_the_fix(
    capsys: pytest.CaptureFixture[str], cluster: Cluster, kubeconfig: Path, command: list[str]
) -> None:
    result = await embedshift(capsys, "rollout", *command, "nosuch", "-n", NS)
    assert result.code != 0
    assert result.out == ""
    assert result.err.count("\n") == 1  # one line
    assert result.err.startswith(f"embedshift: error: EmbeddingMigration {NS}/nosuch not found")
    assert "-n" in result.err and "kubectl get em -A" in result.err


async def test_forbidden_names_the_permission_to_ask_for(
    capsys: pytest.CaptureFixture[str], cluster: Cluster, kubeconfig: Path
) -> None:
    await migration_with_status(cluster)

    def forbidden(request: object) -> None:
        raise kmock.KubernetesError(
            status=403,
            reason="Forbidden",
            message=f'{PLURAL}.{GROUP} "{NAME}" is forbidden: User "dev" cannot patch',
        )

    cluster.emulator["patch", RESOURCE_PATH] << forbidden
    result = await embedshift(capsys, "rollout", "pause", NAME, "--wait", "0")
    assert result.code != 0
    assert result.err.count("\n") == 1
    assert f"EmbeddingMigration {KEY}: not allowed to patch it" in result.err
    assert f"ask for RBAC patch on {PLURAL}.{GROUP} in namespace {NS}" in result.err


async def test_an_unreachable_cluster_is_one_line_naming_the_server(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")  # discard: nothing
    monkeypatch.delenv("KUBECONFIG", raising=False)
    result = await embedshift(capsys, "rollout", "status", NAME, "--kubeconfig", str(path))
    assert result.code != 0
    assert result.err.count("\n") == 1
    assert "cannot reach the Kubernetes API server at http://127.0.0.1:9" in result.err
    assert "--kubeconfig" in result.err


async def test_flags_of_a_cluster_with_a_file_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    result = await embedshift(capsys, "rollout", "status", str(tmp_path / "m.yaml"), "-n", NS)
    assert result.code == 2
    assert "is a file, and -n only apply to a resource on a cluster" in result.err
    paused = await embedshift(capsys, "rollout", "pause", "m.yaml")
    assert paused.code == 2
    assert "edit the file instead: set spec.rollout.paused: true" in paused.err


# ---- pause, resume, abort -----------------------------------------------------------------------


async def test_pause_resume_abort_patch_the_spec_and_say_what_to_commit(
    capsys: pytest.CaptureFixture[str], cluster: Cluster, kubeconfig: Path
) -> None:
    await migration_with_status(cluster)

    paused = await embedshift(capsys, "rollout", "pause", NAME, "-n", NS, "--wait", "0")
    assert paused.code == 0, paused.err
    assert (await raw_resource(cluster))["spec"]["rollout"]["paused"] is True
    lines = paused.out.splitlines()
    assert lines[0] == f"{KEY}: spec.rollout.paused: false → true"
    # No operator runs here: the status has not caught up, and the output says so.
    assert (
        "the operator has not acted on it (still Progressing, step 1 of 2, 10 % to v2)" in lines[1]
    )
    assert lines[-1].endswith("in Git: set spec.rollout.paused: true")
    assert "GitOps" in lines[-1]

    version = (await raw_resource(cluster))["metadata"]["resourceVersion"]
    again = await embedshift(capsys, "rollout", "pause", NAME, "--wait", "0")
    assert again.code == 0, again.err
    assert f"{KEY}: already paused (spec.rollout.paused: true); nothing changed" in again.out
    assert (await raw_resource(cluster))["metadata"]["resourceVersion"] == version  # no write

    resumed = await embedshift(capsys, "rollout", "resume", NAME, "--wait", "0")
    assert resumed.code == 0, resumed.err
    assert resumed.out.startswith(f"{KEY}: spec.rollout.paused: true → false")
    assert resumed.out.rstrip().endswith("in Git: set spec.rollout.paused: false")
    assert (await raw_resource(cluster))["spec"]["rollout"]["paused"] is False
    not_paused = await embedshift(capsys, "rollout", "resume", NAME, "--wait", "0")
    assert f"{KEY}: not paused" in not_paused.out and not_paused.code == 0

    aborted = await embedshift(capsys, "rollout", "abort", NAME, "--wait", "0")
    assert aborted.code == 0, aborted.err
    assert aborted.out.startswith(f"{KEY}: spec.rollout.maxPercentage: 100 → 0")
    assert "raise spec.rollout.maxPercentage again" in aborted.out
    assert aborted.out.rstrip().endswith("in Git: set spec.rollout.maxPercentage: 0")
    rollout = (await raw_resource(cluster))["spec"]["rollout"]
    assert rollout["maxPercentage"] == 0 and rollout["paused"] is False
    again = await embedshift(capsys, "rollout", "abort", NAME, "--wait", "0")
    assert again.code == 0 and "already aborted" in again.out

    # resume does not lift the cap, and says how to.
    await call(
        objects(cluster).patch_namespaced_custom_object,
        GROUP,
        VERSION,
        NS,
        PLURAL,
        NAME,
        {"spec": {"rollout": {"paused": True}}},
    )
    capped = await embedshift(capsys, "rollout", "resume", NAME, "--wait", "0")
    assert capped.code == 0, capped.err
    assert "spec.rollout.maxPercentage is still 0: resume only unpauses" in capped.out
    assert "edit spec.rollout.maxPercentage" in capped.out
    assert (await raw_resource(cluster))["spec"]["rollout"]["maxPercentage"] == 0


async def test_pause_before_the_steps_says_what_it_will_hold(
    capsys: pytest.CaptureFixture[str], cluster: Cluster, kubeconfig: Path
) -> None:
    await create_migration(cluster)  # Pending: the operator has not started it
    paused = await embedshift(capsys, "rollout", "pause", NAME, "--wait", "0")
    assert paused.code == 0, paused.err
    assert "the rollout routes its first step (10 %) and holds there" in paused.out
    assert (await raw_resource(cluster))["spec"]["rollout"]["paused"] is True


def test_each_help_explains_the_gitops_rule(capsys: pytest.CaptureFixture[str]) -> None:
    for action in ("pause", "resume", "abort"):
        with pytest.raises(SystemExit):
            main(["rollout", action, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "GitOps controller reverts a change Git does not have" in text
    with pytest.raises(SystemExit):
        main(["rollout", "resume", "--help"])
    assert "edit maxPercentage to lift it" in " ".join(capsys.readouterr().out.split())


def test_the_cli_does_not_load_the_kubernetes_client_until_a_cluster_command_runs() -> None:
    """``embedshift migrate`` and ``serve`` import the CLI; the client costs them start-up time."""
    import subprocess

    code = (
        "import sys, embedshift_operator.cli; "
        "sys.exit(1 if {'kubernetes', 'kopf'} & set(sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---- with the operator --------------------------------------------------------------------------


async def test_abort_rolls_back_through_the_real_operator(
    capsys: pytest.CaptureFixture[str], operator: Operator, kubeconfig: Path
) -> None:
    create_corpus(operator.database_url, table=TABLE, count=5)
    await operator.create_secret()
    await operator.create_migration()
    await operator.drive_to_progressing()

    aborted = await embedshift(capsys, "rollout", "abort", NAME)
    assert aborted.code == 0, aborted.err
    # --wait (default 10 s) saw the operator act: the phase after is printed, not a promise.
    assert f"{KEY}: now RolledBack, 0 % to v2" in aborted.out
    assert await operator.routing_percentage() == 0

    async def rolled_back() -> bool:
        """RolledBack (ManualRollback) in status"""
        status = await operator.status()
        history = status.get("history") or [{}]
        return status.get("phase") == "RolledBack" and history[-1].get("reason") == "ManualRollback"

    await eventually(rolled_back)
    shown = await embedshift(capsys, "rollout", "status", NAME)
    assert shown.code == 0, shown.err
    assert "RolledBack" in shown.out and "v2 0 %" in shown.out
    assert "ManualRollback" in shown.out
    assert "spec.rollout.maxPercentage: 0 (v2 capped)" in shown.out
