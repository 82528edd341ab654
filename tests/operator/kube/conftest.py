"""A running :class:`ApiServerEmulator` and the official client pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import kmock
import pytest
import pytest_asyncio
from kubernetes import client

from tests.operator.kube.emulator import ApiServerEmulator


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
