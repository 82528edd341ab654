"""An async PromQL client: instant and range queries against Prometheus's HTTP API.

The dashboard, ``embedshift baseline`` and the operator's analysis read the rollout's numbers
through it::

    async with PrometheusClient(url="http://prometheus:9090") as prometheus:
        p95 = await prometheus.query_scalar(
            metric_query("p95_latency_seconds", version="v2", migration="rag/docs", window="5m")
        )

(:func:`rag_service.criteria.metric_query` writes the contract's PromQL, scoped to one
migration.)

Every failure (unreachable, timed out, an HTTP error, a PromQL error, an answer that is not
Prometheus's) raises :class:`PrometheusError`, whose one-line message names the query and the
cause. A bearer token (or any credential in ``headers`` or the URL) never appears in a message
or a ``repr``.
"""

from __future__ import annotations

import asyncio
import math
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

import httpx

from rag_service.errors import ConfigError, EmbedshiftError
from rag_service.redaction import display_url, header_value_problem

__all__ = ["PrometheusClient", "PrometheusError", "Sample"]

# Long or multi-line PromQL would make the one-line message unreadable; the start is enough to
# recognise which query failed.
_MAX_QUERY_IN_MESSAGE = 160
_WHITESPACE = re.compile(r"\s+")
# Prometheus refuses a range query of more than 11,000 points per series; longer ranges are
# fetched in pieces of at most this many steps.
_MAX_POINTS_PER_REQUEST = 11_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PrometheusError(EmbedshiftError):
    """Prometheus could not answer a query: unreachable, an HTTP error, or a PromQL error."""


@dataclass(frozen=True)
class Sample:
    """One series' value at one instant; ``labels`` include ``__name__`` when the query kept it."""

    labels: dict[str, str]
    value: float
    timestamp: datetime


