"""The whole ``EmbeddingMigration`` resource, spec and status, as typed frozen pydantic models.

Pure: no I/O, no clock, no kopf or kubernetes. The kopf operator and the local driver
(``embedshift rollout run``) parse the same YAML into :class:`EmbeddingMigration`; the CRD in
``crds/`` is generated from these models (``embedshift_operator.crd``), and a test keeps them in
step. Defaults are the migration guide's numbers: steps 10 → 25 → 50 → 75 → 100 % with 72 h each
and 48 h at 100 %, the guide's success criteria and rollback thresholds (``rag_service.criteria``).

Field names are the resource's camelCase names (``minDuration``); Python uses snake_case.
Durations are Go-style strings (``72h``, ``30s``, ``1h30m``), as Kubernetes and Flagger write them.
Every validation error names the field path and the fix.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from rag_service.criteria import (
    DEFAULT_ROLLBACK_THRESHOLDS,
    DEFAULT_SUCCESS_CRITERIA,
    METRICS,
    Bound,
    CriterionDefault,
    MetricSource,
    Verdict,
)
from rag_service.errors import ConfigError
from rag_service.identifiers import IDENTIFIER_FIX, IDENTIFIER_PATTERN, MAX_IDENTIFIER_BYTES
from rag_service.spec import (
    API_VERSION,
    KIND,
    MAX_HALFVEC_INDEX_DIMS,
    MAX_VECTOR_INDEX_DIMS,
    NAMESPACE_NAME,
    RESOURCE_NAME,
    DatabaseSpec,
    DataPlaneSpec,
    EmbeddingSpec,
    MigrationSpec,
    SecretKeyRef,
    SpecModel,
    cel_rule,
    cel_rules,
    read_yaml,
    validation_message,
)

# The API the resource is served under (the CRD, the operator and the CLI all address it so).
GROUP, _, VERSION = API_VERSION.partition("/")
PLURAL = "embeddingmigrations"

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "AnalysisSpec",
    "AnalysisStatus",
    "CleanupSpec",
    "CleanupStatus",
    "Condition",
    "ConditionType",
    "CountsKind",
    "Criterion",
    "CriterionKind",
    "CriterionResult",
    "EmbeddingMigration",
    "EmbeddingMigrationSpec",
    "EmbeddingMigrationStatus",
    "HistoryEntry",
    "JobKind",
    "JobRecord",
    "JobState",
    "MigrationProgress",
    "Phase",
    "PrometheusSpec",
    "RolloutSpec",
    "RolloutStep",
    "SpecHash",
    "VerificationStatus",
    "load_migration",
    "parse_duration",
    "parse_migration",
    "spec_hash",
]

HISTORY_LIMIT = 50  # status.history keeps the newest entries: enough to tell a rollout's story
MAX_STEPS = 20
MAX_CRITERIA = 32
# Bounds the API server's estimated cost of the query's CEL rule, run on every criterion.
MAX_QUERY_LENGTH = 4096

# ---- durations --------------------------------------------------------------------------------

# [0-9], not \d: the CRD's pattern runs in Go's RE2, where \d is ASCII but Python's is Unicode.
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(h|ms|m|s))+$"
_DURATION = re.compile(DURATION_PATTERN)
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(h|ms|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
# A duration whose every number is zero, as a CEL string literal (hence the doubled backslash).
_ZERO_DURATION = r"^(0+(\\.0+)?(h|ms|m|s))+$"
MAX_DURATION_LENGTH = 32  # bounds the CEL cost of matching it; "1h30m" needs 5
# Digits per number: 999999999h is 114,000 years. The API server cannot add durations up to
# find one too long for a timedelta, but it can count digits; both refuse the same strings.
MAX_DURATION_DIGITS = 9
_TOO_MANY_DIGITS = f"(^|[hms])[0-9]{{{MAX_DURATION_DIGITS + 1}}}"  # a number starts at ^ or a unit
_TOO_LONG_MESSAGE = (
    f"too long a duration; write at most {MAX_DURATION_DIGITS} digits per number "
    "(nothing needs more than years)"
)


def parse_duration(value: str) -> timedelta:
    """A Go-style duration (``72h``, ``30s``, ``1h30m``, ``500ms``) as a timedelta. Pure.

    Days are not a Go unit (a day is not always 24 h); write ``168h`` for a week.
    """
    if not isinstance(value, str) or not _DURATION.match(value):
        raise ValueError(
            f"{value!r} is not a duration; write it as Go does, e.g. 30s, 5m, 72h or 1h30m "
            "(units h, m, s, ms; no days: 168h is a week)"
        )
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(value))
    try:
        return timedelta(seconds=seconds)
    except OverflowError:  # timedelta holds about 2.7 million years
        raise ValueError(
            f"{value!r} is too long a duration; nothing needs more than years"
        ) from None


def _duration_shape(value: Any) -> Any:
    # Before the pattern constraint, so a bad duration gets this message, not the regex.
    if isinstance(value, str):
        parse_duration(value)
        if re.search(_TOO_MANY_DIGITS, value):
            raise ValueError(f"{value!r} is {_TOO_LONG_MESSAGE}")
    return value


def _positive_duration(value: str) -> str:
    if parse_duration(value) <= timedelta(0):
        raise ValueError(f"{value!r} must be longer than zero, e.g. 30s")
    return value


_NOT_TOO_LONG = cel_rule(f"!self.matches('{_TOO_MANY_DIGITS}')", _TOO_LONG_MESSAGE)

# The constraints are the CRD's (pattern, maxLength); the validators give the messages.
# Each layer lists every rule of its type: an outer Field's json_schema_extra replaces the inner.
NonNegativeDuration = Annotated[
    str,
    StringConstraints(max_length=MAX_DURATION_LENGTH, pattern=DURATION_PATTERN),
    BeforeValidator(_duration_shape),
    Field(json_schema_extra=cel_rules(_NOT_TOO_LONG)),
]
Duration = Annotated[
    NonNegativeDuration,
    AfterValidator(_positive_duration),
    Field(
        json_schema_extra=cel_rules(
            _NOT_TOO_LONG,
            cel_rule(f"!self.matches('{_ZERO_DURATION}')", "must be longer than zero, e.g. 30s"),
        )
    ),
]


def _matching(pattern: str, fix: str) -> BeforeValidator:
    """Refuse a string not matching ``pattern`` with ``fix`` (before the pattern constraint
    that puts the same pattern in the CRD, whose own message would only quote the regex)."""
    compiled = re.compile(pattern)

    def check(value: Any) -> Any:
        if isinstance(value, str) and not compiled.match(value):
            raise ValueError(f"{value!r} {fix}")
        return value

    return BeforeValidator(check)


# ---- spec -------------------------------------------------------------------------------------


class _Model(SpecModel):
    """A part of the operator's spec: as strict about JSON's types as the API server."""


class RolloutStep(_Model):
    """One step: route ``percentage`` % of users to v2 for at least ``minDuration``."""

    percentage: int = Field(
        ge=1, le=100, description="Share of users (sticky buckets) routed to v2, 1–100."
    )
    min_duration: NonNegativeDuration = Field(
        default="72h",
        description="Least time at this step before it may be promoted (Go duration, e.g. 72h).",
    )


def _guide_schedule() -> list[RolloutStep]:
    # The guide's "Rollout Schedule": days 1-3, 4-6, 7-9, 10-12 and 13-14.
    return [
        RolloutStep(percentage=10, min_duration="72h"),
        RolloutStep(percentage=25, min_duration="72h"),
        RolloutStep(percentage=50, min_duration="72h"),
        RolloutStep(percentage=75, min_duration="72h"),
        RolloutStep(percentage=100, min_duration="48h"),
    ]


# Standard CEL has no ranges over indexes; a literal list of every index a step may have does
# it (steps has maxItems MAX_STEPS, so the list is complete).
_STEP_INDEXES = ", ".join(str(i) for i in range(1, MAX_STEPS))
_STEP_RULES = [
    cel_rule(
        f"[{_STEP_INDEXES}].all(i, i >= size(self) || self[i].percentage > self[i - 1].percentage)",
        "each step's percentage must be above the one before (e.g. 10, 25, 50, 75, 100); "
        "reorder the steps or remove the repeated one",
    ),
    cel_rule(
        "size(self) == 0 || self[size(self) - 1].percentage == 100",
        "the last step must be 100 %; add a final step of 100 (use maxPercentage to stop lower)",
    ),
]
_HEADER = r"^[A-Za-z0-9-]+$"


class RolloutSpec(_Model):
    """How traffic moves to v2: the steps, a ceiling, a pause switch and the sticky key."""

    steps: list[RolloutStep] = Field(
        default_factory=_guide_schedule,
        min_length=1,
        max_length=MAX_STEPS,
        description="Percentages strictly increasing within 1–100 and ending at 100, each "
        "with its minDuration. Default: the guide's 10/25/50/75 % for 72h each, 100 % for 48h.",
        json_schema_extra=cel_rules(*_STEP_RULES),
    )
    max_percentage: int = Field(
        default=100,
        ge=0,
        le=100,
        description="Ceiling on the effective percentage, applied at once. 0 is a manual "
        "rollback (commit it to Git); raising it again retries from the first step.",
    )
    paused: bool = Field(
        default=False,
        description="Hold the current step. Rollback thresholds still act while paused.",
    )
    sticky_key: Annotated[
        str, _matching(_HEADER, "is not an HTTP header name; use letters, digits and '-'")
    ] = Field(
        default="X-User-Id",
        max_length=256,
        pattern=_HEADER,
        description="Request header whose value picks the user's bucket (sticky routing).",
    )

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[RolloutStep]) -> list[RolloutStep]:
        for i, (before, after) in enumerate(itertools.pairwise(steps), start=1):
            if after.percentage <= before.percentage:
                raise ValueError(
                    f"step {i} ({after.percentage} %) must be above step {i - 1} "
                    f"({before.percentage} %): percentages strictly increase"
                )
        if steps and steps[-1].percentage != 100:
            raise ValueError(
                f"the last step is {steps[-1].percentage} %; end the steps at 100 "
                "(use maxPercentage to stop lower)"
            )
        return steps


_URL = r"^https?://[^\s/]+.*$"


class PrometheusSpec(_Model):
    """Where the analysis reads the metric contract."""

    url: Annotated[
        str,
        _matching(_URL, "is not an http(s) URL; write it as http://prometheus.monitoring:9090"),
    ] = Field(
        max_length=2048,
        pattern=_URL,
        description="Prometheus base URL (http:// or https://), including any route prefix.",
    )
    bearer_token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding a bearer token for Prometheus, if needed."
    )


class CriterionKind(str, Enum):
    """Which list a criterion comes from."""

    SUCCESS = "success"  # must pass to promote
    ROLLBACK = "rollback"  # breached → RolledBack


_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_BLANK_QUERY_FIX = "write a PromQL expression or use metric"
# Built-in metrics without a v1 to compare with (read from the database, not Prometheus).
_NOT_COMPARABLE = [name for name, m in METRICS.items() if m.source is not MetricSource.PROMETHEUS]
_CRITERION_RULES = [
    cel_rule(
        "has(self.metric) != has(self.query)",
        "set exactly one of metric (a built-in metric) and query (custom PromQL)",
    ),
    cel_rule(
        "(has(self.min) ? 1 : 0) + (has(self.max) ? 1 : 0) + (has(self.maxRatioToV1) ? 1 : 0) == 1",
        "set exactly one of min, max and maxRatioToV1",
    ),
    cel_rule(
        "!has(self.maxRatioToV1) || (has(self.metric) && !(self.metric in "
        + json.dumps(_NOT_COMPARABLE).replace('"', "'")
        + "))",
        "maxRatioToV1 compares v2 with v1 and needs a built-in Prometheus metric; use min or max "
        "with a custom query",
        field_path=".maxRatioToV1",
    ),
]


class Criterion(_Model):
    """One check: a built-in ``metric`` or a custom PromQL ``query``, and where it must lie."""

    model_config = ConfigDict(json_schema_extra=cel_rules(*_CRITERION_RULES))

    name: Annotated[
        str,
        _matching(
            _NAME,
            "is not a criterion name; use lowercase letters, digits and '-' (at most 63, "
            "starting and ending with a letter or digit), e.g. p95-latency",
        ),
    ] = Field(
        max_length=63,
        pattern=_NAME,
        description="Unique name in this analysis (lowercase letters, digits and '-').",
    )
    metric: str | None = Field(
        default=None,
        max_length=64,
        description="A built-in metric of the contract: "
        + ", ".join(METRICS)
        + ". Scoped to this migration and the analysis window.",
        # An enum in the CRD only: the validator below refuses an unknown one with the list.
        json_schema_extra={"enum": list[Any](METRICS)},
    )
    query: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_QUERY_LENGTH,
        description="Custom PromQL returning one number; {{ migration }}, {{ namespace }}, "
        "{{ name }} and {{ window }} are filled in.",
        json_schema_extra=cel_rules(
            # The CEL string literal '\\S' is the regex \S: some character that is not blank.
            cel_rule(r"self.matches('\\S')", f"query is blank; {_BLANK_QUERY_FIX}")
        ),
    )
    min: float | None = Field(default=None, description="Passes when the value is ≥ min.")
    max: float | None = Field(default=None, description="Passes when the value is ≤ max.")
    max_ratio_to_v1: float | None = Field(
        default=None,
        alias="maxRatioToV1",
        gt=0,
        description="Passes when v2's value ≤ this × v1's, measured in the same check "
        "(built-in metrics only).",
    )
    for_: int = Field(
        default=1,
        alias="for",
        ge=1,
        le=100,
        description="Rollback thresholds: consecutive failing checks before rolling back. "
        "Success criteria must pass on every one of successfulChecks checks, so it does not "
        "apply to them.",
    )
    dry_run: bool = Field(
        default=False, description="Evaluate and record the verdict, never act on it."
    )

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(f"query is blank; {_BLANK_QUERY_FIX}")
        return value

    @model_validator(mode="after")
    def _one_source_one_bound(self) -> Criterion:
        if (self.metric is None) == (self.query is None):
            raise ValueError(
                f"criterion {self.name!r}: set exactly one of metric (built-in) and query (PromQL)"
            )
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(
                f"criterion {self.name!r}: unknown metric {self.metric!r}; use one of "
                + ", ".join(METRICS)
                + ", or a custom query"
            )
        bounds = [b for b in (self.min, self.max, self.max_ratio_to_v1) if b is not None]
        if len(bounds) != 1:
            raise ValueError(
                f"criterion {self.name!r}: set exactly one of min, max and maxRatioToV1 "
                f"(got {len(bounds)})"
            )
        if self.max_ratio_to_v1 is not None and (
            self.metric is None or METRICS[self.metric].source is not MetricSource.PROMETHEUS
        ):
            raise ValueError(
                f"criterion {self.name!r}: maxRatioToV1 compares v2 with v1 and needs a "
                "built-in Prometheus metric; use min or max with a custom query"
            )
        return self

    @property
    def bound(self) -> Bound:
        return Bound(min=self.min, max=self.max, max_ratio_to_v1=self.max_ratio_to_v1)

    @classmethod
    def from_default(cls, default: CriterionDefault) -> Criterion:
        b = default.bound
        return cls(
            name=default.name,
            metric=default.metric,
            min=b.min,
            max=b.max,
            max_ratio_to_v1=b.max_ratio_to_v1,
        )


def _default_success() -> list[Criterion]:
    return [Criterion.from_default(c) for c in DEFAULT_SUCCESS_CRITERIA]


def _default_rollback() -> list[Criterion]:
    return [Criterion.from_default(c) for c in DEFAULT_ROLLBACK_THRESHOLDS]


def _unique_within(items: str) -> str:
    # Parenthesised: the caller joins these with &&, which binds tighter than ||.
    return (
        f"(!has(self.{items}) || self.{items}.all(c, self.{items}.exists_one(d, d.name == c.name)))"
    )


_UNIQUE_NAMES = cel_rule(
    " && ".join(
        [
            _unique_within("successCriteria"),
            _unique_within("rollbackThresholds"),
            "(!has(self.successCriteria) || !has(self.rollbackThresholds) || "
            "self.successCriteria.all(c, !self.rollbackThresholds.exists(r, r.name == c.name)))",
        ]
    ),
    "criterion names must be unique across successCriteria and rollbackThresholds; rename the "
    "repeated one",
)


class AnalysisSpec(_Model):
    """When v2 may take more traffic, and when it must give it all back."""

    model_config = ConfigDict(json_schema_extra=cel_rules(_UNIQUE_NAMES))

    prometheus: PrometheusSpec | None = Field(
        default=None,
        description="The Prometheus that scrapes rag_service. Without it nothing can pass, "
        "so the rollout holds at its first step.",
    )
    interval: Duration = Field(
        default="30s",
        description="Time between checks (half of Flagger's default, so a breach is acted on "
        "sooner).",
    )
    window: Duration = Field(
        default="5m", description="Range of each query (PromQL [window]), e.g. 5m."
    )
    min_requests: int = Field(
        default=100,
        ge=0,
        description="v2 requests in the window below which every criterion is nodata: low "
        "traffic never promotes on noise.",
    )
    successful_checks: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Consecutive checks where every success criterion passes needed to promote.",
    )
    success_criteria: list[Criterion] = Field(
        default_factory=_default_success,
        max_length=MAX_CRITERIA,
        description="All must pass to promote. Default: the guide's success criteria.",
    )
    rollback_thresholds: list[Criterion] = Field(
        default_factory=_default_rollback,
        max_length=MAX_CRITERIA,
        description="A criterion failing its 'for' consecutive checks rolls v2 back to 0 %. "
        "Default: v2 error rate > 10 %, v2 p95 > 1.2 s.",
    )
    no_data: Literal["hold", "fail"] = Field(
        default="hold",
        description="nodata on a success criterion: hold (never promotes) or fail (also "
        "counts against a rollback threshold).",
    )
    on_error: Literal["hold", "rollback"] = Field(
        default="hold",
        description="When the metric source fails (Prometheus down): hold, or roll back.",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> AnalysisSpec:
        seen: set[str] = set()
        for criterion in (*self.success_criteria, *self.rollback_thresholds):
            if criterion.name in seen:
                raise ValueError(
                    f"criterion name {criterion.name!r} is used twice; names must be unique "
                    "across successCriteria and rollbackThresholds"
                )
            seen.add(criterion.name)
        return self

    def criteria(self) -> list[tuple[CriterionKind, Criterion]]:
        """Every criterion with its kind, success criteria first."""
        return [(CriterionKind.SUCCESS, c) for c in self.success_criteria] + [
            (CriterionKind.ROLLBACK, c) for c in self.rollback_thresholds
        ]


class CleanupSpec(_Model):
    """What happens to the source vectors after success. Nothing is destroyed unless asked."""

    retain_source_for: NonNegativeDuration = Field(
        default="168h",
        description="Keep the v1 column this long after Succeeded (the guide's week of backup).",
    )
    drop_source: bool = Field(
        default=False,
        description="Drop the v1 embedding column after retainSourceFor. Default false.",
    )


# The API server's copy of DatabaseSpec's identifier checks, with their own pattern
# (rag_service.identifiers): one regex for both validators.
_IDENTIFIER_FIX = f"{IDENTIFIER_FIX} (at most {MAX_IDENTIFIER_BYTES} bytes)"


def _cel_regex(pattern: str) -> str:
    """``pattern`` as a CEL string literal's content (its backslashes doubled)."""
    return pattern.replace("\\", "\\\\")


