"""A test Pod runner: the kubelet's part, for a control plane that has none.

The real control plane of the suite (:mod:`tests.kube_cluster`) has every controller but no
scheduler and no kubelet, so the Pods its Job and ReplicaSet controllers create would stay
Pending. :class:`PodRunner` does what a kubelet on one node does, through the API only:

- registers a Node (``embedshift-test-node``) and keeps its Lease and Ready condition fresh, so
  the node lifecycle controller neither taints it nor evicts its Pods;
- binds each Pending Pod of the namespaces it serves to that Node (``pods/binding``, as the
  scheduler would), so deleting it is graceful, as on a cluster;
- runs the Pod's one container as a local process: its ``command`` (else the image's entrypoint,
  ``embedshift`` from this venv) and ``args`` with ``$(VAR)`` expanded, in an environment made
  of the Pod's ``env`` / ``envFrom`` only (values, Secrets, ConfigMaps, the downward API), its
  ConfigMap, Secret, projected and emptyDir volumes materialised in a directory of its own (a
  mount path in the command line or a literal ``env`` value is rewritten to that directory; a
  ``/tmp`` volume becomes ``TMPDIR``, so host paths under /tmp, like a database's socket,
  stay), and the ServiceAccount token volume the API server injects (a token requested for
  that ServiceAccount, bound to the Pod) mounted where in-cluster clients read it, with
  ``KUBERNETES_SERVICE_HOST/PORT`` set as a kubelet sets them: RBAC is Kubernetes' own;
- gives each Pod a network of its own (:mod:`tests.pod_network`: a network namespace, its own
  IP, the API server at ``10.0.0.1``), so Pods listen on the same ports without meeting; there
  the `kubernetes` Service is :class:`~tests.api_recorder.ApiRecorder`, which forwards each
  request to the real API server and records it with the server's answer
  (:meth:`PodRunner.api_requests`: what ``api-calls.yaml`` is generated from); the Pods trust
  its CA as their ServiceAccount's ``ca.crt``;
- reports through ``pods/status`` what a kubelet reports: Running with ``Ready`` (after the
  readiness probe passes, if the container has one), then the terminated state with exit code,
  reason and the termination message per ``terminationMessagePolicy``; restarts per
  ``restartPolicy`` (with a short back-off);
- on deletion (``deletionTimestamp``) sends SIGTERM, waits the grace period, sends SIGKILL, and
  deletes the Pod with grace period 0.

The Job controller then completes or fails Jobs by its own rules. Nothing here writes
``jobs/status``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client
from kubernetes import config as kubeconfig

from tests import pod_network
from tests.api_calls import PodRequest, rbac_call
from tests.api_recorder import ApiRecorder
from tests.pod_network import Forwarder, PodNetwork

NODE = "embedshift-test-node"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# The image's ENTRYPOINT (Dockerfile): `embedshift`, here the console script of this venv.
DEFAULT_ENTRYPOINT = (str(Path(sys.executable).with_name("embedshift")),)
# What the image's environment gives every container (Dockerfile ENV), not the test's own.
BASE_PATH = f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"
# A kubelet keeps the last 80 lines / 2048 bytes of the log as a FallbackToLogsOnError message.
MESSAGE_LINES, MESSAGE_BYTES = 80, 2048
RESTART_BACKOFF = (1.0, 2.0, 4.0, 8.0)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PodConfigError(Exception):
    """The Pod cannot start: a Secret or ConfigMap (or a key) it names is missing
    (a kubelet's ``CreateContainerConfigError``), or it asks for what the runner lacks."""


# ---- the API, over HTTP with the kubeconfig's credentials -----------------------------------


class Api:
    """A small JSON client of the API server, authenticated as the kubeconfig says."""

    def __init__(self, kubeconfig_path: str) -> None:
        configuration = client.Configuration()
        kubeconfig.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig_path, client_configuration=configuration
        )
        context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        if configuration.cert_file:
            context.load_cert_chain(configuration.cert_file, configuration.key_file)
        headers: dict[str, str] = {}
        # What the client itself would send (its auth settings know the key's name and prefix).
        settings: dict[str, Any] = dict(configuration.auth_settings())
        for setting in settings.values():
            if setting.get("in") == "header" and setting.get("value"):
                headers[str(setting["key"])] = str(setting["value"])
        self.server = str(configuration.host)
        self.ca_file = str(configuration.ssl_ca_cert)
        self.http = httpx.Client(
            base_url=self.server, verify=context, headers=headers, timeout=30.0
        )

    def close(self) -> None:
        self.http.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
        ok: Sequence[int] = (),
    ) -> Any:
        """The JSON answer, or None for a status listed in ``ok``; raises on any other error."""
        content = None if body is None else json.dumps(body)
        response = self.http.request(
            method,
            path,
            content=content,
            params=params,
            headers={"Content-Type": content_type} if content is not None else None,
        )
        if response.status_code in ok:
            return None
        if response.status_code >= 400:
            raise httpx.HTTPStatusError(
                f"{method} {path}: {response.status_code} {response.text[:500]}",
                request=response.request,
                response=response,
            )
        return response.json()

    def watch(self, path: str, resource_version: str) -> Iterator[dict[str, Any]]:
        params = {"watch": "1", "resourceVersion": resource_version, "timeoutSeconds": "30"}
        params["allowWatchBookmarks"] = "true"
        with self.http.stream("GET", path, params=params, timeout=60.0) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line:
                    yield json.loads(line)


