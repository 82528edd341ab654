"""The data-plane part of an ``EmbeddingMigration`` resource, as pydantic models.

The operator composes these with its own rollout and analysis models; the CLI reads the same YAML
(``--config FILE``) or builds the same models from flags. Field names are the resource's camelCase
names; validation errors name the field path (``spec.target.dimensions``) and the fix.
"""

from __future__ import annotations

import difflib
import functools
import re
import types
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails

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


def cel_rule(rule: str, message: str, *, field_path: str | None = None) -> dict[str, str]:
    """One Kubernetes ``x-kubernetes-validations`` entry: a CEL ``rule`` over ``self``.

    Standard CEL only: the tests evaluate every rule offline with cel-python. ``field_path``
    (``.dimensions``) is the field the API server names in its error.
    """
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def cel_rules(*rules: dict[str, str]) -> dict[str, Any]:
    """``json_schema_extra`` putting ``rules`` on a model or field of the generated CRD.

    Models declare the rules next to the Python checks they mirror, so the API server refuses
    at ``kubectl apply`` what the model refuses.
    """
    return {"x-kubernetes-validations": list(rules)}


class SpecModel(BaseModel):
    """A part of ``spec``: camelCase names, unknown fields refused, frozen, and strict as the API
    server is about JSON's types (the CRD's OpenAPI ``type``): ``"3"`` is not a number nor
    ``"yes"`` a boolean. JSON has one number type, so a whole number is an integer wherever it is
    written (``768.0``), as the API server reads it, and an integer is a number (``max: 0``).
    The operator's spec models build on it too, so both validators refuse the same values."""

    # No NaN or infinity anywhere: JSON has neither, so the API server never passes one, but YAML
    # (`.nan`) does, and NaN passes every bound (each comparison with it is false).
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=True,
        allow_inf_nan=False,
    )

    @model_validator(mode="before")
    @classmethod
    def _whole_numbers_are_integers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        integers = _integer_fields(cls)
        return {
            key: int(value)
            if key in integers and isinstance(value, float) and value.is_integer()
            else value
            for key, value in data.items()
        }


@functools.cache
def _integer_fields(model: type[BaseModel]) -> frozenset[str]:
    """The names and aliases of ``model``'s ``int`` (or ``int | None``) fields."""
    return frozenset(
        key
        for name, field in model.model_fields.items()
        if _unwrap(field.annotation) is int
        for key in (name, field.alias or name)
    )


class SecretKeyRef(SpecModel):
    """A key in a Kubernetes Secret; the CLI reads the value from the environment instead."""

    name: str = Field(min_length=1, description="Name of the Secret, in the resource's namespace.")
    key: str = Field(min_length=1, description="Key within the Secret whose value is used.")


class IndexSpec(SpecModel):
    """The pgvector index built on the target vectors after the backfill."""

    type: Literal["hnsw", "ivfflat"] = Field(
        default="hnsw",
        description="Index method: hnsw (better recall per millisecond, slower to build) or "
        "ivfflat.",
    )
    m: int = Field(
        default=16,
        ge=2,
        le=100,
        description="hnsw: links per node (pgvector's m); more is better recall, a larger index.",
    )
    ef_construction: int = Field(
        default=64,
        ge=4,
        le=1000,
        description="hnsw: candidate list size while building; more is better recall, a "
        "slower build.",
    )
    # pgvector's server default (40) measured recall@10 0.944 on benchmarks/search.py's corpus;
    # 100 measured 0.978 for about a millisecond (docs/benchmarks.md, "Search latency").
    ef_search: int = Field(
        default=100,
        ge=1,
        le=1000,
        description="hnsw.ef_search for searches and recall checks: recall against latency.",
    )
    lists: int = Field(
        default=100, ge=1, le=32768, description="ivfflat: number of lists (pgvector's lists)."
    )
    halfvec: bool = Field(
        default=False,
        description=f"Index the vectors as halfvec (16-bit floats): allows up to "
        f"{MAX_HALFVEC_INDEX_DIMS} dimensions instead of {MAX_VECTOR_INDEX_DIMS}, half the size.",
    )


# A model name as providers spell them (fine-tunes "ft:…:org::id", Azure deployments, "models/…"):
# nothing that could break out of a PromQL label, a log line or the ``provider:model@dims`` form.
MODEL_NAME = r"[A-Za-z0-9][A-Za-z0-9._:/-]*"  # no backslash: CEL takes it as written
# Kubernetes' names (DNS-1123): an EmbeddingMigration's, and its namespace's. A migration key,
# ``namespace/name``, is both: it is a routing row's key and a label value in every PromQL query.
RESOURCE_NAME = r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
NAMESPACE_NAME = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"


