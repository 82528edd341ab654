"""The CRD in crds/ is the models' CRD: current, structural, field for field the same, and its
CEL rules refuse what the models refuse.

Offline, with cel-python (:mod:`.apiserver`): a fast pre-check that names the rule and the
model field at fault without a cluster. The proof is test_crd_on_apiserver.py, which sends the
same tables of bad and good manifests (:mod:`.manifests`) to a real kube-apiserver."""

from __future__ import annotations

import datetime
import enum
import re
import types
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import pytest
import yaml
from pydantic import BaseModel, StringConstraints
from pydantic.fields import FieldInfo

from embedshift_operator import crd
from embedshift_operator.resource import (
    EmbeddingMigrationSpec,
    EmbeddingMigrationStatus,
    parse_migration,
)
from rag_service.criteria import METRICS
from rag_service.errors import ConfigError

from . import apiserver
from .manifests import CEL_BAD, CEL_GOOD, EXAMPLES, REPO, Bad, minimal

CHECKED_IN = REPO / "crds" / crd.FILE_NAME


def _schema() -> dict[str, Any]:
    document = yaml.safe_load(CHECKED_IN.read_text(encoding="utf-8"))
    (version,) = document["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


SCHEMA = _schema()


def test_checked_in_crd_is_the_generated_one() -> None:
    assert CHECKED_IN.read_text(encoding="utf-8") == crd.render(crd.definition()), (
        f"{CHECKED_IN.relative_to(REPO)} is stale: the models changed; run `make crd` and commit "
        "the result"
    )


def test_crd_identity() -> None:
    document = yaml.safe_load(CHECKED_IN.read_text(encoding="utf-8"))
    assert document["apiVersion"] == "apiextensions.k8s.io/v1"
    assert document["metadata"]["name"] == "embeddingmigrations.embedshift.io"
    spec = document["spec"]
    assert spec["group"] == "embedshift.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "EmbeddingMigration"
    assert spec["names"]["plural"] == "embeddingmigrations"
    assert spec["names"]["shortNames"] == ["em"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c.get("priority", 0) for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Phase": 0,
        "Percentage": 0,
        "Step": 0,
        "Migrated": 0,
        "Age": 0,
        "Last analysis": 1,
        "Reason": 1,
    }


def test_printer_columns_point_at_fields_of_their_type() -> None:
    # A renamed status field would otherwise leave a column silently empty.
    document = yaml.safe_load(CHECKED_IN.read_text(encoding="utf-8"))
    (version,) = document["spec"]["versions"]
    column_types = {"string": "string", "integer": "integer", "date": "string"}
    for column in version["additionalPrinterColumns"]:
        # .status.phase, or .status.conditions[?(@.type=="Ready")].reason
        parts = re.findall(r'\.(\w+)(?:\[\?\(@\.(\w+)=="(\w+)"\)\])?', column["jsonPath"])
        assert (
            "".join(f".{n}" + (f'[?(@.{k}=="{v}")]' if k else "") for n, k, v in parts)
            == column["jsonPath"]
        )
        if parts[0][0] == "metadata":
            continue
        node = SCHEMA
        for name, key, wanted in parts:
            node = node["properties"][name]
            if key:  # an item whose `key` is `wanted`
                node = node["items"]
                assert wanted in node["properties"][key]["enum"], column
        assert node["type"] == column_types[column["type"]], column
        if column["type"] == "date":
            assert node["format"] == "date-time", column


# ---- structural ---------------------------------------------------------------------------------

_NOT_STRUCTURAL = {"$ref", "$defs", "allOf", "oneOf", "not", "nullable", "title", "const"}
_RULE_KEYS = {"rule", "message", "messageExpression", "fieldPath", "reason", "optionalOldSelf"}


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, prop in node.get("properties", {}).items():
        yield from _nodes(prop, f"{path}.{name}".lstrip("."))
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from _nodes(node["items"], f"{path}[*]")


def _structural_problems(schema: dict[str, Any]) -> list[str]:
    problems = []
    for path, node in _nodes(schema):
        where = path or "(root)"
        if node.get("x-kubernetes-preserve-unknown-fields"):
            problems.append(f"{where}: free-form (x-kubernetes-preserve-unknown-fields)")
        if node.get("x-kubernetes-int-or-string"):
            if node.get("anyOf") != [{"type": "integer"}, {"type": "string"}] or "type" in node:
                problems.append(f"{where}: int-or-string not in Kubernetes' form")
        elif "type" not in node:
            problems.append(f"{where}: no type")
        elif "anyOf" in node:
            problems.append(f"{where}: anyOf")
        problems += [f"{where}: {key}" for key in _NOT_STRUCTURAL & node.keys()]
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{where}: both properties and additionalProperties")
        if isinstance(node.get("additionalProperties"), bool):
            problems.append(f"{where}: additionalProperties is a bool")
        if (
            node.get("type") == "object"
            and path != "metadata"
            and "properties" not in node
            and "additionalProperties" not in node
        ):
            problems.append(f"{where}: an object without properties")
        if node.get("type") == "array" and "items" not in node:
            problems.append(f"{where}: an array without items")
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            if bound in node and not isinstance(node[bound], bool):
                problems.append(f"{where}: {bound} is not a flag (OpenAPI v3.0)")
        if "default" in node and not _pruned(node, node["default"]):
            problems.append(f"{where}: default has fields the schema does not")
        for rule in node.get("x-kubernetes-validations", []):
            if not rule.get("message") or not rule.keys() <= _RULE_KEYS:
                problems.append(f"{where}: rule without a message, or unknown keys: {rule}")
    for path, node in _nodes(schema):
        for name, prop in node.get("properties", {}).items():
            # The API server refuses anything on metadata but its type (it is implicit).
            if not prop.get("description") and f"{path}.{name}" != ".metadata":
                problems.append(f"{path}.{name}: no description".lstrip("."))
    return problems


def _pruned(node: dict[str, Any], value: Any) -> bool:
    if isinstance(value, dict) and "properties" in node:
        return all(
            k in node["properties"] and _pruned(node["properties"][k], v) for k, v in value.items()
        )
    if isinstance(value, list) and "items" in node:
        return all(_pruned(node["items"], v) for v in value)
    return True


def test_schema_is_structural_with_a_description_on_every_field() -> None:
    assert _structural_problems(SCHEMA) == []


def test_structural_check_catches_what_kubernetes_refuses() -> None:
    # The check above is only worth something if it fails on the things it looks for.
    bad = {
        "type": "object",
        "properties": {
            "a": {"$ref": "#/$defs/A", "description": "x"},
            "b": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "x"},
            "c": {"type": "object", "description": "x"},
            "d": {"type": "integer"},
            "e": {"type": "number", "exclusiveMinimum": 0, "description": "x"},
        },
    }
    problems = "\n".join(_structural_problems(bad))
    for fragment in (
        "a: no type",
        "a: $ref",
        "b: no type",
        "c: an object without",
        "d: no description",
        "e: exclusiveMinimum",
    ):
        assert fragment in problems