_TABLE = rf"^{IDENTIFIER_PATTERN}(\.{IDENTIFIER_PATTERN})?$"  # table or schema.table
_DATABASE_RULES = [
    cel_rule(
        f"self.table.matches('{_cel_regex(_TABLE)}')",
        f"not a plain SQL table name; write table or schema.table and {_IDENTIFIER_FIX}",
        field_path=".table",
    ),
    *(
        cel_rule(
            f"!has(self.{column}) || self.{column}.matches('^{IDENTIFIER_PATTERN}$')",
            f"not a plain SQL identifier; {_IDENTIFIER_FIX}",
            field_path=f".{column}",
        )
        for column in ("idColumn", "textColumn", "categoryColumn", "sourceEmbeddingColumn")
    ),
]

# The API server's copy of EmbeddingSpec.check_indexable (pgvector's index limits).
_HALFVEC = "(has(self.index) && has(self.index.halfvec) && self.index.halfvec)"
_INDEXABLE_RULES = [
    cel_rule(
        f"{_HALFVEC} || self.dimensions <= {MAX_VECTOR_INDEX_DIMS}",
        f"pgvector indexes a vector column of at most {MAX_VECTOR_INDEX_DIMS} dimensions; set "
        f"index.halfvec: true (up to {MAX_HALFVEC_INDEX_DIMS}) or lower dimensions",
        field_path=".dimensions",
    ),
    cel_rule(
        f"!{_HALFVEC} || self.dimensions <= {MAX_HALFVEC_INDEX_DIMS}",
        f"pgvector indexes a halfvec column of at most {MAX_HALFVEC_INDEX_DIMS} dimensions; "
        "lower dimensions",
        field_path=".dimensions",
    ),
]


