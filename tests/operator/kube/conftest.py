"""A running :class:`ApiServerEmulator` and the official client pointed at it; the operator
running against it; and the session's record of the operator's API calls
(:mod:`tests.operator.kube.api_calls`), checked last by ``test_api_calls.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import kmock
import pytest
import pytest_asyncio
from kubernetes import client

from tests.operator.kube import api_calls
from tests.operator.kube.emulator import ApiServerEmulator

if TYPE_CHECKING:
    from tests.operator.kube.harness import Operator


@dataclass(frozen=True)
class Cluster:
    emulator: ApiServerEmulator
    api: client.ApiClient


@pytest_asyncio.fixture()
async def emulator(pytestconfig: pytest.Config) -> AsyncIterator[ApiServerEmulator]:
    async with ApiServerEmulator() as handler, kmock.Server(handler):
        try:
            yield handler
        finally:
            api_calls.collector(pytestconfig).add(handler.calls)


@pytest.fixture()
def kube_api(emulator: ApiServerEmulator) -> Iterator[client.ApiClient]:
    """A client of the emulator, configured as a kubeconfig would (no token: kmock needs none)."""
    configuration = client.Configuration(host=str(emulator.url).rstrip("/"))
    with client.ApiClient(configuration) as api:
        yield api


@pytest.fixture()
def cluster(emulator: ApiServerEmulator, kube_api: client.ApiClient) -> Cluster:
    return Cluster(emulator=emulator, api=kube_api)


@pytest_asyncio.fixture()
async def operator(cluster: Cluster, database_url: str) -> AsyncIterator[Operator]:
    """The operator running (kopf in its thread) against the emulator, its metrics on a registry
    of the test's own. Neither the Secret nor the resource exists yet."""
    from tests.operator.kube.harness import Operator

    harness = Operator(cluster=cluster, database_url=database_url)
    await harness.start()
    try:
        yield harness
    finally:
        await harness.stop()


# ---- what ran of the kube suite (for the check of api-calls.yaml) ---------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Note the kube tests collected, and run the API-call check after every other test."""
    record = api_calls.collector(config)
    record.items = [i.nodeid for i in items if api_calls.in_kube_suite(config, i.nodeid)]
    record.by_node_id = any("::" in arg for arg in config.args)
    checks = [i for i in items if i.nodeid.split("::")[0].endswith(f"/{api_calls.CHECK_TEST}")]
    for check in checks:
        items.remove(check)
        items.append(check)


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items and any(api_calls.in_kube_suite(i.config, i.nodeid) for i in items):
        api_calls.collector(items[0].config).deselected = True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    record = api_calls.collector(item.config)
    if report.failed:
        record.failed.add(report.nodeid)
    elif report.when == "call" and report.passed:
        record.passed.add(report.nodeid)
    return report