# ---- the CRD and the models agree, field by field ---------------------------------------------

_FACTS = (
    "type",
    "format",
    "enum",
    "x-kubernetes-int-or-string",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
)


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """``(type, constraints)``: Optional and Annotated taken off, their metadata kept."""
    metadata: list[Any] = []
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation, *extra = get_args(annotation)
            metadata += extra
        elif origin in (Union, types.UnionType):
            rest = [a for a in get_args(annotation) if a is not type(None)]
            if len(rest) > 1:
                return annotation, metadata
            annotation = rest[0]
        else:
            return annotation, metadata


def _expected(annotation: Any, metadata: list[Any], extra: dict[str, Any]) -> dict[str, Any]:
    """What the CRD must say about a value of ``annotation`` with these constraints."""
    annotation, more = _unwrap(annotation)
    metadata = metadata + more
    facts: dict[str, Any] = {}
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):  # int | str: a quantity
        (text,) = [a for a in get_args(annotation) if a is not int]
        facts["x-kubernetes-int-or-string"] = True
        return facts | _expected(text, [], {}) | {"type": None}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        facts |= {"type": "string", "enum": [m.value for m in annotation]}
    elif origin is Literal:
        facts |= {"type": "string", "enum": list(get_args(annotation))}
    elif origin is list:
        facts["type"] = "array"
    elif origin is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        facts["type"] = "object"
    elif annotation is datetime.datetime:
        facts |= {"type": "string", "format": "date-time"}
    else:
        facts["type"] = {bool: "boolean", int: "integer", float: "number", str: "string"}[
            annotation
        ]
    lengths = ("minItems", "maxItems") if origin is list else ("minLength", "maxLength")
    for item in metadata:
        if isinstance(item, StringConstraints):
            facts |= {
                k: v
                for k, v in (
                    ("minLength", item.min_length),
                    ("maxLength", item.max_length),
                    ("pattern", item.pattern),
                )
                if v is not None
            }
        elif isinstance(item, annotated_types.Ge):
            facts["minimum"] = item.ge
        elif isinstance(item, annotated_types.Gt):
            facts |= {"minimum": item.gt, "exclusiveMinimum": True}
        elif isinstance(item, annotated_types.Le):
            facts["maximum"] = item.le
        elif isinstance(item, annotated_types.Lt):
            facts |= {"maximum": item.lt, "exclusiveMaximum": True}
        elif isinstance(item, annotated_types.MinLen):
            facts[lengths[0]] = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            facts[lengths[1]] = item.max_length
        elif getattr(item, "pattern", None) is not None:
            facts["pattern"] = item.pattern
    if "enum" in extra:
        facts["enum"] = extra["enum"]
    return facts