class EmbeddingMigrationSpec(_Model):
    """``spec``: the data plane (rag_service's models) plus the rollout it is carried through."""

    database: DatabaseSpec = Field(
        description="The source table and how to reach it.",
        json_schema_extra=cel_rules(*_DATABASE_RULES),
    )
    source: EmbeddingSpec | None = Field(
        default=None, description="The model behind the existing (v1) vectors."
    )
    target: EmbeddingSpec = Field(
        description="The model to re-embed into (v2).",
        json_schema_extra=cel_rules(*_INDEXABLE_RULES),
    )
    migration: MigrationSpec = Field(
        default_factory=MigrationSpec, description="How the re-embedding Jobs run."
    )
    rollout: RolloutSpec = Field(
        default_factory=RolloutSpec, description="How traffic moves to v2."
    )
    analysis: AnalysisSpec = Field(
        default_factory=AnalysisSpec, description="When traffic may move, and when it goes back."
    )
    cleanup: CleanupSpec = Field(
        default_factory=CleanupSpec, description="What happens to v1 after success."
    )

    @field_validator("target")
    @classmethod
    def _indexable(cls, target: EmbeddingSpec) -> EmbeddingSpec:
        try:
            target.check_indexable(field="target")
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("target.")) from None
        return target

    @property
    def data_plane(self) -> DataPlaneSpec:
        """The part rag_service's commands read (``migrate``, ``serve``, ``verify``…)."""
        return DataPlaneSpec(
            database=self.database,
            source=self.source,
            target=self.target,
            migration=self.migration,
        )


