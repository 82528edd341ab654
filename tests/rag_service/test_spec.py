"""Pure tests of the spec models, identifiers, shards and prices: tables of cases, no I/O."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from rag_service.errors import ConfigError
from rag_service.identifiers import (
    IDENTIFIER_PATTERN,
    TableName,
    check_identifier,
    derived_identifier,
)
from rag_service.migrate import Shard
from rag_service.providers import api_key_from_env
from rag_service.providers.pricing import PriceTable
from rag_service.spec import DataPlaneSpec, EmbeddingSpec, ProviderName, load_resource

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    ("text", "provider", "model", "dims"),
    [
        ("openai:text-embedding-3-small@768", ProviderName.OPENAI, "text-embedding-3-small", 768),
        ("google:gemini-embedding-001@1536", ProviderName.GOOGLE, "gemini-embedding-001", 1536),
        ("local:hash@768", ProviderName.LOCAL, "hash", 768),
        (" local:my-model.v2@3 ", ProviderName.LOCAL, "my-model.v2", 3),
    ],
)
def test_provider_spec_strings(text: str, provider: ProviderName, model: str, dims: int) -> None:
    spec = EmbeddingSpec.parse(text)
    assert (spec.provider, spec.model, spec.dimensions) == (provider, model, dims)
    assert spec.descriptor == text.strip()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("openai:text-embedding-3-small", "provider:model@dimensions"),
        ("openai:text-embedding-ada-002@768", "gives exactly 1536 dimensions"),
        ("openai:text-embedding-3-large@3073", "gives 1–3072 dimensions"),
        ("local:hash@0", "0 is below the minimum of 1; use 1 or more"),
        ("azure:x@8", "not one of openai, google, local"),
        ("google:text-embedding-004@768", "retired on the Gemini API in January 2026"),
    ],
)
def test_bad_provider_spec_strings(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        EmbeddingSpec.parse(text)


@pytest.mark.parametrize(
    ("dims", "halfvec", "ok"),
    [
        (2000, False, True),
        (2001, False, False),
        (2001, True, True),
        (4000, True, True),
        (4001, True, False),
    ],
)
def test_index_dimension_limits(dims: int, halfvec: bool, ok: bool) -> None:
    spec = EmbeddingSpec(
        provider=ProviderName.LOCAL, model="m", dimensions=dims, index={"halfvec": halfvec}
    )  # type: ignore[arg-type]
    if ok:
        spec.check_indexable()
    else:
        with pytest.raises(ConfigError, match="dimension limit"):
            spec.check_indexable()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("documents", TableName("documents")), ("rag.docs_v1", TableName("docs_v1", "rag"))],
)
def test_table_names(value: str, expected: TableName) -> None:
    assert TableName.parse(value, field="table") == expected


@pytest.mark.parametrize(
    "value", ["", "1docs", "docs-v1", 'do"cs', "docs; drop", "a" * 64, "é", "docs\n"]
)
def test_identifiers_are_refused_not_escaped(value: str) -> None:
    with pytest.raises(ConfigError, match="field-name"):
        check_identifier(value, field="field-name")


@pytest.mark.parametrize(
    "value",
    ["docs", "_x", "Docs_v1$2", "a" * 63, "a" * 64, "", "1docs", "docs-v1", "é", "docs\n", "a.b"],
)
def test_the_pattern_the_crd_embeds_is_check_identifier(value: str) -> None:
    """One identifier rule for both validators: the API server matches IDENTIFIER_PATTERN (in
    the operator's CRD), the models call check_identifier."""
    try:
        check_identifier(value, field="f")
    except ConfigError:
        accepted = False
    else:
        accepted = True
    assert (re.fullmatch(IDENTIFIER_PATTERN, value) is not None) == accepted


def test_derived_identifiers_are_short_deterministic_and_distinct() -> None:
    long_a = derived_identifier("embedshift", "x" * 60, "text-embedding-3-small", "768")
    long_b = derived_identifier("embedshift", "x" * 60, "text-embedding-3-large", "768")
    assert len(long_a) <= 63 and long_a != long_b
    assert long_a == derived_identifier("embedshift", "x" * 60, "text-embedding-3-small", "768")
    assert derived_identifier("embedshift", "docs", "text-embedding-3-small", "768") == (
        "embedshift_docs_text_embedding_3_small_768"
    )


@pytest.mark.parametrize(("value", "shard"), [("0/1", Shard(0, 1)), ("3/4", Shard(3, 4))])
def test_shards(value: str, shard: Shard) -> None:
    assert Shard.parse(value) == shard and str(shard) == value


@pytest.mark.parametrize("value", ["4/4", "-1/2", "1", "a/b", "0/0"])
def test_bad_shards(value: str) -> None:
    with pytest.raises(ConfigError, match="--shard"):
        Shard.parse(value)


def test_prices() -> None:
    prices = PriceTable()
    assert prices.cost("openai", "text-embedding-3-small", 1_000_000) == pytest.approx(0.02)
    assert prices.cost("google", "gemini-embedding-001", 2_000_000) == pytest.approx(0.30)
    assert prices.cost("local", "hash", 10**9) == 0
    assert prices.cost("google", "models/gemini-embedding-001", 10**6) == pytest.approx(0.15)
    key, usd = PriceTable.parse_override("local:hash=1.5")
    assert prices.with_overrides({key: usd}).cost("local", "hash", 10**6) == 1.5


def test_api_keys_prefer_the_role_variable() -> None:
    spec = EmbeddingSpec.parse("openai:text-embedding-3-small@768")
    env = {"OPENAI_API_KEY": "generic", "EMBEDSHIFT_TARGET_API_KEY": "target"}
    assert api_key_from_env(spec, "target", env) == "target"
    assert api_key_from_env(spec, "source", env) == "generic"
    assert (
        api_key_from_env(EmbeddingSpec.parse("google:gemini-embedding-001@768"), "target", {})
        is None
    )


@pytest.mark.parametrize("name", ["migration.yaml", "local-demo.yaml"])
def test_examples_load(name: str) -> None:
    resource = load_resource(EXAMPLES / name)
    assert resource.spec.target.dimensions == 768
    assert resource.key in {"rag/docs-to-3-small", "default/demo"}


def test_ef_search_defaults_to_100_and_is_bounded() -> None:
    assert (
        DataPlaneSpec.model_validate(
            {
                "database": {"table": "docs"},
                "target": {"provider": "local", "model": "m", "dimensions": 8},
            }
        ).target.index.ef_search
        == 100
    )
    with pytest.raises(ValidationError, match="efSearch"):
        DataPlaneSpec.model_validate(
            {
                "database": {"table": "docs"},
                "target": {
                    "provider": "local",
                    "model": "m",
                    "dimensions": 8,
                    "index": {"efSearch": 0},
                },
            }
        )
