"""``embedshift rollout status NAME | pause | resume | abort``: an EmbeddingMigration on a cluster.

``status NAME`` reads the resource (its ``status`` is what the operator decided) through the
API, as ``rollout status FILE`` reads what ``rollout run`` saved. ``pause``, ``resume`` and
``abort`` merge-patch the spec, as ``kubectl patch --type=merge`` would; the operator acts on
the change at once (a spec edit wakes its loop). Under GitOps the spec belongs to Git: each
command says which line to commit, since the GitOps controller reverts a change made only here.

The Kubernetes client (and :mod:`embedshift_operator.adapters.kube`, which imports it) is
imported inside the functions: :mod:`embedshift_operator.cli` imports this module for every
command, and ``embedshift migrate`` and ``serve`` must not load it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedshift_operator.cli.flags import seconds_or_zero
from embedshift_operator.resource import GROUP, PLURAL, EmbeddingMigration, Phase
from rag_service.errors import ConfigError, EmbedshiftError

if TYPE_CHECKING:
    from kubernetes import client

__all__ = [
    "FILE_SUFFIXES",
    "Change",
    "Connection",
    "add_cluster_flags",
    "change",
    "connect",
    "is_file",
    "load_configuration",
    "one_line",
    "read",
    "state_line",
]

FILE_SUFFIXES = (".yaml", ".yml", ".json")
DEFAULT_KUBECONFIG = "~/.kube/config"
# kubectl reads the namespace of a Pod's service account from here when run in a Pod.
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
RESOURCE = f"{PLURAL}.{GROUP}"  # as RBAC rules and kubectl name it
POLL_SECONDS = 0.2
# Before the steps: pausing holds nothing yet (the pipeline runs on, then the first step holds).
PIPELINE = (Phase.PREPARING, Phase.MIGRATING, Phase.INDEXING, Phase.VERIFYING)

GITOPS_NOTE = """\
Under GitOps (Argo CD, Flux) the spec belongs to Git: this command changes the resource on
the cluster only, and the GitOps controller reverts a change Git does not have. Commit the
same line in Git (each command prints it); use the command where nothing syncs the resource,
or to act at once and commit right after.
"""


# ---- what TARGET is -----------------------------------------------------------------------------


def add_cluster_flags(parser: argparse.ArgumentParser, *, wait: bool = False) -> None:
    """``-n``, ``--kubeconfig``, ``--context`` (and ``--wait`` for the commands that patch)."""
    g = parser.add_argument_group("cluster (as kubectl picks them)")
    g.add_argument(
        "-n",
        "--namespace",
        help="the resource's namespace (default: the kubeconfig context's, else default)",
    )
    g.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="kubeconfig file (default: KUBECONFIG, else ~/.kube/config, else in-cluster)",
    )
    g.add_argument(
        "--context", metavar="NAME", help="kubeconfig context (default: its current-context)"
    )
    if wait:
        g.add_argument(
            "--wait",
            type=seconds_or_zero,
            default=10.0,
            metavar="SECONDS",
            help="how long to wait for the operator to act on the change before printing the "
            "phase and percentage (default 10; 0: print at once)",
        )


def _cluster_flags(args: argparse.Namespace) -> list[str]:
    given = [("-n", args.namespace), ("--kubeconfig", args.kubeconfig), ("--context", args.context)]
    return [flag for flag, value in given if value]


def is_file(args: argparse.Namespace) -> bool:
    """Whether ``args.target`` names a manifest file (else a resource on the cluster).

    A file: a name ending in .yaml/.yml/.json or holding a '/' (no resource name does), or a
    file here while no cluster flag is given (a directory is not: ``docs`` in a repository
    root is still the resource). The cluster flags make no sense with a file, so they are
    refused rather than ignored.
    """
    target: str = args.target
    flags = _cluster_flags(args)
    if target.endswith(FILE_SUFFIXES) or "/" in target:
        if flags:
            raise ConfigError(
                f"{target} is a file, and {', '.join(flags)} only apply to a resource on a "
                "cluster: give the resource's name instead (rollout status NAME -n NAMESPACE)"
            )
        return True
    return not flags and Path(target).is_file()


# ---- the connection -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Connection:
    api: client.ApiClient
    namespace: str  # the namespace the resource is in (-n, else the context's, else default)
    server: str  # for messages: which API server was asked

    def where(self, name: str) -> str:
        return f"{self.namespace}/{name}"


def load_configuration(
    kubeconfig: str | Path | None, context: str | None, *, in_cluster_first: bool = False
) -> tuple[client.Configuration, str | None]:
    """The client's configuration and the namespace it implies (the context's, or the Pod's).

    As kubectl: ``kubeconfig``, else KUBECONFIG (a list is merged), else ~/.kube/config, else
    the Pod's service account. ``in_cluster_first`` (the operator, when given neither flag):
    the Pod's service account before any kubeconfig. ConfigError when there is none."""
    from kubernetes import client
    from kubernetes import config as loader

    configuration = client.Configuration()
    if in_cluster_first and kubeconfig is None and context is None:
        try:
            loader.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except loader.ConfigException:
            pass  # not in a Pod: a kubeconfig, as below
        else:
            return configuration, _pod_namespace()
    given = str(kubeconfig) if kubeconfig is not None else None
    path = given or os.environ.get("KUBECONFIG") or None
    if path is None and Path(DEFAULT_KUBECONFIG).expanduser().exists():
        path = DEFAULT_KUBECONFIG
    if path is None:
        if context:
            raise ConfigError(
                f"--context {context}: no kubeconfig (--kubeconfig, KUBECONFIG or "
                f"{DEFAULT_KUBECONFIG}) to find it in"
            )
        try:
            loader.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except loader.ConfigException:
            raise ConfigError(
                "no cluster to talk to: no kubeconfig (--kubeconfig, KUBECONFIG or "
                f"{DEFAULT_KUBECONFIG}) and not running in a Pod"
            ) from None
        return configuration, _pod_namespace()
    if given and not Path(given).expanduser().exists():
        raise ConfigError(f"--kubeconfig {given}: no such file")
    if not any(Path(p).expanduser().exists() for p in path.split(os.pathsep) if p):
        raise ConfigError(
            f"KUBECONFIG={path}: no such file; point it at your kubeconfig, or pass "
            "--kubeconfig FILE"
        )
    try:
        contexts, current = loader.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=path
        )
        chosen = current
        if context:
            chosen = next((c for c in contexts if c.get("name") == context), None)
            if chosen is None:
                names = ", ".join(str(c.get("name")) for c in contexts) or "none"
                raise ConfigError(
                    f"--context {context}: not in kubeconfig {path} (contexts: {names})"
                )
        loader.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path,
            context=context,
            client_configuration=configuration,
            persist_config=False,  # never rewrite the user's kubeconfig
        )
    except loader.ConfigException as exc:
        raise ConfigError(
            f"kubeconfig {path}: {one_line(str(exc)).rstrip('.')}; fix it, or pass "
            "--kubeconfig FILE or --context NAME"
        ) from None
    return configuration, ((chosen or {}).get("context") or {}).get("namespace")


