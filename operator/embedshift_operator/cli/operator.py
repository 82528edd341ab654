"""``embedshift operator run``: the kopf operator, with its alert receiver, metrics and liveness.

One process serves three ports besides the operator's work (each 0 turns its server off):
kopf's liveness endpoint (``/healthz``), the operator's Prometheus metrics (``/metrics``, from
one registry of its own, never prometheus_client's global one) and Alertmanager's webhook
(``POST /alerts``, bearer token from ``ALERT_WEBHOOK_SECRET``, the variable rag_service's
webhook reads, so one Secret serves both). The receiver and the metrics server start before
kopf and stop after it; SIGTERM (or Ctrl+C) stops kopf gracefully and the command exits 0.

kopf and the Kubernetes client are imported inside the handler, so ``embedshift migrate …`` and
``embedshift serve`` never load them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from embedshift_operator.cli import cluster
from embedshift_operator.cli.flags import (
    add_statement_timeout_flag,
    duration,
    env,
    port_or_off,
    positive,
    whole,
)
from rag_service.alerts import WEBHOOK_SECRET_ENV as TOKEN_ENV
from rag_service.alerts import webhook_secret
from rag_service.errors import ConfigError

if TYPE_CHECKING:
    from kubernetes import client

__all__ = ["DEFAULT_PEERING", "TOKEN_ENV", "register"]

log = logging.getLogger("embedshift.operator")

DEFAULT_PEERING = "embedshift"
# In a Pod: the probes, Prometheus and Alertmanager all come from outside it.
_BIND = "0.0.0.0"  # noqa: S104
_PEERING_GROUP, _PEERING_VERSION = "kopf.dev", "v1"
# kopf's namespace patterns (globs, negations) match namespaces as they come; only plain names
# name a peering object that can be checked before start.
_PATTERN = re.compile(r"[*?\[\]!,]")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``operator run`` to the ``embedshift`` command line."""
    operator = commands.add_parser(
        "operator",
        help="run the Kubernetes operator that drives EmbeddingMigration resources",
        description="The kopf operator: one loop per EmbeddingMigration, its Jobs, the routing "
        "row, Alertmanager's webhook.",
    )
    sub = operator.add_subparsers(dest="operator_command", metavar="COMMAND", required=True)
    run = sub.add_parser(
        "run",
        help="run the operator until SIGTERM",
        description="Run the operator until SIGTERM (exit 0). It serves kopf's liveness "
        "endpoint, its own Prometheus metrics and Alertmanager's webhook; a port of 0 turns "
        "that server off. Credentials: --kubeconfig/--context, else the Pod's service account, "
        "else the default kubeconfig ($KUBECONFIG or ~/.kube/config).",
    )
    where = run.add_argument_group("which resources (one of these is required)")
    scope = where.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "--namespace",
        action="append",
        metavar="NS",
        help="serve EmbeddingMigrations in NS (repeatable; kopf's globs such as rag-* work)",
    )
    scope.add_argument(
        "--all-namespaces",
        action="store_true",
        help="serve EmbeddingMigrations in every namespace (needs cluster-wide RBAC)",
    )
    peers = run.add_argument_group("peering (several replicas: one works, the others stand by)")
    peering = peers.add_mutually_exclusive_group()
    peering.add_argument(
        "--peering",
        metavar="NAME",
        help=f"kopf's peering object: a KopfPeering NAME in each namespace served, or a "
        f"ClusterKopfPeering NAME with --all-namespaces; it must exist (default {DEFAULT_PEERING})",
    )
    peering.add_argument(
        "--standalone", action="store_true", help="no peering: this is the only replica"
    )
    peers.add_argument(
        "--priority",
        type=whole,
        metavar="N",
        default=0,
        help="peering priority: a replica stands by while a live peer has a higher one; peers "
        "of equal priority all stand by, so give each replica its own (default 0)",
    )
    ports = run.add_argument_group("servers (0 turns one off)")
    ports.add_argument(
        "--liveness-port",
        type=port_or_off,
        metavar="PORT",
        default=8080,
        help="kopf's liveness endpoint http://0.0.0.0:PORT/healthz (default 8080)",
    )
    ports.add_argument(
        "--metrics-port",
        type=port_or_off,
        metavar="PORT",
        default=9100,
        help="the operator's Prometheus metrics at http://0.0.0.0:PORT/metrics (default 9100)",
    )
    ports.add_argument(
        "--receiver-port",
        type=port_or_off,
        metavar="PORT",
        default=8081,
        help=f"Alertmanager's webhook, POST http://0.0.0.0:PORT/alerts, with the bearer token "
        f"in env {TOKEN_ENV}; without the token the operator refuses to start unless "
        f"--receiver-insecure (default 8081; 0: no receiver)",
    )
    ports.add_argument(
        "--receiver-insecure",
        action="store_true",
        help=f"accept alerts without a token when {TOKEN_ENV} is unset (only behind a "
        "NetworkPolicy: anyone who can reach the port can roll a migration back)",
    )
    ports.add_argument(
        "--trust-alerts-across-namespaces",
        action="store_true",
        help="accept an alert for NS/NAME whatever its namespace label says (default: only when "
        "it is NS, the label the Prometheus Operator forces onto a namespace's own rules, so a "
        "rule in one namespace cannot roll back a migration in another)",
    )
    ports.add_argument(
        "--max-firing-alerts",
        type=positive,
        metavar="N",
        help="firing alerts the receiver holds over every migration it serves; past it the "
        "oldest of the migration holding the most are dropped, and counted (default: the "
        "receiver's DEFAULT_MAX_FIRING, 10000)",
    )
    run.add_argument(
        "--operator-image",
        default=env("EMBEDSHIFT_IMAGE"),
        metavar="IMAGE",
        help="the image the Jobs and the follower run when spec.migration.image names none "
        "(env EMBEDSHIFT_IMAGE)",
    )
    allowed = run.add_argument_group(
        "what a migration may use (the operator's allowlists; a spec outside is held with a "
        "Ready=False condition and a Warning Event, and nothing is run or sent)"
    )
    allowed.add_argument(
        "--allowed-image",
        action="append",
        dest="allowed_images",
        type=_image_pattern,
        metavar="PATTERN",
        help="an image spec.migration.image may name (repeatable): * (any image), a repository "
        "(any tag or digest: ghcr.io/embedshift/embedshift, not ghcr.io/embedshift/"
        "embedshift-evil), a prefix ending in / (ghcr.io/embedshift/), or an image with a tag "
        "or digest (exactly that one); --operator-image is always allowed. Outside: "
        "ImageNotAllowed (default: none, so only --operator-image)",
    )
    allowed.add_argument(
        "--allowed-endpoint",
        action="append",
        dest="allowed_endpoints",
        type=_endpoint_pattern,
        metavar="HOST",
        help="a host spec.analysis.prometheus.url and the providers' baseURL may name "
        "(repeatable): a host (any port: prometheus.monitoring.svc), HOST:PORT, *.DOMAIN (the "
        "names under it: *.openai.azure.com), an IP ([fd00::1] for IPv6) or *. Outside: "
        "EndpointNotAllowed, and the Prometheus bearer token is never sent there (default: "
        "none, so any host)",
    )
    run.add_argument(
        "--deletion-timeout",
        type=duration,
        default="5m",
        metavar="DURATION",
        help="how long a deleted resource waits for an unreachable database to route 0 %% "
        "before it lets go with a RoutingNotReset Warning; a Go duration (default 5m)",
    )
    run.add_argument(
        "--kubeconfig",
        type=Path,
        metavar="FILE",
        help="a kubeconfig file (default: in-cluster, else $KUBECONFIG or ~/.kube/config)",
    )
    run.add_argument(
        "--context", metavar="NAME", help="the kubeconfig context (default: its current context)"
    )
    add_statement_timeout_flag(run)
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(handler=_run)