def _disagreements(model: type[BaseModel], node: dict[str, Any], path: str) -> Iterator[str]:
    fields = {f.alias or n: f for n, f in model.model_fields.items()}
    if set(fields) != set(node.get("properties", {})):
        yield f"{path}: fields {sorted(fields)} != CRD {sorted(node.get('properties', {}))}"
        return
    required = sorted(a for a, f in fields.items() if f.is_required())
    if required != sorted(node.get("required", [])):
        yield f"{path}: required {required} != CRD {sorted(node.get('required', []))}"
    for alias, field in fields.items():
        yield from _field_disagreements(field, node["properties"][alias], f"{path}.{alias}")


def _field_disagreements(field: FieldInfo, node: dict[str, Any], path: str) -> Iterator[str]:
    if field.description and node.get("description") != field.description.replace("``", "`"):
        yield f"{path}: description differs from the model's"
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    yield from _value_disagreements(field.annotation, list(field.metadata), extra, node, path)
    if not field.is_required():
        wanted = _json(field.get_default(call_default_factory=True))
        # What the API server stores for a missing field: its default, filled in field by field.
        stored = apiserver.default(node, node["default"]) if "default" in node else None
        if stored != wanted:
            yield f"{path}: default {stored!r} != the model's {wanted!r}"


def _value_disagreements(
    annotation: Any, metadata: list[Any], extra: dict[str, Any], node: dict[str, Any], path: str
) -> Iterator[str]:
    facts = _expected(annotation, metadata, extra)
    facts = {k: v for k, v in facts.items() if v is not None}
    actual = {k: node[k] for k in _FACTS if k in node}
    if facts != actual:
        yield f"{path}: model says {facts}, CRD says {actual}"
    inner, _ = _unwrap(annotation)
    if get_origin(inner) is list:
        (item,) = get_args(inner)
        yield from _value_disagreements(item, [], {}, node["items"], f"{path}[*]")
    elif get_origin(inner) is dict:
        _, value = get_args(inner)
        yield from _value_disagreements(value, [], {}, node["additionalProperties"], f"{path}.*")
    elif isinstance(inner, type) and issubclass(inner, BaseModel):
        yield from _disagreements(inner, node, path)


