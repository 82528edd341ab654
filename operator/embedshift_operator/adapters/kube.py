"""Jobs and the follower as Kubernetes objects: the kopf operator's runner.

The same role as :mod:`.subprocess_jobs` for ``embedshift rollout run``, over another backend:
``RunJob`` becomes a batch/v1 Job, ``EnsureFollower`` a one-replica apps/v1 Deployment, both
owned by the ``EmbeddingMigration`` (deleted with it) and named deterministically
(:mod:`embedshift_operator.core.jobs`), so creating one that exists is success.

The container runs ``embedshift <args> --config /etc/embedshift/migration.yaml --migration
NS/NAME``. ``--config`` reads a file (``rag_service.spec.load_resource``), so the data-plane spec
is rendered into a ConfigMap the adapter also creates (owned by the resource, named by a digest
of its content) and mounted read-only; an env var would need a second way into the CLI. The
ConfigMap holds Secret *references* only: the database URL and the API keys reach the container
as ``secretKeyRef`` env, never as values.

Pure builders (:func:`job_manifest`, :func:`follower_manifest`, :func:`config_map_manifest`)
return plain dicts; :class:`KubeJobs` sends them through the official client (synchronous, so
each call runs in :func:`asyncio.to_thread`). :class:`KubeJobs` creates nothing for a spec whose
image or providers' ``baseURL`` the operator's allowlist refuses
(:func:`embedshift_operator.core.allowlist.job_refusals`): the handlers hold such a spec before
asking, and this is the last word where the Job would be created.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol, Self, TypeVar

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException, OpenApiException
from urllib3.exceptions import HTTPError

from embedshift_operator.core.allowlist import Allowlist, job_refusals
from embedshift_operator.core.jobs import MAX_NAME, config_name
from embedshift_operator.core.model import EnsureFollower, JobObservation, RunJob
from embedshift_operator.resource import (
    GROUP,
    PLURAL,
    VERSION,
    EmbeddingMigration,
    EmbeddingMigrationStatus,
    JobState,
    parse_migration,
)
from rag_service.errors import PERMANENT_EXIT_CODES, ConfigError, EmbedshiftError
from rag_service.spec import SecretKeyRef

__all__ = [
    "CONFIG_DIR",
    "CONFIG_PATH",
    "ClusterError",
    "KubeJobs",
    "config_map_manifest",
    "follower_manifest",
    "job_manifest",
    "label_selector",
    "migration_labels",
    "patch_spec",
    "patch_status",
    "read_migration",
    "read_secret",
]

CONFIG_DIR = "/etc/embedshift"
CONFIG_FILE = "migration.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"

APP = "embedshift"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MIGRATION = "embedshift.io/migration"
LABEL_KIND = "embedshift.io/kind"
LABEL_FOLLOWER = "embedshift.io/follower"
COMPONENT_JOB = "migrate-job"
COMPONENT_FOLLOWER = "follower"
COMPONENT_CONFIG = "config"

BACKOFF_LIMIT = 2  # as the local runner's retries
ACTIVE_DEADLINE_SECONDS = 24 * 3600  # a backfill of millions of rows takes hours, not days
# A finished Job stays a week (its logs readable, `kubectl get jobs` tells the story); the core
# keeps each Job's outcome in status, so the Job's disappearance afterwards changes nothing.
TTL_SECONDS_AFTER_FINISHED = 7 * 24 * 3600
RUN_AS_USER = 65532  # the distroless "nonroot" uid; the image need not define a user by name
CONTAINER = "embedshift"
# The Job controller's message when a FailJob rule matched (kubernetes pkg/controller/job):
# "Container embedshift for pod rag/docs-verify-x-abcde failed with exit code 3 matching FailJob
# rule at index 0".
_POLICY_MESSAGE = re.compile(
    r"for pod (?P<ns>[^/\s]+)/(?P<pod>\S+) failed with exit code (?P<code>\d+)"
)
POLICY_REASON = "PodFailurePolicy"  # the Job condition's reason when a FailJob rule matched
CLI_ERROR = "embedshift: error:"

_T = TypeVar("_T")


class _Model(Protocol):
    """A model of the client (``V1Job``, ...): each builds itself from its manifest's dict."""

    @classmethod
    def from_dict(cls, obj: dict[str, Any] | None) -> Self | None: ...


