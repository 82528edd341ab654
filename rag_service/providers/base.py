"""The one interface every embedding backend implements, and the values it returns."""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np
import numpy.typing as npt

from rag_service.errors import DimensionMismatch

Vectors = npt.NDArray[np.float32]


class Purpose(str, Enum):
    """What the text is for: Google embeds documents and queries differently."""

    DOCUMENT = "document"
    QUERY = "query"


@dataclass(frozen=True)
class Usage:
    """What a call cost: tokens as the API counted them (or our estimate where it does not)."""

    tokens: int = 0
    requests: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            tokens=self.tokens + other.tokens,
            requests=self.requests + other.requests,
            cost_usd=self.cost_usd + other.cost_usd,
        )


@dataclass(frozen=True)
class Embeddings:
    """Vectors in input order, shape (len(texts), dimensions), float32; plus what they cost."""

    vectors: Vectors
    usage: Usage


class EmbeddingProvider(Protocol):
    """Embeds texts. Splits into API-sized requests, retries and paces by itself."""

    @property
    def descriptor(self) -> str:
        """``provider:model@dimensions``."""
        ...

    @property
    def dimensions(self) -> int: ...

    def estimate_tokens(self, texts: Sequence[str]) -> int:
        """A pre-flight token estimate, for dry runs and budgets. Pure."""
        ...

    async def embed(self, texts: Sequence[str], purpose: Purpose) -> Embeddings:
        """Embed ``texts`` (all or nothing: a failed request fails the whole call)."""
        ...

    async def aclose(self) -> None: ...


class RequestWatch(Protocol):
    """Told about each request of one ``embed`` call (set in :data:`request_watch`)."""

    def sent(self) -> None:
        """A request is going out (the pacer let it)."""
        ...

    def answered(self, usage: Usage | None) -> None:
        """A request came back: with what it cost, or None (it failed and is not billed)."""
        ...


# The watch of the ``embed`` call running in this context. A caller that may abandon calls (a
# worker stopping on SIGTERM) sets it in the call's task context, and so learns which calls have
# no request out and what each has spent so far. None: nobody is watching.
request_watch: ContextVar[RequestWatch | None] = ContextVar(
    "embedshift_request_watch", default=None
)


def request_sent() -> None:
    """Tell this context's watch, if any, that a request is going out."""
    watch = request_watch.get()
    if watch is not None:
        watch.sent()


def request_answered(usage: Usage | None) -> None:
    """Tell this context's watch, if any, that a request came back (None: failed, unbilled)."""
    watch = request_watch.get()
    if watch is not None:
        watch.answered(usage)


def checked_vectors(rows: Sequence[Sequence[float]], *, dimensions: int, source: str) -> Vectors:
    """Stack API vectors into float32, refusing any of the wrong length. Pure."""
    for row in rows:
        if len(row) != dimensions:
            raise DimensionMismatch(
                f"{source} returned {len(row)}-dimensional vectors, expected {dimensions}; "
                "check the model and dimensions in the spec (nothing was stored)"
            )
    if not rows:
        return np.zeros((0, dimensions), dtype=np.float32)
    return np.asarray(rows, dtype=np.float32)


def l2_normalise(vectors: Vectors) -> Vectors:
    """Unit-length rows (zero rows stay zero). Pure."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    unit: Vectors = (vectors / norms).astype(np.float32, copy=False)
    return unit


def estimate_tokens(texts: Sequence[str]) -> int:
    """A conservative token estimate without a tokenizer: ~1 token per 3 characters.

    BPE tokenizers average ~4 characters per token on English; 3 errs on the side of smaller
    requests and earlier budget stops. Pure.
    """
    return sum(len(t) // 3 + 1 for t in texts)
