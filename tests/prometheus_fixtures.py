"""Fixtures that start a real Prometheus (Debian's ``prometheus`` binary) for a test.

Registered from ``tests/conftest.py`` (``pytest_plugins``). Nothing skips: without the binary
every test that asks for Prometheus fails and says how to install it.

Prometheus needs ~5 s after start before it scrapes a target for the first time (see
:mod:`rag_service.testing.prometheus`), so modules whose tests can share one instance should
use ``module_prometheus``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import pytest

from rag_service.testing.prometheus import (
    PrometheusNotInstalled,
    PrometheusProcess,
    prometheus_binary,
    running_prometheus,
)


class PrometheusFactory(Protocol):
    def __call__(
        self,
        *,
        targets: Sequence[str],
        scrape_interval: str = "1s",
        rule_files: Sequence[Path] = (),
        extra_flags: Sequence[str] = (),
    ) -> PrometheusProcess: ...


@pytest.fixture
def prometheus() -> Iterator[PrometheusFactory]:
    """Start Prometheus servers scraping ``targets`` (job ``embedshift``); each is ready when
    returned, and all are stopped at teardown. Follow with ``wait_for_scrape()``."""
    yield from _factory()


@pytest.fixture(scope="module")
def module_prometheus() -> Iterator[PrometheusFactory]:
    """:func:`prometheus`, but the servers live until the test module ends."""
    yield from _factory()


def _factory() -> Iterator[PrometheusFactory]:
    try:
        prometheus_binary()
    except PrometheusNotInstalled as error:
        missing = f"{error}; tests never skip a missing real part"
    else:
        missing = ""
    # Outside the except block, so the report is the one line, not a chained traceback.
    if missing:
        pytest.fail(missing, pytrace=False)

    with ExitStack() as stack:

        def start(
            *,
            targets: Sequence[str],
            scrape_interval: str = "1s",
            rule_files: Sequence[Path] = (),
            extra_flags: Sequence[str] = (),
        ) -> PrometheusProcess:
            return stack.enter_context(
                running_prometheus(
                    targets=targets,
                    scrape_interval=scrape_interval,
                    rule_files=rule_files,
                    extra_flags=extra_flags,
                )
            )

        yield start
