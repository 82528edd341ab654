"""The operator's Kubernetes API calls, for least privilege: what ``api-calls.yaml`` lists.

The emulator records every request (:class:`~tests.operator.kube.emulator.ApiCall`); the
operator's are told from the tests' own by User-Agent: kopf sends ``kopf/<version>``, the
operator's kubernetes client ``embedshift-operator/<version>`` (``handlers._api``), the tests'
client the library's default. :class:`Collector` gathers the operator's calls of every kube test
in the session as :class:`Permission` (what an RBAC rule grants: verb, API group, resource,
subresource), and ``test_api_calls.py``, run last, compares them with the file.

Which runs count as "the whole kube suite" (only then must every listed entry have been used) is
decided here too: every kube test module collected, none of its tests deselected (``-k``, ``-m``,
``--deselect``, ``--lf``), none picked by node id, and every one passed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.operator.kube.emulator import ApiCall

__all__ = [
    "API_CALLS",
    "CHECK_TEST",
    "RECORD_ENV",
    "Collector",
    "Permission",
    "collector",
    "in_kube_suite",
    "is_operator",
    "load",
    "write",
]

KUBE_DIR = Path(__file__).parent
API_CALLS = KUBE_DIR / "api-calls.yaml"
RECORD_ENV = "EMBEDSHIFT_RECORD_API_CALLS"
CHECK_TEST = "test_api_calls.py"
OPERATOR_AGENTS = ("kopf/", "embedshift-operator/")

_HEADER = f"""\
# Every Kubernetes API call the operator makes, as RBAC names it: one entry per (verb, API group,
# resource, subresource); group "" is the core group. The Helm chart's RBAC is compared with it.
#
# Produced by the kube tests, not by hand: the API-server emulator (tests/operator/kube/emulator.py)
# records every request, and the operator's are those whose User-Agent is kopf's (kopf/...) or the
# operator's kubernetes client's (embedshift-operator/...). tests/operator/kube/{CHECK_TEST}
# fails when the operator makes a call missing here, or (after the whole kube suite) when an entry
# is no longer used. Regenerate with:
#
#   {RECORD_ENV}=1 .venv/bin/pytest tests/operator/kube
#
# The tests run the operator with --all-namespaces (list and watch cluster-wide) and, as
# `embedshift operator run --namespace`, with kopf peering (namespaces and kopfpeerings).
"""


@dataclass(frozen=True, order=True)
class Permission:
    """What one RBAC rule entry grants (field order is the file's sort order)."""

    group: str
    resource: str
    subresource: str
    verb: str

    @classmethod
    def of(cls, call: ApiCall) -> Permission:
        return cls(
            group=call.group,
            resource=call.resource,
            subresource=call.subresource or "",
            verb=call.verb,
        )

    def as_entry(self) -> dict[str, str]:
        entry = {"verb": self.verb, "group": self.group, "resource": self.resource}
        if self.subresource:
            entry["subresource"] = self.subresource
        return entry

    def __str__(self) -> str:
        where = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return f"{self.verb} {where}.{self.group or 'core'}"


def is_operator(call: ApiCall) -> bool:
    return call.user_agent.startswith(OPERATOR_AGENTS)


def load(path: Path = API_CALLS) -> list[Permission]:
    """The file's entries, in the file's order (an absent file lists nothing)."""
    if not path.exists():
        return []
    entries: list[dict[str, Any]] = yaml.safe_load(path.read_text()) or []
    return [
        Permission(
            group=str(e["group"]),
            resource=str(e["resource"]),
            subresource=str(e.get("subresource", "")),
            verb=str(e["verb"]),
        )
        for e in entries
    ]


def write(permissions: Iterable[Permission], path: Path = API_CALLS) -> None:
    entries = [p.as_entry() for p in sorted(set(permissions))]
    body = yaml.safe_dump(entries, sort_keys=False, default_flow_style=None, width=100)
    path.write_text(_HEADER + body)


@dataclass
class Collector:
    """The session's record: the operator's permissions used, and what ran of the kube suite."""

    used: set[Permission] = field(default_factory=set)
    items: list[str] = field(default_factory=list)  # kube tests collected (node ids)
    passed: set[str] = field(default_factory=set)  # their call phase passed
    failed: set[str] = field(default_factory=set)  # failed in any phase
    deselected: bool = False
    by_node_id: bool = False

    def add(self, calls: Iterable[ApiCall]) -> None:
        self.used.update(Permission.of(c) for c in calls if is_operator(c))

    def whole_suite_ran(self, *, before: str) -> bool:
        """Whether every kube test ran and passed before the check ``before`` (a node id)."""
        modules = {node.split("::", 1)[0].rsplit("/", 1)[-1] for node in self.items}
        every_module = {p.name for p in KUBE_DIR.glob("test_*.py")} <= modules
        others = [node for node in self.items if node != before]
        return (
            every_module
            and not self.deselected
            and not self.by_node_id
            and all(node in self.passed and node not in self.failed for node in others)
        )


_KEY = pytest.StashKey[Collector]()


def collector(config: pytest.Config) -> Collector:
    """The session's one collector (created on first use)."""
    if _KEY not in config.stash:
        config.stash[_KEY] = Collector()
    return config.stash[_KEY]


def in_kube_suite(config: pytest.Config, nodeid: str) -> bool:
    """Whether ``nodeid`` is a test of this directory (node ids are relative to the rootdir)."""
    return nodeid.startswith(KUBE_DIR.relative_to(config.rootpath).as_posix() + "/")
