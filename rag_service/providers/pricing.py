"""USD per million tokens, by provider and model; defaults from the providers' price lists."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from rag_service.errors import ConfigError

DEFAULT_USD_PER_MILLION_TOKENS: Mapping[str, float] = {
    "openai:text-embedding-3-small": 0.02,
    "openai:text-embedding-3-large": 0.13,
    "openai:text-embedding-ada-002": 0.10,
    "google:gemini-embedding-001": 0.15,
}


@dataclass(frozen=True)
class PriceTable:
    """Prices keyed ``provider:model``; unknown models cost 0 (``local`` always does)."""

    usd_per_million: Mapping[str, float] = field(
        default_factory=lambda: dict(DEFAULT_USD_PER_MILLION_TOKENS)
    )

    def cost(self, provider: str, model: str, tokens: int) -> float:
        # Google also names models "models/gemini-embedding-001".
        key = f"{provider}:{model.removeprefix('models/')}"
        return self.usd_per_million.get(key, 0.0) * tokens / 1_000_000

    def with_overrides(self, overrides: Mapping[str, float]) -> PriceTable:
        return PriceTable({**self.usd_per_million, **overrides})

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