class PrometheusClient:
    """PromQL queries over ``GET /api/v1/query`` and ``/api/v1/query_range``; close it with
    :meth:`aclose`.

    ``url`` is Prometheus's base URL, including any ``--web.route-prefix`` path. ``timeout`` is
    the whole budget of one HTTP request (connecting, sending, waiting, reading), in seconds.
    ``bearer_token`` is sent as ``Authorization: Bearer …`` (surrounding whitespace, such as a
    Secret file's trailing newline, is dropped); ``headers`` are sent with every request (e.g. a
    tenant header for Thanos or Mimir). ``tls``: the SSL context for https (default: a new one
    with the system's CAs); a process with many clients passes one to all, as each context
    holds its own copy of the CA bundle (about 1 MB).
    """

    def __init__(
        self,
        *,
        url: str,
        timeout: float = 10.0,
        bearer_token: str | None = None,
        headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        base = httpx.URL(url)
        if base.scheme not in ("http", "https") or not base.host:
            raise ConfigError(
                f"Prometheus URL {_redact(base)!r} must be http:// or https:// with a host"
            )
        if timeout <= 0:
            raise ConfigError(f"Prometheus timeout must be positive, got {timeout}")
        sent = dict(headers or {})
        if bearer_token is not None:
            token = bearer_token.strip()  # a trailing newline from `echo` into the Secret
            problem = header_value_problem(token)
            if problem is not None:  # httpx's own refusal would quote the header, token and all
                raise ConfigError(f"the Prometheus bearer token cannot be sent: {problem}")
            if base.userinfo or any(name.lower() == "authorization" for name in sent):
                raise ConfigError(
                    "give Prometheus either a bearer token or credentials in the URL or an "
                    "Authorization header, not both"
                )
            sent["Authorization"] = f"Bearer {token}"
        self._url = base
        # Userinfo in the URL becomes basic auth in httpx; messages show the URL without it.
        self._display_url = _redact(base)
        self._timeout = timeout
        self._client = httpx.AsyncClient(
            base_url=base, timeout=timeout, headers=sent, verify=tls if tls is not None else True
        )

    def __repr__(self) -> str:
        return f"PrometheusClient(url={self._display_url!r}, timeout={self._timeout})"

    @property
    def url(self) -> str:
        """The base URL, without credentials."""
        return self._display_url

    async def query(self, promql: str, *, at: datetime | None = None) -> list[Sample]:
        """Evaluate ``promql`` at ``at`` (timezone-aware; default: Prometheus's now).

        A scalar result comes back as one unlabelled sample. A range vector (``foo[5m]``) or a
        string result raises :class:`PrometheusError`: it has no single value per series.
        """
        params = {"query": promql}
        if at is not None:
            if at.tzinfo is None:
                raise ValueError("`at` must be timezone-aware; a naive datetime is ambiguous")
            params["time"] = f"{at.timestamp():.3f}"
        data = await self._get_data("/api/v1/query", promql, params)
        return _parse_result(promql, data)

    async def query_scalar(self, promql: str, *, at: datetime | None = None) -> float | None:
        """The single value of ``promql``, or ``None`` when there is no data or it is NaN.

        NaN is what PromQL gives for 0/0, e.g. a quantile or ratio over a window with no
        requests, which means "no data" to a caller. More than one series raises
        :class:`PrometheusError`: aggregate the query (``sum``, ``max``…) to one.
        """
        samples = await self.query(promql, at=at)
        if not samples:
            return None
        if len(samples) > 1:
            raise PrometheusError(
                f"Prometheus query {_describe(promql)} returned {len(samples)} series, "
                "expected one: aggregate it (sum, max, …)"
            )
        value = samples[0].value
        return None if math.isnan(value) else value

    async def query_range(
        self, promql: str, *, start: datetime, end: datetime, step: timedelta
    ) -> list[tuple[datetime, float | None]]:
        """``promql`` evaluated every ``step`` from ``start`` to ``end`` (inclusive, as
        Prometheus's ``/api/v1/query_range`` steps): one ``(instant, value)`` per step.

        ``value`` is ``None`` at a step with no data: no sample there, or NaN. An empty result
        is every step ``None``. More than one series raises :class:`PrometheusError`:
        aggregate the query to one. Ranges beyond Prometheus's 11,000 points per query are
        fetched in several requests. ``start`` and ``end`` must be timezone-aware; Prometheus
        works in milliseconds, so finer parts are dropped.
        """
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError(
                "`start` and `end` must be timezone-aware; a naive datetime is ambiguous"
            )
        step_ms = _milliseconds(step)
        if step_ms <= 0:
            raise ValueError(f"`step` must be at least 1 ms, got {step}")
        start_ms = _epoch_ms(start)
        end_ms = _epoch_ms(end)
        if end_ms < start_ms:
            raise ValueError(f"`end` ({end.isoformat()}) is before `start` ({start.isoformat()})")
        steps = (end_ms - start_ms) // step_ms + 1
        values: dict[int, float] = {}
        for first in range(0, steps, _MAX_POINTS_PER_REQUEST):
            last = min(first + _MAX_POINTS_PER_REQUEST, steps) - 1
            params = {
                "query": promql,
                "start": _seconds(start_ms + first * step_ms),
                "end": _seconds(start_ms + last * step_ms),
                "step": _seconds(step_ms),
            }
            data = await self._get_data("/api/v1/query_range", promql, params)
            values.update(_parse_matrix(promql, data))
        grid = (start_ms + k * step_ms for k in range(steps))
        return [
            (
                _EPOCH + timedelta(milliseconds=at),
                None if (value := values.get(at)) is None or math.isnan(value) else value,
            )
            for at in grid
        ]

    async def ready(self) -> bool:
        """Whether Prometheus answers ``/-/ready`` with 200; never raises."""
        try:
            response = await self._client.get("/-/ready")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

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

    async def _get_data(self, path: str, promql: str, params: dict[str, str]) -> dict[str, Any]:
        where = f"Prometheus query {_describe(promql)}"
        try:
            # httpx's timeout bounds each phase (connect, each read); this bounds the whole
            # request, so a server that trickles bytes cannot hold a check for longer.
            async with asyncio.timeout(self._timeout):
                response = await self._client.get(path, params=params)
        except (httpx.TimeoutException, TimeoutError):
            raise PrometheusError(
                f"{where} timed out after {self._timeout:g}s at {self._display_url}"
            ) from None
        except httpx.HTTPError as error:
            cause = _one_line(str(error)) or type(error).__name__
            raise PrometheusError(
                f"{where} failed: cannot reach {self._display_url}: {cause}"
            ) from error
        # Prometheus answers PromQL errors with 400/422/503 and a JSON body that says why; the
        # body is more useful than the status, so read it first.
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("status") == "error":
            kind = body.get("errorType", "error")
            raise PrometheusError(f"{where} failed: {kind}: {_one_line(str(body.get('error')))}")
        if response.status_code != 200:
            raise PrometheusError(
                f"{where} failed: HTTP {response.status_code} from {self._display_url}"
            )
        if not isinstance(body, dict) or body.get("status") != "success":
            raise PrometheusError(
                f"{where} failed: {self._display_url} did not answer like Prometheus "
                "(no JSON with status 'success')"
            )
        data = body.get("data")
        if not isinstance(data, dict):
            raise PrometheusError(f"{where} failed: the answer has no 'data' object")
        return data


def _parse_result(promql: str, data: dict[str, Any]) -> list[Sample]:
    kind = data.get("resultType")
    try:
        if kind == "vector":
            return [_sample(item["metric"], item["value"]) for item in data["result"]]
        if kind == "scalar":
            return [_sample({}, data["result"])]
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise PrometheusError(
            f"Prometheus query {_describe(promql)} failed: malformed {kind} result ({error!r})"
        ) from error
    if kind == "matrix":
        raise PrometheusError(
            f"Prometheus query {_describe(promql)} returned a range vector; an instant query "
            "needs an instant vector (wrap it in rate(), avg_over_time(), …)"
        )
    raise PrometheusError(
        f"Prometheus query {_describe(promql)} returned a {kind!r} result, not a number"
    )


def _parse_matrix(promql: str, data: dict[str, Any]) -> dict[int, float]:
    """A range query's one series as {epoch milliseconds: value}; {} for no series."""
    kind = data.get("resultType")
    if kind != "matrix":
        raise PrometheusError(
            f"Prometheus range query {_describe(promql)} returned a {kind!r} result, not a matrix"
        )
    try:
        series = data["result"]
        if len(series) > 1:
            raise PrometheusError(
                f"Prometheus range query {_describe(promql)} returned {len(series)} series, "
                "expected one: aggregate it (sum, max, …)"
            )
        if not series:
            return {}
        return {
            round(float(timestamp) * 1000): float(value) for timestamp, value in series[0]["values"]
        }
    except (KeyError, TypeError, ValueError) as error:
        raise PrometheusError(
            f"Prometheus range query {_describe(promql)} failed: malformed matrix result "
            f"({error!r})"
        ) from error


def _epoch_ms(at: datetime) -> int:
    return (at - _EPOCH) // timedelta(milliseconds=1)


def _milliseconds(step: timedelta) -> int:
    return step // timedelta(milliseconds=1)


def _seconds(milliseconds: int) -> str:
    """Milliseconds as the decimal seconds Prometheus reads, exactly (no float rounding)."""
    whole, fraction = divmod(milliseconds, 1000)
    return f"{whole}.{fraction:03d}"


def _sample(labels: dict[str, str], point: list[Any]) -> Sample:
    timestamp, value = point
    # Prometheus sends values as strings so that NaN and ±Inf survive JSON; float() reads them.
    return Sample(
        labels=dict(labels),
        value=float(value),
        timestamp=datetime.fromtimestamp(float(timestamp), tz=UTC),
    )


def _describe(promql: str) -> str:
    text = _one_line(promql)
    if len(text) > _MAX_QUERY_IN_MESSAGE:
        text = text[: _MAX_QUERY_IN_MESSAGE - 1] + "…"
    return repr(text)


def _one_line(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def _redact(url: httpx.URL) -> str:
    return display_url(str(url))
