"""The search service's bounds in the chart: each value becomes the `embedshift serve` flag of
the same meaning, which the real parser accepts; unset, serve's own defaults apply (one place
for each default); a value serve would refuse is refused by the chart first."""

from __future__ import annotations

from typing import Any

import pytest

from embedshift_operator.cli import build_parser
from tests.chart.helm import of_kind, render, template

BOUNDS = {
    "search.searchTimeoutSeconds": "2.5",
    "search.statementTimeoutSeconds": "1",
    "search.queryCache.ttl": "72h",
    "search.queryCache.maxRows": "2000000",
}
FLAGS = ("--search-timeout", "--statement-timeout", "--query-cache-ttl", "--query-cache-max-rows")


def serve_args(values: dict[str, str]) -> list[str]:
    (search,) = [
        d
        for d in of_kind(render(values), "Deployment")
        if d["metadata"]["name"].endswith("-search")
    ]
    (container,) = search["spec"]["template"]["spec"]["containers"]
    args: list[str] = container["args"]
    return args


def test_each_bound_is_the_flag_serve_takes() -> None:
    args = serve_args(BOUNDS)
    assert [a for a in args if a.startswith(FLAGS)] == [
        "--search-timeout=2.5",
        "--statement-timeout=1",
        "--query-cache-ttl=72h",
        "--query-cache-max-rows=2000000",
    ]
    parsed: Any = build_parser("serve").parse_args(args)
    assert parsed.search_timeout == 2.5 and parsed.statement_timeout == 1.0
    assert parsed.query_cache_ttl == 72 * 3600.0 and parsed.query_cache_max_rows == 2_000_000


def test_unset_bounds_leave_serves_defaults() -> None:
    assert [a for a in serve_args({}) if a.startswith(FLAGS)] == []


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"search.searchTimeoutSeconds": "0"}, "/search/searchTimeoutSeconds"),
        ({"search.statementTimeoutSeconds": "soon"}, "/search/statementTimeoutSeconds"),
        ({"search.queryCache.ttl": "7d"}, "/search/queryCache/ttl"),
        ({"search.queryCache.maxRows": "0"}, "/search/queryCache/maxRows"),
        ({"search.queryCache.size": "1"}, "additional properties 'size' not allowed"),
    ],
)
def test_a_bound_serve_would_refuse_is_refused_by_the_chart(
    values: dict[str, str], where: str
) -> None:
    result = template(values)
    assert result.returncode != 0
    assert where in result.stderr, result.stderr
