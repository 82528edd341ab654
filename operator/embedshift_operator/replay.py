"""``embedshift rollout replay``: run the rollout core over recorded metric values. Pure.

Users tune a policy on last week's metrics before trusting it: this module takes a spec and a
series of recorded checks and says what :func:`embedshift_operator.core.decide` would have done at
each one. It reads no file and asks no server; its callers (the CLI, benchmarks) pass the lines
in, and the Prometheus range adapter passes its ranges to :func:`series_from_ranges`.

The series format, one JSON object per line::

    {"at": "2026-11-17T10:00:00Z", "p95-latency": 0.31, "p95-latency-vs-v1": 0.31,
     "p95-latency-vs-v1.v1": 0.35, "error-rate": null, "cache-hit-rate": "error",
     "requests": 512, "alert": false}

- ``at``: RFC 3339 with an offset; strictly increasing. Each line is one check at that time.
- ``<criterion name>``: a number, ``null`` (no data: an empty result or NaN) or ``"error"`` (the
  metric source failed). A criterion absent from a line is no data, as ``null``.
- ``<criterion name>.v1``: v1's value for a criterion that compares with v1 (``maxRatioToV1``);
  absent, v1 is taken as equal to v2, so the comparison passes.
- ``requests``: v2 requests in the window, the traffic gate (``minRequests``); absent, the
  traffic is assumed to be enough.
- ``alert``: ``true`` is a firing alert for this migration (rolls back at once).

The rollout starts at the first line's time, from the first step, as if the migration had just
been verified; that status is built by running ``decide`` itself through the migration's Jobs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from embedshift_operator.core import (
    AnalysisObservation,
    Decision,
    JobObservation,
    Measurement,
    Observations,
    RunJob,
    decide,
)
from embedshift_operator.resource import (
    CriterionResult,
    EmbeddingMigrationSpec,
    EmbeddingMigrationStatus,
    HistoryEntry,
    JobState,
    Phase,
    parse_duration,
)
from rag_service.criteria import Verdict

__all__ = [
    "RESERVED_KEYS",
    "ReplayDecision",
    "Replayer",
    "SeriesError",
    "SeriesPoint",
    "Value",
    "known_keys",
    "observations",
    "parse_series",
    "points_from_dicts",
    "replay",
    "series_from_ranges",
    "verified_status",
]

#: One recorded value: a number, None (no data) or "error" (the metric source failed).
Value = float | None | Literal["error"]

RESERVED_KEYS = ("at", "requests", "alert")
V1_SUFFIX = ".v1"
ALERT_NAME = "recorded-alert"


class SeriesError(ValueError):
    """A series line the replay cannot use. ``str()`` is one line naming the line and field."""


@dataclass(frozen=True)
class SeriesPoint:
    """One recorded check. ``values`` is keyed by criterion name (and ``<name>.v1``)."""

    at: datetime
    values: Mapping[str, Value]
    requests: Value | Literal["enough"] = "enough"  # "enough": not recorded, assume the gate passes
    alert: bool = False
    line: int = 0  # 1-based line number in the series (0: not from a file)


@dataclass(frozen=True)
class ReplayDecision:
    """What the core decided at one recorded check."""

    at: datetime
    phase: Phase
    percentage: int
    reason: str  # the transition's reason (StepPromoted, ThresholdBreached, …) or "Hold"
    message: str
    transition: bool  # the phase or step changed at this check
    results: tuple[CriterionResult, ...]  # this check's verdicts; empty when none was evaluated
    line: int = 0

    @property
    def verdicts(self) -> dict[str, Verdict]:
        return {r.name: r.verdict for r in self.results}


# ---- parsing ----------------------------------------------------------------------------------


def known_keys(spec: EmbeddingMigrationSpec) -> list[str]:
    """Every key a series line may hold for ``spec``, in the order people read them."""
    keys: list[str] = ["at"]
    for _, criterion in spec.analysis.criteria():
        keys.append(criterion.name)
        if criterion.bound.compares_versions:
            keys.append(criterion.name + V1_SUFFIX)
    return [*keys, "requests", "alert"]


def parse_series(spec: EmbeddingMigrationSpec, lines: Iterable[str]) -> list[SeriesPoint]:
    """Parse a JSON-lines series (blank lines are skipped). Raises :class:`SeriesError`."""

    def objects() -> Iterator[tuple[int, object]]:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                raise SeriesError(
                    f"line {number}: not JSON: {exc.msg} (column {exc.colno})"
                ) from None

    return _points(spec, objects())


def points_from_dicts(
    spec: EmbeddingMigrationSpec, lines: Iterable[Mapping[str, object]]
) -> list[SeriesPoint]:
    """Validate lines already decoded (e.g. from :func:`series_from_ranges`)."""
    return _points(spec, enumerate(lines, start=1))


def _points(
    spec: EmbeddingMigrationSpec, numbered: Iterable[tuple[int, object]]
) -> list[SeriesPoint]:
    _check_reserved(spec)
    known = known_keys(spec)
    allowed = set(known)
    points: list[SeriesPoint] = []
    for number, obj in numbered:
        point = _point(obj, number, allowed, known)
        if points and point.at <= points[-1].at:
            before = points[-1]
            raise SeriesError(
                f'line {number}: field "at": {_rfc3339(point.at)} is not after line '
                f"{before.line}'s {_rfc3339(before.at)}; times must increase"
            )
        points.append(point)
    if not points:
        raise SeriesError("the series has no lines")
    return points


def _check_reserved(spec: EmbeddingMigrationSpec) -> None:
    for _, criterion in spec.analysis.criteria():
        if criterion.name in RESERVED_KEYS:
            raise SeriesError(
                f"criterion {criterion.name!r} cannot be replayed: {', '.join(RESERVED_KEYS)} "
                "are series fields; rename the criterion"
            )


def _point(obj: object, number: int, allowed: set[str], known: list[str]) -> SeriesPoint:
    where = f"line {number}"
    if not isinstance(obj, Mapping):
        raise SeriesError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "at" not in obj:
        raise SeriesError(f'{where}: field "at" is missing (an RFC 3339 time)')
    at = _time(obj["at"], where)
    values: dict[str, Value] = {}
    requests: Value | Literal["enough"] = "enough"
    alert = False
    for key, raw in obj.items():
        if not isinstance(key, str) or key not in allowed:
            raise SeriesError(
                f'{where}: unknown field "{key}"; known: {", ".join(known)}'
                + _hint(str(key), allowed)
            )
        if key == "at":
            continue
        if key == "alert":
            if not isinstance(raw, bool):
                raise SeriesError(f'{where}: field "alert" must be true or false, got {_show(raw)}')
            alert = raw
            continue
        value = _value(raw, f'{where}: field "{key}"')
        if key == "requests":
            requests = value
        else:
            values[key] = value
    return SeriesPoint(at=at, values=values, requests=requests, alert=alert, line=number)


def _hint(key: str, allowed: set[str]) -> str:
    if key.endswith(V1_SUFFIX) and key[: -len(V1_SUFFIX)] in allowed:
        return f" ({key[: -len(V1_SUFFIX)]} does not compare with v1)"
    return ""


def _time(raw: object, where: str) -> datetime:
    problem = f'{where}: field "at" must be an RFC 3339 time with an offset'
    if not isinstance(raw, str):
        raise SeriesError(f"{problem}, got {_show(raw)}")
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        raise SeriesError(f"{problem} (e.g. 2026-11-17T10:00:00Z), got {raw!r}") from None
    if at.tzinfo is None:
        raise SeriesError(f"{problem} (Z or ±hh:mm), got {raw!r}")
    return at


def _value(raw: object, where: str) -> Value:
    if raw is None or raw == "error":
        return None if raw is None else "error"
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise SeriesError(f'{where} must be a number, null or "error", got {_show(raw)}')
    value = float(raw)
    return None if math.isnan(value) else value  # NaN is no data, as the metric source says


def _show(raw: object) -> str:
    text = json.dumps(raw, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "…"


def _rfc3339(at: datetime) -> str:
    text = at.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


# ---- observations -----------------------------------------------------------------------------


def observations(spec: EmbeddingMigrationSpec, point: SeriesPoint) -> Observations:
    """The core's view of one recorded check."""
    where = f"series line {point.line}" if point.line else "the series"
    measurements: dict[str, Measurement] = {}
    for _, criterion in spec.analysis.criteria():
        name = criterion.name
        value = point.values.get(name)
        query = f"recorded {name}"
        if criterion.bound.compares_versions:
            v1_key = name + V1_SUFFIX
            v1 = point.values.get(v1_key, value)  # absent: v1 as v2, so it passes
            measurements[name] = _measurement(
                query, value, v1, where, v1_query=f"recorded {v1_key}"
            )
        else:
            measurements[name] = _measurement(query, value, None, where)
    if point.requests == "enough":
        requests = Measurement(
            "recorded requests (not recorded: enough assumed)",
            value=float(spec.analysis.min_requests),
        )
    else:
        requests = _measurement("recorded requests", point.requests, None, where)
    return Observations(
        analysis=AnalysisObservation(requests=requests, measurements=measurements),
        alerts=(ALERT_NAME,) if point.alert else (),
    )


