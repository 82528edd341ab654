"""routing.py: sticky buckets are uniform and stable everywhere; the percentage only moves users up.

What a user notices: the share of traffic on v2 is the percentage the operator set; one user
stays on one version across requests, replicas and restarts; raising the percentage never sends
anyone back to v1; a bad ``X-Embedding-Version`` is refused with a message saying what to send.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rag_service.routing import (
    Version,
    bucket,
    choose,
    parse_forced,
    random_bucket,
    request_bucket,
)

MIGRATION = "default/docs"
migrations = st.text(min_size=1, max_size=60)
keys = st.text(max_size=60)
percentages = st.integers(min_value=0, max_value=100)
USERS = [bucket(migration=MIGRATION, key=f"user-{i}") for i in range(2000)]


# Pinned: a replica running the next release must route every user as this one does, or a
# rolling upgrade reshuffles users between versions mid-step.
@pytest.mark.parametrize(
    ("migration", "key", "expected"),
    [
        ("default/docs", "alice", 63),
        ("default/docs", "bob", 10),
        ("prod/kb", "alice", 21),  # another migration, another bucket for the same user
        ("default/docs", "", 2),
        ("default/docs", "ユーザー", 1),
    ],
)
def test_bucket_is_the_documented_sha256_and_does_not_change(
    migration: str, key: str, expected: int
) -> None:
    digest = hashlib.sha256(f"{migration}\0{key}".encode()).digest()
    assert int.from_bytes(digest[:8], "big") % 100 == expected
    assert bucket(migration=migration, key=key) == expected


def test_buckets_are_uniform_over_100k_keys() -> None:
    rng = random.Random(20240601)
    counts = Counter(
        bucket(migration=MIGRATION, key=f"{rng.getrandbits(64):x}") for _ in range(100_000)
    )
    assert set(counts) == set(range(100))
    expected = 100_000 / 100
    chi_square = sum((counts[b] - expected) ** 2 / expected for b in range(100))
    # 99 degrees of freedom: the 0.1 % critical value is 148.2 (the mean is 99).
    assert chi_square < 148.2, chi_square
    # And no bucket is far off: ±15 % of 1000 is about 4.7 standard deviations.
    assert all(850 <= counts[b] <= 1150 for b in range(100)), counts.most_common(3)


def test_sequential_user_ids_are_as_uniform_as_random_ones() -> None:
    # Real sticky keys are often "user-1", "user-2", ...: no structure may leak into buckets.
    counts = Counter(bucket(migration=MIGRATION, key=f"user-{i}") for i in range(100_000))
    expected = 1000
    chi_square = sum((counts[b] - expected) ** 2 / expected for b in range(100))
    assert chi_square < 148.2, chi_square


@pytest.mark.parametrize("hash_seed", ["0", "1", "4242", "random"])
def test_buckets_are_the_same_in_another_process_whatever_its_hash_seed(hash_seed: str) -> None:
    pairs = [(MIGRATION, f"user-{i}") for i in range(200)] + [("ns/other", "ünïcode ✓")]
    script = (
        "import json, sys\n"
        "from rag_service.routing import bucket\n"
        "pairs = json.load(sys.stdin)\n"
        "print(json.dumps([bucket(migration=m, key=k) for m, k in pairs]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(pairs),
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    assert json.loads(done.stdout) == [bucket(migration=m, key=k) for m, k in pairs]


@given(migration=migrations, key=keys)
def test_bucket_is_in_range_and_repeatable(migration: str, key: str) -> None:
    first = bucket(migration=migration, key=key)
    assert 0 <= first < 100
    assert bucket(migration=migration, key=key) == first


@given(migration=migrations, key=keys, low=percentages, high=percentages)
def test_raising_the_percentage_never_moves_a_user_back_to_v1(
    migration: str, key: str, low: int, high: int
) -> None:
    low, high = sorted((low, high))
    b = bucket(migration=migration, key=key)
    before = choose(bucket=b, percentage=low, emergency=False)
    after = choose(bucket=b, percentage=high, emergency=False)
    assert not (before is Version.V2 and after is Version.V1)


@given(percentage=percentages)
def test_the_share_of_users_on_v2_is_the_percentage(percentage: int) -> None:
    on_v2 = sum(
        choose(bucket=b, percentage=percentage, emergency=False) is Version.V2 for b in USERS
    )
    # 2000 users: a binomial standard deviation is at most 22 users (1.1 points).
    assert abs(on_v2 / len(USERS) * 100 - percentage) <= 4


@pytest.mark.parametrize(
    ("percentage", "emergency", "gradual_enabled", "forced", "expected"),
    [
        # No traffic on v2 at 0 %, all of it at 100 %.
        (0, False, True, None, {Version.V1}),
        (100, False, True, None, {Version.V2}),
        (50, False, True, None, {Version.V1, Version.V2}),
        # An emergency or a disabled gradual migration serves v1, whatever the percentage.
        (100, True, True, None, {Version.V1}),
        (100, False, False, None, {Version.V1}),
        # A forced version wins over the percentage and the flag (a tester asked for it)...
        (0, False, True, Version.V2, {Version.V2}),
        (100, False, True, Version.V1, {Version.V1}),
        (0, False, False, Version.V2, {Version.V2}),
        # ...never over an emergency: nothing bypasses it.
        (100, True, True, Version.V2, {Version.V1}),
        (0, True, False, Version.V2, {Version.V1}),
    ],
)
def test_choose_over_every_bucket(
    percentage: int,
    emergency: bool,
    gradual_enabled: bool,
    forced: Version | None,
    expected: set[Version],
) -> None:
    served = {
        choose(
            bucket=b,
            percentage=percentage,
            emergency=emergency,
            gradual_enabled=gradual_enabled,
            forced=forced,
        )
        for b in range(100)
    }
    assert served == expected


@pytest.mark.parametrize(
    ("b", "percentage", "expected"),
    [
        (0, 1, Version.V2),  # 1 %: exactly bucket 0
        (1, 1, Version.V1),
        (9, 10, Version.V2),  # v2 iff bucket < percentage
        (10, 10, Version.V1),
        (99, 99, Version.V1),
        (99, 100, Version.V2),
    ],
)
def test_v2_serves_the_buckets_below_the_percentage(
    b: int, percentage: int, expected: Version
) -> None:
    assert choose(bucket=b, percentage=percentage, emergency=False) is expected


@pytest.mark.parametrize(
    ("b", "percentage", "message"),
    [(-1, 10, "bucket"), (100, 10, "bucket"), (5, -1, "percentage"), (5, 101, "percentage")],
)
def test_choose_refuses_out_of_range_inputs(b: int, percentage: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose(bucket=b, percentage=percentage, emergency=False)


def test_requests_without_a_key_spread_over_all_buckets_reproducibly() -> None:
    draws = [random_bucket(random.Random(7)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same bucket: the RNG is the only source
    rng = random.Random(7)
    counts = Counter(random_bucket(rng) for _ in range(100_000))
    assert set(counts) == set(range(100))
    assert all(850 <= n <= 1150 for n in counts.values())


@pytest.mark.parametrize("key", [None, "", "   "])
def test_a_missing_or_blank_key_gets_a_random_bucket(key: str | None) -> None:
    rng = random.Random(1)
    seen = {request_bucket(migration=MIGRATION, key=key, rng=rng) for _ in range(500)}
    assert len(seen) > 90  # not one shared bucket for everyone without a key


def test_a_present_key_gets_its_sticky_bucket_and_leaves_the_rng_alone() -> None:
    rng = random.Random(1)
    state = rng.getstate()
    assert request_bucket(migration=MIGRATION, key="alice", rng=rng) == 63
    assert rng.getstate() == state


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("v1", Version.V1),
        ("v2", Version.V2),
        ("V2", Version.V2),
        ("  v1 ", Version.V1),
    ],
)
def test_parse_forced_accepts_v1_and_v2(header: str | None, expected: Version | None) -> None:
    assert parse_forced(header) is expected


@pytest.mark.parametrize("header", ["", "v3", "2", "version2", "v1,v2", "V 2", "x" * 500])
def test_parse_forced_refuses_anything_else_naming_the_header_and_the_values(
    header: str,
) -> None:
    with pytest.raises(ValueError) as raised:
        parse_forced(header)
    message = str(raised.value)
    assert "X-Embedding-Version" in message
    assert "v1" in message and "v2" in message
    assert len(message) < 200  # a huge header is not echoed back whole


def test_versions_are_their_header_values_and_know_each_other() -> None:
    assert [v.value for v in Version] == ["v1", "v2"]
    assert isinstance(Version.V1, str)
    assert json.dumps({"version": Version.V2}) == '{"version": "v2"}'
    assert Version.V1.other is Version.V2
    assert Version.V2.other is Version.V1
