"""Least privilege, against the emulator: the operator makes no Kubernetes API call here that
``tests/cluster/api-calls.yaml`` (the real server's record, :mod:`tests.api_calls`) does not
list. This suite reaches paths the cluster story does not (a restart in every phase, a Job
failing in every way), so a call only they make is caught here. Run after every other test of
this directory (its conftest moves it last)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api_calls import API_CALLS, RECORD_ENV, collector, load


def test_the_operator_calls_only_what_api_calls_yaml_lists(request: pytest.FixtureRequest) -> None:
    used = collector(request.config, Path(__file__).parent).used
    new = sorted(used - set(load()))
    assert not new, (
        f"against the emulator the operator made API calls {API_CALLS.name} does not list: "
        + ", ".join(map(str, new))
        + f"; make the cluster story (tests/cluster) make them on the real server, then "
        f"regenerate the file with {RECORD_ENV}=1 .venv/bin/pytest tests/cluster"
    )
