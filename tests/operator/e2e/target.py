"""Which real API server the Kubernetes suites run against.

``KUBECONFIG`` set: the cluster it names (its current context), refused unless it looks like a
throwaway cluster or ``EMBEDSHIFT_E2E_CONTEXT`` confirms it. Unset: the session's own control
plane (:mod:`tests.kube_cluster`: ``../shared/kube/control-plane.sh``, a real kube-apiserver and
kube-controller-manager). The project's emulator is never the target of a claim about what
Kubernetes does.

Registered as a plugin by ``tests/conftest.py`` for :func:`pytest_report_header` (a conftest
this deep is not loaded before the header is printed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kubernetes import config as kubeconfig

__all__ = [
    "Target",
    "TargetRefused",
    "pytest_report_header",
    "target_from_environment",
]

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
        return f"the cluster KUBECONFIG names (context {self.context!r}, {self.kubeconfig})"


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
        return (
            "embedshift kube: against the session's control plane (kube-apiserver and "
            "kube-controller-manager from ../shared/kube, started by tests/kube_cluster.py)"
        )
    return f"embedshift kube: against {target.describe()}"
