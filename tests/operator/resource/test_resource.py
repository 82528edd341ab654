"""The resource model: bad specs refused with the field's path and the fix, the guide's
defaults, and the two spec hashes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedshift_operator.resource import (
    EmbeddingMigration,
    SpecHash,
    load_migration,
    parse_migration,
    spec_hash,
)
from rag_service.criteria import DEFAULT_ROLLBACK_THRESHOLDS, DEFAULT_SUCCESS_CRITERIA
from rag_service.errors import ConfigError

from .manifests import REPO, criterion, minimal, steps, with_spec


def _criteria(*items: dict[str, Any]) -> dict[str, Any]:
    return {"analysis": {"successCriteria": list(items)}}


# (id, edit of the minimal spec, the path the message names, a fragment saying the fix)
BAD_SPECS: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "steps-not-increasing",
        {"rollout": {"steps": steps(50, 25, 100)}},
        "spec.rollout.steps",
        "must be above step 0",
    ),
    (
        "step-of-0",
        {"rollout": {"steps": steps(0, 100)}},
        "spec.rollout.steps[0].percentage",
        "use 1 or more",
    ),
    (
        "step-of-101",
        {"rollout": {"steps": steps(50, 101)}},
        "spec.rollout.steps[1].percentage",
        "use 100 or less",
    ),
    (
        "steps-not-ending-at-100",
        {"rollout": {"steps": steps(10, 50)}},
        "spec.rollout.steps",
        "end the steps at 100",
    ),
    (
        "more-than-20-steps",
        {"rollout": {"steps": steps(*range(1, 21), 100)}},
        "spec.rollout.steps",
        "more than the 20 allowed",
    ),
    (
        "min-and-max",
        _criteria(criterion(metric="error_rate", min=0, max=1)),
        "spec.analysis.successCriteria[0]",
        "set exactly one of min, max and maxRatioToV1",
    ),
    (
        "no-bound",
        _criteria(criterion(metric="error_rate")),
        "spec.analysis.successCriteria[0]",
        "set exactly one of min, max and maxRatioToV1",
    ),
    (
        "ratio-with-custom-query",
        _criteria(criterion(query="up", maxRatioToV1=1)),
        "spec.analysis.successCriteria[0]",
        "use min or max with a custom query",
    ),
    (
        "unknown-metric",
        _criteria(criterion(metric="latency", max=1)),
        "spec.analysis.successCriteria[0]",
        "use one of requests, avg_latency_seconds",
    ),
    (
        "metric-and-query",
        _criteria(criterion(metric="error_rate", query="up", max=1)),
        "spec.analysis.successCriteria[0]",
        "set exactly one of metric",
    ),
    (
        "neither-metric-nor-query",
        _criteria(criterion(max=1)),
        "spec.analysis.successCriteria[0]",
        "set exactly one of metric",
    ),
    (
        "empty-query",
        _criteria(criterion(query="", max=1)),
        "spec.analysis.successCriteria[0].query",
        "give a value or leave the field out",
    ),
    (
        "blank-query",
        _criteria(criterion(query="   ", max=1)),
        "spec.analysis.successCriteria[0].query",
        "write a PromQL expression or use metric",
    ),
    (
        "duration-in-words",
        {"analysis": {"interval": "5 minutes"}},
        "spec.analysis.interval",
        "e.g. 30s, 5m, 72h",
    ),
    (
        "negative-duration",
        {"rollout": {"steps": [{"percentage": 100, "minDuration": "-1s"}]}},
        "spec.rollout.steps[0].minDuration",
        "e.g. 30s, 5m, 72h",
    ),
    (
        "duration-in-days",
        {"cleanup": {"retainSourceFor": "3d"}},
        "spec.cleanup.retainSourceFor",
        "168h is a week",
    ),
    (
        "zero-interval",
        {"analysis": {"interval": "0s"}},
        "spec.analysis.interval",
        "longer than zero",
    ),
    (
        "vector-over-2000-dims",
        {"target": {"provider": "local", "model": "hash", "dimensions": 2001}},
        "spec.target",
        "index.halfvec: true (up to 4000)",
    ),
    (
        "halfvec-over-4000-dims",
        {
            "target": {
                "provider": "local",
                "model": "hash",
                "dimensions": 4001,
                "index": {"halfvec": True},
            }
        },
        "spec.target",
        "4000-dimension limit for a halfvec index; lower dimensions",
    ),
    (
        "typo-in-a-field-name",
        {"rollout": {"stpes": steps(100)}},
        "spec.rollout.stpes",
        "did you mean steps?",
    ),
    (
        "duplicate-criterion-name",
        {
            "analysis": {
                "rollbackThresholds": [{"name": "error-rate", "metric": "error_rate", "max": 1}]
            }
        },
        "spec.analysis",
        "names must be unique across successCriteria and rollbackThresholds",
    ),
    (
        "bad-criterion-name",
        _criteria({"name": "P95 Latency", "metric": "error_rate", "max": 1}),
        "spec.analysis.successCriteria[0].name",
        "use lowercase letters, digits and '-'",
    ),
    (
        "for-0",
        _criteria(criterion(metric="error_rate", max=1) | {"for": 0}),
        "spec.analysis.successCriteria[0].for",
        "use 1 or more",
    ),
    (
        "no-data-maybe",
        {"analysis": {"noData": "maybe"}},
        "spec.analysis.noData",
        "use 'hold' or 'fail'",
    ),
    (
        "on-error-explode",
        {"analysis": {"onError": "explode"}},
        "spec.analysis.onError",
        "use 'hold' or 'rollback'",
    ),
    (
        "max-percentage-150",
        {"rollout": {"maxPercentage": 150}},
        "spec.rollout.maxPercentage",
        "use 100 or less",
    ),
    (
        "prometheus-url-without-scheme",
        {"analysis": {"prometheus": {"url": "prometheus:9090"}}},
        "spec.analysis.prometheus.url",
        "write it as http://",
    ),
    (
        "sticky-key-with-a-space",
        {"rollout": {"stickyKey": "X User"}},
        "spec.rollout.stickyKey",
        "use letters, digits and '-'",
    ),
    (
        "negative-min-requests",
        {"analysis": {"minRequests": -1}},
        "spec.analysis.minRequests",
        "use 0 or more",
    ),
    (
        "zero-successful-checks",
        {"analysis": {"successfulChecks": 0}},
        "spec.analysis.successfulChecks",
        "use 1 or more",
    ),
    (
        "retired-model",
        {"target": {"provider": "google", "model": "text-embedding-004", "dimensions": 768}},
        "spec.target",
        "use gemini-embedding-001",
    ),
    ("batch-size-0", {"migration": {"batchSize": 0}}, "spec.migration.batchSize", "use 1 or more"),
    (
        "table-not-an-identifier",
        {"database": {"table": "my-docs"}},
        "spec.database.table",
        "use letters, digits and underscores",
    ),
    (
        # The API server's RE2 ends a string at $; Python's $ would let the newline through.
        "table-with-a-final-newline",
        {"database": {"table": "documents\n"}},
        "spec.database.table",
        "is not a plain SQL identifier",
    ),
    (
        "bad-quantity",
        {"migration": {"resources": {"limits": {"memory": "lots"}}}},
        "spec.migration.resources.limits.memory",
        "write e.g. 500m, 512Mi",
    ),
    (
        "interval-beyond-timedelta",
        {"analysis": {"interval": "99999999999999h"}},
        "spec.analysis.interval",
        "too long a duration",
    ),
    (
        "dimensions-in-words",
        {"target": {"dimensions": "many"}},
        "spec.target.dimensions",
        "not a whole number",
    ),
    # JSON's types, as strictly as the API server reads them: no number or boolean in quotes.
    (
        "paused-yes",
        {"rollout": {"paused": "yes"}},
        "spec.rollout.paused",
        "'yes' is not true or false; write true or false without quotes",
    ),
    (
        "paused-true-in-quotes",
        {"rollout": {"paused": "true"}},
        "spec.rollout.paused",
        "write true or false without quotes",
    ),
    (
        "halfvec-as-1",
        {"target": {"index": {"halfvec": 1}}},
        "spec.target.index.halfvec",
        "1 is not true or false",
    ),
    (
        "min-requests-in-quotes",
        {"analysis": {"minRequests": "3"}},
        "spec.analysis.minRequests",
        "'3' is not a whole number; write a whole number without quotes",
    ),
    (
        "dimensions-in-quotes",
        {"target": {"dimensions": "768"}},
        "spec.target.dimensions",
        "write a whole number without quotes",
    ),
    (
        "max-percentage-true",
        {"rollout": {"maxPercentage": True}},
        "spec.rollout.maxPercentage",
        "true is not a whole number",
    ),
    (
        "batch-size-fractional",
        {"migration": {"batchSize": 100.5}},
        "spec.migration.batchSize",
        "100.5 is not a whole number",
    ),
    (
        "max-in-quotes",
        _criteria(criterion(query="up", max="0.5")),
        "spec.analysis.successCriteria[0].max",
        "'0.5' is not a number; write a number without quotes",
    ),
    (
        "budget-in-quotes",
        {"migration": {"budgetUSD": "5"}},
        "spec.migration.budgetUSD",
        "write a number without quotes",
    ),
]


@pytest.mark.parametrize(
    ("edit", "path", "fix"), [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS]
)
def test_bad_spec_is_refused_naming_the_field_and_the_fix(
    edit: dict[str, Any], path: str, fix: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_migration(with_spec(edit), where="em.yaml")
    message = str(refused.value)
    assert f"em.yaml: {path}: " in message
    assert fix in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("edit", "fix"),
    [
        ({"apiVersion": "embedshift.io/v1"}, "expected apiVersion embedshift.io/v1alpha1"),
        (
            {"kind": "Migration"},
            "and kind EmbeddingMigration, got embedshift.io/v1alpha1 Migration",
        ),
    ],
    ids=["api-version", "kind"],
)
def test_wrong_api_version_or_kind(edit: dict[str, Any], fix: str) -> None:
    with pytest.raises(ConfigError, match=fix):
        parse_migration(minimal() | edit, where="em.yaml")


def test_missing_target_is_named() -> None:
    manifest = minimal()
    del manifest["spec"]["target"]
    with pytest.raises(ConfigError, match=r"spec\.target: required; add this field"):
        parse_migration(manifest, where="em.yaml")


def test_malformed_yaml_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "em.yaml"
    path.write_text("apiVersion: embedshift.io/v1alpha1\nspec:\n  rollout: {steps: [\n")
    with pytest.raises(ConfigError, match=r"em\.yaml is not valid YAML at line 4, column 1"):
        load_migration(path)


def test_every_problem_is_reported_at_once() -> None:
    # One round trip through the editor, not one per mistake.
    edit = {"rollout": {"maxPercentage": 150}, "analysis": {"noData": "maybe"}}
    with pytest.raises(ConfigError) as refused:
        parse_migration(with_spec(edit), where="em.yaml")
    assert "spec.rollout.maxPercentage" in str(refused.value)
    assert "spec.analysis.noData" in str(refused.value)


# ---- defaults ----------------------------------------------------------------------------------


def test_minimal_manifest_gets_the_guides_defaults() -> None:
    spec = parse_migration(minimal(), where="em.yaml").spec
    assert [(s.percentage, s.min_duration) for s in spec.rollout.steps] == [
        (10, "72h"),
        (25, "72h"),
        (50, "72h"),
        (75, "72h"),
        (100, "48h"),
    ]
    assert (spec.rollout.max_percentage, spec.rollout.paused, spec.rollout.sticky_key) == (
        100,
        False,
        "X-User-Id",
    )
    analysis = spec.analysis
    assert (analysis.interval, analysis.window) == ("30s", "5m")
    assert (analysis.min_requests, analysis.successful_checks) == (100, 3)
    assert (analysis.no_data, analysis.on_error) == ("hold", "hold")
    assert [(c.name, c.metric, c.bound) for c in analysis.success_criteria] == [
        (d.name, d.metric, d.bound) for d in DEFAULT_SUCCESS_CRITERIA
    ]
    assert [(c.name, c.metric, c.bound) for c in analysis.rollback_thresholds] == [
        (d.name, d.metric, d.bound) for d in DEFAULT_ROLLBACK_THRESHOLDS
    ]
    assert all(c.for_ == 1 and not c.dry_run for _, c in analysis.criteria())
    assert (spec.cleanup.retain_source_for, spec.cleanup.drop_source) == ("168h", False)


def test_guides_thresholds_are_the_numbers_it_states() -> None:
    # The guide: p95 < 800 ms, similarity > 0.7, errors < 0.1 %, cache > 70 %; roll back on
    # errors > 10 % or p95 > 1.2 s.
    spec = parse_migration(minimal(), where="em.yaml").spec
    bounds = {c.name: c.bound.describe() for _, c in spec.analysis.criteria()}
    assert bounds == {
        "p95-latency": "≤ 0.8",
        "p95-latency-vs-v1": "≤ 1 × v1",
        "avg-similarity": "≥ 0.7",
        "error-rate": "≤ 0.001",
        "cache-hit-rate": "≥ 0.7",
        "critical-errors": "≤ 0",
        "cost-vs-v1": "≤ 1 × v1",
        "error-rate-critical": "≤ 0.1",
        "p95-latency-critical": "≤ 1.2",
    }


def test_examples_are_full_manifests() -> None:
    migration = load_migration(REPO / "examples" / "migration.yaml")
    assert migration.key == "rag/docs-to-3-small"
    assert migration.spec.analysis.prometheus is not None
    assert [s.percentage for s in migration.spec.rollout.steps] == [10, 25, 50, 75, 100]
    demo = load_migration(REPO / "examples" / "local-demo.yaml")
    assert demo.key == "default/demo"


# ---- spec hashes -------------------------------------------------------------------------------


def _hash(edit: dict[str, Any]) -> SpecHash:
    return spec_hash(parse_migration(with_spec(edit), where="em.yaml").spec)


BASE = _hash({})
HashChange = tuple[str, dict[str, Any], bool, bool]
HASH_CHANGES: list[HashChange] = [
    (
        "target-model",
        {"target": {"model": "text-embedding-3-large", "dimensions": 1024}},
        True,
        False,
    ),
    ("target-dimensions", {"target": {"dimensions": 512}}, True, False),
    ("table", {"database": {"table": "public.articles"}}, True, False),
    ("steps", {"rollout": {"steps": steps(20, 100)}}, False, True),
    ("step-duration", {"rollout": {"steps": steps(10, 25, 50, 75, 100)}}, False, True),
    (
        "a-threshold",
        {
            "analysis": {
                "rollbackThresholds": [{"name": "errors", "metric": "error_rate", "max": 0.05}]
            }
        },
        False,
        True,
    ),
    ("interval", {"analysis": {"interval": "1m"}}, False, True),
    ("paused", {"rollout": {"paused": True}}, False, False),
    ("max-percentage", {"rollout": {"maxPercentage": 0}}, False, False),
    ("batch-size", {"migration": {"batchSize": 500}}, False, False),
]


@pytest.mark.parametrize(
    ("edit", "data_plane", "rollout"),
    [c[1:] for c in HASH_CHANGES],
    ids=[c[0] for c in HASH_CHANGES],
)
def test_spec_hash_changes_only_the_part_that_changed(
    edit: dict[str, Any], data_plane: bool, rollout: bool
) -> None:
    changed = _hash(edit)
    assert (changed.data_plane != BASE.data_plane, changed.rollout != BASE.rollout) == (
        data_plane,
        rollout,
    )


def test_spec_hash_ignores_how_the_manifest_is_written() -> None:
    # Defaults written out, keys in another order: the same spec, the same hashes.
    spelled_out = with_spec(
        {
            "rollout": {
                "stickyKey": "X-User-Id",
                "steps": [{"minDuration": "72h", "percentage": p} for p in (10, 25, 50, 75)]
                + [{"percentage": 100, "minDuration": "48h"}],
            },
            "analysis": {"window": "5m", "interval": "30s"},
        }
    )
    assert spec_hash(parse_migration(spelled_out, where="x").spec) == BASE


def test_a_whole_number_is_an_integer_however_it_is_written() -> None:
    # JSON has one number type; the API server stores 100.0 as 100 (type: integer), so the
    # models read it as the integer too: the same spec, the same hashes, ints where ints are.
    written = with_spec(
        {"migration": {"batchSize": 100.0}, "rollout": {"steps": [{"percentage": 100.0}]}}
    )
    spec = parse_migration(written, where="x").spec
    assert (spec.migration.batch_size, spec.rollout.steps[0].percentage) == (100, 100)
    assert type(spec.migration.batch_size) is int and type(spec.rollout.steps[0].percentage) is int
    plain = with_spec({"rollout": {"steps": [{"percentage": 100}]}})
    assert spec_hash(spec) == spec_hash(parse_migration(plain, where="x").spec)


def test_spec_hash_is_stable_across_processes() -> None:
    # Recorded in status by one operator process, compared by the next: no per-process salt.
    manifest = json.dumps(with_spec({"rollout": {"steps": steps(5, 100)}}))
    script = (
        "import json, sys\n"
        "from embedshift_operator.resource import parse_migration, spec_hash\n"
        "h = spec_hash(parse_migration(json.loads(sys.argv[1]), where='x').spec)\n"
        "print(h.data_plane, h.rollout)\n"
    )
    here = spec_hash(parse_migration(json.loads(manifest), where="x").spec)
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", script, manifest],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert out == [here.data_plane, here.rollout]


def test_status_round_trips_through_yaml() -> None:
    # What the operator writes to status is what it reads back on the next tick.
    resource = EmbeddingMigration.model_validate(
        minimal()
        | {
            "status": {
                "phase": "Progressing",
                "percentage": 25,
                "stepIndex": 1,
                "specHash": {"dataPlane": "a", "rollout": "b"},
                "analysis": {"consecutivePasses": 2, "streaks": {"error-rate": 1}},
            }
        }
    )
    written = yaml.safe_dump(resource.model_dump(mode="json", by_alias=True, exclude_none=True))
    again = EmbeddingMigration.model_validate(yaml.safe_load(written))
    assert again.status == resource.status
    assert again.status.analysis.streaks == {"error-rate": 1}
