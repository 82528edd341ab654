"""How the index step sizes its build: pure, no database."""

from __future__ import annotations

import pytest

from rag_service.indexes import hnsw_graph_bytes, memory_text, parse_memory, plan_build
from rag_service.schema import layout_for
from tests.helpers import spec_for

MB = 1024**2
GB = 1024**3


@pytest.mark.parametrize(
    ("text", "size"),
    [("512MB", 512 * MB), ("4GB", 4 * GB), ("65536kB", 64 * MB), ("2048", 2 * MB), (" 1GB ", GB)],
)
def test_memory_sizes_are_read_in_postgresqls_units(text: str, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("512mb", "PostgreSQL's units"),  # PostgreSQL's units are case-sensitive
        ("1.5GB", "PostgreSQL's units"),
        ("-1MB", "PostgreSQL's units"),
        ("", "PostgreSQL's units"),
        ("512KB", "PostgreSQL's units"),
        ("100kB", "1MB to 2TB"),
        ("3TB", "1MB to 2TB"),
    ],
)
def test_a_size_postgresql_would_refuse_is_refused_naming_the_form(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_memory(text)


@pytest.mark.parametrize(
    ("size", "text"), [(4 * GB, "4GB"), (1536 * MB, "1536MB"), (MB + 1, "1025kB"), (MB, "1MB")]
)
def test_sizes_are_set_in_the_largest_whole_unit(size: int, text: str) -> None:
    assert memory_text(size) == text


def test_the_graph_estimate_matches_what_pgvector_was_measured_to_hold() -> None:
    # pgvector 0.8.5 said "no longer fits into maintenance_work_mem" at 16MB after 9,642
    # elements at 256-d and 4,426 at 768-d (m = 16): 1,740 and 3,790 bytes an element.
    for dims, measured in ((256, 1740), (768, 3790)):
        estimate = hnsw_graph_bytes(1_000_000, dimensions=dims, m=16, bytes_per_dimension=4)
        assert abs(estimate / 1_000_000 - measured) / measured < 0.05


def _plan(target: str = "local:hash@768", **overrides: object) -> object:
    layout = layout_for(spec_for("docs", target=target), id_type="bigint")
    arguments: dict[str, object] = {
        "rows": 1_000_000,
        "memory": None,
        "memory_cap": 4 * GB,
        "server_memory": 64 * MB,
        "workers": None,
        "server_workers": 8,
    } | overrides
    return plan_build(layout, **arguments)  # type: ignore[arg-type]


def test_auto_sizes_the_build_to_the_graph_with_the_servers_workers() -> None:
    plan = _plan(target="local:hash@256")
    graph = hnsw_graph_bytes(1_000_000, dimensions=256, m=16, bytes_per_dimension=4)
    assert graph < plan.maintenance_work_mem < 1.3 * graph  # type: ignore[attr-defined]
    assert plan.maintenance_work_mem % MB == 0  # type: ignore[attr-defined]
    assert plan.parallel_workers == 8  # type: ignore[attr-defined]
    assert "sized to the graph of 1,000,000 rows" in plan.reason  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("overrides", "memory", "workers", "says"),
    [
        ({"rows": 10}, 64 * MB, 8, "sized to the graph"),  # never below the server's own
        ({"rows": 5_000_000}, 4 * GB, 8, "raise --max-maintenance-work-mem"),
        ({"memory": 256 * MB, "workers": 0}, 256 * MB, 0, "as given"),
        ({"memory_cap": 32 * MB}, 64 * MB, 8, "more than the cap 32MB"),
    ],
)
def test_auto_stays_within_the_cap_and_the_server_and_obeys_what_is_given(
    overrides: dict[str, object], memory: int, workers: int, says: str
) -> None:
    plan = _plan(**overrides)
    assert plan.maintenance_work_mem == memory  # type: ignore[attr-defined]
    assert plan.parallel_workers == workers  # type: ignore[attr-defined]
    assert says in plan.reason  # type: ignore[attr-defined]


def test_halfvec_halves_the_vectors_share_of_the_graph() -> None:
    full = hnsw_graph_bytes(1000, dimensions=3000, m=16, bytes_per_dimension=4)
    half = hnsw_graph_bytes(1000, dimensions=3000, m=16, bytes_per_dimension=2)
    assert half < 0.6 * full
