"""Least privilege, from the real server: the chart's operator made no Kubernetes API call that
``api-calls.yaml`` does not list, and (after the whole cluster suite) the file lists none it no
longer makes. The calls are those the operator's Pods sent through the test node's recorder to
the real API server (:mod:`tests.api_recorder`, :mod:`tests.api_calls`); the Helm chart's RBAC
is compared with the file (``tests/chart/test_rbac.py``). Run after every other test of this
directory (its conftest moves it last)."""

from __future__ import annotations

import os

import pytest

from tests.api_calls import API_CALLS, CLUSTER_SUITE, RECORD_ENV, collector, load, write


def test_the_operator_calls_only_what_api_calls_yaml_lists(request: pytest.FixtureRequest) -> None:
    record = collector(request.config, CLUSTER_SUITE)
    assert record.used, "no call of the operator was recorded: did the cluster story run?"
    listed = load()
    whole = record.whole_suite_ran(before=request.node.nodeid)
    if os.environ.get(RECORD_ENV) == "1":
        # A partial run cannot tell an unused entry from one its tests did not reach: keep them.
        write(record.used if whole else record.used | set(listed))
        return
    assert listed == sorted(set(listed)), f"{API_CALLS.name} is not sorted and unique"
    regenerate = f"regenerate it with {RECORD_ENV}=1 .venv/bin/pytest tests/cluster"
    new = sorted(record.used - set(listed))
    assert not new, (
        f"the operator made API calls {API_CALLS.name} does not list: "
        + ", ".join(map(str, new))
        + f"; if they are intended, {regenerate}"
    )
    if whole:
        unused = sorted(set(listed) - record.used)
        assert not unused, (
            f"{API_CALLS.name} lists calls the whole cluster suite no longer made: "
            + ", ".join(map(str, unused))
            + f"; {regenerate}"
        )
