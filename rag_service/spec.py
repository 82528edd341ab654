"""The data-plane part of an ``EmbeddingMigration`` resource, as pydantic models.

The operator composes these with its own rollout and analysis models; the CLI reads the same YAML
(``--config FILE``) or builds the same models from flags. Field names are the resource's camelCase
names; validation errors name the field path (``spec.target.dimensions``) and the fix.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from rag_service.errors import ConfigError
from rag_service.identifiers import TableName, check_identifier, derived_identifier

API_VERSION = "embedshift.io/v1alpha1"
KIND = "EmbeddingMigration"

# pgvector 0.8 index limits: HNSW/IVFFlat index ``vector`` up to 2000 dims, ``halfvec`` up to 4000.
MAX_VECTOR_INDEX_DIMS = 2000
MAX_HALFVEC_INDEX_DIMS = 4000


class ProviderName(str, Enum):
    OPENAI = "openai"
    GOOGLE = "google"
    LOCAL = "local"


# Known models: the (smallest, largest) dimensions the API accepts.
_MODEL_DIMENSIONS: dict[tuple[ProviderName, str], tuple[int, int]] = {
    (ProviderName.OPENAI, "text-embedding-3-small"): (1, 1536),
    (ProviderName.OPENAI, "text-embedding-3-large"): (1, 3072),
    (ProviderName.OPENAI, "text-embedding-ada-002"): (1536, 1536),
    (ProviderName.GOOGLE, "gemini-embedding-001"): (128, 3072),
}

# Models their provider has switched off: refused with the replacement, not failed at run time.
_RETIRED_MODELS: dict[tuple[ProviderName, str], str] = {
    (ProviderName.GOOGLE, "text-embedding-004"): (
        "was retired on the Gemini API in January 2026; use gemini-embedding-001 "
        "(dimensions 768 or 1536 via output_dimensionality)"
    ),
}


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class SecretKeyRef(_Model):
    """A key in a Kubernetes Secret; the CLI reads the value from the environment instead."""

    name: str = Field(min_length=1)
    key: str = Field(min_length=1)


class IndexSpec(_Model):
    type: Literal["hnsw", "ivfflat"] = "hnsw"
    m: int = Field(default=16, ge=2, le=100)
    ef_construction: int = Field(default=64, ge=4, le=1000)
    # pgvector's server default (40) measured recall@10 0.944 on benchmarks/search.py's corpus;
    # 100 measured 0.978 for about a millisecond (docs/benchmarks.md, "Search latency").
    ef_search: int = Field(
        default=100,
        ge=1,
        le=1000,
        description="hnsw.ef_search for searches and recall checks: recall against latency.",
    )
    lists: int = Field(default=100, ge=1, le=32768)
    halfvec: bool = False


_SPEC_STRING = re.compile(r"^(?P<provider>[a-z]+):(?P<model>[A-Za-z0-9._\-/]+)@(?P<dims>\d+)$")


class EmbeddingSpec(_Model):
    """One embedding model: ``source`` (v1) or ``target`` (v2)."""

    provider: ProviderName
    model: str = Field(min_length=1)
    dimensions: int = Field(ge=1, le=16000)
    api_key_secret_ref: SecretKeyRef | None = None
    base_url: str | None = Field(default=None, alias="baseURL")
    index: IndexSpec = Field(default_factory=IndexSpec)

    @model_validator(mode="after")
    def _known_model_dimensions(self) -> EmbeddingSpec:
        retired = _RETIRED_MODELS.get((self.provider, self.model))
        if retired:
            raise ValueError(f"{self.provider.value}:{self.model} {retired}")
        bounds = _MODEL_DIMENSIONS.get((self.provider, self.model))
        if bounds and not bounds[0] <= self.dimensions <= bounds[1]:
            low, high = bounds
            allowed = f"exactly {low}" if low == high else f"{low}–{high}"
            raise ValueError(
                f"{self.provider.value}:{self.model} gives {allowed} dimensions, "
                f"not {self.dimensions}; change dimensions"
            )
        return self

    @classmethod
    def parse(cls, value: str, *, field: str = "--target") -> EmbeddingSpec:
        """Parse ``provider:model@dims`` (``openai:text-embedding-3-small@768``)."""
        match = _SPEC_STRING.match(value.strip())
        if not match:
            raise ConfigError(
                f"{field}: {value!r} is not provider:model@dimensions, "
                "e.g. openai:text-embedding-3-small@768, google:gemini-embedding-001@1536 "
                "or local:hash@768"
            )
        known = [p.value for p in ProviderName]
        if match["provider"] not in known:
            raise ConfigError(
                f"{field}: provider {match['provider']!r} is not one of {', '.join(known)}"
            )
        try:
            return cls(
                provider=ProviderName(match["provider"]),
                model=match["model"],
                dimensions=int(match["dims"]),
            )
        except ValueError as exc:  # includes ValidationError
            raise ConfigError(f"{field}: {_one_line(exc)}") from None

    @property
    def descriptor(self) -> str:
        return f"{self.provider.value}:{self.model}@{self.dimensions}"

    @property
    def vector_type(self) -> str:
        return "halfvec" if self.index.halfvec else "vector"

    def check_indexable(self, *, field: str = "spec.target") -> None:
        """Refuse dimensions pgvector cannot index, saying how to fix it."""
        if self.index.halfvec:
            if self.dimensions > MAX_HALFVEC_INDEX_DIMS:
                raise ConfigError(
                    f"{field}.dimensions: {self.dimensions} exceeds pgvector's "
                    f"{MAX_HALFVEC_INDEX_DIMS}-dimension limit for a halfvec index; "
                    "lower dimensions"
                )
        elif self.dimensions > MAX_VECTOR_INDEX_DIMS:
            raise ConfigError(
                f"{field}.dimensions: {self.dimensions} exceeds pgvector's "
                f"{MAX_VECTOR_INDEX_DIMS}-dimension limit for a vector index; set "
                f"{field}.index.halfvec: true (up to {MAX_HALFVEC_INDEX_DIMS}) or lower dimensions"
            )


class DatabaseSpec(_Model):
    url_secret_ref: SecretKeyRef | None = None
    table: str
    id_column: str = "id"
    text_column: str = "content"
    category_column: str | None = None
    source_embedding_column: str | None = None

    @field_validator("table")
    @classmethod
    def _table(cls, value: str) -> str:
        TableName.parse(value, field="table")
        return value

    @field_validator("id_column", "text_column", "category_column", "source_embedding_column")
    @classmethod
    def _column(cls, value: str | None) -> str | None:
        if value is not None:
            check_identifier(value, field="column")
        return value

    @property
    def table_name(self) -> TableName:
        return TableName.parse(self.table, field="spec.database.table")


class MigrationSpec(_Model):
    categories: list[str] = Field(default_factory=list)
    batch_size: int = Field(default=100, ge=1, le=10000)
    concurrency: int = Field(default=4, ge=1, le=256)
    parallelism: int = Field(default=1, ge=1, le=1000)
    shards: int = Field(default=1, ge=1, le=1000)
    image: str | None = None
    resources: dict[str, Any] | None = None
    budget_usd: float | None = Field(default=None, alias="budgetUSD", ge=0)


class DataPlaneSpec(_Model):
    """``spec`` of an EmbeddingMigration, as far as the data plane reads it.

    ``rollout``, ``analysis`` and ``cleanup`` belong to the operator and pass through unread.
    """

    database: DatabaseSpec
    source: EmbeddingSpec | None = None
    target: EmbeddingSpec
    migration: MigrationSpec = Field(default_factory=MigrationSpec)
    rollout: dict[str, Any] | None = None
    analysis: dict[str, Any] | None = None
    cleanup: dict[str, Any] | None = None

    @property
    def target_table(self) -> TableName:
        """The side table holding target vectors: one per (source table, target model)."""
        table = self.database.table_name
        return table.sibling(
            derived_identifier(
                "embedshift", table.name, self.target.model, str(self.target.dimensions)
            )
        )


class Metadata(_Model):
    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(min_length=1)
    namespace: str = "default"


class EmbeddingMigrationResource(_Model):
    """A whole ``EmbeddingMigration`` manifest, status (if any) ignored."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )
    api_version: str
    kind: str
    metadata: Metadata
    spec: DataPlaneSpec

    @model_validator(mode="after")
    def _kind(self) -> EmbeddingMigrationResource:
        if self.api_version != API_VERSION or self.kind != KIND:
            raise ValueError(
                f"expected apiVersion {API_VERSION} and kind {KIND}, "
                f"got {self.api_version} {self.kind}"
            )
        return self

    @property
    def key(self) -> str:
        """``namespace/name``: the routing row's and status rows' key."""
        return f"{self.metadata.namespace}/{self.metadata.name}"


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
            msg = str(err["msg"]).removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
        return "; ".join(parts)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def validation_message(exc: ValidationError, *, prefix: str) -> str:
    """A pydantic error as one line whose field paths start with ``prefix``."""
    parts = []
    for err in exc.errors():
        loc = ".".join([prefix, *(str(p) for p in err["loc"])]).strip(".")
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; check its spelling against the EmbeddingMigration schema"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def load_resource(path: Path) -> EmbeddingMigrationResource:
    """Read an EmbeddingMigration manifest; every problem becomes one ConfigError line."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: {path} is not valid YAML: {_one_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path} must hold one EmbeddingMigration mapping")
    if raw.get("apiVersion") != API_VERSION or raw.get("kind") != KIND:
        raise ConfigError(
            f"--config: {path}: expected apiVersion {API_VERSION} and kind {KIND}, "
            f"got {raw.get('apiVersion')} {raw.get('kind')}"
        )
    try:
        resource = EmbeddingMigrationResource.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {validation_message(exc, prefix='')}") from None
    resource.spec.target.check_indexable()
    return resource
