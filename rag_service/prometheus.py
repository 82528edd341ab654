"""An async PromQL client: instant queries against Prometheus's HTTP API.

The dashboard and ``embedshift baseline`` read the rollout's numbers through it::

    async with PrometheusClient(url="http://prometheus:9090") as prometheus:
        p95 = await prometheus.query_scalar(
            metric_query("p95_latency_seconds", version="v2", migration="rag/docs", window="5m")
        )

(:func:`rag_service.criteria.metric_query` writes the contract's PromQL, scoped to one
migration.)

Every failure (unreachable, an HTTP error, a PromQL error, an answer that is not Prometheus's)
raises :class:`PrometheusError`, whose one-line message names the query and the cause.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import httpx

from rag_service.errors import ConfigError, EmbedshiftError

__all__ = ["PrometheusClient", "PrometheusError", "Sample"]

# Long or multi-line PromQL would make the one-line message unreadable; the start is enough to
# recognise which query failed.
_MAX_QUERY_IN_MESSAGE = 160
_WHITESPACE = re.compile(r"\s+")


class PrometheusError(EmbedshiftError):
    """Prometheus could not answer a query: unreachable, an HTTP error, or a PromQL error."""


@dataclass(frozen=True)
class Sample:
    """One series' value at one instant; ``labels`` include ``__name__`` when the query kept it."""

    labels: dict[str, str]
    value: float
    timestamp: datetime


class PrometheusClient:
    """Instant PromQL queries over ``GET /api/v1/query``; close it with :meth:`aclose`.

    ``url`` is Prometheus's base URL, including any ``--web.route-prefix`` path. ``timeout`` is
    per request, in seconds.
    """

    def __init__(self, *, url: str, timeout: float = 10.0) -> None:
        base = httpx.URL(url)
        if base.scheme not in ("http", "https") or not base.host:
            raise ConfigError(
                f"Prometheus URL {_redact(base)!r} must be http:// or https:// with a host"
            )
        self._url = base
        # Userinfo in the URL becomes basic auth in httpx; messages show the URL without it.
        self._display_url = _redact(base)
        self._client = httpx.AsyncClient(base_url=base, timeout=timeout)

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
        data = await self._get_data(promql, params)
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

    async def _get_data(self, promql: str, params: dict[str, str]) -> dict[str, Any]:
        where = f"Prometheus query {_describe(promql)}"
        try:
            response = await self._client.get("/api/v1/query", params=params)
        except httpx.TimeoutException:
            raise PrometheusError(
                f"{where} timed out after {self._client.timeout.read}s at {self._display_url}"
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
    return str(url.copy_with(userinfo=b"")).rstrip("/")
