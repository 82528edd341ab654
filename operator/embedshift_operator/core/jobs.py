"""Deterministic names for the Jobs and the follower of one resource. Pure.

A name is a function of the resource's name, the step, the data-plane hash and the attempt, so a
restarted driver asks for the same Job again (and creating a Job that exists is success), while a
new target or a retry after a failure gets fresh Jobs. Names fit Kubernetes' 63-character label
limit: a long resource name is cut and a digest of the whole name keeps it unique.
"""

from __future__ import annotations

import hashlib

from embedshift_operator.resource import JobKind

MAX_NAME = 63


def job_name(
    resource: str,
    kind: JobKind,
    *,
    data_hash: str,
    attempt: int = 1,
    shard: int | None = None,
    shards: int | None = None,
) -> str:
    """``docs-migrate-2of4-1a2b3c4d`` (shard 2 of 4), ``docs-setup-1a2b3c4d-r2`` (a retry)."""
    part = kind.value
    if shard is not None:
        part += f"-{shard}of{shards}"
    suffix = f"-{part}-{data_hash[:8]}" + (f"-r{attempt}" if attempt > 1 else "")
    return _fit(resource, suffix)


def follower_name(resource: str, *, data_hash: str) -> str:
    return _fit(resource, f"-follow-{data_hash[:8]}")


def config_name(resource: str, *, digest: str) -> str:
    """The ConfigMap holding the data-plane spec the Jobs read (``digest``: of its content)."""
    return _fit(resource, f"-spec-{digest[:8]}")


def _fit(resource: str, suffix: str) -> str:
    room = MAX_NAME - len(suffix)
    if len(resource) <= room:
        return resource + suffix
    digest = hashlib.sha256(resource.encode()).hexdigest()[:6]
    return f"{resource[: room - 7].rstrip('-.')}-{digest}{suffix}"
