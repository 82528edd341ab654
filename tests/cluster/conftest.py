"""The cluster suite's record of the operator's API calls on the real server
(:mod:`tests.api_calls`): each module hands in the requests of the chart's operator Pods
(:func:`tests.api_calls.record_operator_calls`), and ``test_api_calls.py``, run after every
other test here, checks them against ``api-calls.yaml``."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests import api_calls

HERE = api_calls.CLUSTER_SUITE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    api_calls.note_collection(config, items, HERE)


def pytest_deselected(items: list[pytest.Item]) -> None:
    api_calls.note_deselected(items, HERE)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    api_calls.note_report(item, report, HERE)
    return report
