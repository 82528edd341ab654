"""Manifests for the resource tests: the smallest valid one, edits of it, and the CRD's tables
of bad and good specs (checked offline by test_crd.py, on the real API server by
test_crd_on_apiserver.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def minimal() -> dict[str, Any]:
    """The least a platform engineer writes: a table and a target model. The rest is defaults."""
    return {
        "apiVersion": "embedshift.io/v1alpha1",
        "kind": "EmbeddingMigration",
        "metadata": {"name": "docs", "namespace": "rag"},
        "spec": {
            "database": {"table": "documents"},
            "target": {"provider": "openai", "model": "text-embedding-3-small", "dimensions": 768},
        },
    }


def with_spec(edit: dict[str, Any]) -> dict[str, Any]:
    """:func:`minimal` with ``edit`` merged into its spec (mappings merge, the rest replaces)."""
    manifest = minimal()
    _merge(manifest["spec"], copy.deepcopy(edit))
    return manifest


def _merge(into: dict[str, Any], edit: dict[str, Any]) -> None:
    for key, value in edit.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def criterion(**fields: Any) -> dict[str, Any]:
    """A success criterion named ``custom`` (fields as the manifest spells them)."""
    return {"name": "custom", **fields}


def steps(*percentages: int) -> list[dict[str, Any]]:
    return [{"percentage": p, "minDuration": "1h"} for p in percentages]


@dataclass(frozen=True)
class Bad:
    """A manifest that must be refused (by one CEL rule, offline; by the API server, with
    ``status``), the path it names, and a fragment of its message."""

    id: str
    manifest: Callable[[], dict[str, Any]]
    path: str
    fragment: str
    status: int = 422  # Unprocessable Entity: the object is invalid


def edited(edit: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    return lambda: with_spec(edit)


def _criteria(*items: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    return edited({"analysis": {"successCriteria": list(items)}})


def _target(**fields: Any) -> Callable[[], dict[str, Any]]:
    return edited({"target": fields})


CEL_BAD = [
    Bad(
        "steps-not-increasing",
        edited({"rollout": {"steps": steps(10, 50, 25, 100)}}),
        "spec.rollout.steps",
        "above the one before",
    ),
    Bad(
        "steps-repeated",
        edited({"rollout": {"steps": steps(10, 10, 100)}}),
        "spec.rollout.steps",
        "remove the repeated one",
    ),
    Bad(
        "steps-twentieth-not-increasing",
        # The last pair a bounded index list can reach: maxItems 20, so indexes 18 and 19.
        edited({"rollout": {"steps": steps(*range(1, 19), 100, 100)}}),
        "spec.rollout.steps",
        "above the one before",
    ),
    Bad(
        "steps-not-ending-at-100",
        edited({"rollout": {"steps": steps(10, 50)}}),
        "spec.rollout.steps",
        "last step must be 100",
    ),
    Bad(
        "metric-and-query",
        _criteria(criterion(metric="error_rate", query="up", max=1)),
        "spec.analysis.successCriteria[0]",
        "exactly one of metric",
    ),
    Bad(
        "neither-metric-nor-query",
        _criteria(criterion(max=1)),
        "spec.analysis.successCriteria[0]",
        "exactly one of metric",
    ),
    Bad(
        "min-and-max",
        _criteria(criterion(metric="error_rate", min=0, max=1)),
        "spec.analysis.successCriteria[0]",
        "exactly one of min, max",
    ),
    Bad(
        "no-bound",
        edited({"analysis": {"rollbackThresholds": [criterion(metric="error_rate")]}}),
        "spec.analysis.rollbackThresholds[0]",
        "exactly one of min, max",
    ),
    Bad(
        "ratio-with-query",
        _criteria(criterion(query="up", maxRatioToV1=1.0)),
        "spec.analysis.successCriteria[0].maxRatioToV1",
        "use min or max with a custom query",
    ),
    Bad(
        "ratio-without-a-v1",
        _criteria(criterion(metric="follower_lag_seconds", maxRatioToV1=1.0)),
        "spec.analysis.successCriteria[0].maxRatioToV1",
        "needs a built-in Prometheus metric",
    ),
    Bad(
        "duplicate-within",
        _criteria(criterion(metric="error_rate", max=1), criterion(metric="error_rate", max=2)),
        "spec.analysis",
        "must be unique",
    ),
    Bad(
        "duplicate-across",
        edited(
            {"analysis": {"rollbackThresholds": [{"name": "error-rate", "query": "up", "max": 1}]}}
        ),
        "spec.analysis",
        "must be unique",
    ),
    Bad(
        "vector-over-2000",
        _target(provider="openai", model="text-embedding-3-large", dimensions=3072),
        "spec.target.dimensions",
        "set index.halfvec: true",
    ),
    Bad(
        "halfvec-over-4000",
        _target(provider="local", model="hash", dimensions=4001, index={"halfvec": True}),
        "spec.target.dimensions",
        "halfvec column of at most 4000",
    ),
    Bad(
        "retired-model",
        _target(provider="google", model="text-embedding-004", dimensions=768),
        "spec.target.model",
        "use gemini-embedding-001",
    ),
    Bad(
        "ada-002-not-1536",
        edited(
            {"source": {"provider": "openai", "model": "text-embedding-ada-002", "dimensions": 768}}
        ),
        "spec.source.dimensions",
        "exactly 1536 dimensions",
    ),
    Bad(
        "model-breaking-promql",
        _target(provider="local", model='hash"} or vector(1) #', dimensions=8),
        "spec.target.model",
        "only letters, digits",
    ),
    Bad(
        "source-model-with-newline",
        edited({"source": {"provider": "local", "model": "hash\nX: 1", "dimensions": 8}}),
        "spec.source.model",
        "only letters, digits",
    ),
    Bad(
        "base-url-not-http",
        _target(
            provider="openai",
            model="text-embedding-3-small",
            dimensions=8,
            baseURL="file:///etc/passwd",
        ),
        "spec.target.baseURL",
        "http:// or https://",
    ),
    Bad(
        "source-base-url-with-newline",
        edited(
            {
                "source": {
                    "provider": "openai",
                    "model": "text-embedding-3-small",
                    "dimensions": 8,
                    "baseURL": "http://a/v1\nHost: b",
                }
            }
        ),
        "spec.source.baseURL",
        "http:// or https://",
    ),
    Bad(
        "3-small-over-1536",
        _target(provider="openai", model="text-embedding-3-small", dimensions=1537),
        "spec.target.dimensions",
        "1–1536 dimensions",
    ),
    Bad(
        "3-large-over-3072",
        _target(
            provider="openai",
            model="text-embedding-3-large",
            dimensions=3073,
            index={"halfvec": True},
        ),
        "spec.target.dimensions",
        "1–3072 dimensions",
    ),
    Bad(
        "gemini-under-128",
        _target(provider="google", model="gemini-embedding-001", dimensions=64),
        "spec.target.dimensions",
        "128–3072 dimensions",
    ),
    Bad(
        "zero-interval",
        edited({"analysis": {"interval": "0s"}}),
        "spec.analysis.interval",
        "longer than zero",
    ),
    Bad(
        "zero-window",
        edited({"analysis": {"window": "0m0.0s"}}),
        "spec.analysis.window",
        "longer than zero",
    ),
    Bad(
        "duration-too-long",
        edited({"analysis": {"interval": "1000000000h"}}),
        "spec.analysis.interval",
        "too long a duration",
    ),
    Bad(
        "blank-query",
        _criteria(criterion(query="  ", max=1)),
        "spec.analysis.successCriteria[0].query",
        "write a PromQL expression or use metric",
    ),
    Bad(
        "table-not-an-identifier",
        edited({"database": {"table": "public.my-docs"}}),
        "spec.database.table",
        "write table or schema.table",
    ),
    Bad(
        "table-of-three-parts",
        edited({"database": {"table": "db.public.documents"}}),
        "spec.database.table",
        "write table or schema.table",
    ),
    *(
        Bad(
            f"{column}-not-an-identifier",
            edited({"database": {column: value}}),
            f"spec.database.{column}",
            "not a plain SQL identifier",
        )
        for column, value in (
            ("idColumn", "doc id"),
            ("textColumn", "1text"),
            ("categoryColumn", "category;drop"),
            ("sourceEmbeddingColumn", "e" * 64),
        )
    ),
]

# Edge cases both the rules and the models accept.
CEL_GOOD: list[tuple[str, Callable[[], dict[str, Any]]]] = [
    ("minimal", minimal),
    ("one-step-of-100", edited({"rollout": {"steps": steps(100)}})),
    ("twenty-steps", edited({"rollout": {"steps": steps(*range(5, 100, 5), 100)}})),
    ("vector-at-2000", _target(provider="local", model="hash", dimensions=2000)),
    (
        "halfvec-at-4000",
        _target(provider="local", model="hash", dimensions=4000, index={"halfvec": True}),
    ),
    (
        "3-large-halfvec",
        _target(
            provider="openai",
            model="text-embedding-3-large",
            dimensions=3072,
            index={"halfvec": True},
        ),
    ),
    ("ratio-on-a-metric", _criteria(criterion(metric="error_rate", maxRatioToV1=2.0))),
    ("custom-query", _criteria(criterion(query="up", min=1))),
    ("sub-second-interval", edited({"analysis": {"interval": "0.5s", "window": "1m30s"}})),
    ("empty-criteria", edited({"analysis": {"successCriteria": [], "rollbackThresholds": []}})),
    # JSON has one number type: a whole number is an integer, an integer a number. kubectl sends
    # YAML's 768.0 as 768 (stored so); this client sends 100.0, which the API server's type check
    # takes as an integer but its CEL rules do not ("expected int, got float64"), hence fields no
    # rule reads.
    ("whole-number-for-an-integer", edited({"migration": {"batchSize": 100.0, "shards": 2.0}})),
    (
        "integers-for-numbers",
        edited(
            {
                "migration": {"budgetUSD": 5},
                "analysis": {"successCriteria": [criterion(query="up", max=0)]},
            }
        ),
    ),
]