def _pod_namespace() -> str | None:
    if SERVICE_ACCOUNT_NAMESPACE.exists():
        return SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip() or None
    return None


@contextmanager
def connect(args: argparse.Namespace) -> Iterator[Connection]:
    """A client configured as kubectl would be (see :func:`load_configuration`)."""
    from kubernetes import client

    configuration, namespace = load_configuration(args.kubeconfig, args.context)
    with client.ApiClient(configuration) as api:
        yield Connection(
            api=api,
            namespace=args.namespace or namespace or "default",
            server=str(configuration.host),
        )


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters (for messages)."""
    return " ".join(text.split())[:limit]


# ---- reading and patching -----------------------------------------------------------------------


def _explained(exc: Exception, conn: Connection, name: str, *, verb: str) -> EmbedshiftError:
    """A ClusterError as one line naming the resource and the fix."""
    from embedshift_operator.adapters.kube import ClusterError

    assert isinstance(exc, ClusterError)
    what = f"EmbeddingMigration {conn.where(name)}"
    # "kubernetes: patch embeddingmigrations NS/NAME: 403 Forbidden: …": the API's part only.
    detail = str(exc).removeprefix("kubernetes: ").split(": ", 1)[-1]
    if exc.status == 404:
        message = (
            f"{what} not found on {conn.server}: check the name and the namespace (-n; "
            "`kubectl get em -A` lists them) and that the embedshift CRD is installed"
        )
    elif exc.status == 401:
        message = (
            f"{what}: {conn.server} did not accept the credentials (401 Unauthorized): log in "
            "again, or pick another user with --context"
        )
    elif exc.status == 403:
        message = (
            f"{what}: not allowed to {verb} it ({detail}): ask for RBAC {verb} on {RESOURCE} "
            f"in namespace {conn.namespace}, or use another --context"
        )
    elif exc.status is None:
        message = (
            f"{what}: cannot reach the Kubernetes API server at {conn.server}: check "
            "--kubeconfig / --context (or KUBECONFIG) and that the cluster is up"
        )
    else:
        message = f"{what}: {detail}"
    return ClusterError(message, status=exc.status)


async def read(conn: Connection, name: str) -> EmbeddingMigration:
    """The resource as the API server has it now, status included."""
    from embedshift_operator.adapters.kube import ClusterError, read_migration

    try:
        return await read_migration(api=conn.api, namespace=conn.namespace, name=name)
    except ClusterError as exc:
        raise _explained(exc, conn, name, verb="get") from None


async def _patch(conn: Connection, name: str, spec: Mapping[str, Any]) -> EmbeddingMigration:
    from embedshift_operator.adapters.kube import ClusterError, patch_spec

    try:
        return await patch_spec(api=conn.api, namespace=conn.namespace, name=name, spec=spec)
    except ClusterError as exc:
        raise _explained(exc, conn, name, verb="patch") from None


async def _acted_on(
    conn: Connection, patched: EmbeddingMigration, *, wait: float
) -> tuple[EmbeddingMigration, bool]:
    """The resource once the operator's status reflects ``patched``'s generation (True), or as
    it is after ``wait`` seconds (False)."""
    generation = patched.metadata.generation
    resource = patched
    deadline = time.monotonic() + wait
    while True:
        observed = resource.status.observed_generation
        if generation is not None and observed is not None and observed >= generation:
            return resource, True
        if time.monotonic() >= deadline:
            return resource, False
        await asyncio.sleep(POLL_SECONDS)
        resource = await read(conn, patched.metadata.name)


# ---- the words ----------------------------------------------------------------------------------


def state_line(resource: EmbeddingMigration) -> str:
    """``Paused, step 1 of 5, 10 % to v2``: where the rollout stands, from status."""
    status = resource.status
    steps = resource.spec.rollout.steps
    where = ""
    if status.phase.routes_v2:
        index = min(status.step_index, len(steps) - 1)
        where = f" step {index + 1} of {len(steps)},"
    return f"{status.phase.value},{where} {status.percentage} % to v2"


def spec_notes(resource: EmbeddingMigration) -> list[str]:
    """What the spec holds that the status alone does not say (shown by ``status NAME``)."""
    rollout = resource.spec.rollout
    notes = []
    if rollout.paused:
        notes.append("spec.rollout.paused: true (held at the current step)")
    if rollout.max_percentage < 100:
        notes.append(f"spec.rollout.maxPercentage: {rollout.max_percentage} (v2 capped)")
    generation = resource.metadata.generation
    observed = resource.status.observed_generation
    if generation is not None and observed is not None and observed < generation:
        notes.append(
            f"the operator has not acted on the latest spec yet (generation {generation}, "
            f"status reflects {observed})"
        )
    return notes


@dataclass(frozen=True)
class Change:
    """One of pause, resume, abort: the spec.rollout field it sets, and how to say it."""

    field: str  # the camelCase name under spec.rollout
    value: bool | int
    already: str  # "already paused"

    def current(self, resource: EmbeddingMigration) -> bool | int:
        rollout = resource.spec.rollout
        return rollout.paused if self.field == "paused" else rollout.max_percentage

    def git_line(self) -> str:
        return f"spec.rollout.{self.field}: {_yaml(self.value)}"


PAUSE = Change(field="paused", value=True, already="already paused")
RESUME = Change(field="paused", value=False, already="not paused")
ABORT = Change(field="maxPercentage", value=0, already="already aborted")


def _yaml(value: bool | int) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


async def change(args: argparse.Namespace, wanted: Change) -> int:
    """Set ``spec.rollout.<field>`` to the wanted value unless it holds it; print what changed,
    where the rollout stands after, and the line to commit under GitOps."""
    name: str = args.name
    if name.endswith(FILE_SUFFIXES) or "/" in name:
        raise ConfigError(
            f"{name} is a file: `rollout {args.action}` acts on a resource on a cluster. "
            f"For `rollout run {name}`, edit the file instead: set {wanted.git_line()} "
            "(the driver re-reads it every tick)"
        )
    with connect(args) as conn:
        resource = await read(conn, name)
        key = conn.where(name)
        before = wanted.current(resource)
        if before == wanted.value:
            print(f"{key}: {wanted.already} ({wanted.git_line()}); nothing changed")
            print(f"{key}: {state_line(resource)}")
        else:
            patched = await _patch(conn, name, {"rollout": {wanted.field: wanted.value}})
            print(f"{key}: spec.rollout.{wanted.field}: {_yaml(before)} → {_yaml(wanted.value)}")
            resource, acted = await _acted_on(conn, patched, wait=args.wait)
            if acted:
                print(f"{key}: now {state_line(resource)}")
            else:
                waited = f" within {args.wait:g} s" if args.wait else ""
                print(
                    f"{key}: the operator has not acted on it{waited} (still "
                    f"{state_line(resource)}); follow it with "
                    f"`kubectl get em {name} -n {conn.namespace} -w`"
                )
        for line in _advice(resource, wanted):
            print(line)
    print(
        "under GitOps, commit the same change or the GitOps controller reverts it; "
        f"in Git: set {wanted.git_line()}"
    )
    return 0


def _advice(resource: EmbeddingMigration, wanted: Change) -> list[str]:
    """What the command did not do that the user may expect of it."""
    cap = resource.spec.rollout.max_percentage
    phase = resource.status.phase
    if wanted is PAUSE and phase in (Phase.PENDING, *PIPELINE):
        first = min(resource.spec.rollout.steps[0].percentage, cap)
        return [
            f"note: {phase.value}: the migration goes on; once verified, the rollout routes "
            f"its first step ({first} %) and holds there"
        ]
    if wanted is RESUME and cap < 100:
        return [
            f"note: spec.rollout.maxPercentage is still {cap}: resume only unpauses; to let v2 "
            "past it, edit spec.rollout.maxPercentage (raising it from 0 retries from step 1)"
        ]
    if wanted is ABORT:
        return [
            "to retry later, raise spec.rollout.maxPercentage again: the rollout restarts "
            "from the first step"
        ]
    return []
