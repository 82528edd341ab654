"""``operator.allowedImages`` / ``operator.allowedEndpoints`` → the operator's flags, rendered by
the real pinned helm and read back by the real ``embedshift`` command line; bad patterns are
refused by values.schema.json."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from embedshift_operator.cli import build_parser
from embedshift_operator.core.allowlist import Allowlist
from tests.chart.helm import CHART, NAMESPACE, RELEASE, helm, of_kind


def _render(*args: str) -> list[dict[str, Any]]:
    result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _operator_args(objects: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["args"]
        for d in of_kind(objects, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    }


def _allowlist(args: list[str]) -> tuple[Allowlist, str]:
    """What ``embedshift operator run`` makes of the rendered args: its allowlist, its image."""
    parsed = build_parser("operator").parse_args(args)
    allowlist = Allowlist(
        images=tuple(parsed.allowed_images or ()), endpoints=tuple(parsed.allowed_endpoints or ())
    )
    return allowlist, parsed.operator_image


def test_by_default_only_the_charts_repository_and_any_host() -> None:
    (args,) = _operator_args(_render()).values()
    assert [a for a in args if a.startswith("--allowed")] == [
        "--allowed-image=ghcr.io/embedshift/embedshift"
    ]
    allowlist, own = _allowlist(args)
    assert allowlist.endpoints == ()
    assert allowlist.image_allowed("ghcr.io/embedshift/embedshift:9.9.9", operator_image=own)
    assert not allowlist.image_allowed("ghcr.io/embedshift/embedshift-evil:1", operator_image=own)
    assert not allowlist.image_allowed("docker.io/library/python:3", operator_image=own)


def test_the_default_follows_image_repository_and_job_image_is_allowed() -> None:
    objects = _render(
        "--set", "image.repository=registry.example.com/platform/embedshift",
        "--set", "operator.jobImage=jobs.example.com/embedshift-jobs:2.0",
    )  # fmt: skip
    (args,) = _operator_args(objects).values()
    assert "--allowed-image=registry.example.com/platform/embedshift" in args
    allowlist, own = _allowlist(args)
    assert own == "jobs.example.com/embedshift-jobs:2.0"
    assert allowlist.image_allowed(own, operator_image=own)
    assert not allowlist.image_allowed("jobs.example.com/embedshift-jobs:2.1", operator_image=own)
    assert allowlist.image_allowed(
        "registry.example.com/platform/embedshift:0.1.0", operator_image=own
    )


def test_listed_patterns_reach_every_replica_in_order() -> None:
    images = ["*", "ghcr.io/acme/", f"ghcr.io/acme/tool@sha256:{'a' * 64}"]
    endpoints = ["prometheus.monitoring.svc:9090", "*.openai.azure.com", "[fd00::1]:9090"]
    objects = _render(
        "--set", "operator.standby.enabled=true",
        "--set-json", f"operator.allowedImages={json.dumps(images)}",
        "--set-json", f"operator.allowedEndpoints={json.dumps(endpoints)}",
    )  # fmt: skip
    replicas = _operator_args(objects)
    assert len(replicas) == 2
    for args in replicas.values():
        assert [a for a in args if a.startswith("--allowed-image=")] == [
            f"--allowed-image={p}" for p in images
        ]
        assert [a for a in args if a.startswith("--allowed-endpoint=")] == [
            f"--allowed-endpoint={p}" for p in endpoints
        ]
        allowlist, _ = _allowlist(args)
        assert allowlist.images == tuple(images) and allowlist.endpoints == tuple(endpoints)
        assert allowlist.url_allowed("https://acme.openai.azure.com/openai")
        assert not allowlist.url_allowed("http://prometheus.monitoring.svc:9091")


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"operator.allowedImages": ["ghcr.io/*"]}, "/operator/allowedImages/0"),
        ({"operator.allowedImages": ["ghcr.io/a b"]}, "/operator/allowedImages/0"),
        ({"operator.allowedImages": "ghcr.io/acme/"}, "/operator/allowedImages"),
        ({"operator.allowedEndpoints": ["http://prometheus:9090"]}, "/operator/allowedEndpoints/0"),
        ({"operator.allowedEndpoints": ["prom*.example"]}, "/operator/allowedEndpoints/0"),
        ({"operator.allowedEndpoints": ["user@prometheus"]}, "/operator/allowedEndpoints/0"),
        ({"operator.allowedEndpoints": ["a", "a"]}, "/operator/allowedEndpoints"),
    ],
)
def test_bad_patterns_are_refused_by_the_schema(values: dict[str, Any], where: str) -> None:
    sets = [a for k, v in values.items() for a in ("--set-json", f"{k}={json.dumps(v)}")]
    result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *sets)
    assert result.returncode != 0
    assert where in result.stderr, result.stderr
