"""What the Kubernetes API server does with an object of a CRD before storing it, offline.

Two steps of the API server, as far as the CRD's schema decides them: structural defaulting
(a missing field with a ``default`` gets it, then its own fields' defaults, top-down) and the
CEL rules (``x-kubernetes-validations``, ``self`` bound to the value at the rule's node),
evaluated with cel-python, a standard CEL implementation. Kubernetes-only CEL functions are not
available here, which is the point: the CRD must use standard CEL only.

A fast pre-check, not the proof: it knows neither Kubernetes' CEL cost limits nor its schema
messages. test_crd_on_apiserver.py sends the same manifests to a real kube-apiserver, and
checks there that its defaulting is this module's.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import celpy
from celpy.adapter import json_to_cel
from celpy.celtypes import BoolType
from celpy.evaluation import CELEvalError


@dataclass(frozen=True)
class Refusal:
    """One rule that refused: where (as the API server names it), which rule, and its message."""

    path: str  # the value's path, plus the rule's fieldPath: spec.target.dimensions
    schema_path: str  # the rule's node in the schema, items as [*]: spec.analysis...[*]
    rule: str
    message: str


def default(schema: dict[str, Any], value: Any) -> Any:
    """``value`` with the schema's defaults filled in, as the API server stores it. Pure."""
    value = copy.deepcopy(value)
    _default(schema, value)
    return value


def _default(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        for name, prop in schema.get("properties", {}).items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
        for name, item in value.items():
            if name in schema.get("properties", {}):
                _default(schema["properties"][name], item)
            elif isinstance(schema.get("additionalProperties"), dict):
                _default(schema["additionalProperties"], item)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _default(schema["items"], item)


def refusals(schema: dict[str, Any], value: Any, path: str = "") -> list[Refusal]:
    """Every CEL rule of ``schema`` that refuses ``value`` (or fails to evaluate on it)."""
    return list(_refusals(schema, value, path, path))


def _refusals(schema: dict[str, Any], value: Any, path: str, schema_path: str) -> Iterator[Refusal]:
    for entry in schema.get("x-kubernetes-validations", []):
        verdict = evaluate(entry["rule"], value)
        if verdict is not True:
            where = path + entry.get("fieldPath", "")
            message = entry["message"] if verdict is False else f"rule evaluation error: {verdict}"
            yield Refusal(where, schema_path, entry["rule"], message)
    if isinstance(value, dict):
        for name, item in value.items():
            if name in schema.get("properties", {}):
                prop, sub = schema["properties"][name], f"{path}.{name}".lstrip(".")
                yield from _refusals(prop, item, sub, f"{schema_path}.{name}".lstrip("."))
            elif isinstance(schema.get("additionalProperties"), dict):
                sub = f"{path}.{name}".lstrip(".")
                yield from _refusals(
                    schema["additionalProperties"], item, sub, f"{schema_path}.*".lstrip(".")
                )
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from _refusals(schema["items"], item, f"{path}[{i}]", f"{schema_path}[*]")


def rules(schema: dict[str, Any], schema_path: str = "") -> Iterator[tuple[str, str]]:
    """``(schema_path, rule)`` for every CEL rule in ``schema``, in the form Refusal names them."""
    for entry in schema.get("x-kubernetes-validations", []):
        yield schema_path, entry["rule"]
    for name, prop in schema.get("properties", {}).items():
        yield from rules(prop, f"{schema_path}.{name}".lstrip("."))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from rules(schema["additionalProperties"], f"{schema_path}.*".lstrip("."))
    if "items" in schema:
        yield from rules(schema["items"], f"{schema_path}[*]")


def evaluate(rule: str, value: Any) -> bool | str:
    """True or False as the rule decides, or the error text when it cannot be evaluated."""
    try:
        result = _program(rule).evaluate({"self": json_to_cel(value)})
    except CELEvalError as exc:
        return str(exc)
    if isinstance(result, CELEvalError):
        return str(result)
    if not isinstance(result, BoolType):
        return f"the rule gave {result!r}, not a bool"
    return bool(result)


@functools.cache
def _program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule))