_M = TypeVar("_M", bound=_Model)


class ClusterError(EmbedshiftError):
    """The Kubernetes API refused a call or could not be reached (one line, no secrets).

    ``status`` is the HTTP status the API server answered (404, 403…), None when it was not
    reached: callers that explain the fix (the CLI) tell "not found" from "forbidden" by it.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# ---- pure builders ------------------------------------------------------------------------------


def label_value(value: str) -> str:
    """``value`` as a label value (≤ 63 characters; a long one is cut and a digest added)."""
    if len(value) <= MAX_NAME:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:6]
    return f"{value[: MAX_NAME - 7].rstrip('-.')}-{digest}"


def migration_labels(resource: EmbeddingMigration, component: str) -> dict[str, str]:
    return {
        LABEL_NAME: APP,
        LABEL_COMPONENT: component,
        LABEL_MIGRATION: label_value(resource.metadata.name),
    }


def owned_metadata(
    resource: EmbeddingMigration, name: str, labels: Mapping[str, str]
) -> dict[str, Any]:
    """An object's metadata in the resource's namespace, owned by it (deleted with it). Pure."""
    return {
        "name": name,
        "namespace": resource.metadata.namespace,
        "labels": dict(labels),
        "ownerReferences": [owner_reference(resource)],
    }


def owner_reference(resource: EmbeddingMigration) -> dict[str, Any]:
    """The resource as the controller owner: its objects go when it goes."""
    uid = resource.metadata.uid
    if not uid:
        raise ConfigError(
            f"{resource.key}: the resource has no metadata.uid; read it from the API server"
        )
    return {
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "name": resource.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _config_document(resource: EmbeddingMigration) -> str:
    """The manifest ``embedshift migrate --config`` reads: the data-plane spec, references only."""
    document = {
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": {"name": resource.metadata.name, "namespace": resource.metadata.namespace},
        "spec": resource.spec.data_plane.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    return yaml.safe_dump(document, sort_keys=True)


def _config_map_name(resource: EmbeddingMigration) -> str:
    digest = hashlib.sha256(_config_document(resource).encode()).hexdigest()
    return config_name(resource.metadata.name, digest=digest)


def config_map_manifest(resource: EmbeddingMigration) -> dict[str, Any]:
    """The ConfigMap holding ``migration.yaml`` for the Jobs and the follower."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owned_metadata(
            resource, _config_map_name(resource), migration_labels(resource, COMPONENT_CONFIG)
        ),
        "data": {CONFIG_FILE: _config_document(resource)},
    }


def _secret_env(name: str, ref: SecretKeyRef) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _env(resource: EmbeddingMigration) -> list[dict[str, Any]]:
    """DATABASE_URL and the API keys as secretKeyRef (the names ``rollout run`` gives children)."""
    spec = resource.spec
    ref = spec.database.url_secret_ref
    if ref is None:
        raise ConfigError(
            "spec.database.urlSecretRef: required on a cluster; name the Secret key holding "
            "the PostgreSQL URL, e.g. {name: rag-db, key: url}"
        )
    env = [_secret_env("DATABASE_URL", ref)]
    for role, model in (("TARGET", spec.target), ("SOURCE", spec.source)):
        if model is not None and model.api_key_secret_ref is not None:
            env.append(_secret_env(f"EMBEDSHIFT_{role}_API_KEY", model.api_key_secret_ref))
    # The root filesystem is read-only: caches and the home directory live on /tmp.
    env.append({"name": "HOME", "value": "/tmp"})  # noqa: S108
    env.append({"name": "PYTHONDONTWRITEBYTECODE", "value": "1"})
    return env


