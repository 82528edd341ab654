"""The cluster suite's record of the operator's API calls on the real server
(:mod:`tests.api_calls`): each module hands in the requests of the chart's operator Pods
(:func:`tests.api_calls.record_operator_calls`), and ``test_api_calls.py``, run after every
other test here, checks them against ``api-calls.yaml``."""

from __future__ import annotations

from tests import api_calls

HERE = api_calls.CLUSTER_SUITE


pytest_collection_modifyitems, pytest_deselected, pytest_runtest_makereport = (
    api_calls.conftest_hooks(HERE)
)