# ---- one Pod ----------------------------------------------------------------------------------


def expand(value: str, env: Mapping[str, str]) -> str:
    """``$(VAR)`` as Kubernetes expands it in env values, command and args (``$$`` escapes;
    an unknown name stays as written). Pure."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", one, value)


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """The downward API's ``fieldRef.fieldPath`` of ``pod``. Pure."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName") or NODE,
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": status.get("podIP") or "127.0.0.1",
        "status.hostIP": status.get("hostIP") or "127.0.0.1",
    }
    if path in simple:
        return str(simple[path])
    labelled = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if labelled:
        return str((meta.get(labelled.group(1)) or {}).get(labelled.group(2), ""))
    raise PodConfigError(f"fieldRef {path!r} is not served by the test Pod runner")


@dataclass
class PodProcess:
    """One Pod on the runner's node: its directory, its process, what it reported."""

    runner: PodRunner
    pod: dict[str, Any]
    directory: Path
    deleting: threading.Event = field(default_factory=threading.Event)
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    last_state: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    thread: threading.Thread | None = None
    deleted: bool = False
    network: PodNetwork | None = None

    @property
    def ip(self) -> str:
        assert self.network is not None
        return self.network.ip

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def container(self) -> dict[str, Any]:
        containers: list[dict[str, Any]] = self.pod["spec"]["containers"]
        return containers[0]

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.container['name']}.log"

    # -- the container's configuration

    def _secret(self, name: str) -> dict[str, str] | None:
        found = self.runner.api.request(
            "GET", f"/api/v1/namespaces/{self.namespace}/secrets/{name}", ok=(404,)
        )
        if found is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (found.get("data") or {}).items()}

    def _config_map(self, name: str) -> dict[str, str] | None:
        found = self.runner.api.request(
            "GET", f"/api/v1/namespaces/{self.namespace}/configmaps/{name}", ok=(404,)
        )
        return None if found is None else dict(found.get("data") or {})

    def _source(self, kind: str, name: str, optional: bool) -> dict[str, str]:
        data = self._secret(name) if kind == "secret" else self._config_map(name)
        if data is None:
            if optional:
                return {}
            raise PodConfigError(f'{kind} "{name}" not found')
        return data

    def _key(self, kind: str, ref: Mapping[str, Any]) -> str | None:
        data = self._source(kind, ref["name"], bool(ref.get("optional")))
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise PodConfigError(f"couldn't find key {ref['key']} in {kind} {ref['name']}")
        return data[ref["key"]]

    def environment(self, mounts: Mapping[str, Path]) -> dict[str, str]:
        """The container's environment as a kubelet builds it: envFrom, then env in order."""
        env: dict[str, str] = {}
        for source in self.container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, ref in (("configmap", "configMapRef"), ("secret", "secretRef")):
                if ref in source:
                    data = self._source(
                        kind, source[ref]["name"], bool(source[ref].get("optional"))
                    )
                    env.update({prefix + k: v for k, v in data.items()})
        for variable in self.container.get("env") or []:
            name, source = variable["name"], variable.get("valueFrom")
            if source is None:  # a literal may name a mount path; a Secret's value never does
                env[name] = _translate(expand(variable.get("value", ""), env), mounts)
            elif "secretKeyRef" in source or "configMapKeyRef" in source:
                kind = "secret" if "secretKeyRef" in source else "configmap"
                ref = source.get("secretKeyRef") or source["configMapKeyRef"]
                value = self._key(kind, ref)
                if value is not None:
                    env[name] = value
            elif "fieldRef" in source:
                env[name] = field_value(self.pod, source["fieldRef"]["fieldPath"])
            else:
                raise PodConfigError(f"env {name}: {sorted(source)} is not served by the runner")
        return env

    def _volume_files(self, volume: Mapping[str, Any]) -> dict[str, str] | None:
        """A volume's files (path → content); None for an emptyDir."""
        if "emptyDir" in volume:
            return None
        if "configMap" in volume or "secret" in volume:
            kind = "configmap" if "configMap" in volume else "secret"
            spec = volume.get("configMap") or volume["secret"]
            name = spec.get("name") or spec.get("secretName")
            data = self._source(kind, name, bool(spec.get("optional")))
            items = spec.get("items")
            if not items:
                return data
            return {i["path"]: data[i["key"]] for i in items if i["key"] in data}
        if "projected" in volume:
            files: dict[str, str] = {}
            for source in volume["projected"]["sources"]:
                if "serviceAccountToken" in source:
                    files[source["serviceAccountToken"]["path"]] = self.runner.token_for(self.pod)
                elif "downwardAPI" in source:
                    for item in source["downwardAPI"]["items"]:
                        files[item["path"]] = field_value(self.pod, item["fieldRef"]["fieldPath"])
                else:
                    kind = "configMap" if "configMap" in source else "secret"
                    files.update(self._volume_files({kind: source[kind]}) or {})
            return files
        if "downwardAPI" in volume:
            return {
                i["path"]: field_value(self.pod, i["fieldRef"]["fieldPath"])
                for i in volume["downwardAPI"]["items"]
            }
        raise PodConfigError(f"volume {volume['name']}: this kind is not served by the runner")

    def materialise(self) -> dict[str, Path]:
        """Every volume mount of the container as a directory here: mount path → directory."""
        volumes = {v["name"]: v for v in self.pod["spec"].get("volumes") or []}
        mounts: dict[str, Path] = {}
        for mount in self.container.get("volumeMounts") or []:
            target = self.directory / "volumes" / mount["name"]
            if not target.exists():
                files = self._volume_files(volumes[mount["name"]])
                target.mkdir(parents=True)
                if mount["mountPath"].rstrip("/") == SERVICE_ACCOUNT_DIR and files:
                    # The Pods reach the API server through the recorder, whose CA they trust.
                    files["ca.crt"] = self.runner.recorder.ca_pem
                for relative, content in (files or {}).items():
                    path = target / relative
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(content)
            mounts[mount["mountPath"]] = target / mount.get("subPath", "")
        return mounts

    def command(self, env: Mapping[str, str], mounts: Mapping[str, Path]) -> list[str]:
        container = self.container
        command = [expand(a, env) for a in container.get("command") or ()]
        args = [expand(a, env) for a in container.get("args") or ()]
        if not command:
            command = list(self.runner.entrypoint)
        elif command[0] in self.runner.executables:
            command[0] = self.runner.executables[command[0]]
        return [_translate(a, mounts) for a in [*command, *args]]

    def _process_environment(self, mounts: Mapping[str, Path]) -> dict[str, str]:
        env = {
            "PATH": BASE_PATH,
            "LANG": "C.UTF-8",
            "HOSTNAME": self.name,
            # What a kubelet gives every container: where the API server is.
            "KUBERNETES_SERVICE_HOST": pod_network.SERVICE_IP,
            "KUBERNETES_SERVICE_PORT": str(self.runner.api_port),
        }
        env.update(self.environment(mounts))
        if "/tmp" in mounts:
            env["TMPDIR"] = str(mounts["/tmp"])
        return env

    # -- running it

    def run(self) -> None:
        """The Pod's life on this node, from Pending to terminated (or deleted)."""
        try:
            self._run()
        except Exception as exc:  # reported on the Pod, as a kubelet would; the test sees it
            self.runner.errors.append(f"{self.namespace}/{self.name}: {exc!r}")
            with contextlib.suppress(Exception):
                self.report_terminated(128, "RunnerError", f"the test Pod runner failed: {exc}")
        finally:
            if self.network is not None:  # the Pod's sandbox goes with its last container
                self.network.delete()
            if self.deleting.is_set():
                self.finish_deletion()

    def _run(self) -> None:
        if len(self.pod["spec"]["containers"]) != 1 or self.pod["spec"].get("initContainers"):
            raise PodConfigError("the test Pod runner runs Pods of exactly one container")
        policy = self.pod["spec"].get("restartPolicy", "Always")
        backoff = iter(RESTART_BACKOFF)
        while not self.deleting.is_set():
            try:
                mounts = self.materialise()
                env = self._process_environment(mounts)
                argv = self.command(env, mounts)
            except PodConfigError as exc:
                self.report_waiting("CreateContainerConfigError", str(exc))
                self.deleting.wait(1.0)
                continue
            binds = {str(d): p for p, d in mounts.items() if p == SERVICE_ACCOUNT_DIR}
            assert self.network is not None
            code = self._run_once(self.network.wrap(argv, binds), env)
            if self.deleting.is_set():
                return
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                return
            self.restarts += 1
            self.deleting.wait(next(backoff, RESTART_BACKOFF[-1]))

    def _run_once(self, argv: list[str], env: Mapping[str, str]) -> int:
        with self.log_path.open("ab") as log:
            log_start = log.tell()  # before the process writes: this run's part of the log
            self.process = subprocess.Popen(
                argv,
                env=dict(env),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started_at = _now()
        self.report_running(ready=self._probe() is None)
        ready_thread = threading.Thread(target=self._watch_readiness, daemon=True)
        ready_thread.start()
        code = self.process.wait()
        ready_thread.join(timeout=5)
        if self.deleting.is_set():
            return code
        self.report_terminated(
            code, "Completed" if code == 0 else "Error", self.message(code, log_start)
        )
        return code

    def _probe(self) -> dict[str, Any] | None:
        probe: dict[str, Any] | None = self.container.get("readinessProbe")
        return probe

    def _port(self, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for declared in self.container.get("ports") or []:
            if declared.get("name") == port:
                return int(declared["containerPort"])
        raise PodConfigError(f"probe port {port!r} is not a port of the container")

    def probe_passes(self, probe: Mapping[str, Any]) -> bool:
        """One run of a readiness probe, as the kubelet runs it against the Pod's IP."""
        timeout = float(probe.get("timeoutSeconds", 1))
        if "httpGet" in probe:
            get = probe["httpGet"]
            url = f"http://{self.ip}:{self._port(get['port'])}{get.get('path', '/')}"
            try:
                return 200 <= httpx.get(url, timeout=timeout).status_code < 400
            except httpx.HTTPError:
                return False
        if "tcpSocket" in probe:
            try:
                with socket.create_connection(
                    (self.ip, self._port(probe["tcpSocket"]["port"])), timeout=timeout
                ):
                    return True
            except OSError:
                return False
        raise PodConfigError("only httpGet and tcpSocket probes are served by the runner")

    def _watch_readiness(self) -> None:
        probe = self._probe()
        if probe is None:
            return
        # The probe's own period, but at most a second: tests wait for Ready.
        period = min(float(probe.get("periodSeconds", 10)), 1.0)
        ready = False
        assert self.process is not None
        while self.process.poll() is None and not self.deleting.is_set():
            passes = self.probe_passes(probe)
            if passes != ready:
                ready = passes
                self.report_running(ready=ready)
            time.sleep(period)

    def message(self, code: int, log_start: int) -> str:
        """The termination message: the container's file (never written here: the runner
        gives it no /dev/termination-log), else the log's tail under FallbackToLogsOnError."""
        policy = self.container.get("terminationMessagePolicy", "File")
        if policy != "FallbackToLogsOnError" or code == 0:
            return ""
        with self.log_path.open("rb") as log:
            log.seek(log_start)
            tail = log.read().decode(errors="replace").splitlines()[-MESSAGE_LINES:]
        return "\n".join(tail).encode()[-MESSAGE_BYTES:].decode(errors="replace")

    # -- what the kubelet reports

    def _container_status(self, state: dict[str, Any], *, ready: bool) -> dict[str, Any]:
        status: dict[str, Any] = {
            "name": self.container["name"],
            "image": self.container["image"],
            "imageID": "",
            "ready": ready,
            "restartCount": self.restarts,
            "started": "running" in state,
            "state": state,
        }
        if self.process is not None:
            status["containerID"] = f"embedshift-runner://{self.process.pid}"
        if self.last_state:
            status["lastState"] = self.last_state
        return status

    def _conditions(self, *, ready: bool) -> list[dict[str, Any]]:
        now = _now()
        flag = "True" if ready else "False"
        return [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
            {"type": "Ready", "status": flag, "lastTransitionTime": now},
        ]

    def _report(self, status: dict[str, Any]) -> None:
        base = {
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.pod.get("status", {}).get("startTime") or self.started_at or _now(),
        }
        self.runner.api.request(
            "PATCH",
            f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status",
            {"status": {**base, **status}},
            content_type="application/merge-patch+json",
            ok=(404,),
        )

    def report_waiting(self, reason: str, message: str) -> None:
        state = {"waiting": {"reason": reason, "message": message}}
        self._report(
            {
                "phase": "Pending",
                "conditions": self._conditions(ready=False),
                "containerStatuses": [self._container_status(state, ready=False)],
            }
        )

    def report_running(self, *, ready: bool) -> None:
        state = {"running": {"startedAt": self.started_at}}
        self._report(
            {
                "phase": "Running",
                "conditions": self._conditions(ready=ready),
                "containerStatuses": [self._container_status(state, ready=ready)],
            }
        )

    def report_terminated(self, code: int, reason: str, message: str) -> None:
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": reason,
            "startedAt": self.started_at or _now(),
            "finishedAt": _now(),
        }
        if message:
            terminated["message"] = message
        if self.process is not None:
            terminated["containerID"] = f"embedshift-runner://{self.process.pid}"
        policy = self.pod["spec"].get("restartPolicy", "Always")
        final = policy == "Never" or (policy == "OnFailure" and code == 0)
        state = {"terminated": terminated}
        if final:
            phase = "Succeeded" if code == 0 else "Failed"
        else:
            phase = "Running"
            self.last_state = state
            state = {"waiting": {"reason": "CrashLoopBackOff" if code else "Completed"}}
        self._report(
            {
                "phase": phase,
                "conditions": self._conditions(ready=False),
                "containerStatuses": [self._container_status(state, ready=False)],
            }
        )

    # -- deletion

    def stop(self, grace: float) -> None:
        """SIGTERM, the grace period, then SIGKILL, as a kubelet stops a container."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def finish_deletion(self) -> None:
        """The Pod's process is gone: delete it for good (grace period 0), as the kubelet does."""
        if self.deleted:
            return
        self.deleted = True
        uid = self.pod["metadata"]["uid"]
        self.runner.api.request(
            "DELETE",
            f"/api/v1/namespaces/{self.namespace}/pods/{self.name}",
            {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
            ok=(404, 409),
        )


def _translate(value: str, mounts: Mapping[str, Path]) -> str:
    """A mount path (or a path under it) in ``value`` rewritten to its directory here, in one
    pass (a rewritten path is never rewritten again). Pure."""
    # /tmp is TMPDIR instead: host paths under /tmp (a database's socket) must stay as they are.
    # The ServiceAccount's files are mounted where in-cluster clients look (PodNetwork.wrap).
    skip = ("", "/tmp", SERVICE_ACCOUNT_DIR)
    paths = {p.rstrip("/"): d for p, d in mounts.items() if p.rstrip("/") not in skip}
    if not paths:
        return value
    alternatives = "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
    pattern = rf"(?<![\w./-])({alternatives})(?=/|$|[\s:=,;\"'])"
    return re.sub(pattern, lambda match: str(paths[match.group(1)]), value)


# ---- the node ---------------------------------------------------------------------------------


@dataclass
class PodRunner:
    """The kubelet of one node for the Pods of ``namespaces`` (see the module doc)."""

    kubeconfig_path: str
    workdir: Path
    namespaces: set[str] = field(default_factory=set)
    entrypoint: Sequence[str] = DEFAULT_ENTRYPOINT
    executables: Mapping[str, str] = field(
        default_factory=lambda: {"embedshift": DEFAULT_ENTRYPOINT[0]}
    )
    errors: list[str] = field(default_factory=list)
    pods: dict[str, PodProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        pod_network.check()
        pod_network.ensure_service_address()
        self.api = Api(self.kubeconfig_path)
        self.api_port = int(self.api.server.rsplit(":", 1)[1])
        self.addresses = pod_network.Addresses()
        self.forwarders: dict[int, Forwarder] = {}
        # The `kubernetes` Service: the real API server, through a recorder of the Pods' calls.
        self.recorder = ApiRecorder(
            ip=pod_network.SERVICE_IP,
            port=self.api_port,
            upstream=self.api.server,
            upstream_ca=self.api.ca_file,
            directory=self.workdir / "api-recorder",
        )
        self.pod_of_ip: dict[str, str] = {}  # every Pod this runner started: IP → "ns/name"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # -- lifecycle

    def __enter__(self) -> PodRunner:
        self.register_node()
        for target in (self._watch_pods, self._heartbeat):
            thread = threading.Thread(
                target=target, name=f"pod-runner-{target.__name__}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with self._lock:
            running = list(self.pods.values())
        for pod in running:
            pod.deleting.set()
            pod.stop(grace=5.0)
        for pod in running:
            if pod.thread is not None:
                pod.thread.join(timeout=10)
        for thread in self._threads:
            thread.join(timeout=40)
        for forwarder in self.forwarders.values():
            forwarder.close()
        self.recorder.close()
        self.api.close()

    def expose(self, port: int) -> str:
        """Make the host's ``127.0.0.1:port`` reachable from the Pods; the address they use."""
        if port not in self.forwarders:
            self.forwarders[port] = Forwarder(port)
        return self.forwarders[port].address

    def serve(self, namespace: str) -> None:
        """Run the Pods of ``namespace`` from now on (those already Pending included)."""
        self.namespaces.add(namespace)

    # -- the node and its heartbeat

    def register_node(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
        }
        self.api.request("POST", "/api/v1/nodes", body, ok=(409,))
        self._node_status()

    def _node_status(self) -> None:
        now = _now()
        status = {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "the embedshift test Pod runner is running",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "capacity": {"cpu": "2", "memory": "24Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "24Gi", "pods": "110"},
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        }
        self.api.request(
            "PATCH",
            f"/api/v1/nodes/{NODE}/status",
            {"status": status},
            content_type="application/merge-patch+json",
        )

    def _renew_lease(self) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{NODE}"
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": NODE, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": NODE, "leaseDurationSeconds": 40, "renewTime": now},
        }
        if (
            self.api.request(
                "PATCH",
                path,
                {"spec": body["spec"]},
                content_type="application/merge-patch+json",
                ok=(404,),
            )
            is None
        ):
            self.api.request(
                "POST",
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                body,
                ok=(409,),
            )

    def _heartbeat(self) -> None:
        while not self._stop.is_set():
            try:
                self._renew_lease()
                self._node_status()
            except httpx.HTTPError as exc:
                self._error(f"heartbeat: {exc}")
            self._stop.wait(5.0)

    # -- tokens for the Pods' ServiceAccounts

    def token_for(self, pod: Mapping[str, Any]) -> str:
        """A token of the Pod's ServiceAccount, bound to the Pod (TokenRequest)."""
        meta = pod["metadata"]
        account = pod["spec"].get("serviceAccountName") or "default"
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": 3600,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        answer = self.api.request(
            "POST",
            f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token",
            body,
        )
        return str(answer["status"]["token"])

    # -- the Pods

    def _error(self, message: str) -> None:
        self.errors.append(message)

    def _watch_pods(self) -> None:
        resource_version = ""
        while not self._stop.is_set():
            try:
                if not resource_version:
                    listed = self.api.request("GET", "/api/v1/pods")
                    for pod in listed["items"]:
                        self._seen(pod)
                    resource_version = listed["metadata"]["resourceVersion"]
                for event in self.api.watch("/api/v1/pods", resource_version):
                    if self._stop.is_set():
                        return
                    if event["type"] == "ERROR":
                        resource_version = ""  # 410 Gone: list again
                        break
                    resource_version = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._seen(event["object"])
                    elif event["type"] == "DELETED":
                        self._deleted(event["object"])
            except (httpx.HTTPError, OSError, ValueError) as exc:
                if self._stop.is_set():
                    return
                self._error(f"watch: {exc}")
                resource_version = ""
                self._stop.wait(0.5)
            # a periodic re-list catches Pods of namespaces served since the last event
            self._relist()

    def _relist(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            for pod in self.api.request("GET", "/api/v1/pods")["items"]:
                self._seen(pod)

    def _key(self, pod: Mapping[str, Any]) -> str:
        return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}/{pod['metadata']['uid']}"

    def _seen(self, pod: dict[str, Any]) -> None:
        if pod["metadata"]["namespace"] not in self.namespaces:
            return
        node = pod["spec"].get("nodeName")
        if node not in (None, "", NODE):
            return
        key = self._key(pod)
        with self._lock:
            known = self.pods.get(key)
            if known is None:
                if pod["metadata"].get("deletionTimestamp"):
                    return
                phase = (pod.get("status") or {}).get("phase", "Pending")
                if phase in ("Succeeded", "Failed"):
                    return  # a Pod some earlier runner finished
                known = self._start(pod)
            else:
                known.pod["metadata"] = pod["metadata"]
        if pod["metadata"].get("deletionTimestamp") and not known.deleting.is_set():
            grace = float(pod["metadata"].get("deletionGracePeriodSeconds") or 0)
            known.deleting.set()
            threading.Thread(target=self._delete, args=(known, grace), daemon=True).start()

    def _start(self, pod: dict[str, Any]) -> PodProcess:
        if not pod["spec"].get("nodeName"):
            meta = pod["metadata"]
            self.api.request(
                "POST",
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding",
                {
                    "apiVersion": "v1",
                    "kind": "Binding",
                    "metadata": {"name": meta["name"], "uid": meta["uid"]},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
                },
                ok=(409,),
            )
            pod["spec"]["nodeName"] = NODE
        directory = (
            self.workdir
            / pod["metadata"]["namespace"]
            / f"{pod['metadata']['name']}-{pod['metadata']['uid'][:8]}"
        )
        directory.mkdir(parents=True, exist_ok=True)
        process = PodProcess(runner=self, pod=pod, directory=directory)
        process.network = self.addresses.allocate()
        process.network.create()
        pod.setdefault("status", {})["podIP"] = process.network.ip  # for the downward API
        self.pod_of_ip[process.network.ip] = self._key(pod)
        process.thread = threading.Thread(
            target=process.run, name=f"pod-{process.name}", daemon=True
        )
        self.pods[self._key(pod)] = process
        process.thread.start()
        return process

    def _delete(self, pod: PodProcess, grace: float) -> None:
        pod.stop(grace)
        if pod.thread is not None:
            pod.thread.join(timeout=grace + 10)
        pod.finish_deletion()  # a no-op when run() already did

    def _deleted(self, pod: Mapping[str, Any]) -> None:
        with self._lock:
            known = self.pods.get(self._key(pod))
        if known is not None and not known.deleting.is_set():
            known.deleting.set()
            known.stop(grace=0.0)

    # -- for tests

    def logs(self, namespace: str, name_prefix: str = "") -> dict[str, str]:
        """Each Pod's log in ``namespace`` (name starting with ``name_prefix``), by Pod name."""
        with self._lock:
            pods = [p for p in self.pods.values() if p.namespace == namespace]
        return {
            p.name: p.log_path.read_text(errors="replace")
            for p in pods
            if p.name.startswith(name_prefix) and p.log_path.exists()
        }

    def api_requests(self, namespace: str, name_prefix: str = "") -> list[PodRequest]:
        """Every request the Pods of ``namespace`` named ``name_prefix…`` sent the API server
        (through :attr:`recorder`), in order, with the real server's status for each."""
        wanted = f"{namespace}/{name_prefix}"
        found = []
        for request in self.recorder.requests():
            pod = self.pod_of_ip.get(request.client, "")
            if pod.startswith(wanted):
                call = rbac_call(request.method, request.path, request.user_agent)
                found.append(PodRequest(pod=pod, request=request, call=call))
        return found

    def running(self, namespace: str) -> list[str]:
        with self._lock:
            return [
                p.name
                for p in self.pods.values()
                if p.namespace == namespace and p.process is not None and p.process.poll() is None
            ]
