"""A running :class:`ApiServerEmulator` and the official client pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import kmock
import pytest
import pytest_asyncio
from kopf.testing import KopfRunner
from kubernetes import client

from embedshift_operator import handlers
from tests.operator.kube.emulator import ApiServerEmulator

if TYPE_CHECKING:
    from tests.operator.kube.harness import Operator


@dataclass(frozen=True)
class Cluster:
    emulator: ApiServerEmulator
    api: client.ApiClient


@pytest_asyncio.fixture()
async def emulator() -> AsyncIterator[ApiServerEmulator]:
    async with ApiServerEmulator() as handler, kmock.Server(handler):
        yield handler


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
    from tests.operator.kube.harness import Operator, call

    harness = Operator(cluster=cluster, database_url=database_url)
    handlers.configure(harness.config)
    runner = KopfRunner(
        ["run", "--standalone", "--all-namespaces", "-m", "embedshift_operator.handlers"],
        timeout=30,
    )
    await call(runner.__enter__)
    try:
        yield harness
    finally:
        await call(runner.__exit__, None, None, None)
        handlers.configure(handlers.OperatorConfig())
    assert runner.exception is None
