"""Which embedding version serves a search: sticky buckets, the rollout percentage, overrides.

Pure functions (the RNG is a parameter). The contract with the operator (DESIGN.md):
``bucket = hash(migration, sticky key) mod 100`` and v2 iff ``bucket < percentage``, so raising
the percentage only ever moves users from v1 to v2, never back, and a user sees one version
for the whole of a step. The hash is SHA-256, never Python's ``hash()``: that one is salted per
process (``PYTHONHASHSEED``), so two replicas, or one replica after a restart, would route the
same user differently.
"""

from __future__ import annotations

import hashlib
import random
from enum import Enum

BUCKETS = 100
FORCE_HEADER = "X-Embedding-Version"


class Version(str, Enum):
    V1 = "v1"  # the source embeddings (what serves before and after a rollback)
    V2 = "v2"  # the target embeddings

    @property
    def other(self) -> Version:
        return Version.V2 if self is Version.V1 else Version.V1


def bucket(*, migration: str, key: str) -> int:
    """The sticky bucket in [0, 100) of ``key`` (e.g. the ``X-User-Id`` value) in ``migration``.

    Pure and stable across processes, hosts and Python versions: the first 8 bytes of
    ``sha256(migration + "\\0" + key)`` (UTF-8) as a big-endian unsigned integer, mod 100. The
    migration takes part so a user is not always among the first 10 % of every rollout. The
    modulo bias of 2**64 mod 100 is about 1e-18 and does not matter.
    """
    # surrogatepass: header values are arbitrary strings; equal to UTF-8 for every valid one.
    data = f"{migration}\0{key}".encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(data).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def random_bucket(rng: random.Random) -> int:
    """A bucket for a request without a sticky key: the percentage still holds in aggregate."""
    return rng.randrange(BUCKETS)


def request_bucket(*, migration: str, key: str | None, rng: random.Random) -> int:
    """``bucket`` of the sticky key, or ``random_bucket`` when the request has none.

    A blank key counts as none: otherwise every client that sends an empty header would share
    one bucket and move to v2 together, all at one step.
    """
    if key is None or not key.strip():
        return random_bucket(rng)
    return bucket(migration=migration, key=key)


def choose(
    *,
    bucket: int,
    percentage: int,
    emergency: bool,
    gradual_enabled: bool = True,
    forced: Version | None = None,
) -> Version:
    """The version that serves a request in ``bucket``. Pure.

    An emergency serves v1, always: nothing bypasses it. Then a forced version
    (``X-Embedding-Version``, for testing, when the service allows it) wins: whoever sets it
    asked for exactly that version. Otherwise a disabled gradual migration
    (``FF_ENABLE_GRADUAL_MIGRATION=false``) serves v1, and v2 serves the buckets below
    ``percentage``. Raises ``ValueError`` for a bucket outside [0, 100) or a
    percentage outside [0, 100].
    """
    if not 0 <= bucket < BUCKETS:
        raise ValueError(f"bucket must be in [0, {BUCKETS}); got {bucket}")
    if not 0 <= percentage <= 100:
        raise ValueError(f"percentage must be in [0, 100]; got {percentage}")
    if emergency:
        return Version.V1
    if forced is not None:
        return forced
    if not gradual_enabled:
        return Version.V1
    return Version.V2 if bucket < percentage else Version.V1


def parse_forced(header_value: str | None) -> Version | None:
    """The version an ``X-Embedding-Version`` header forces, or None when the header is absent.

    Case-insensitive and stripped. Anything else, an empty value included, raises ``ValueError``
    (the app answers 400): a typo silently served by the rollout would mislead whoever is
    testing one version.
    """
    if header_value is None:
        return None
    try:
        return Version(header_value.strip().lower())
    except ValueError:
        allowed = ", ".join(v.value for v in Version)
        shown = header_value if len(header_value) <= 40 else header_value[:40] + "…"
        raise ValueError(
            f"{FORCE_HEADER} must be one of {allowed} (case-insensitive); got {shown!r}"
        ) from None