def _json(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(value, list):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value


@pytest.mark.parametrize(
    ("name", "model"), [("spec", EmbeddingMigrationSpec), ("status", EmbeddingMigrationStatus)]
)
def test_crd_and_model_agree_field_by_field(name: str, model: type[BaseModel]) -> None:
    assert list(_disagreements(model, SCHEMA["properties"][name], name)) == []


def test_a_hand_edit_of_the_crd_is_a_disagreement() -> None:
    node = yaml.safe_load(yaml.safe_dump(SCHEMA["properties"]["spec"]))
    rollout = node["properties"]["rollout"]["properties"]
    rollout["maxPercentage"]["maximum"] = 150
    rollout["steps"]["default"][0]["percentage"] = 5
    rollout["stickyKey"]["pattern"] = ".*"
    del node["properties"]["cleanup"]["properties"]["dropSource"]
    found = "\n".join(_disagreements(EmbeddingMigrationSpec, node, "spec"))
    for path in ("maxPercentage", "steps: default", "stickyKey", "spec.cleanup: fields"):
        assert path in found


def test_metric_enum_is_the_contract() -> None:
    items = SCHEMA["properties"]["spec"]["properties"]["analysis"]["properties"]
    for kind in ("successCriteria", "rollbackThresholds"):
        assert items[kind]["items"]["properties"]["metric"]["enum"] == list(METRICS)


def test_api_server_defaults_give_the_models_defaults() -> None:
    # A minimal manifest as the API server stores it (defaults filled in by the CRD) parses to
    # the same spec as the minimal manifest itself: the operator sees what kubectl shows.
    stored = apiserver.default(SCHEMA, minimal())
    assert stored["spec"]["rollout"]["steps"][0] == {"percentage": 10, "minDuration": "72h"}
    assert stored["spec"]["analysis"]["interval"] == "30s"
    assert parse_migration(stored, where="x").spec == parse_migration(minimal(), where="x").spec


# ---- CEL rules, offline ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", CEL_BAD, ids=[b.id for b in CEL_BAD])
def test_cel_rule_refuses(bad: Bad) -> None:
    manifest = bad.manifest()
    found = apiserver.refusals(SCHEMA, apiserver.default(SCHEMA, manifest))
    assert [(r.path, bad.fragment in r.message) for r in found] == [(bad.path, True)], found
    # The model refuses it too: the rule and the Python check say the same.
    with pytest.raises(ConfigError):
        parse_migration(manifest, where="x")


@pytest.mark.parametrize(("name", "manifest"), CEL_GOOD, ids=[g[0] for g in CEL_GOOD])
def test_cel_rules_accept(name: str, manifest: Callable[[], dict[str, Any]]) -> None:
    assert apiserver.refusals(SCHEMA, apiserver.default(SCHEMA, manifest())) == []
    parse_migration(manifest(), where=name)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_pass_every_rule(path: Any) -> None:
    manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert apiserver.refusals(SCHEMA, manifest) == []
    assert apiserver.refusals(SCHEMA, apiserver.default(SCHEMA, manifest)) == []


def test_every_rule_has_a_manifest_it_refuses() -> None:
    # By rule: one model's rule sits at each place the model is used (source and target).
    refused = set()
    for bad in CEL_BAD:
        for r in apiserver.refusals(SCHEMA, apiserver.default(SCHEMA, bad.manifest())):
            refused.add(r.rule)
    assert {rule for _, rule in apiserver.rules(SCHEMA)} - refused == set()


def test_rules_are_evaluated_not_assumed() -> None:
    # A rule that cannot be evaluated (here: standard CEL has no isSorted()) is a refusal with
    # the error, as the API server reports it; a test passing on it would pass on anything.
    schema = {
        "type": "array",
        "x-kubernetes-validations": [{"rule": "self.isSorted()", "message": "m"}],
    }
    (refusal,) = apiserver.refusals(schema, [1, 2])
    assert refusal.message.startswith("rule evaluation error")
