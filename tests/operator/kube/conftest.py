"""A running :class:`ApiServerEmulator` and the official client pointed at it; the operator
running against it; and the session's record of the operator's API calls here
(:mod:`tests.api_calls`), checked last by ``test_api_calls.py``: each must be one the real
server's record lists."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import kmock
import pytest
import pytest_asyncio
from kubernetes import client

from tests import api_calls
from tests.operator.kube.emulator import ApiServerEmulator

if TYPE_CHECKING:
    from tests.operator.kube.harness import Operator

HERE = Path(__file__).parent


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
            calls = handler.calls
            api_calls.collector(pytestconfig, HERE).add(filter(api_calls.is_operator, calls))


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


pytest_collection_modifyitems, pytest_deselected, pytest_runtest_makereport = (
    api_calls.conftest_hooks(HERE)
)