async def _run(args: argparse.Namespace) -> int:
    import kopf
    from prometheus_client import CollectorRegistry, start_http_server

    from embedshift_operator import handlers
    from embedshift_operator.adapters.alerts import DEFAULT_MAX_FIRING, AlertReceiver
    from embedshift_operator.adapters.operator_metrics import OperatorMetrics
    from embedshift_operator.core.allowlist import Allowlist

    if not args.verbose:  # a line per probe and per scrape would bury the operator's own
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    token = webhook_secret(env(TOKEN_ENV))
    if args.receiver_port and token is None and not args.receiver_insecure:
        raise ConfigError(
            f"{TOKEN_ENV} is not set: the alert receiver would take anyone's alerts. Set it "
            "(the token Alertmanager sends), or pass --receiver-insecure, or --receiver-port 0"
        )
    namespaces: list[str] = args.namespace or []
    clusterwide = bool(args.all_namespaces)
    peering = None if args.standalone else (args.peering or DEFAULT_PEERING)
    kube, _ = await asyncio.to_thread(
        cluster.load_configuration, args.kubeconfig, args.context, in_cluster_first=True
    )
    if peering is not None:
        await asyncio.to_thread(
            _check_peering, kube, name=peering, namespaces=namespaces, clusterwide=clusterwide
        )

    registry = CollectorRegistry()
    receiver = (
        AlertReceiver(
            token=token,
            trust_across_namespaces=args.trust_alerts_across_namespaces,
            max_firing=args.max_firing_alerts or DEFAULT_MAX_FIRING,
            registry=registry,
        )
        if args.receiver_port
        else None
    )
    handlers.configure(
        handlers.OperatorConfig(
            kube=kube,
            operator_image=args.operator_image,
            receiver=receiver,
            metrics=OperatorMetrics(registry=registry),
            deletion_timeout=args.deletion_timeout,
            statement_timeout=args.statement_timeout,
            allowlist=Allowlist(
                images=tuple(args.allowed_images or ()),
                endpoints=tuple(args.allowed_endpoints or ()),
            ),
        )
    )
    # Started before kopf: kopf treats tasks created after it starts as its own and cancels
    # them when it stops. A port taken ends here, as one line.
    metrics = None
    where = f"--metrics-port {args.metrics_port}"
    try:
        if args.metrics_port:
            metrics, _ = start_http_server(args.metrics_port, addr=_BIND, registry=registry)
            log.info("metrics on http://%s:%d/metrics", _BIND, args.metrics_port)
        where = f"--receiver-port {args.receiver_port}"
        if receiver is not None:
            await receiver.start(_BIND, args.receiver_port)
    except OSError as exc:
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        raise ConfigError(f"{where}: cannot serve: {exc.strerror or exc}") from None
    try:
        await kopf.operator(
            namespaces=namespaces,
            clusterwide=clusterwide,
            standalone=peering is None,
            peering_name=peering,
            priority=args.priority,
            liveness_endpoint=(
                f"http://{_BIND}:{args.liveness_port}/healthz" if args.liveness_port else None
            ),
        )
    finally:
        if receiver is not None:
            await receiver.aclose()
        if metrics is not None:
            await asyncio.to_thread(metrics.shutdown)
            metrics.server_close()
        handlers.configure(handlers.OperatorConfig())
    return 0


