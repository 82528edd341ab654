"""The ``EmbeddingMigration`` CustomResourceDefinition, generated from the typed models. Pure.

``python -m embedshift_operator.crd`` (``make crd``) writes ``crds/embeddingmigrations.
embedshift.io.yaml``; a test fails when the checked-in file is not what the models generate, so
the models in :mod:`embedshift_operator.resource` stay the one place each field is described.

The models' JSON schemas (by alias) become a Kubernetes *structural* schema:

- every ``$ref`` is inlined, the field's own description and default over the type's;
- an optional field is simply not required. No ``nullable``: the API server prunes a ``null``
  of a non-nullable field, and a field left out is what ``None`` means to the models;
- ``int | str`` (a quantity) becomes ``x-kubernetes-int-or-string``, as in a Pod's resources;
- a field's ``default_factory`` becomes its ``default``, ``{}`` for a model whose defaults the
  API server fills in field by field;
- the models' CEL rules (``x-kubernetes-validations`` in ``json_schema_extra``, declared next
  to the Python checks they mirror) ride along.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from embedshift_operator.resource import (
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    EmbeddingMigration,
    EmbeddingMigrationSpec,
    EmbeddingMigrationStatus,
)

__all__ = ["FILE_NAME", "GROUP", "PLURAL", "SHORT_NAMES", "VERSION", "definition", "render"]

SINGULAR = "embeddingmigration"
SHORT_NAMES = ["em"]
FILE_NAME = f"{PLURAL}.{GROUP}.yaml"
# The source checkout's crds/ (operator/embedshift_operator/crd.py → the repository root).
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "crds" / FILE_NAME

HEADER = (
    "# Generated from embedshift_operator.resource by `make crd` "
    "(python -m embedshift_operator.crd).\n"
    "# Do not edit: change the models and regenerate; a test fails when this file is stale.\n"
)

# The order keys are written in, so the YAML reads like a hand-written CRD and diffs stay small.
_KEY_ORDER = [
    "description",
    "type",
    "format",
    "x-kubernetes-int-or-string",
    "anyOf",
    "enum",
    "default",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "x-kubernetes-validations",
]


class _KubernetesSchema(GenerateJsonSchema):
    """pydantic's generator, also writing the defaults that come from a ``default_factory``."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().get_default_value(schema)
        return _as_default(factory())  # type: ignore[call-arg]


