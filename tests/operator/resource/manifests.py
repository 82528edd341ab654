"""Manifests for the resource tests: the smallest valid one, and edits of it."""

from __future__ import annotations

import copy
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