def _pod_spec(
    resource: EmbeddingMigration,
    args: tuple[str, ...],
    *,
    image: str,
    restart_policy: str,
) -> dict[str, Any]:
    resources = resource.spec.migration.resources
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "command": ["embedshift"],
        "args": [*args, "--config", CONFIG_PATH, "--migration", resource.key],
        "env": _env(resource),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # The CLI's last line (`embedshift: error: …`) becomes the Pod's termination message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if resources is not None:
        container["resources"] = resources.model_dump(mode="json", exclude_defaults=True)
    return {
        "restartPolicy": restart_policy,
        "automountServiceAccountToken": False,  # the Jobs never call the Kubernetes API
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": _config_map_name(resource)}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }


def _image(resource: EmbeddingMigration, operator_image: str | None) -> str:
    image = resource.spec.migration.image or operator_image
    if not image:
        raise ConfigError(
            "spec.migration.image: not set and the operator's own image is unknown; set it "
            "(or the operator's --operator-image, env EMBEDSHIFT_IMAGE)"
        )
    return image


def job_manifest(
    resource: EmbeddingMigration,
    action: RunJob,
    *,
    operator_image: str | None,
    image: str | None = None,
    active_deadline_seconds: int = ACTIVE_DEADLINE_SECONDS,
    ttl_seconds_after_finished: int = TTL_SECONDS_AFTER_FINISHED,
) -> dict[str, Any]:
    """The batch/v1 Job for ``action``. ``image`` overrides; else ``spec.migration.image``, else
    ``operator_image`` (the operator's own). Pure."""
    labels = {**migration_labels(resource, COMPONENT_JOB), LABEL_KIND: action.kind.value}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": owned_metadata(resource, action.name, labels),
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            "podFailurePolicy": pod_failure_policy(),
            "activeDeadlineSeconds": active_deadline_seconds,
            "ttlSecondsAfterFinished": ttl_seconds_after_finished,
            "template": {
                "metadata": {"labels": labels},
                "spec": _pod_spec(
                    resource,
                    action.args,
                    image=image or _image(resource, operator_image),
                    restart_policy="Never",
                ),
            },
        },
    }


def pod_failure_policy() -> dict[str, Any]:
    """Fail the Job at once on an exit code no retry mends; a node drain costs no retry. Pure.

    Rules match in order: the container's own verdict first, so a verification that failed while
    its node drained still fails the Job. Requires ``restartPolicy: Never``.
    """
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "In",
                    "values": sorted(PERMANENT_EXIT_CODES),
                },
            },
            # status: the server's default, written out so the stored Job equals the manifest.
            {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
        ]
    }


def follower_manifest(
    resource: EmbeddingMigration,
    action: EnsureFollower,
    *,
    operator_image: str | None,
    image: str | None = None,
) -> dict[str, Any]:
    """The one-replica apps/v1 Deployment running ``migrate follow``. Pure.

    Its selector includes its own name, so an old and a new follower never select each other's
    Pods while one replaces the other; ``Recreate`` keeps at most one Pod of each.
    """
    labels = {**migration_labels(resource, COMPONENT_FOLLOWER), LABEL_FOLLOWER: action.name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": owned_metadata(resource, action.name, labels),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": _pod_spec(
                    resource,
                    action.args,
                    image=image or _image(resource, operator_image),
                    restart_policy="Always",
                ),
            },
        },
    }


# ---- reading Job status -------------------------------------------------------------------------


def job_observation(job: client.V1Job, *, termination: str = "") -> JobObservation:
    """A Job's state from its status: the terminal conditions first, then the counters.

    ``termination``: the failed Pod's termination message (its log's tail), for a Job its
    ``podFailurePolicy`` failed; the message then says why once, with the CLI's own error line.
    """
    status = job.status
    if status is None:
        return JobObservation(state=JobState.RUNNING)  # created, no Pod yet: launched all the same
    conditions = {c.type: c for c in status.conditions or [] if c.status == "True"}
    for kind in ("Failed", "FailureTarget"):
        if kind in conditions:
            c = conditions[kind]
            if c.reason == POLICY_REASON:
                message = policy_failure_message(c.message or "", termination)
            else:
                message = ": ".join(p for p in (c.reason, c.message) if p) or "the Job failed"
            return JobObservation(state=JobState.FAILED, message=_one_line(message))
    if "Complete" in conditions or "SuccessCriteriaMet" in conditions or (status.succeeded or 0):
        return JobObservation(state=JobState.SUCCEEDED)
    if (status.failed or 0) > BACKOFF_LIMIT:
        return JobObservation(
            state=JobState.FAILED, message=f"failed {status.failed} times (backoffLimit reached)"
        )
    return JobObservation(state=JobState.RUNNING)


