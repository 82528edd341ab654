"""Test doubles that speak real wire protocols, for tests, benchmarks and demos.

Shipped with ``rag_service`` so the demo and other projects' tests can use the same servers.
Imports are lazy: ``python -m rag_service.testing.embedding_server`` must not find its own module
already imported by this package (runpy warns, and the module would exist twice).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rag_service.testing.embedding_server import EmbeddingServer, RecordedRequest

__all__ = ["EmbeddingServer", "RecordedRequest"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rag_service.testing import embedding_server

        return getattr(embedding_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