# ---- status -----------------------------------------------------------------------------------


class Phase(str, Enum):
    """Where the migration is; only Progressing, Paused, Promoted and Succeeded route to v2."""

    PENDING = "Pending"
    PREPARING = "Preparing"  # migrate setup
    MIGRATING = "Migrating"  # migrate run, one Job per shard
    INDEXING = "Indexing"  # migrate index
    VERIFYING = "Verifying"  # migrate verify
    PROGRESSING = "Progressing"  # stepping the percentage up
    PAUSED = "Paused"  # spec.rollout.paused while progressing
    PROMOTED = "Promoted"  # 100 %, held for the last step's minDuration
    SUCCEEDED = "Succeeded"
    ROLLED_BACK = "RolledBack"
    FAILED = "Failed"

    @property
    def routes_v2(self) -> bool:
        """Only these phases send users to v2."""
        return self in (Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTED, Phase.SUCCEEDED)


class JobKind(str, Enum):
    """Which ``embedshift migrate`` command a Job runs."""

    SETUP = "setup"
    MIGRATE = "migrate"
    INDEX = "index"
    VERIFY = "verify"


class JobState(str, Enum):
    """A Job's state as last observed."""

    PENDING = "Pending"  # decided, not yet seen running
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"  # a Job failed for good (an exit code no retry mends, or retries ran out)