def _measurement(
    query: str, value: Value, v1: Value, where: str, *, v1_query: str = ""
) -> Measurement:
    if value == "error" or v1 == "error":
        return Measurement(query, v1_query=v1_query, error=f"recorded as an error in {where}")
    return Measurement(query, value=value, v1_value=v1, v1_query=v1_query)


# ---- the replay -------------------------------------------------------------------------------


def verified_status(
    spec: EmbeddingMigrationSpec, at: datetime, *, name: str = "replay"
) -> EmbeddingMigrationStatus:
    """The status right after verification: the first step, started at ``at``.

    Built by running :func:`decide` itself from an empty status, answering every Job it asks for
    with success, so the replay starts from a status the core can actually produce.
    """
    status = EmbeddingMigrationStatus()
    jobs: dict[str, JobObservation] = {}
    # Each tick starts up to ``parallelism`` migrate Jobs; setup, index and verify take a tick each.
    for _ in range(spec.migration.shards + 8):
        decision: Decision = decide(spec, status, Observations(jobs=dict(jobs)), at, name=name)
        status = decision.status
        if status.phase in (Phase.PROGRESSING, Phase.PROMOTED):
            return status
        for job in decision.of_type(RunJob):
            jobs[job.name] = JobObservation(JobState.SUCCEEDED)
    raise RuntimeError(f"the core did not reach the rollout (stuck in {status.phase.value})")


