"""The analysis's :class:`~embedshift_operator.core.analysis.MetricSource` over Prometheus.

Instant queries through :class:`rag_service.prometheus.PrometheusClient` (the one PromQL client
of the project)::

    async with PrometheusSource(url="http://prometheus:9090", bearer_token=token) as source:
        observation = await measure(source, plan_analysis(spec, migration=key), progress=None)

What the core reads from an answer: one series → its value; no series or NaN (PromQL's 0/0, a
ratio or quantile over a window without requests) → ``None``, no data. Everything else raises
:class:`~embedshift_operator.core.analysis.MetricSourceError` with one line naming the query and
the cause: several series (aggregate the query), a PromQL error, an HTTP error, Prometheus
unreachable or slower than ``timeout``. The bearer token never appears in a message or a repr.

With the operator's ``allowlist`` (``--allowed-endpoint``), a URL whose host is not allowed is
refused here, where the token would be attached: no request, so no token, ever reaches it.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from datetime import datetime, timedelta
from types import TracebackType
from typing import Self

from embedshift_operator.core.allowlist import PROMETHEUS_URL, Allowlist, url_refusal
from embedshift_operator.core.analysis import MetricSourceError
from rag_service.errors import ConfigError
from rag_service.prometheus import PrometheusClient, PrometheusError

__all__ = ["DEFAULT_TIMEOUT", "PrometheusSource"]

# One check runs a dozen queries concurrently every ``interval`` (30 s by default); a query
# Prometheus has not answered in 5 s is an error verdict, not a check that hangs.
DEFAULT_TIMEOUT = 5.0


class PrometheusSource:
    """Prometheus as the analysis's metric source. Close it with :meth:`aclose` (or ``async
    with``).

    ``url``: Prometheus's base URL, including any route prefix. ``bearer_token``: sent as
    ``Authorization: Bearer …`` (e.g. from ``spec.analysis.prometheus.bearerTokenSecretRef``).
    ``headers``: sent with every query (e.g. a tenant header). ``timeout``: seconds one query
    may take in all. ``allowlist``: the operator's; a host outside its endpoints is refused
    before any request (``spec.analysis.prometheus.url`` is where the operator's URL comes from).
    A bad URL or token, or a refused host, raises :class:`rag_service.errors.ConfigError`.
    """

    def __init__(
        self,
        *,
        url: str,
        bearer_token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
        allowlist: Allowlist | None = None,
    ) -> None:
        refusal = url_refusal(PROMETHEUS_URL, url, allowlist) if allowlist is not None else None
        if refusal is not None:  # names the host only, never the URL (it may hold a password)
            raise ConfigError(refusal.message)
        self._client = PrometheusClient(
            url=url, timeout=timeout, bearer_token=bearer_token, headers=headers, tls=tls
        )

    @property
    def url(self) -> str:
        """The base URL, without credentials."""
        return self._client.url

    async def query(self, promql: str) -> float | None:
        """The single value of ``promql`` now; ``None`` for no data (no series, or NaN)."""
        try:
            return await self._client.query_scalar(promql)
        except PrometheusError as error:
            # The message already names the query and the cause, in one line, without secrets.
            raise MetricSourceError(str(error)) from error

    async def query_ranges(
        self, queries: Mapping[str, str], *, start: datetime, end: datetime, step: timedelta
    ) -> dict[str, list[tuple[datetime, float | None]]]:
        """Each query evaluated every ``step`` over [start, end] (for ``rollout replay``).

        Keyed as ``queries`` is. A failure raises :class:`MetricSourceError` naming the query:
        a replay over a half-fetched week would mislead.
        """
        ranges: dict[str, list[tuple[datetime, float | None]]] = {}
        for key, promql in queries.items():
            try:
                ranges[key] = await self._client.query_range(
                    promql, start=start, end=end, step=step
                )
            except PrometheusError as exc:
                raise MetricSourceError(str(exc)) from None
        return ranges

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"PrometheusSource(url={self.url!r})"