class _Status(BaseModel):
    # Status is written by the control plane; unknown fields from a newer operator are kept out.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )


class JobRecord(_Status):
    """A Job the control plane launched for this resource (deterministic name)."""

    name: str = Field(description="Job name (deterministic: launching it twice is a no-op).")
    kind: JobKind = Field(description="setup, migrate, index or verify.")
    shard: int | None = Field(default=None, description="Shard index of a migrate Job.")
    state: JobState = Field(default=JobState.PENDING, description="Last observed state.")
    attempt: int = Field(
        default=1, ge=1, description="Run of this Job for the current data-plane hash."
    )
    message: str = Field(default="", description="Last error of a failed Job, one line.")


class CategoryProgress(_Status):
    """Progress of one category."""

    total: int = Field(default=0, description="Source rows with text in this category.")
    migrated: int = Field(default=0, description="Rows with a current v2 vector.")


class CountsKind(str, Enum):
    """How the row counts in ``status.migration`` were obtained."""

    # From the counters setup installs and the change queue: O(changes), every tick.
    MAINTAINED = "maintained"
    # From a full source ⟕ target comparison (a setup by an older embedshift has no counters).
    EXACT = "exact"


class MigrationProgress(_Status):
    """Where the re-embedding stands, as last read from the database."""

    total: int = Field(default=0, description="Source rows with text to embed.")
    migrated: int = Field(default=0, description="Rows with a current v2 vector.")
    pending: int = Field(default=0, description="Rows without a current v2 vector.")
    failed: int = Field(default=0, description="Failed batches recorded in the status table.")
    oldest_pending_seconds: float | None = Field(
        default=None, description="Age of the oldest queued change (the follower's lag)."
    )
    by_category: dict[str, CategoryProgress] = Field(
        default_factory=dict, description="Progress per category."
    )
    counts: CountsKind | None = Field(
        default=None,
        description="How total, migrated, pending and byCategory were counted: maintained "
        "(counters kept in the writers' transactions and the change queue, read every tick) or "
        "exact (a full comparison of the tables). failed and oldestPendingSeconds are always "
        "read directly. `embedshift migrate status --exact` compares the two.",
    )
    counted_since: datetime | None = Field(
        default=None,
        description="maintained: when the counters were last counted from the tables (by setup, "
        "or by a check that found them drifted).",
    )
    jobs: list[JobRecord] = Field(default_factory=list, description="Jobs of the migration.")