class Replayer:
    """Feeds recorded checks to :func:`decide` one at a time (the benchmark drives it per check,
    because its synthetic series depend on the percentage the core chose)."""

    def __init__(self, spec: EmbeddingMigrationSpec, start: datetime, *, name: str = "replay"):
        self.spec = spec
        self.name = name
        self.status = verified_status(spec, start, name=name)

    def feed(self, point: SeriesPoint) -> ReplayDecision:
        before = self.status
        decision = decide(
            self.spec, before, observations(self.spec, point), point.at, name=self.name
        )
        self.status = after = decision.status
        new = _new_entries(before.history, after.history)
        checked = after.analysis.time == point.at
        if new:
            reason = new[-1].reason
            message = "; ".join(e.message for e in new)
        else:
            reason, message = "Hold", _hold_message(self.spec, after, point.at, checked)
        return ReplayDecision(
            at=point.at,
            phase=after.phase,
            percentage=after.percentage,
            reason=reason,
            message=message,
            transition=bool(new),
            results=tuple(after.analysis.results) if checked else (),
            line=point.line,
        )


def replay(
    spec: EmbeddingMigrationSpec, points: Sequence[SeriesPoint], *, name: str = "replay"
) -> Iterator[ReplayDecision]:
    """One decision per recorded check; the rollout starts at the first point's time."""
    if not points:
        return
    replayer = Replayer(spec, points[0].at, name=name)
    for point in points:
        yield replayer.feed(point)


def _new_entries(
    before: Sequence[HistoryEntry], after: Sequence[HistoryEntry]
) -> list[HistoryEntry]:
    if not before:
        return list(after)
    last = before[-1]
    for index in range(len(after) - 1, -1, -1):
        if after[index] == last:
            return list(after[index + 1 :])
    return list(after)  # the bounded history dropped the old entry: everything is new


def _hold_message(
    spec: EmbeddingMigrationSpec, status: EmbeddingMigrationStatus, at: datetime, checked: bool
) -> str:
    phase = status.phase
    if phase in (Phase.ROLLED_BACK, Phase.FAILED, Phase.SUCCEEDED):
        return f"{phase.value}: holding {status.percentage} %"
    steps = spec.rollout.steps
    index = min(status.step_index, len(steps) - 1)
    step = steps[index]
    parts = [f"step {index + 1} of {len(steps)} ({status.percentage} %)"]
    if phase is Phase.PAUSED:
        parts.append("paused")
    started = status.step_started_at or at
    ends = started + parse_duration(step.min_duration)
    if at < ends:
        parts.append(f"minDuration {step.min_duration} ends at {_rfc3339(ends)}")
    if phase is not Phase.PROMOTED:
        parts.append(
            f"{status.analysis.consecutive_passes} of {spec.analysis.successful_checks} "
            "consecutive passes"
        )
    if checked:
        failing = [
            f"{r.name} {r.verdict.value}"
            for r in status.analysis.results
            if r.verdict is not Verdict.PASS and not r.dry_run
        ]
        if failing:
            parts.append("not passing: " + ", ".join(failing))
    return "; ".join(parts)


# ---- Prometheus range data --------------------------------------------------------------------


def series_from_ranges(
    ranges: Mapping[str, Sequence[tuple[datetime, float | None]]], step: timedelta
) -> list[dict[str, object]]:
    """Merge range-query results into series lines, one per ``step`` from the earliest point to
    the latest. Pure.

    ``ranges`` is keyed by series field: a criterion name, ``<name>.v1``, ``requests`` or
    ``alert`` (a value above zero is a firing alert, e.g. from ``ALERTS{…}``). A grid time where
    a range has no point (a gap in the data) or a NaN is ``null`` for it; points are placed on
    the nearest grid time. Validate the result with :func:`points_from_dicts`.
    """
    if step <= timedelta(0):
        raise ValueError(f"step must be longer than zero, got {step}")
    times = [t for points in ranges.values() for t, _ in points]
    if not times:
        return []
    for t in times:
        if t.tzinfo is None:
            raise ValueError(f"range point at {t.isoformat()} has no time zone")
    start = min(times)
    slots = round((max(times) - start) / step) + 1
    grid: list[dict[str, object]] = [{"at": _rfc3339(start + i * step)} for i in range(slots)]
    for key, points in ranges.items():
        for line in grid:
            line[key] = False if key == "alert" else None
        for t, value in points:
            slot = round((t - start) / step)
            clean = None if value is None or math.isnan(value) else value
            grid[slot][key] = (clean is not None and clean > 0) if key == "alert" else clean
    return grid
