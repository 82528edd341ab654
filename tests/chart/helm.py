"""Render charts/embedshift with the pinned helm `make helm` installs (scripts/install-helm.sh).

Nothing is mocked: each call runs the helm binary, and a missing helm fails the test (it is a
real part of the suite, as Prometheus and PostgreSQL are).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "embedshift"
HELM = ROOT / ".venv" / "tools" / "helm"
KUBECTL = ROOT / ".venv" / "tools" / "kubectl"  # the same package as helm
RELEASE, NAMESPACE = "es", "rag"

# Every optional part on, in both operator modes: the objects the tests must see at least once.
ALL_ON = {
    "operator.standby.enabled": "true",
    "serviceMonitor.enabled": "true",
    "prometheusRule.enabled": "true",
    "networkPolicy.enabled": "true",
    "search.autoscaling.enabled": "true",
    "search.podDisruptionBudget.enabled": "true",
    "alertWebhook.create": "true",
    "alertWebhook.token": "0123456789abcdef0123",
}


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def helm(*args: str) -> Result:
    if not HELM.exists():
        raise AssertionError(f"{HELM} is missing: run `make helm` (scripts/install-helm.sh)")
    done = subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, timeout=120, check=False
    )
    return Result(done.returncode, done.stdout, done.stderr)


def set_args(values: dict[str, str]) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def template(values: dict[str, str] | None = None, *, include_crds: bool = False) -> Result:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if include_crds:
        args.append("--include-crds")
    return helm(*args, *set_args(values or {}))


def render(
    values: dict[str, str] | None = None, *, include_crds: bool = False
) -> list[dict[str, Any]]:
    """The chart's objects for these values; fails the test when helm refuses them."""
    result = template(values, include_crds=include_crds)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]