class VerificationStatus(_Status):
    """The result of the last ``migrate verify``."""

    ok: bool = Field(description="Whether every check of migrate verify passed.")
    time: datetime = Field(description="When the verification finished.")
    failed_checks: list[str] = Field(
        default_factory=list, description="Names of failed checks, with their detail."
    )


class CriterionResult(_Status):
    """One criterion's verdict in the last check."""

    name: str = Field(description="The criterion's name.")
    kind: CriterionKind = Field(description="success or rollback.")
    query: str = Field(default="", description="The rendered query (or the observation read).")
    value: float | None = Field(default=None, description="v2's value; null when no data.")
    bound: str = Field(default="", description="Where the value must lie, e.g. ≤ 0.8.")
    verdict: Verdict = Field(description="pass, fail, nodata or error.")
    dry_run: bool = Field(default=False, description="Recorded only, never acted on.")
    message: str = Field(default="", description="Why: the error, or the v1 value compared.")


class AnalysisStatus(_Status):
    """The last check of the analysis and the counters decisions need."""

    time: datetime | None = Field(default=None, description="When the last check ran.")
    consecutive_passes: int = Field(
        default=0, description="Consecutive checks where every success criterion passed."
    )
    streaks: dict[str, int] = Field(
        default_factory=dict,
        description="Consecutive failing checks per criterion (compared with its 'for').",
    )
    results: list[CriterionResult] = Field(
        default_factory=list, description="The last check, criterion by criterion."
    )