def policy_pod(job: client.V1Job) -> tuple[str, str] | None:
    """(namespace, name) of the Pod whose exit code failed ``job`` by its podFailurePolicy."""
    status = job.status
    for c in (status.conditions if status is not None else None) or []:
        if c.status == "True" and c.reason == POLICY_REASON:
            found = _POLICY_MESSAGE.search(c.message or "")
            if found:
                return found["ns"], found["pod"]
    return None


def policy_failure_message(condition: str, termination: str) -> str:
    """Why a Job failed by its podFailurePolicy, once: the CLI's error line (else what its exit
    code means) and the Pod and code, never "failed N times" (it ran once). Pure."""
    error = cli_error_line(termination)
    found = _POLICY_MESSAGE.search(condition)
    if found is None:  # another wording than the Job controller's of 1.31-1.36: keep it whole
        return "; ".join(p for p in (error, f"{POLICY_REASON}: {condition}") if p)
    code = int(found["code"])
    why = error or PERMANENT_EXIT_CODES.get(code, "a FailJob exit code")
    return f"{why} (pod {found['ns']}/{found['pod']} exited {code}, not retried)"


def cli_error_line(text: str) -> str:
    """The CLI's own error from a log's tail (``embedshift: error: …``, prefix removed), else its
    last non-empty line; "" for none. Pure."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(CLI_ERROR)]
    if errors:
        return errors[-1].removeprefix(CLI_ERROR).strip()
    return lines[-1] if lines else ""


def termination_message(pod: client.V1Pod) -> str:
    """The embedshift container's termination message (FallbackToLogsOnError: its log's tail)."""
    statuses = pod.status.container_statuses if pod.status is not None else None
    for container in statuses or []:
        if container.name != CONTAINER:
            continue
        for state in (container.state, container.last_state):
            terminated = state.terminated if state is not None else None
            if terminated is not None and terminated.message:
                return str(terminated.message)
    return ""


def as_model(model: type[_M], manifest: dict[str, Any]) -> _M:
    """A manifest as the client's model: the client validates it, as it does every body."""
    built = model.from_dict(manifest)
    assert built is not None  # only None for None
    return built


def _one_line(text: str, limit: int = 1000) -> str:
    return " ".join(text.split())[:limit]


def label_selector(labels: Mapping[str, str]) -> str:
    """``k=v,k2=v2``: the objects carrying all of ``labels``. Pure."""
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


# ---- the runner ---------------------------------------------------------------------------------