def check_migration_key(value: str, *, field: str = "--migration") -> str:
    """``value`` when it is ``namespace/name`` as Kubernetes spells them; ConfigError otherwise."""
    namespace, _, name = value.partition("/")
    if not (
        re.fullmatch(NAMESPACE_NAME, namespace)
        and len(namespace) <= 63
        and re.fullmatch(RESOURCE_NAME, name)
        and len(name) <= 253
    ):
        raise ConfigError(
            f"{field}: the migration key must be namespace/name in lower-case letters, digits "
            "and - (the name may also hold .), e.g. rag/docs-to-3-small"
        )
    return value


# http(s) and printable ASCII only: no other scheme, no space, no line break to inject a header.
BASE_URL = r"https?://[!-~]+"
_SPEC_STRING = re.compile(rf"^(?P<provider>[a-z]+):(?P<model>{MODEL_NAME})@(?P<dims>\d+)$")


_MODEL_NAME_FIX = (
    "model must start with a letter or digit and hold only letters, digits and . _ : / -"
)
_BASE_URL_FIX = (
    "baseURL must be an http:// or https:// URL of printable ASCII, without spaces or line "
    "breaks (percent-encode them)"
)


def _model_rules() -> list[dict[str, str]]:
    # The API server's copy of _known_model_dimensions, generated from the same two tables.
    rules = [
        cel_rule(
            f"!(self.provider == '{provider.value}' && self.model == '{model}')",
            f"{provider.value}:{model} {why}",
            field_path=".model",
        )
        for (provider, model), why in _RETIRED_MODELS.items()
    ]
    for (provider, model), (low, high) in _MODEL_DIMENSIONS.items():
        allowed = f"exactly {low}" if low == high else f"{low}–{high}"
        rules.append(
            cel_rule(
                f"!(self.provider == '{provider.value}' && self.model == '{model}') || "
                f"(self.dimensions >= {low} && self.dimensions <= {high})",
                f"{provider.value}:{model} gives {allowed} dimensions; change dimensions",
                field_path=".dimensions",
            )
        )
    return rules


class EmbeddingSpec(SpecModel):
    """One embedding model: ``source`` (v1) or ``target`` (v2)."""

    model_config = ConfigDict(json_schema_extra=cel_rules(*_model_rules()))

    provider: ProviderName = Field(
        strict=False,  # in Python, strict takes only ProviderName members; the name is a string
        description="Embedding API: openai (also Azure OpenAI and compatible servers via "
        "baseURL), google (Gemini API) or local (deterministic, offline).",
    )
    model: str = Field(
        min_length=1,
        max_length=128,
        description="Model name as the provider spells it, e.g. text-embedding-3-small or "
        "gemini-embedding-001.",
        json_schema_extra=cel_rules(cel_rule(f"self.matches('^{MODEL_NAME}$')", _MODEL_NAME_FIX)),
    )
    dimensions: int = Field(
        ge=1,
        le=16000,
        description="Vector length the model is asked for (OpenAI dimensions, Google "
        "output_dimensionality) and the column is typed with.",
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the provider's API key (not needed for local).",
    )
    base_url: str | None = Field(
        default=None,
        alias="baseURL",
        description="API endpoint instead of the provider's default (Azure OpenAI, an "
        "OpenAI-compatible server, a proxy).",
        json_schema_extra=cel_rules(cel_rule(f"self.matches('^{BASE_URL}$')", _BASE_URL_FIX)),
    )
    index: IndexSpec = Field(
        default_factory=IndexSpec,
        description="The vector index (read for the target only).",
    )
    # Known models are priced from the providers' lists (providers/pricing.py); a fine-tune or a
    # compatible server is not, and a budget cannot stop what it cannot price.
    usd_per_million_tokens: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        alias="usdPerMillionTokens",
        description="The model's price in USD per million tokens, for models embedshift has no "
        "list price for (needed for migration.budgetUSD and the cost criteria); overrides the "
        "list price. --price on the command line overrides this.",
    )
    # Google's API sends no rate-limit headers, so its pacer can only keep to limits it is told;
    # OpenAI's headers are learned, and a limit given here is the starting point until they come.
    requests_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="The account's requests-per-minute limit for this model, paced to from the "
        "first request (Google sends no rate-limit headers; OpenAI's are learned and win).",
    )
    tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="The account's tokens-per-minute limit for this model, paced to from the "
        "first request (Google sends no rate-limit headers; OpenAI's are learned and win).",
    )

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not re.fullmatch(MODEL_NAME, value):
            raise ValueError(_MODEL_NAME_FIX)
        return value

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(BASE_URL, value):
            raise ValueError(_BASE_URL_FIX)
        return value

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