class ConditionType(str, Enum):
    """The standard conditions this resource reports."""

    READY = "Ready"
    MIGRATED = "Migrated"
    VERIFIED = "Verified"
    ANALYSIS_PASSING = "AnalysisPassing"
    ROLLED_BACK = "RolledBack"
    # kstatus' abnormal-true condition: True while only a spec change moves the resource on
    # (Failed, RolledBack), so Flux and kstatus report it Failed rather than InProgress forever.
    STALLED = "Stalled"
    # Only with cleanup.dropSource: True once the v1 column's DROP committed.
    SOURCE_DROPPED = "SourceDropped"


class Condition(_Status):
    """A standard Kubernetes condition."""

    type: ConditionType = Field(
        description="Ready, Migrated, Verified, AnalysisPassing, RolledBack, Stalled or "
        "SourceDropped (only with cleanup.dropSource)."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason.")
    message: str = Field(default="", description="What happened, for people.")
    last_transition_time: datetime = Field(description="When status last changed.")


class HistoryEntry(_Status):
    """One transition: when, to which phase and percentage, and why."""

    time: datetime = Field(description="When the transition happened.")
    phase: Phase = Field(description="The phase entered.")
    percentage: int = Field(description="The effective percentage after it.")
    reason: str = Field(description="CamelCase reason.")
    message: str = Field(default="", description="Why, for people.")


class SpecHash(_Status):
    """Hashes of the spec's parts the last decision acted on (Argo's pod-template hash)."""

    data_plane: str = Field(description="database, source and target: a change re-migrates.")
    rollout: str = Field(
        description="steps and analysis: a change restarts the rollout at the first step."
    )
    migration: str = Field(
        default="",
        description="the Jobs' settings (batch size, shards, budget, image…): a change restarts "
        "nothing, but retries a Failed migration.",
    )


class CleanupStatus(_Status):
    """cleanup.dropSource's failed attempts since the last success: what its backoff counts."""

    drop_failures: int = Field(
        default=0, ge=0, description="Consecutive failed attempts to drop the v1 column."
    )
    last_failure_at: datetime | None = Field(
        default=None, description="When the last attempt failed (the backoff counts from it)."
    )
    last_error: str = Field(default="", description="Why the last attempt failed.")


class EmbeddingMigrationStatus(_Status):
    """``status``: everything the control plane decided and why, and every counter it needs."""

    phase: Phase = Field(default=Phase.PENDING, description="Where the migration is.")
    percentage: int = Field(default=0, ge=0, le=100, description="Effective share routed to v2.")
    step_index: int = Field(default=0, ge=0, description="Current step (0-based).")
    step_started_at: datetime | None = Field(
        default=None, description="When the current step (or phase hold) started."
    )
    phase_started_at: datetime | None = Field(default=None, description="When the phase began.")
    spec_hash: SpecHash | None = Field(default=None, description="What the decisions acted on.")
    attempt: int = Field(
        default=1,
        ge=1,
        description="Run of the migration pipeline; a retry after Failed starts the next, with "
        "new Job names.",
    )
    source_dropped_at: datetime | None = Field(
        default=None,
        description="When cleanup's DROP of the v1 column committed (dropSource only).",
    )
    cleanup: CleanupStatus | None = Field(
        default=None,
        description="Failed attempts to drop the v1 column (dropSource only), retried with "
        "backoff; absent until one fails, and again once one succeeds.",
    )
    migration: MigrationProgress = Field(
        default_factory=MigrationProgress, description="Re-embedding progress and Jobs."
    )
    verification: VerificationStatus | None = Field(
        default=None, description="The last migrate verify."
    )
    analysis: AnalysisStatus = Field(
        default_factory=AnalysisStatus, description="The last check and its counters."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Standard conditions.")
    history: list[HistoryEntry] = Field(
        default_factory=list,
        max_length=HISTORY_LIMIT,
        description=f"The newest {HISTORY_LIMIT} transitions.",
    )
    message: str = Field(default="", description="The latest reason, for people.")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the status reflects."
    )


# ---- the resource -----------------------------------------------------------------------------


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)
    name: str = Field(min_length=1, max_length=253, pattern=f"^{RESOURCE_NAME}$")
    namespace: str = Field(default="default", max_length=63, pattern=f"^{NAMESPACE_NAME}$")
    generation: int | None = None
    uid: str | None = None
    resource_version: str | None = Field(default=None, alias="resourceVersion")