class KubeJobs:
    """Runs RunJob and EnsureFollower actions as Jobs and a Deployment in the resource's namespace.

    ``api`` is a configured :class:`kubernetes.client.ApiClient`; ``operator_image`` is the image
    used when ``spec.migration.image`` is not set (the operator's own); ``allowlist``: the
    operator's (default: any image, any host), checked before each Job or follower is created.
    """

    def __init__(
        self,
        api: client.ApiClient,
        *,
        operator_image: str | None,
        allowlist: Allowlist | None = None,
    ) -> None:
        self._core = client.CoreV1Api(api)
        self._batch = client.BatchV1Api(api)
        self._apps = client.AppsV1Api(api)
        self._operator_image = operator_image
        self._allowlist = allowlist or Allowlist.unrestricted()
        # A failed Job's Pod message by the Job's uid: read once, not on every tick for a week.
        self._terminations: dict[str, str] = {}

    async def observe(self, resource: EmbeddingMigration) -> dict[str, JobObservation]:
        """Every Job of this migration, by name: Running, Succeeded or Failed (with a message)."""
        ns = resource.metadata.namespace
        # Filtered by the API server: a namespace with many migrations (or other Jobs) must not
        # cost every tick a list, and a deserialisation, of all of them.
        selector = label_selector(migration_labels(resource, COMPONENT_JOB))
        jobs = await _call(
            f"list Jobs in {ns}",
            lambda: self._batch.list_namespaced_job(namespace=ns, label_selector=selector),
        )
        return {
            job.metadata.name: job_observation(job, termination=await self._termination(job))
            for job in jobs.items
            if job.metadata is not None and job.metadata.name
        }

    async def _termination(self, job: client.V1Job) -> str:
        """The termination message of the Pod that failed ``job`` by its podFailurePolicy; "" for
        another Job, or when the Pod cannot be read (gone, or no RBAC to get Pods): the Job's
        condition still says which exit code, and what it means."""
        where = policy_pod(job)
        if where is None:
            return ""
        meta = job.metadata
        key = str((meta.uid or meta.name) if meta is not None else where)
        if key not in self._terminations:
            ns, name = where
            try:
                pod = await _call(
                    f"get Pod {ns}/{name}", lambda: self._core.read_namespaced_pod(name, ns)
                )
            except ClusterError as exc:
                if exc.status not in (403, 404):  # unreachable now: ask again next tick
                    return ""
                self._terminations[key] = ""  # no RBAC to get Pods, or the Pod is gone
            else:
                self._terminations[key] = termination_message(pod)
        return self._terminations[key]

    async def run_job(self, resource: EmbeddingMigration, action: RunJob) -> bool:
        """Create the Job (and its ConfigMap). True when created; False when it already exists.
        ConfigError, creating nothing, when the allowlist refuses the spec's image or a host."""
        self._check_allowed(resource)
        manifest = job_manifest(resource, action, operator_image=self._operator_image)
        await self._ensure_config(resource)
        ns = resource.metadata.namespace
        body = as_model(client.V1Job, manifest)
        return await _create(
            f"create Job {ns}/{action.name}",
            lambda: self._batch.create_namespaced_job(namespace=ns, body=body),
        )

    async def ensure_follower(self, resource: EmbeddingMigration, action: EnsureFollower) -> bool:
        """Keep exactly one follower Deployment: delete this migration's followers under other
        names, create this one if missing. True when it was created. ConfigError, changing
        nothing, when the allowlist refuses the spec's image or a host."""
        self._check_allowed(resource)
        manifest = follower_manifest(resource, action, operator_image=self._operator_image)
        ns = resource.metadata.namespace
        selector = label_selector(migration_labels(resource, COMPONENT_FOLLOWER))
        listed = await _call(
            f"list Deployments in {ns}",
            lambda: self._apps.list_namespaced_deployment(namespace=ns, label_selector=selector),
        )
        present = False
        for deployment in listed.items:
            meta = deployment.metadata
            if meta is None or not meta.name:
                continue
            if meta.name == action.name:
                present = True
            else:
                await self._delete_deployment(ns, meta.name)
        if present:  # every tick asks; only the first one writes
            return False
        await self._ensure_config(resource)
        body = as_model(client.V1Deployment, manifest)
        return await _create(
            f"create Deployment {ns}/{action.name}",
            lambda: self._apps.create_namespaced_deployment(namespace=ns, body=body),
        )

    def _check_allowed(self, resource: EmbeddingMigration) -> None:
        found = job_refusals(resource.spec, self._allowlist, operator_image=self._operator_image)
        if found:
            raise ConfigError("; ".join(r.message for r in found))

    async def _delete_deployment(self, ns: str, name: str) -> None:
        def call() -> object:
            return self._apps.delete_namespaced_deployment(
                name=name, namespace=ns, propagation_policy="Foreground"
            )

        await _delete(f"delete Deployment {ns}/{name}", call)

    async def _ensure_config(self, resource: EmbeddingMigration) -> None:
        manifest = config_map_manifest(resource)
        ns = resource.metadata.namespace
        body = as_model(client.V1ConfigMap, manifest)
        await _create(
            f"create ConfigMap {ns}/{manifest['metadata']['name']}",
            lambda: self._core.create_namespaced_config_map(namespace=ns, body=body),
        )


# ---- the resource and its Secrets ---------------------------------------------------------------


async def read_migration(*, api: client.ApiClient, namespace: str, name: str) -> EmbeddingMigration:
    """The resource as the API server has it now (status included)."""
    objects = client.CustomObjectsApi(api)
    raw = await _call(
        f"get {PLURAL} {namespace}/{name}",
        lambda: objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name),
    )
    return parse_migration(raw, where=f"{PLURAL}/{namespace}/{name}")