def _image_pattern(text: str) -> str:
    """An ``--allowed-image`` pattern, checked (argparse's one-line error otherwise)."""
    from embedshift_operator.core.allowlist import image_pattern_problem

    problem = image_pattern_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def _endpoint_pattern(text: str) -> str:
    """An ``--allowed-endpoint`` pattern, checked (argparse's one-line error otherwise)."""
    from embedshift_operator.core.allowlist import endpoint_pattern_problem

    problem = endpoint_pattern_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def _check_peering(
    configuration: client.Configuration,
    *,
    name: str,
    namespaces: list[str],
    clusterwide: bool,
) -> None:
    """Refuse to start when the peering object is missing: kopf would wait for it silently,
    handling nothing (mandatory peering pauses until the object says no peer outranks it)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    from embedshift_operator.handlers import USER_AGENT

    with client.ApiClient(configuration) as api:
        api.user_agent = USER_AGENT  # the operator's call, as its audit trail should show
        objects = client.CustomObjectsApi(api)
        wanted: list[str | None] = (
            [None] if clusterwide else [ns for ns in namespaces if not _PATTERN.search(ns)]
        )
        for namespace in wanted:
            what = (
                f"ClusterKopfPeering {name}"
                if namespace is None
                else f"KopfPeering {namespace}/{name}"
            )
            try:
                if namespace is None:
                    objects.get_cluster_custom_object(
                        _PEERING_GROUP, _PEERING_VERSION, "clusterkopfpeerings", name
                    )
                else:
                    objects.get_namespaced_custom_object(
                        _PEERING_GROUP, _PEERING_VERSION, namespace, "kopfpeerings", name
                    )
            except ApiException as exc:
                if exc.status == 404:
                    raise ConfigError(
                        f"--peering {name}: {what} not found (install kopf's peering CRDs and "
                        "create the object, or pass --standalone for a single replica)"
                    ) from None
                if exc.status in (401, 403):  # kopf reads it with its own rights; let it try
                    log.warning("cannot check %s (%s %s)", what, exc.status, exc.reason)
                    continue
                raise ConfigError(f"reading {what}: {exc.status} {exc.reason}") from None
            except HTTPError as exc:
                detail = cluster.one_line(str(exc))
                raise ConfigError(
                    f"cannot reach the Kubernetes API at {configuration.host}: {detail}"
                ) from None
