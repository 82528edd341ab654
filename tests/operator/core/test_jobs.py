"""Job and follower names: deterministic, unique, and within Kubernetes' 63 characters."""

from __future__ import annotations

import re
from itertools import product

import pytest

from embedshift_operator.core import follower_name, job_name
from embedshift_operator.resource import JobKind

HASH = "1a2b3c4d5e6f7a8b"
OTHER_HASH = "ffffeeee11112222"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")

RESOURCE_NAMES = [
    pytest.param("docs", id="short"),
    pytest.param("support-knowledge-base-embeddings-to-text-embedding-3-small", id="59-chars"),
    pytest.param("a" * 63, id="63-chars"),
    pytest.param("a" * 253, id="253-chars"),
    pytest.param("x-" * 100 + "x", id="dashes-at-every-cut"),
    pytest.param("docs.v2." * 20 + "z", id="dots"),
]


def _all_names(resource: str, data_hash: str = HASH) -> list[str]:
    names = []
    for attempt in (1, 2, 100):
        for kind in (JobKind.SETUP, JobKind.INDEX, JobKind.VERIFY):
            names.append(job_name(resource, kind, data_hash=data_hash, attempt=attempt))
        for shard, shards in [*product(range(12), [12]), (0, 1), (999, 1000), (1, 2)]:
            names.append(
                job_name(
                    resource,
                    JobKind.MIGRATE,
                    data_hash=data_hash,
                    attempt=attempt,
                    shard=shard,
                    shards=shards,
                )
            )
    return names


@pytest.mark.parametrize("resource", RESOURCE_NAMES)
def test_names_fit_63_characters_and_are_unique(resource: str) -> None:
    names = _all_names(resource)
    follower = follower_name(resource, data_hash=HASH)
    for name in [*names, follower]:
        assert len(name) <= 63, name
        assert DNS_LABEL.match(name), name
    assert len(set(names)) == len(names)
    assert follower not in names


@pytest.mark.parametrize("resource", RESOURCE_NAMES)
def test_names_are_deterministic(resource: str) -> None:
    assert _all_names(resource) == _all_names(resource)
    assert follower_name(resource, data_hash=HASH) == follower_name(resource, data_hash=HASH)


@pytest.mark.parametrize("resource", RESOURCE_NAMES)
def test_a_new_data_plane_gets_new_names(resource: str) -> None:
    assert not set(_all_names(resource)) & set(_all_names(resource, OTHER_HASH))
    assert follower_name(resource, data_hash=HASH) != follower_name(resource, data_hash=OTHER_HASH)


def test_long_names_that_differ_only_past_the_cut_stay_apart() -> None:
    a, b = "a" * 100 + "-one", "a" * 100 + "-two"
    assert not set(_all_names(a)) & set(_all_names(b))
    assert follower_name(a, data_hash=HASH) != follower_name(b, data_hash=HASH)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param({"kind": JobKind.SETUP}, "docs-setup-1a2b3c4d", id="setup"),
        pytest.param(
            {"kind": JobKind.MIGRATE, "shard": 2, "shards": 4},
            "docs-migrate-2of4-1a2b3c4d",
            id="shard",
        ),
        pytest.param({"kind": JobKind.VERIFY, "attempt": 2}, "docs-verify-1a2b3c4d-r2", id="retry"),
    ],
)
def test_short_names_read_plainly(kwargs: dict[str, object], expected: str) -> None:
    assert job_name("docs", data_hash=HASH, **kwargs) == expected  # type: ignore[arg-type]
    assert follower_name("docs", data_hash=HASH) == "docs-follow-1a2b3c4d"
