"""kmock's Kubernetes emulator with the metadata an API server assigns.

kmock 0.8 stores objects as plain JSON and merges patches into them; it sets no ``uid``,
``resourceVersion``, ``generation`` or ``creationTimestamp``, and takes no JSON-Patch. Clients
rely on these (kopf's finalizer patch tests ``resourceVersion``; owner references need the
owner's ``uid``), so :class:`ApiServerEmulator` adds them in the one hook every write passes
through, ``KubernetesEmulator._handle``, before kmock stores the object:

- create: ``name`` from ``generateName`` and a random suffix when no name is given (kopf's
  Events have none), ``uid`` (a UUID), ``resourceVersion`` (one counter for all objects, as etcd's
  revision), ``generation`` 1 and ``creationTimestamp``;
- patch: the next ``resourceVersion``; ``generation`` + 1 when ``spec`` changes (a patch of
  ``status`` or metadata leaves it), ``uid`` and ``creationTimestamp`` kept; a JSON-Patch
  (a list of operations, ``test`` included) is applied here and handed to kmock as the
  equivalent merge patch; a failed ``test`` is 422 Invalid, as on an API server;
- Namespaces: ``/api/v1/namespaces[/NAME]`` are the cluster-scoped Namespace objects (kmock
  0.8 reads the path as a namespace prefix with no resource and answers 500); kopf lists and
  watches them to serve ``--namespace``, so a test creates its namespace as a cluster has it.
- kopf's peering resources (``kopf.dev/v1`` ``kopfpeerings``, ``clusterkopfpeerings``) are
  known, so an operator with peering finds them; a test creates the peering object.
- Validation of EmbeddingMigrations as the CRD declares it: a create, or a patch that changes
  ``spec``, whose object (with the schema's defaults) breaks one of the CRD's CEL rules is 422
  Invalid with the rule's message, as an API server answers (evaluated with cel-python by
  :mod:`tests.operator.resource.apiserver`; the rest of the OpenAPI schema is not checked);
- Label selectors on a list (``?labelSelector=``), equality-based (``k=v``, ``k==v``, ``k!=v``,
  ``k``, ``!k``), as the operator sends them; set-based selectors (``k in (…)``) are refused
  with 400 rather than ignored, so a test cannot pass on an unfiltered list.

Every request for a resource is also recorded as :class:`ApiCall` (its RBAC verb, group,
resource and subresource, and the User-Agent that tells the operator from the tests' own
client) in ``calls``, and every create the emulator accepted in ``created``: what least
privilege is checked against (``api-calls.yaml``) and how a double create is counted.

Still not emulated (see issue 8): PUT, OpenAPI type checks, a separate ``/status``
subresource (a patch of ``.../status`` is a patch of the object; here it is cut to its
``status``), validation, garbage collection and the Job
controller. Tests complete Jobs by patching their status.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import uuid
from typing import Any

import jsonpatch
import kmock
import yaml
from kmock._internal import (
    parsing,  # kmock's path parser, corrected below for the Namespace objects
    rendering,  # the Request type of the hook kmock itself overrides
)

from embedshift_operator.crd import DEFAULT_PATH as CRD_PATH
from embedshift_operator.resource import API_VERSION, KIND
from tests.api_calls import ApiCall
from tests.operator.resource import apiserver

__all__ = ["CRD_RESOURCE", "PEERING_RESOURCES", "ApiCall", "ApiServerEmulator"]

# The EmbeddingMigration resource as discovery would show it (kmock's bundle holds builtins only).
CRD_RESOURCE = f"{API_VERSION}/embeddingmigrations"
_CRD_INFO = kmock.ResourceInfo(
    namespaced=True,
    kind="EmbeddingMigration",
    singular="embeddingmigration",
    shortnames={"em"},
    verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
    subresources={"status"},
)

# kopf's peering CRDs (kopf's docs ship them as peering.yaml), as discovery would show them.
_PEERING_VERBS = {"create", "delete", "get", "list", "patch", "update", "watch"}
PEERING_RESOURCES = {
    "kopf.dev/v1/kopfpeerings": kmock.ResourceInfo(
        namespaced=True, kind="KopfPeering", singular="kopfpeering", verbs=_PEERING_VERBS
    ),
    "kopf.dev/v1/clusterkopfpeerings": kmock.ResourceInfo(
        namespaced=False,
        kind="ClusterKopfPeering",
        singular="clusterkopfpeering",
        verbs=_PEERING_VERBS,
    ),
}

_kmock_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock's parser, but ``/api/v1/namespaces[/NAME]`` is the Namespace resource itself."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        name = parts[3] if len(parts) == 4 else None
        return parsing.ParsedPath(group="", version="v1", plural="namespaces", name=name)
    return _kmock_parse_path(path)


# kmock parses each request with the module's function (rendering.Request._parse), before any
# hook of the emulator runs; for every other path this is kmock's parser unchanged.
parsing.parse_path = _parse_path


def _crd_schema() -> dict[str, Any]:
    (version,) = yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _validate(obj: dict[str, Any], *, schema: dict[str, Any]) -> None:
    """422 Invalid when the CRD's CEL rules refuse ``obj``, in the API server's words."""
    found = apiserver.refusals(schema, apiserver.default(schema, obj))
    if found:
        name = obj.get("metadata", {}).get("name", "")
        causes = "; ".join(f"{r.path}: Invalid value: {r.message}" for r in found)
        raise kmock.KubernetesError(
            status=422,
            reason="Invalid",
            message=f'{KIND}.{API_VERSION.split("/")[0]} "{name}" is invalid: {causes}',
        )


# kmock's request log is cut back to half of this whenever it grows past it.
_REQUEST_LOG = 64


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """An equality-based label selector, as an API server reads it."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if any(word in term for word in (" in ", " notin ", "(")):
            raise kmock.KubernetesError(
                status=400, reason="BadRequest", message=f"set-based selector {term!r}"
            )
        if "!=" in term:
            key, value = (part.strip() for part in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (part.strip() for part in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _verb(request: rendering.Request) -> str:
    method = str(request.method.value).upper()
    if request.action == kmock.action.WATCH:
        return "watch"
    if method == "GET":
        return "get" if request.name else "list"
    if method == "DELETE":
        return "delete" if request.name else "deletecollection"
    return {"POST": "create", "PATCH": "patch", "PUT": "update"}.get(method, method.lower())


def _api_call(request: rendering.Request) -> ApiCall | None:
    """``request`` as RBAC sees it; None for discovery (``/api``, ``/apis/...``: no resource)."""
    resource = request.resource
    if resource is None or resource.plural is None:
        return None
    name = request.name
    if name is None and isinstance(request.data, dict):
        name = (request.data.get("metadata") or {}).get("name")
    agent = next((v for k, v in request.headers.items() if k.lower() == "user-agent"), "")
    return ApiCall(
        verb=_verb(request),
        group=resource.group or "",
        resource=resource.plural,
        subresource=request.subresource,
        namespace=request.namespace,
        name=name,
        user_agent=agent,
    )


def _merge(base: Any, patch: Any) -> Any:
    """RFC 7386 merge patch (None removes a key), as kmock applies it."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


def _merge_patch(old: Any, new: Any) -> Any:
    """The merge patch turning ``old`` into ``new`` (lists are replaced whole)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif old[key] != value:
            patch[key] = _merge_patch(old[key], value)
    return patch


class ApiServerEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus uid, resourceVersion, generation and creationTimestamp."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._revisions = itertools.count(1)
        self.resources.load_bundled()
        self.resources[CRD_RESOURCE] = _CRD_INFO
        for resource, info in PEERING_RESOURCES.items():
            self.resources[resource] = info
        self.calls: list[ApiCall] = []
        self.created: list[ApiCall] = []
        self._crd_schema = _crd_schema()
        self._crd_resource = next(r for r in self.resources if r == CRD_RESOURCE)

    async def _handle(self, request: rendering.Request) -> Any:
        self._forget_old_requests()
        if request.resource is not None and request.action is not None:
            async with self._lock:
                self._stamp(request)
        call = _api_call(request)  # after the stamp: a generated name is known
        if call is not None:
            self.calls.append(call)
        response = await super()._handle(request)
        # A create kmock refused (409 AlreadyExists) or a test's reaction failed raised above.
        if call is not None and call.verb == "create":
            self.created.append(call)
        return response

    def _forget_old_requests(self) -> None:
        """Keep kmock's request log short. kmock keeps every request, and matching a new one
        against a reaction walks the whole log: an operator ticking for minutes made every
        request cost more than the last (the API server, not the operator, was the bottleneck).
        Tests assert on ``calls`` and ``created`` (ours, kept whole), never on kmock's log."""
        if len(self._requests) > _REQUEST_LOG:
            del self._requests[: -_REQUEST_LOG // 2]
            for payload in self._payloads:
                del payload._requests[: -_REQUEST_LOG // 2]

    async def _serve_list(self, request: rendering.Request) -> Any:
        listed = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector and isinstance(listed, dict):
            listed["items"] = [
                item
                for item in listed["items"]
                if _selector_matches(selector, item.get("metadata", {}).get("labels") or {})
            ]
        return listed

    def _stamp(self, request: rendering.Request) -> None:
        action = request.action
        if action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
            meta["uid"] = str(uuid.uuid4())
            meta["resourceVersion"] = str(next(self._revisions))
            meta["generation"] = 1
            meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            )
            meta.pop("deletionTimestamp", None)
            if request.resource == self._crd_resource:
                _validate(request.data, schema=self._crd_schema)
            return
        if action != kmock.action.UPDATE or request.name is None or request.resource is None:
            return
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return  # kmock answers 404
        old = copy.deepcopy(self.objects[key].raw)
        if request.subresource == "status" and isinstance(request.data, dict):
            # The status subresource takes status only, as an API server does (kmock merges
            # whatever a patch of .../status carries into the object).
            object.__setattr__(request, "data", {"status": request.data.get("status")})
        if isinstance(request.data, list):  # JSON-Patch
            try:
                new = jsonpatch.apply_patch(old, request.data)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise kmock.KubernetesError(
                    status=422, reason="Invalid", message=f"the JSON patch failed: {exc}"
                ) from None
            patch = _merge_patch(old, new)
            # The request is frozen; kmock reads .data when it stores the patch.
            object.__setattr__(request, "data", patch)
        elif isinstance(request.data, dict):
            new = _merge(old, request.data)
            patch = request.data
        else:
            return
        meta = patch.setdefault("metadata", {}) or {}
        patch["metadata"] = meta
        meta["resourceVersion"] = str(next(self._revisions))
        meta["uid"] = old.get("metadata", {}).get("uid")
        meta["creationTimestamp"] = old.get("metadata", {}).get("creationTimestamp")
        generation = old.get("metadata", {}).get("generation") or 1
        changed = old.get("spec") != new.get("spec")
        if changed and request.resource == self._crd_resource:
            _validate(new, schema=self._crd_schema)
        meta["generation"] = generation + 1 if changed else generation
