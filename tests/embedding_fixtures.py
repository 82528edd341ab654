"""Fixtures that put the real OpenAI and Gemini SDKs in front of a local embedding API.

Registered from ``tests/conftest.py`` (``pytest_plugins``). Nothing is mocked: providers talk
HTTP to :class:`rag_service.testing.EmbeddingServer`, which speaks both wire protocols and can
rate-limit, fail and misbehave on request.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from rag_service.indexes import build_index
from rag_service.migrate import RunOptions, run_migration
from rag_service.providers.google import GoogleProvider
from rag_service.providers.openai import OpenAIProvider
from rag_service.providers.retry import RetryPolicy
from rag_service.schema import setup
from rag_service.spec import DataPlaneSpec
from rag_service.testing import EmbeddingServer

# Looks like nothing a real provider issues, so a leak in an error message is unambiguous.
EMBEDDING_API_KEY = "test-key-5ecr3t-do-not-print"

# Retries fast enough for a test suite, patient enough to ride out a 20 % error rate.
FAST_RETRIES = RetryPolicy(max_attempts=12, base_delay=0.01, max_delay=0.2)

OpenAIFactory = Callable[..., OpenAIProvider]
GoogleFactory = Callable[..., GoogleProvider]


@pytest.fixture
def embedding_api_key() -> str:
    return EMBEDDING_API_KEY


@pytest.fixture
def embedding_server() -> Iterator[EmbeddingServer]:
    """A fresh in-process server that requires :data:`EMBEDDING_API_KEY`; knobs off."""
    with EmbeddingServer(api_key=EMBEDDING_API_KEY) as server:
        yield server


@pytest.fixture
async def openai_provider(
    embedding_server: EmbeddingServer,
) -> AsyncIterator[OpenAIFactory]:
    """Build ``OpenAIProvider``s aimed at ``embedding_server`` (keywords override defaults);
    all are closed at teardown."""
    made: list[OpenAIProvider] = []

    def make(**overrides: Any) -> OpenAIProvider:
        options: dict[str, Any] = {
            "model": "text-embedding-3-small",
            "dimensions": 64,
            "api_key": EMBEDDING_API_KEY,
            "base_url": embedding_server.openai_base_url,
            "retry_policy": FAST_RETRIES,
            **overrides,
        }
        provider = OpenAIProvider(**options)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


@pytest.fixture
async def google_provider(
    embedding_server: EmbeddingServer,
) -> AsyncIterator[GoogleFactory]:
    """Build ``GoogleProvider``s aimed at ``embedding_server``; all are closed at teardown."""
    made: list[GoogleProvider] = []

    def make(**overrides: Any) -> GoogleProvider:
        options: dict[str, Any] = {
            "model": "gemini-embedding-001",
            "dimensions": 64,
            "api_key": EMBEDDING_API_KEY,
            "base_url": embedding_server.google_base_url,
            "retry_policy": FAST_RETRIES,
            **overrides,
        }
        provider = GoogleProvider(**options)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


@dataclass(frozen=True)
class ServerProcess:
    """The server run as ``python -m rag_service.testing.embedding_server``."""

    url: str
    process: subprocess.Popen[str]

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def google_base_url(self) -> str:
        return self.url

    def control(self, **knobs: Any) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 (our loopback server)
            f"{self.url}/_control",
            data=json.dumps(knobs).encode(),
            headers={"content-type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            answer: dict[str, Any] = json.load(response)
        return answer

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_stats", timeout=10) as response:  # noqa: S310
            answer: dict[str, Any] = json.load(response)
        return answer


@pytest.fixture
def embedding_server_process() -> Iterator[ServerProcess]:
    """The CLI server in a subprocess on a free port, requiring :data:`EMBEDDING_API_KEY`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "rag_service.testing.embedding_server", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={"EMBEDDING_SERVER_API_KEY": EMBEDDING_API_KEY, "PATH": "/usr/bin:/bin"},
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), f"server printed {url!r}"
        yield ServerProcess(url=url, process=process)
    finally:
        process.terminate()
        process.wait(timeout=10)


def migrate_through_openai(
    database_url: str, spec: DataPlaneSpec, *, migration: str, batch_size: int
) -> None:
    """``setup``, re-embed through the real ``openai`` SDK at ``spec.target``'s baseURL (the
    local API), then build the index: a data plane ready to serve v2."""

    async def prepare() -> None:
        await setup(database_url, spec, migration=migration)
        provider = OpenAIProvider(
            model=spec.target.model,
            dimensions=spec.target.dimensions,
            api_key=EMBEDDING_API_KEY,
            base_url=spec.target.base_url,
            retry_policy=FAST_RETRIES,
        )
        try:
            await run_migration(
                database_url,
                spec,
                provider=provider,
                options=RunOptions(batch_size=batch_size),
                migration=migration,
            )
        finally:
            await provider.aclose()
        await build_index(database_url, spec)

    asyncio.run(prepare())
