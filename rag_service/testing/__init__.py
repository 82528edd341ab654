"""Test doubles that speak real wire protocols, for tests, benchmarks and demos.

Importing this package pulls in nothing beyond the standard library and numpy; it is shipped with
``rag_service`` so the CLI's demo and other projects' tests can use the same server.
"""

from rag_service.testing.embedding_server import EmbeddingServer, RecordedRequest

__all__ = ["EmbeddingServer", "RecordedRequest"]
