"""A real Kubernetes API server for the suite: ``../shared/kube/control-plane.sh`` (etcd,
kube-apiserver and kube-controller-manager v1.36.2), started once per session, stopped after.

Which cluster
    ``KUBECONFIG`` set: the cluster it names (kind, k3d, …; refused unless throwaway or confirmed
    with ``EMBEDSHIFT_E2E_CONTEXT``, see :mod:`tests.operator.e2e.target`). Unset: the control
    plane script, found at ``EMBEDSHIFT_KUBE_CONTROL_PLANE`` or ``../shared/kube/control-plane.sh``
    beside the repository, started on free loopback ports with its state in the session's own
    temporary directory (so two sessions on one machine do not meet). In CI
    (``EMBEDSHIFT_REQUIRE_REAL=1``) a missing control plane fails every test that needs it;
    elsewhere those tests skip, saying what is missing.

Registered as a plugin by ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.kubelet import PodRunner
from tests.operator.e2e.target import Target, TargetRefused, target_from_environment

REPO = Path(__file__).resolve().parents[1]
SCRIPT_VARIABLE = "EMBEDSHIFT_KUBE_CONTROL_PLANE"
DEFAULT_SCRIPT = REPO.parent / "shared" / "kube" / "control-plane.sh"
CONTEXT = "kcp"  # the context the script's kubeconfig names


class ControlPlaneMissing(Exception):
    """No control-plane script (nor a KUBECONFIG) to run the Kubernetes tests against."""


def control_plane_script() -> Path:
    """The script, from ``EMBEDSHIFT_KUBE_CONTROL_PLANE`` or beside the repository."""
    script = Path(os.environ.get(SCRIPT_VARIABLE) or DEFAULT_SCRIPT)
    if not script.is_file():
        raise ControlPlaneMissing(
            f"no Kubernetes control plane: {script} does not exist. Set {SCRIPT_VARIABLE} to a "
            "control-plane.sh (any directory of etcd, kube-apiserver and kube-controller-manager "
            "binaries of one version works, see its README), or KUBECONFIG to a kind/k3d cluster"
        )
    return script


def _free_port_pair() -> int:
    """A port P with P and P + 1 free on 127.0.0.1 (etcd takes both)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port >= 65535:
            continue
        try:
            with socket.socket() as second:
                second.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# control-plane.sh checks that a process it spawned is alive by its /proc cmdline, which names
# the binary only once the background shell has exec'd it: on a loaded machine its first check
# can come before that and report "kube-apiserver exited" with an empty log (seen once in CI).
# One more start, on fresh ports, tells that race from a control plane that cannot start.
_START_ATTEMPTS = 2


@contextmanager
def control_plane(state: Path, script: Path | None = None) -> Iterator[Target]:
    """A fresh, empty control plane with its state under ``state``; stopped on exit."""
    script = script or control_plane_script()
    failures: list[str] = []
    for _ in range(_START_ATTEMPTS):
        env = {
            **os.environ,
            "KCP_STATE": str(state),
            "KCP_API_PORT": str(free_port()),
            "KCP_ETCD_PORT": str(_free_port_pair()),
        }
        env.pop("KUBECONFIG", None)
        started = subprocess.run(
            ["bash", str(script), "start"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if started.returncode == 0:
            break
        failures.append(f"(exit {started.returncode}):\n{started.stderr[-3000:]}")
        _stop(script, env)
    try:
        if len(failures) == _START_ATTEMPTS:
            raise RuntimeError(
                f"{script} start failed {_START_ATTEMPTS} times " + "\n".join(failures)
            )
        kubeconfig = str(state / "kubeconfig")
        assert f"export KUBECONFIG={kubeconfig}" in started.stdout, started.stdout
        yield Target(kubeconfig=kubeconfig, context=CONTEXT, real=True)
    finally:
        _stop(script, env)


def _stop(script: Path, env: dict[str, str]) -> None:
    subprocess.run(
        ["bash", str(script), "stop"], env=env, capture_output=True, timeout=120, check=False
    )


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The real API server every Kubernetes claim is tested against (see the module doc)."""
    try:
        named = target_from_environment()
    except TargetRefused as exc:
        pytest.fail(str(exc), pytrace=False)
    if named is not None:
        yield named
        return
    try:
        script = control_plane_script()
    except ControlPlaneMissing as exc:
        missing = str(exc)
    else:
        missing = ""
    if missing:
        if os.environ.get("EMBEDSHIFT_REQUIRE_REAL") == "1":
            pytest.fail(missing, pytrace=False)
        pytest.skip(missing)
    with control_plane(tmp_path_factory.mktemp("kube-control-plane"), script) as target:
        yield target


@pytest.fixture(scope="session")
def pod_runner(
    kube_cluster: Target, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PodRunner]:
    """The kubelet's part for the session's cluster (:mod:`tests.kubelet`); a test makes it
    run the Pods of its namespace with ``pod_runner.serve(namespace)``."""
    with PodRunner(kube_cluster.kubeconfig, tmp_path_factory.mktemp("pods")) as runner:
        yield runner
    assert not [e for e in runner.errors if not e.startswith("watch:")], runner.errors
