"""Real parts for the test suite: a private PostgreSQL with pgvector, one database per module.

Nothing here skips: a missing real part fails the run (``make test`` sets
``EMBEDSHIFT_REQUIRE_REAL=1``; outside CI, and only there, the Kubernetes tests skip when no
control plane is found, saying so: see :mod:`tests.kube_cluster`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rag_service.testing.postgres import create_database, drop_database, postgres_server

# tests.operator.e2e.target: the e2e suite's pytest header (which API server it runs against).
pytest_plugins = [
    "tests.embedding_fixtures",
    "tests.prometheus_fixtures",
    "tests.operator.e2e.target",
    "tests.kube_cluster",
]


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="module")
def database_url(pg_admin_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database (with ``vector``) for this test module, dropped afterwards."""
    prefix = "t_" + request.module.__name__.rsplit(".", 1)[-1][:40]
    name, url = create_database(pg_admin_url, prefix=prefix)
    yield url
    drop_database(pg_admin_url, name)