class EmbeddingMigration(BaseModel):
    """A whole manifest: apiVersion, kind, metadata, spec and (optional) status."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )
    api_version: Literal["embedshift.io/v1alpha1"]
    kind: Literal["EmbeddingMigration"]
    metadata: Metadata
    spec: EmbeddingMigrationSpec
    status: EmbeddingMigrationStatus = Field(default_factory=EmbeddingMigrationStatus)

    @property
    def key(self) -> str:
        """``namespace/name``: the routing row's and the status table's key."""
        return f"{self.metadata.namespace}/{self.metadata.name}"


def spec_hash(spec: EmbeddingMigrationSpec) -> SpecHash:
    """The hashes of DESIGN.md "Phases", plus one for the Jobs' settings. Pure and stable.

    ``migration`` is beyond DESIGN.md's two: raising ``budgetUSD`` after a budget stop (or fixing
    an image) must retry a Failed migration without re-migrating or resetting traffic.

    ``rollout`` covers the steps and the analysis, not ``paused`` or ``maxPercentage`` (they act
    at once without restarting anything) nor ``stickyKey`` (the service's concern).
    """
    data = {
        "database": spec.database.model_dump(mode="json", by_alias=True),
        "source": spec.source.model_dump(mode="json", by_alias=True) if spec.source else None,
        "target": spec.target.model_dump(mode="json", by_alias=True),
    }
    rollout = {
        "steps": [s.model_dump(mode="json", by_alias=True) for s in spec.rollout.steps],
        "analysis": spec.analysis.model_dump(mode="json", by_alias=True),
    }
    jobs = spec.migration.model_dump(mode="json", by_alias=True)
    return SpecHash(data_plane=_digest(data), rollout=_digest(rollout), migration=_digest(jobs))


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def parse_migration(raw: Any, *, where: str) -> EmbeddingMigration:
    """Validate a manifest already read into Python; every problem is one ConfigError line."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold one EmbeddingMigration mapping")
    if raw.get("apiVersion") != API_VERSION or raw.get("kind") != KIND:
        raise ConfigError(
            f"{where}: expected apiVersion {API_VERSION} and kind {KIND}, "
            f"got {raw.get('apiVersion')} {raw.get('kind')}"
        )
    try:
        return EmbeddingMigration.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            f"{where}: {validation_message(exc, prefix='', model=EmbeddingMigration)}"
        ) from None


def load_migration(path: Path) -> EmbeddingMigration:
    """Read an EmbeddingMigration manifest from a YAML file (status in it, if any, is kept)."""
    return parse_migration(read_yaml(path, what="FILE"), where=str(path))