async def read_secret(*, api: client.ApiClient, namespace: str, ref: SecretKeyRef) -> str:
    """One key of a Secret, decoded. ConfigError (never the value) when it cannot be read."""
    core = client.CoreV1Api(api)
    try:
        secret = await asyncio.to_thread(core.read_namespaced_secret, ref.name, namespace)
    except ApiException as exc:
        what = "not found" if exc.status == 404 else f"cannot be read ({exc.status} {exc.reason})"
        raise ConfigError(f"Secret {namespace}/{ref.name} {what}") from None
    except (HTTPError, OSError) as exc:
        raise ClusterError(
            f"kubernetes: read Secret {namespace}/{ref.name}: cannot reach the API server "
            f"({type(exc).__name__})"
        ) from None
    data = secret.data or {}
    if ref.key not in data:
        raise ConfigError(f"Secret {namespace}/{ref.name} has no key {ref.key!r}")
    try:
        return base64.b64decode(data[ref.key]).decode()
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"Secret {namespace}/{ref.name}: key {ref.key!r} is not text") from None


async def patch_status(
    *, api: client.ApiClient, namespace: str, name: str, status: EmbeddingMigrationStatus
) -> None:
    """Write ``status`` through the status subresource (a merge patch: null removes a field)."""
    body = {"status": status.model_dump(mode="json", by_alias=True)}
    objects = client.CustomObjectsApi(api)
    await _call(
        f"patch status of {PLURAL} {namespace}/{name}",
        lambda: objects.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, body
        ),
    )


async def patch_spec(
    *, api: client.ApiClient, namespace: str, name: str, spec: Mapping[str, Any]
) -> EmbeddingMigration:
    """A merge patch of ``spec`` (what ``kubectl patch --type=merge`` sends); the result."""
    objects = client.CustomObjectsApi(api)
    raw = await _call(
        f"patch {PLURAL} {namespace}/{name}",
        lambda: objects.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"spec": dict(spec)}
        ),
    )
    return parse_migration(raw, where=f"{PLURAL}/{namespace}/{name}")


# ---- calls and errors ---------------------------------------------------------------------------


async def _call(what: str, call: Callable[[], _T]) -> _T:
    """Run one blocking client call in a thread; failures become one-line ClusterErrors."""
    try:
        return await asyncio.to_thread(call)
    except ApiException as exc:
        raise ClusterError(f"kubernetes: {what}: {_api_message(exc)}", status=exc.status) from None
    except (HTTPError, OSError) as exc:
        raise ClusterError(
            f"kubernetes: {what}: cannot reach the API server ({type(exc).__name__})"
        ) from None
    except OpenApiException as exc:  # the client refused the body before sending it
        raise ClusterError(f"kubernetes: {what}: {_one_line(str(exc), 300)}") from None


async def _create(what: str, call: Callable[[], object]) -> bool:
    """Create; an object that already exists is success (False: nothing was created)."""
    try:
        await asyncio.to_thread(call)
    except ApiException as exc:
        if exc.status == 409:
            return False
        raise ClusterError(f"kubernetes: {what}: {_api_message(exc)}", status=exc.status) from None
    except (HTTPError, OSError) as exc:
        raise ClusterError(
            f"kubernetes: {what}: cannot reach the API server ({type(exc).__name__})"
        ) from None
    return True


async def _delete(what: str, call: Callable[[], object]) -> None:
    """Delete; an object already gone is success."""
    try:
        await asyncio.to_thread(call)
    except ApiException as exc:
        if exc.status == 404:
            return
        raise ClusterError(f"kubernetes: {what}: {_api_message(exc)}", status=exc.status) from None
    except (HTTPError, OSError) as exc:
        raise ClusterError(
            f"kubernetes: {what}: cannot reach the API server ({type(exc).__name__})"
        ) from None


def _api_message(exc: ApiException) -> str:
    """``403 Forbidden: jobs.batch is forbidden: …``: the Status' message, never the headers.

    Our objects carry Secret references only, so an echo of the request holds no secret value.
    """
    message = ""
    try:
        body = json.loads(exc.body or "")
        if isinstance(body, dict):
            message = str(body.get("message") or "")
    except ValueError:
        pass
    head = f"{exc.status} {exc.reason or ''}".strip()
    return _one_line(f"{head}: {message}" if message else head, 500)
