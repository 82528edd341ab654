"""Which API server the e2e suite runs against, and the stand-in served when there is no cluster.

``KUBECONFIG`` set: the cluster it names (its current context). Unset: the stand-in, the
project's API-server emulator (:mod:`tests.operator.kube.emulator`) served on a local port in a
thread of its own, with a kubeconfig written for it; the suite then reaches it exactly as it
reaches a cluster, through that kubeconfig only. The stand-in asks for the kubeconfig's bearer
token on every request (401 without it), as a cluster asks for credentials, so the suite also
proves that both the ``kubernetes`` client and kopf authenticate with what the kubeconfig holds.

Registered as a plugin by ``tests/conftest.py`` for :func:`pytest_report_header` (a conftest
this deep is not loaded before the header is printed).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import yaml
from kmock._internal import rendering  # the Request type of the hook kmock itself overrides
from kubernetes import config as kubeconfig

from tests.operator.kube.emulator import ApiServerEmulator

__all__ = [
    "STAND_IN",
    "Target",
    "TargetRefused",
    "pytest_report_header",
    "stand_in",
    "target_from_environment",
]

STAND_IN = "embedshift-stand-in"
# Contexts of the usual throwaway local clusters; any other needs EMBEDSHIFT_E2E_CONTEXT set to
# its name, so a KUBECONFIG left pointing at production does not get test namespaces (and a
# replaced CRD) from a `make test`.
THROWAWAY_CONTEXTS = ("kind-", "k3d-", "minikube", "docker-desktop", "rancher-desktop", "colima")
CONFIRM_VARIABLE = "EMBEDSHIFT_E2E_CONTEXT"


class TargetRefused(Exception):
    """KUBECONFIG names a cluster the suite will not run against, or cannot be read."""


@dataclass(frozen=True)
class Target:
    """The API server the suite runs against: its kubeconfig and whether it is a real one."""

    kubeconfig: str
    context: str
    real: bool

    def describe(self) -> str:
        if self.real:
            return f"the cluster KUBECONFIG names (context {self.context!r}, {self.kubeconfig})"
        return (
            "the stand-in: tests/operator/kube/emulator.py on a local port, a kubeconfig "
            "written for it (KUBECONFIG is not set); its CEL is cel-python's, not Kubernetes'"
        )


def target_from_environment() -> Target | None:
    """The cluster ``KUBECONFIG`` names (refused unless throwaway or confirmed), else None."""
    path = os.environ.get("KUBECONFIG")
    if not path:
        return None
    try:
        _, active = kubeconfig.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]
    except (OSError, kubeconfig.ConfigException) as exc:
        raise TargetRefused(f"KUBECONFIG={path}: cannot read its current context: {exc}") from None
    context = str(active["name"])
    if not context.startswith(THROWAWAY_CONTEXTS) and os.environ.get(CONFIRM_VARIABLE) != context:
        raise TargetRefused(
            f"KUBECONFIG's current context {context!r} does not look like a throwaway cluster "
            f"(kind, k3d, minikube, ...); the e2e suite creates a namespace and applies the CRD "
            f"there. Set {CONFIRM_VARIABLE}={context} to confirm, or unset KUBECONFIG"
        )
    return Target(kubeconfig=path, context=context, real=True)


def pytest_report_header() -> str:
    try:
        target = target_from_environment()
    except TargetRefused as exc:
        return f"embedshift e2e: refused: {exc}"
    if target is None:
        target = Target(kubeconfig="(written at session start)", context=STAND_IN, real=False)
    return f"embedshift e2e: against {target.describe()}"


class _StandInEmulator(ApiServerEmulator):
    """The emulator asking for the kubeconfig's bearer token (401 without it), as a cluster
    does: a client that forgot its credentials fails here too."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.token = ""  # set before serving

    async def _handle(self, request: rendering.Request) -> Any:
        lowered = {k.lower(): v for k, v in request.headers.items()}
        if lowered.get("authorization") != f"Bearer {self.token}":
            raise kmock.KubernetesError(
                status=401, reason="Unauthorized", message="no or a wrong bearer token"
            )
        return await super()._handle(request)


def _kubeconfig(server: str, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": STAND_IN, "cluster": {"server": server}}],
        "users": [{"name": "e2e", "user": {"token": token}}],
        "contexts": [{"name": STAND_IN, "context": {"cluster": STAND_IN, "user": "e2e"}}],
        "current-context": STAND_IN,
    }


@contextmanager
def stand_in(directory: Path) -> Iterator[Target]:
    """The emulator served in its own thread and event loop (as a cluster's API server runs
    apart from the tests), and the kubeconfig naming it."""
    token = secrets.token_urlsafe(16)
    ready = threading.Event()
    started: dict[str, Any] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        started["stop"] = (asyncio.get_running_loop(), stop)
        emulator = _StandInEmulator()
        emulator.token = token
        async with emulator, kmock.Server(emulator):
            started["url"] = str(emulator.url).rstrip("/")
            ready.set()
            await stop.wait()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # reported by the fixture's teardown
            started["error"] = exc
            raise
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="e2e-stand-in", daemon=True)
    thread.start()
    ready.wait(timeout=30)
    if "url" not in started:
        raise RuntimeError(f"the stand-in API server did not start: {started.get('error')!r}")
    path = directory / "kubeconfig"
    path.write_text(yaml.safe_dump(_kubeconfig(started["url"], token)))
    try:
        yield Target(kubeconfig=str(path), context=STAND_IN, real=False)
    finally:
        loop, stop = started["stop"]
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
    if "error" in started:
        raise RuntimeError(f"the stand-in API server failed: {started['error']!r}")
