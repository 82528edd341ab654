"""The operator's Kubernetes API calls, for least privilege: what ``api-calls.yaml`` lists.

Where the calls come from
    The real API server: the cluster suite (``tests/cluster``) runs the Helm chart's operator as
    the Pods of its Deployments, and every request a Pod makes passes the test node's recorder
    (:mod:`tests.api_recorder`), which notes the Pod, the request and the real server's answer.
    The calls of the chart's operator Pods, in namespaced and in all-namespaces mode, are what
    ``api-calls.yaml`` lists (:func:`rbac_call` names each as RBAC does, like the API server's
    own RequestInfo). ``tests/cluster/test_api_calls.py``, run after the cluster suite, fails
    when the operator made a call the file does not list, or (after the whole cluster suite)
    when the file lists one it no longer makes; ``EMBEDSHIFT_RECORD_API_CALLS=1`` rewrites it.

    The kmock emulator of ``tests/operator/kube`` records its calls too (same :class:`ApiCall`,
    the operator's told from the tests' by User-Agent: kopf sends ``kopf/<version>``, the
    operator's kubernetes client ``embedshift-operator/<version>``): there the check is only
    that each call is listed, since what the real server saw is the record.

Which runs count as "the whole suite" (only then must every listed entry have been used) is
decided here too: every test module of the directory collected, none of its tests deselected
(``-k``, ``-m``, ``--deselect``, ``--lf``), none picked by node id, and every one passed.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

from tests.api_recorder import Request

__all__ = [
    "API_CALLS",
    "CHECK_TEST",
    "CLUSTER_SUITE",
    "RECORD_ENV",
    "ApiCall",
    "Collector",
    "Permission",
    "PodRequest",
    "collector",
    "is_operator",
    "load",
    "rbac_call",
    "record_operator_calls",
    "write",
]

TESTS = Path(__file__).parent
CLUSTER_SUITE = TESTS / "cluster"
API_CALLS = CLUSTER_SUITE / "api-calls.yaml"
RECORD_ENV = "EMBEDSHIFT_RECORD_API_CALLS"
CHECK_TEST = "test_api_calls.py"
OPERATOR_AGENTS = ("kopf/", "embedshift-operator/")

_HEADER = f"""\
# Every Kubernetes API call the operator makes, as RBAC names it: one entry per (verb, API group,
# resource, subresource); group "" is the core group. The Helm chart's RBAC is compared with it
# (tests/chart/test_rbac.py).
#
# Produced by the cluster tests on a real kube-apiserver, not by hand: the chart's operator runs
# as the Pods of its Deployments (tests/cluster/test_chart_story.py in namespaced mode with a
# standby, tests/cluster/test_chart_all_namespaces.py in all-namespaces mode), and every request a
# Pod makes passes the test node's recorder (tests/api_recorder.py) on its way to the real server.
# tests/cluster/{CHECK_TEST} fails when the operator makes a call missing here, or (after the whole
# cluster suite) when an entry is no longer used. Regenerate with:
#
#   {RECORD_ENV}=1 .venv/bin/pytest tests/cluster
"""


@dataclass(frozen=True)
class ApiCall:
    """One request for a resource, as RBAC names it (``verb`` is RBAC's, not HTTP's)."""

    verb: str  # get list watch create patch update delete deletecollection
    group: str  # "" for the core group
    resource: str
    subresource: str | None
    namespace: str | None
    name: str | None  # for a create, None: the name is in the body
    user_agent: str


def rbac_call(method: str, target: str, user_agent: str = "") -> ApiCall | None:
    """An HTTP request (``target``: path and query) as the API server's RequestInfo names it;
    None for a non-resource URL (discovery, ``/version``, ``/openapi``). Pure."""
    split = urlsplit(target)
    parts = [unquote(p) for p in split.path.strip("/").split("/") if p]
    query = parse_qs(split.query)
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    watch = False
    if rest[:1] == ["watch"]:  # the deprecated /watch/ paths
        watch, rest = True, rest[1:]
    if not rest:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:  # namespaces/NS/resource[...]
        namespace, rest = rest[1], rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else None
    subresource = rest[2] if len(rest) > 2 else None
    method = method.upper()
    watch = watch or query.get("watch", [""])[0] in ("1", "true")
    if watch:
        verb = "watch"
    elif method == "GET":
        verb = "get" if name else "list"
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update"}.get(method, method.lower())
    return ApiCall(
        verb=verb,
        group=group,
        resource=resource,
        subresource=subresource,
        namespace=namespace,
        name=name,
        user_agent=user_agent,
    )


@dataclass(frozen=True)
class PodRequest:
    """A request a Pod sent the API server (:meth:`tests.kubelet.PodRunner.api_requests`): which
    Pod, the request with the real server's status, and the call as RBAC names it (None for
    discovery)."""

    pod: str  # namespace/name/uid
    request: Request
    call: ApiCall | None


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
    """Whether the operator made ``call``, told by its User-Agent (kopf's or its own client's)."""
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
    """One suite's record (a test directory): the operator's permissions used, and what ran."""

    directory: Path
    used: set[Permission] = field(default_factory=set)
    items: list[str] = field(default_factory=list)  # the directory's tests collected (node ids)
    passed: set[str] = field(default_factory=set)  # their call phase passed
    failed: set[str] = field(default_factory=set)  # failed in any phase
    deselected: bool = False
    by_node_id: bool = False

    def add(self, calls: Iterable[ApiCall]) -> None:
        """Calls the operator made (the caller tells them from others')."""
        self.used.update(Permission.of(c) for c in calls)

    def whole_suite_ran(self, *, before: str) -> bool:
        """Whether every test of the directory ran and passed before the check ``before``."""
        modules = {node.split("::", 1)[0].rsplit("/", 1)[-1] for node in self.items}
        every_module = {p.name for p in self.directory.glob("test_*.py")} <= modules
        others = [node for node in self.items if node != before]
        return (
            every_module
            and not self.deselected
            and not self.by_node_id
            and all(node in self.passed and node not in self.failed for node in others)
        )

    def contains(self, config: pytest.Config, nodeid: str) -> bool:
        """Whether ``nodeid`` is a test of this directory (node ids are relative to rootdir)."""
        return nodeid.startswith(self.directory.relative_to(config.rootpath).as_posix() + "/")


_KEYS: dict[Path, pytest.StashKey[Collector]] = {}


def collector(config: pytest.Config, directory: Path) -> Collector:
    """The session's one collector for ``directory`` (created on first use)."""
    key = _KEYS.setdefault(directory, pytest.StashKey[Collector]())
    if key not in config.stash:
        config.stash[key] = Collector(directory=directory)
    return config.stash[key]


def record_operator_calls(config: pytest.Config, requests: Iterable[PodRequest]) -> None:
    """The requests of the chart's operator Pods, as the real server answered them, into the
    cluster suite's record. A refused one (401, 403) fails the test that made it happen."""
    requests = list(requests)
    refused = [r for r in requests if r.request.status in (401, 403)]
    assert not refused, f"the real API server refused the operator: {refused[:5]}"
    collector(config, CLUSTER_SUITE).add(r.call for r in requests if r.call is not None)


# ---- the conftest hooks of a directory whose check is its test_api_calls.py ------------------


def note_collection(config: pytest.Config, items: list[pytest.Item], directory: Path) -> None:
    """Note the directory's tests collected, and run its API-call check after every other."""
    record = collector(config, directory)
    record.items = [i.nodeid for i in items if record.contains(config, i.nodeid)]
    record.by_node_id = any("::" in arg for arg in config.args)
    check = directory.relative_to(config.rootpath).as_posix() + f"/{CHECK_TEST}"
    for item in [i for i in items if i.nodeid.split("::")[0] == check]:
        items.remove(item)
        items.append(item)


def note_deselected(items: list[pytest.Item], directory: Path) -> None:
    if items:
        record = collector(items[0].config, directory)
        if any(record.contains(i.config, i.nodeid) for i in items):
            record.deselected = True


def note_report(item: pytest.Item, report: pytest.TestReport, directory: Path) -> None:
    record = collector(item.config, directory)
    if not record.contains(item.config, report.nodeid):
        return
    if report.failed:
        record.failed.add(report.nodeid)
    elif report.when == "call" and report.passed:
        record.passed.add(report.nodeid)


Hooks = tuple[
    Callable[[pytest.Config, list[pytest.Item]], None],
    Callable[[list[pytest.Item]], None],
    Callable[..., Generator[None, pytest.TestReport, pytest.TestReport]],
]


def conftest_hooks(directory: Path) -> Hooks:
    """The three hooks a directory's conftest needs for its ``test_api_calls.py`` check:
    ``pytest_collection_modifyitems, pytest_deselected, pytest_runtest_makereport =
    conftest_hooks(HERE)``."""

    def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
        note_collection(config, items, directory)

    def pytest_deselected(items: list[pytest.Item]) -> None:
        note_deselected(items, directory)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        note_report(item, report, directory)
        return report

    return pytest_collection_modifyitems, pytest_deselected, pytest_runtest_makereport
