"""Embedding providers behind one protocol, built from a spec such as
``openai:text-embedding-3-small@768``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from rag_service.errors import AuthenticationFailed
from rag_service.providers.base import EmbeddingProvider, Embeddings, Purpose, Usage
from rag_service.providers.local import LocalProvider
from rag_service.providers.pricing import PriceTable
from rag_service.redaction import header_value_problem
from rag_service.spec import EmbeddingSpec, ProviderName

__all__ = [
    "EmbeddingProvider",
    "Embeddings",
    "PriceTable",
    "Purpose",
    "Usage",
    "api_key_from_env",
    "make_provider",
]

Role = Literal["source", "target"]
INTERACTIVE_TIMEOUT_SECONDS = 5.0

# Per-role variables come first so v1 and v2 can use different accounts of the same provider;
# the operator's Jobs set EMBEDSHIFT_<ROLE>_API_KEY from the spec's apiKeySecretRef.
_PROVIDER_KEY_VARIABLES: Mapping[ProviderName, tuple[str, ...]] = {
    ProviderName.OPENAI: ("OPENAI_API_KEY",),
    ProviderName.GOOGLE: ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    ProviderName.LOCAL: (),
}


def api_key_from_env(
    spec: EmbeddingSpec, role: Role, environ: Mapping[str, str] | None = None
) -> str | None:
    """The API key for ``spec``: ``EMBEDSHIFT_<ROLE>_API_KEY``, then the provider's own variable."""
    env = os.environ if environ is None else environ
    names = (f"EMBEDSHIFT_{role.upper()}_API_KEY", *_PROVIDER_KEY_VARIABLES[spec.provider])
    for name in names:
        if env.get(name):
            return env[name]
    return None


def make_provider(
    spec: EmbeddingSpec,
    *,
    api_key: str | None,
    prices: PriceTable | None = None,
    concurrency: int = 4,
    role: Role = "target",
    bulk: bool = False,
    interactive: bool = False,
) -> EmbeddingProvider:
    """Build the provider ``spec`` names. Raises AuthenticationFailed if a needed key is missing.

    ``bulk``: for backfills; the local provider then hashes in a worker process.
    ``interactive``: for queries a user waits on: a short timeout and one quick retry, so a
    failing API costs a fallback, not a hung request (a backfill would rather wait it out).
    """
    prices = prices or PriceTable()
    if spec.provider is ProviderName.LOCAL:
        return LocalProvider(
            model=spec.model, dimensions=spec.dimensions, prices=prices, processes=int(bulk)
        )
    if not api_key:
        variables = " or ".join(
            (f"EMBEDSHIFT_{role.upper()}_API_KEY", *_PROVIDER_KEY_VARIABLES[spec.provider])
        )
        raise AuthenticationFailed(
            f"no API key for {role} {spec.descriptor}: set {variables} "
            f"(in Kubernetes: spec.{role}.apiKeySecretRef)"
        )
    problem = header_value_problem(api_key.strip())
    if problem is not None:  # the HTTP client's own refusal would quote the header, key and all
        variables = " or ".join(
            (f"EMBEDSHIFT_{role.upper()}_API_KEY", *_PROVIDER_KEY_VARIABLES[spec.provider])
        )
        raise AuthenticationFailed(
            f"the API key for {role} {spec.descriptor} cannot be sent: {problem} (check "
            f"{variables}; in Kubernetes: spec.{role}.apiKeySecretRef)"
        )
    api_key = api_key.strip()  # a trailing newline from `echo` into the Secret
    from rag_service.providers.retry import RetryPolicy

    patience: dict[str, Any] = (
        {"retry_policy": RetryPolicy.interactive(), "timeout": INTERACTIVE_TIMEOUT_SECONDS}
        if interactive
        else {}
    )
    if spec.provider is ProviderName.OPENAI:
        from rag_service.providers.openai import OpenAIProvider

        return OpenAIProvider(
            model=spec.model,
            dimensions=spec.dimensions,
            api_key=api_key,
            base_url=spec.base_url,
            prices=prices,
            concurrency=concurrency,
            requests_per_minute=spec.requests_per_minute,
            tokens_per_minute=spec.tokens_per_minute,
            **patience,
        )
    from rag_service.providers.google import GoogleProvider

    return GoogleProvider(
        model=spec.model,
        dimensions=spec.dimensions,
        api_key=api_key,
        base_url=spec.base_url,
        prices=prices,
        concurrency=concurrency,
        requests_per_minute=spec.requests_per_minute,
        tokens_per_minute=spec.tokens_per_minute,
        **patience,
    )
