"""USD per million tokens, by provider and model; defaults from the providers' price lists."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from rag_service.errors import ConfigError
from rag_service.spec import EmbeddingSpec

DEFAULT_USD_PER_MILLION_TOKENS: Mapping[str, float] = {
    "openai:text-embedding-3-small": 0.02,
    "openai:text-embedding-3-large": 0.13,
    "openai:text-embedding-ada-002": 0.10,
    "google:gemini-embedding-001": 0.15,
}


def spend_text(usd: float | None) -> str:
    """A spend as the CLI prints it; None (the model's price is unknown) says so, never "$0".
    Pure."""
    return "price unknown" if usd is None else f"${usd:.4f}"


# Computed on this machine: free by design, whatever the model is called.
FREE_PROVIDERS = frozenset({"local"})


@dataclass(frozen=True)
class PriceTable:
    """Prices keyed ``provider:model``. ``local`` is free; any other model not in the table (or
    given with ``--price``) has no known price: :meth:`price` says None, and whatever shows or
    limits a cost must say so rather than show $0 (a budget could never stop it)."""

    usd_per_million: Mapping[str, float] = field(
        default_factory=lambda: dict(DEFAULT_USD_PER_MILLION_TOKENS)
    )

    @staticmethod
    def key(provider: str, model: str) -> str:
        """``provider:model`` as ``--price`` spells it (Google also says "models/…"). Pure."""
        return f"{provider}:{model.removeprefix('models/')}"

    def price(self, provider: str, model: str) -> float | None:
        """USD per million tokens; None when nobody told us."""
        if provider in FREE_PROVIDERS:
            return self.usd_per_million.get(self.key(provider, model), 0.0)
        return self.usd_per_million.get(self.key(provider, model))

    def knows(self, spec: EmbeddingSpec) -> bool:
        """Whether ``spec``'s model has a price (``local`` always does)."""
        return self.price(spec.provider.value, spec.model) is not None

    def cost(self, provider: str, model: str, tokens: int) -> float:
        """What ``tokens`` cost; 0 for a model of unknown price (counted, not known: ask
        :meth:`price` before showing it or limiting by it)."""
        return (self.price(provider, model) or 0.0) * tokens / 1_000_000

    def require_price(self, provider: str, model: str, *, field: str) -> float:
        """The price, or a ConfigError naming ``field`` (the budget that could not stop)."""
        usd = self.price(provider, model)
        if usd is None:
            key = self.key(provider, model)
            raise ConfigError(
                f"{field}: no price is known for {key}, so the budget could never stop the run "
                f"(its spend would count as $0); pass --price {key}=USD_PER_MILLION_TOKENS "
                "or set the model's usdPerMillionTokens in the manifest, or drop the budget "
                "(nothing was changed)"
            )
        return usd

    def with_overrides(self, overrides: Mapping[str, float]) -> PriceTable:
        return PriceTable({**self.usd_per_million, **overrides})

    def with_spec_prices(self, *specs: EmbeddingSpec | None) -> PriceTable:
        """The prices the specs' ``usdPerMillionTokens`` give, over the list prices."""
        return self.with_overrides(
            {
                self.key(spec.provider.value, spec.model): spec.usd_per_million_tokens
                for spec in specs
                if spec is not None and spec.usd_per_million_tokens is not None
            }
        )

    @staticmethod
    def parse_override(value: str) -> tuple[str, float]:
        """``provider:model=USD_PER_MILLION`` (the ``--price`` flag). Pure."""
        key, sep, price = value.partition("=")
        try:
            usd = float(price)
        except ValueError:
            usd = -1.0
        if not sep or ":" not in key or usd < 0:
            raise ConfigError(
                f"--price: {value!r} must be provider:model=USD_PER_MILLION_TOKENS, "
                "e.g. openai:text-embedding-3-small=0.02"
            )
        return key.strip(), usd
