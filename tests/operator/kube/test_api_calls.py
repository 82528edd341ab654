"""Least privilege: the operator makes no Kubernetes API call that ``api-calls.yaml`` does not
list, and (after the whole kube suite) the file lists none it no longer makes. The Helm chart's
RBAC is compared with that file. Run after every other test (the kube conftest moves it last);
see :mod:`tests.operator.kube.api_calls` for how calls are recorded and told apart."""

from __future__ import annotations

import os

import pytest

from tests.operator.kube.api_calls import API_CALLS, RECORD_ENV, collector, load, write


def test_the_operator_calls_only_what_api_calls_yaml_lists(request: pytest.FixtureRequest) -> None:
    record = collector(request.config)
    listed = load()
    whole = record.whole_suite_ran(before=request.node.nodeid)
    if os.environ.get(RECORD_ENV) == "1":
        # A partial run cannot tell an unused entry from one its tests did not reach: keep them.
        write(record.used if whole else record.used | set(listed))
        return
    assert listed == sorted(set(listed)), f"{API_CALLS.name} is not sorted and unique"
    here = API_CALLS.parent.relative_to(request.config.rootpath)
    regenerate = f"regenerate it with {RECORD_ENV}=1 .venv/bin/pytest {here}"
    new = sorted(record.used - set(listed))
    assert not new, (
        f"the operator made API calls {API_CALLS.name} does not list: "
        + ", ".join(map(str, new))
        + f"; if they are intended, {regenerate}"
    )
    if whole:
        unused = sorted(set(listed) - record.used)
        assert not unused, (
            f"{API_CALLS.name} lists calls the whole kube suite no longer made: "
            + ", ".join(map(str, unused))
            + f"; {regenerate}"
        )