def _as_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        # Built from no arguments: {} and the API server fills in each field's own default.
        if not value.model_fields_set:
            return {}
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(value, list):
        return [_as_default(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_default(v) for k, v in value.items()}
    return value


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model`` (by alias) as a structural OpenAPI v3 schema."""
    raw = model.model_json_schema(by_alias=True, schema_generator=_KubernetesSchema)
    defs = raw.pop("$defs", {})
    return _structural(raw, defs)


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = dict(node)
    base: dict[str, Any] | None = None
    if "$ref" in node:
        base = defs[node.pop("$ref").rsplit("/", 1)[-1]]
    elif len(node.get("allOf", [])) == 1:
        base = node.pop("allOf")[0]
    elif "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o != {"type": "null"}]
        if len(options) == 1:
            base = options[0]
        elif sorted(o.get("type", "") for o in options) == ["integer", "string"]:
            # A quantity: Kubernetes' own spelling, constraints of the string beside the anyOf.
            string = next(o for o in options if o.get("type") == "string")
            node["x-kubernetes-int-or-string"] = True
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            node.update({k: v for k, v in string.items() if k != "type"})
        else:
            raise ValueError(f"no structural schema for anyOf {options}")
    if base is not None:
        inner = _structural(base, defs)
        rules = inner.pop("x-kubernetes-validations", []) + node.pop("x-kubernetes-validations", [])
        node = {**inner, **node}
        if rules:
            node["x-kubernetes-validations"] = rules

    node.pop("title", None)
    if node.get("additionalProperties") is False:
        # extra="forbid": the API server prunes unknown fields, and kubectl's default
        # --validate=strict reports them; `false` itself is not allowed in a structural schema.
        del node["additionalProperties"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        # JSON Schema 2020-12 writes the number; OpenAPI v3.0 (Kubernetes) a flag beside it.
        if not isinstance(node.get(bound), bool) and bound in node:
            node[flag] = node[bound]
            node[bound] = True
    if node.get("default", 0) is None:
        del node["default"]
    if "description" in node:
        node["description"] = node["description"].replace("``", "`")
    if "properties" in node:
        node["properties"] = {k: _structural(v, defs) for k, v in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _structural(node["additionalProperties"], defs)
    if "items" in node:
        node["items"] = _structural(node["items"], defs)
    return {k: node[k] for k in sorted(node, key=_key_rank)}


def _key_rank(key: str) -> tuple[int, str]:
    return (_KEY_ORDER.index(key) if key in _KEY_ORDER else len(_KEY_ORDER), key)


def _doc(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split()).replace("``", "`")


def _status_field(path: str) -> str:
    """The description of a status field (``migration.migrated``), for a printer column."""
    model: type[BaseModel] = EmbeddingMigrationStatus
    *parents, leaf = path.split(".")
    for name in parents:
        annotation = model.model_fields[name].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
        model = annotation
    return model.model_fields[leaf].description or ""


def printer_columns() -> list[dict[str, Any]]:
    """``kubectl get em``: Phase, Percentage, Step, Migrated, Age; ``-o wide`` adds the rest."""
    return [
        {
            "name": "Phase",
            "type": "string",
            "jsonPath": ".status.phase",
            "description": _status_field("phase"),
        },
        {
            "name": "Percentage",
            "type": "integer",
            "jsonPath": ".status.percentage",
            "description": _status_field("percentage"),
        },
        {
            "name": "Step",
            "type": "integer",
            "jsonPath": ".status.stepIndex",
            "description": _status_field("step_index"),
        },
        {
            "name": "Migrated",
            "type": "integer",
            "jsonPath": ".status.migration.migrated",
            "description": _status_field("migration.migrated"),
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {
            "name": "Last analysis",
            "type": "date",
            "jsonPath": ".status.analysis.time",
            "description": _status_field("analysis.time"),
            "priority": 1,
        },
        {
            "name": "Reason",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
            "description": "Why the resource is (not) Ready, in CamelCase.",
            "priority": 1,
        },
    ]


def definition() -> dict[str, Any]:
    """The whole CRD as a dict (``apiextensions.k8s.io/v1``)."""
    root = {
        "description": _doc(EmbeddingMigration),
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "description": "APIVersion defines the versioned schema of this representation "
                "of an object.",
                "type": "string",
            },
            "kind": {
                "description": "Kind is a string value representing the REST resource this "
                "object represents.",
                "type": "string",
            },
            # Kubernetes refuses anything here but the type ("metadata is implicitly specified").
            "metadata": {"type": "object"},
            "spec": {
                **openapi_schema(EmbeddingMigrationSpec),
                "description": _doc(EmbeddingMigrationSpec),
            },
            "status": {
                **openapi_schema(EmbeddingMigrationStatus),
                "description": _doc(EmbeddingMigrationStatus),
            },
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns(),
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    # A schema used twice (source and target) is written out twice, not as &id001 / *id001:
    # people read this file, and some tools mishandle aliases.
    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(crd: dict[str, Any]) -> str:
    """The CRD as the YAML file that is checked in: the header, then the document."""
    return HEADER + yaml.dump(crd, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m embedshift_operator.crd",
        description="Write the EmbeddingMigration CRD generated from the models.",
    )
    parser.add_argument(
        "output", nargs="?", type=Path, default=DEFAULT_PATH, help=f"default: {DEFAULT_PATH}"
    )
    args = parser.parse_args(argv)
    output: Path = args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(definition()), encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