class DatabaseSpec(SpecModel):
    """The source table and how to reach its database."""

    url_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the PostgreSQL URL (postgresql://...). The CLI reads "
        "DATABASE_URL instead.",
    )
    table: str = Field(
        description="The table holding the documents: table or schema.table (plain SQL "
        "identifiers). It is never rewritten; v2 vectors go to a side table."
    )
    id_column: str = Field(default="id", description="Primary key column of the table.")
    text_column: str = Field(default="content", description="Column holding the text to embed.")
    category_column: str | None = Field(
        default=None,
        description="Column to filter and report by (migration.categories, progress per "
        "category), if any.",
    )
    source_embedding_column: str | None = Field(
        default=None,
        description="Column holding the existing (v1) vectors, if v1 is served from this table.",
    )

    # The identifier checks raise ConfigError, which pydantic would let through without the
    # field's path; as ValueError the path is added (``spec.database.table: ...``).
    @field_validator("table")
    @classmethod
    def _table(cls, value: str) -> str:
        try:
            TableName.parse(value, field="table")
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("table: ")) from None
        return value

    @field_validator("id_column", "text_column", "category_column", "source_embedding_column")
    @classmethod
    def _column(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                check_identifier(value, field="column")
            except ConfigError as exc:
                raise ValueError(str(exc).removeprefix("column: ")) from None
        return value

    @property
    def table_name(self) -> TableName:
        return TableName.parse(self.table, field="spec.database.table")


# A Kubernetes quantity (``500m``, ``2Gi``, ``1.5``), the pattern the API server itself uses.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY = re.compile(QUANTITY_PATTERN)


def _quantity(value: Any) -> Any:
    # One message for a bad quantity, rather than one per branch of the int | str union.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | str)
        or (isinstance(value, str) and not _QUANTITY.match(value))
    ):
        raise ValueError(f"{value!r} is not a Kubernetes quantity; write e.g. 500m, 512Mi or 2")
    return value


Quantity = Annotated[
    int | Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN)], BeforeValidator(_quantity)
]


class ResourceRequirements(SpecModel):
    """CPU and memory for each migrate Job's container, as in a Pod's resources."""

    requests: dict[str, Quantity] = Field(
        default_factory=dict,
        description="Resources the scheduler reserves, e.g. {cpu: 500m, memory: 512Mi}.",
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict,
        description="Most the container may use, e.g. {memory: 1Gi}.",
    )


class MigrationSpec(SpecModel):
    """How the re-embedding runs: which rows, how fast, in how many Jobs, at what cost."""

    categories: list[str] = Field(
        default_factory=list,
        description="Categories to migrate (values of database.categoryColumn); empty means all.",
    )
    batch_size: int = Field(
        default=100, ge=1, le=10000, description="Texts per embedding request and database batch."
    )
    concurrency: int = Field(
        default=4, ge=1, le=256, description="Embedding requests in flight per worker."
    )
    parallelism: int = Field(default=1, ge=1, le=1000, description="Shards (Jobs) running at once.")
    shards: int = Field(
        default=1,
        ge=1,
        le=1000,
        description="Parts the table is split into by primary key: one migrate Job each.",
    )
    image: str | None = Field(
        default=None, description="Container image of the Jobs; default: the operator's own."
    )
    resources: ResourceRequirements | None = Field(
        default=None, description="CPU and memory of each Job's container."
    )
    budget_usd: float | None = Field(
        default=None,
        alias="budgetUSD",
        ge=0,
        allow_inf_nan=False,  # nan compares false with any spend; inf never stops
        description="Stop the backfill before its estimated embedding cost exceeds this many "
        "US dollars.",
    )


class DataPlaneSpec(SpecModel):
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


class Metadata(SpecModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(min_length=1)
    namespace: str = "default"


class EmbeddingMigrationResource(SpecModel):
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
        return validation_message(exc, prefix="")
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def validation_message(
    exc: ValidationError, *, prefix: str, model: type[BaseModel] | None = None
) -> str:
    """A pydantic error as one line whose field paths start with ``prefix``.

    Paths are written as Kubernetes writes them (``spec.analysis.successCriteria[0].for``);
    ``model`` (the validated class) lets an unknown field suggest the one it was probably meant
    to be.
    """
    parts = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if p != "__root__"]
        path = prefix
        for part in loc:
            path = f"{path}[{part}]" if isinstance(part, int) else f"{path}.{part}".lstrip(".")
        msg = _error_text(err)
        if err["type"] == "extra_forbidden" and model is not None and loc:
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(model, loc[:-1]), n=1)
            if close:
                msg += f" (did you mean {close[0]}?)"
        parts.append(f"{path}: {msg}" if path else msg)
    return "; ".join(parts)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # as YAML and JSON write it
    return repr(value) if isinstance(value, str) else str(value)


_TYPE_ERRORS = {
    "int_parsing": "is not a whole number",
    "int_type": "is not a whole number",
    "int_from_float": "is not a whole number",
    "float_parsing": "is not a number",
    "float_type": "is not a number",
    "bool_parsing": "is not true or false",
    "bool_type": "is not true or false",
    "string_type": "is not a string; quote it",
    "dict_type": "is not a mapping; write key: value fields",
    "model_type": "is not a mapping; write key: value fields",
    "model_attributes_type": "is not a mapping; write key: value fields",
    "list_type": "is not a list; write one item per '- ' line or [a, b]",
}


_QUOTED = {
    "int_type": "write a whole number",
    "float_type": "write a number",
    "bool_type": "write true or false",
}


def _error_text(err: ErrorDetails) -> str:
    """What is wrong and how to fix it; pydantic's own words when they already say both.

    pydantic's bound messages ("Input should be less than or equal to 100") say neither the
    value given nor what to do: every field's bound is reworded here, in one place.
    """
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        return "unknown field; check its spelling against the EmbeddingMigration schema"
    if kind == "missing":
        return "required; add this field"
    if kind == "greater_than_equal":
        return f"{_show(value)} is below the minimum of {ctx['ge']}; use {ctx['ge']} or more"
    if kind == "greater_than":
        return f"{_show(value)} is too small; use a value above {ctx['gt']}"
    if kind == "less_than_equal":
        return f"{_show(value)} is above the maximum of {ctx['le']}; use {ctx['le']} or less"
    if kind == "less_than":
        return f"{_show(value)} is too large; use a value below {ctx['lt']}"
    if kind == "too_long":
        return (
            f"{ctx['actual_length']} items, more than the {ctx['max_length']} allowed; remove some"
        )
    if kind == "too_short":
        return f"{ctx['actual_length']} items; give at least {ctx['min_length']}"
    if kind == "string_too_short":
        return "empty; give a value or leave the field out"
    if kind == "string_too_long":
        return f"longer than {ctx['max_length']} characters; shorten it"
    if kind == "string_pattern_mismatch":
        return f"{_show(value)} does not match {ctx['pattern']}; change it to match"
    if kind in ("literal_error", "enum"):
        return f"{_show(value)} is not allowed; use {ctx['expected']}"
    if kind in _TYPE_ERRORS:
        text = f"{_show(value)} {_TYPE_ERRORS[kind]}"
        if isinstance(value, str) and kind in _QUOTED:
            # The models are as strict as the API server: no number or boolean in quotes.
            text += f"; {_QUOTED[kind]} without quotes"
        return text
    return str(err["msg"]).removeprefix("Value error, ")


def _fields_at(model: type[BaseModel], loc: list[int | str]) -> list[str]:
    """The field names (aliases) of the model found by following ``loc`` from ``model``."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int) or get_origin(current) is dict:
            args = get_args(current)
            current = args[-1] if args else None
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = next(
            (f for n, f in current.model_fields.items() if part in (n, f.alias)),
            None,
        )
        if field is None:
            return []
        current = field.annotation
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return []


def _unwrap(annotation: Any) -> Any:
    """``X | None`` and ``Annotated[X, ...]`` as ``X``."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            rest = [a for a in get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def yaml_error_message(exc: yaml.YAMLError) -> str:
    """`` at line L, column C: problem (context at line …)`` for a YAML error, to follow "is not
    valid YAML"; lines and columns count from 1, as editors do. Pure."""
    mark = getattr(exc, "problem_mark", None)
    if not isinstance(exc, yaml.MarkedYAMLError) or mark is None:
        return f": {_one_line(exc)}"
    text = f" at line {mark.line + 1}, column {mark.column + 1}: {exc.problem or _one_line(exc)}"
    context = exc.context_mark
    if (
        exc.context
        and context is not None
        and (context.line, context.column)
        != (
            mark.line,
            mark.column,
        )
    ):
        # Where the unclosed bracket or block began: often the line to fix.
        text += f" ({exc.context} at line {context.line + 1}, column {context.column + 1})"
    return text


def read_yaml(path: Path, *, what: str) -> Any:
    """The one YAML document in ``path``; every problem (unreadable, not UTF-8, not YAML, a
    tag that would construct a Python object) is one ConfigError line starting with ``what``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what}: {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what}: {path} is not valid YAML{yaml_error_message(exc)}") from None


def load_resource(path: Path) -> EmbeddingMigrationResource:
    """Read an EmbeddingMigration manifest; every problem becomes one ConfigError line."""
    raw = read_yaml(path, what="--config")
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
        raise ConfigError(
            f"{path}: {validation_message(exc, prefix='', model=EmbeddingMigrationResource)}"
        ) from None
    resource.spec.target.check_indexable()
    return resource
