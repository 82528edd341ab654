"""Pending → Preparing → Migrating → Indexing → Verifying → Progressing: one Job per phase (one per
shard while migrating), failures, retries, idempotence and restart safety."""

from __future__ import annotations

import json
from typing import Any

import pytest

from embedshift_operator.core import (
    EnsureFollower,
    JobObservation,
    Observations,
    ProgressObservation,
    RoutingObservation,
    RunJob,
    SetPercentage,
    follower_name,
)
from embedshift_operator.resource import (
    ConditionType,
    CountsKind,
    EmbeddingMigrationSpec,
    EmbeddingMigrationStatus,
    JobKind,
    JobState,
    Phase,
    spec_hash,
)
from tests.operator.core.builders import (
    NAME,
    all_pass,
    at,
    changed,
    condition,
    events,
    job,
    make_spec,
    percentages,
    run_jobs,
    seen,
    status_at,
    tick,
)

# (phase, the Job it runs, its args, the phase its success leads to, that transition's reason)
PIPELINE = [
    pytest.param(
        Phase.PREPARING, JobKind.SETUP, ("migrate", "setup"), Phase.MIGRATING, "SetUp", id="setup"
    ),
    pytest.param(
        Phase.MIGRATING,
        JobKind.MIGRATE,
        ("migrate", "run", "--shard", "0/1"),
        Phase.INDEXING,
        "Migrated",
        id="migrate",
    ),
    pytest.param(
        Phase.INDEXING, JobKind.INDEX, ("migrate", "index"), Phase.VERIFYING, "Indexed", id="index"
    ),
    pytest.param(
        Phase.VERIFYING,
        JobKind.VERIFY,
        ("migrate", "verify"),
        Phase.PROGRESSING,
        "Verified",
        id="verify",
    ),
]


def _job_of(spec: EmbeddingMigrationSpec, kind: JobKind, attempt: int = 1) -> str:
    return job(spec, kind, shard=0 if kind is JobKind.MIGRATE else None, attempt=attempt)


def test_a_new_resource_starts_preparing_and_runs_setup() -> None:
    spec = make_spec()
    d = tick(spec, EmbeddingMigrationStatus())
    assert d.status.phase is Phase.PREPARING
    assert d.status.spec_hash == spec_hash(spec)
    assert [(e.phase, e.reason) for e in d.status.history] == [(Phase.PREPARING, "Started")]
    assert run_jobs(d) == [
        RunJob(name=job(spec, JobKind.SETUP), kind=JobKind.SETUP, args=("migrate", "setup"))
    ]
    assert d.status.percentage == 0
    assert not d.of_type(SetPercentage)
    assert not d.of_type(EnsureFollower)  # no side table to follow yet


def test_a_pending_status_with_hashes_moves_to_preparing() -> None:
    spec = make_spec()
    d = tick(spec, status_at(spec, Phase.PENDING))
    assert d.status.phase is Phase.PREPARING
    assert d.status.history[-1].reason == "Started"


@pytest.mark.parametrize(("phase", "kind", "args", "next_phase", "reason"), PIPELINE)
def test_each_phase_runs_its_job(
    phase: Phase, kind: JobKind, args: tuple[str, ...], next_phase: Phase, reason: str
) -> None:
    spec = make_spec()
    d = tick(spec, status_at(spec, phase))
    name = _job_of(spec, kind)
    shard = 0 if kind is JobKind.MIGRATE else None
    assert run_jobs(d) == [RunJob(name=name, kind=kind, args=args, shard=shard)]
    assert d.status.phase is phase
    [record] = d.status.migration.jobs
    assert (record.name, record.kind, record.state) == (name, kind, JobState.PENDING)
    assert [e.reason for e in events(d)] == ["JobStarted"]


@pytest.mark.parametrize(("phase", "kind", "args", "next_phase", "reason"), PIPELINE)
def test_a_succeeded_job_moves_to_the_next_phase(
    phase: Phase, kind: JobKind, args: tuple[str, ...], next_phase: Phase, reason: str
) -> None:
    spec = make_spec()
    started = tick(spec, status_at(spec, phase)).status
    name = _job_of(spec, kind)
    d = tick(spec, started, Observations(jobs=seen({name: JobState.SUCCEEDED})), at(minutes=5))
    assert d.status.phase is next_phase
    assert d.status.history[-1].reason == reason
    assert d.status.history[-1].time == at(minutes=5)
    assert not [r for r in run_jobs(d) if r.name == name]
    assert d.status.migration.jobs[0].state is JobState.SUCCEEDED


@pytest.mark.parametrize(("phase", "kind", "args", "next_phase", "reason"), PIPELINE)
def test_a_job_seen_running_is_not_launched_again(
    phase: Phase, kind: JobKind, args: tuple[str, ...], next_phase: Phase, reason: str
) -> None:
    spec = make_spec()
    started = tick(spec, status_at(spec, phase)).status
    name = _job_of(spec, kind)
    d = tick(spec, started, Observations(jobs=seen({name: JobState.RUNNING})), at(minutes=1))
    assert run_jobs(d) == []
    assert d.status.phase is phase
    assert d.status.migration.jobs[0].state is JobState.RUNNING
    assert not events(d)  # nothing new to tell
    # A runner that no longer reports an unfinished Job (Ctrl-C interrupted it, someone
    # deleted it) is asked for it again under the same name: creating it is idempotent.
    again = tick(spec, d.status, Observations(), at(minutes=2))
    assert [r.name for r in run_jobs(again)] == [name]
    assert "JobStarted" not in [e.reason for e in events(again)]


@pytest.mark.parametrize(("phase", "kind", "args", "next_phase", "reason"), PIPELINE)
def test_a_job_not_seen_yet_is_asked_for_again_under_the_same_name(
    phase: Phase, kind: JobKind, args: tuple[str, ...], next_phase: Phase, reason: str
) -> None:
    spec = make_spec()
    first = tick(spec, status_at(spec, phase))
    second = tick(spec, first.status, Observations(), at(seconds=30))
    assert run_jobs(second) == run_jobs(first)
    assert len(second.status.migration.jobs) == 1
    assert "JobStarted" not in [e.reason for e in events(second)]  # started once, asked twice


def test_the_whole_pipeline_reaches_step_one_at_ten_percent() -> None:
    spec = make_spec(migration={"shards": 3, "parallelism": 2})
    status = EmbeddingMigrationStatus()
    done: dict[str, JobState] = {}
    phases = []
    for minute in range(20):
        d = tick(spec, status, Observations(jobs=seen(done)), at(minutes=minute))
        status = d.status
        phases.append(status.phase)
        done.update({r.name: JobState.SUCCEEDED for r in run_jobs(d)})  # each Job takes a tick
        if status.phase is Phase.PROGRESSING:
            break
    assert list(dict.fromkeys(phases)) == [
        Phase.PREPARING,
        Phase.MIGRATING,
        Phase.INDEXING,
        Phase.VERIFYING,
        Phase.PROGRESSING,
    ]
    assert [e.reason for e in status.history] == [
        "Started",
        "SetUp",
        "Migrated",
        "Indexed",
        "Verified",
    ]
    assert d.of_type(SetPercentage) == [
        SetPercentage(percentage=10, reason=status.history[-1].message, clear_emergency=True)
    ]
    assert (status.percentage, status.step_index, status.step_started_at) == (
        10,
        0,
        at(minutes=minute),
    )
    assert status.verification is not None and status.verification.ok
    assert sorted(done) == sorted(
        [job(spec, JobKind.SETUP), job(spec, JobKind.INDEX), job(spec, JobKind.VERIFY)]
        + [job(spec, JobKind.MIGRATE, shard=i) for i in range(3)]
    )


# ---- shards and parallelism ----------------------------------------------------------------------


def test_five_shards_two_at_a_time() -> None:
    spec = make_spec(migration={"shards": 5, "parallelism": 2})
    name = [job(spec, JobKind.MIGRATE, shard=i) for i in range(5)]
    decisions = [tick(spec, status_at(spec, Phase.MIGRATING))]

    def launched(states: dict[int, JobState]) -> list[int | None]:
        """Tick once more with the runner reporting ``states`` (by shard); the shards asked for."""
        obs = Observations(jobs=seen({name[i]: s for i, s in states.items()}))
        decisions.append(tick(spec, decisions[-1].status, obs, at(minutes=len(decisions))))
        return [r.shard for r in run_jobs(decisions[-1])]

    assert [(r.name, r.args) for r in run_jobs(decisions[0])] == [
        (name[0], ("migrate", "run", "--shard", "0/5")),
        (name[1], ("migrate", "run", "--shard", "1/5")),
    ]
    assert launched({}) == [0, 1]  # not seen yet: asked again, and still no third
    run, ok = JobState.RUNNING, JobState.SUCCEEDED
    assert launched({0: run, 1: run}) == []
    assert launched({0: ok, 1: run}) == [2]  # a slot freed
    assert launched({0: ok, 1: ok, 2: run}) == [3]
    assert launched({0: ok, 1: ok, 2: run, 3: run}) == []
    assert launched({0: ok, 1: ok, 2: ok, 3: ok}) == [4]
    assert launched({i: ok for i in range(5)}) == []
    assert [d.status.phase for d in decisions[-2:]] == [Phase.MIGRATING, Phase.INDEXING]
    assert decisions[-1].status.history[-1].reason == "Migrated"


@pytest.mark.parametrize(
    ("shards", "parallelism"),
    [(5, 2), (3, 1), (4, 4), (2, 5), (7, 3)],
    ids=lambda v: str(v),
)
def test_never_more_than_parallelism_shards_run_at_once(shards: int, parallelism: int) -> None:
    spec = make_spec(migration={"shards": shards, "parallelism": parallelism})
    status = status_at(spec, Phase.MIGRATING)
    runner: dict[str, JobState] = {}
    age: dict[str, int] = {}
    launched: list[str] = []
    for minute in range(50):
        d = tick(spec, status, Observations(jobs=seen(runner)), at(minutes=minute))
        status = d.status
        for r in run_jobs(d):
            if r.name not in runner:
                launched.append(r.name)
                runner[r.name] = JobState.RUNNING
                age[r.name] = 0
        active = [n for n, s in runner.items() if s is JobState.RUNNING]
        assert len(active) <= parallelism
        for n in active:  # each Job runs for three ticks
            age[n] += 1
            if age[n] == 3:
                runner[n] = JobState.SUCCEEDED
        if status.phase is not Phase.MIGRATING:
            break
    assert status.phase is Phase.INDEXING
    assert launched == [job(spec, JobKind.MIGRATE, shard=i) for i in range(shards)]


# ---- failures and retries ------------------------------------------------------------------------


@pytest.mark.parametrize(("phase", "kind", "args", "next_phase", "reason"), PIPELINE[:3])
def test_a_job_failing_past_its_retries_fails_the_migration(
    phase: Phase, kind: JobKind, args: tuple[str, ...], next_phase: Phase, reason: str
) -> None:
    spec = make_spec()
    name = _job_of(spec, kind)
    obs = Observations(jobs=seen({name: JobState.FAILED}, "budget of $5.00 reached"))
    d = tick(spec, tick(spec, status_at(spec, phase)).status, obs, at(minutes=3))
    assert d.status.phase is Phase.FAILED
    entry = d.status.history[-1]
    assert entry.reason == "JobFailed"
    assert name in entry.message and "budget of $5.00 reached" in entry.message
    assert d.status.message == entry.message
    assert d.status.percentage == 0
    assert not d.of_type(EnsureFollower)
    assert condition(d.status, ConditionType.READY).reason == "Failed"
    assert [e.type for e in events(d) if e.reason == "JobFailed"] == ["Warning"]


def test_a_failing_shard_fails_the_migration_with_its_message() -> None:
    spec = make_spec(migration={"shards": 3, "parallelism": 3})
    name = [job(spec, JobKind.MIGRATE, shard=i) for i in range(3)]
    status = tick(spec, status_at(spec, Phase.MIGRATING)).status
    states = {name[0]: JobState.SUCCEEDED, name[1]: JobState.FAILED, name[2]: JobState.RUNNING}
    d = tick(spec, status, Observations(jobs=seen(states, "OpenAI 401: bad key")), at(minutes=9))
    assert d.status.phase is Phase.FAILED
    assert name[1] in d.status.message and "OpenAI 401: bad key" in d.status.message


def test_a_failed_verification_fails_with_verification_failed() -> None:
    spec = make_spec()
    name = job(spec, JobKind.VERIFY)
    status = tick(spec, status_at(spec, Phase.VERIFYING)).status
    why = "recall@10 0.81 below 0.9"
    d = tick(spec, status, Observations(jobs=seen({name: JobState.FAILED}, why)), at(minutes=2))
    assert d.status.phase is Phase.FAILED
    assert d.status.history[-1].reason == "VerificationFailed"
    assert why in d.status.history[-1].message
    assert d.status.verification is not None
    assert d.status.verification.ok is False
    assert d.status.verification.failed_checks == [why]
    verified = condition(d.status, ConditionType.VERIFIED)
    assert (verified.status, verified.reason, verified.message) == (
        "False",
        "VerificationFailed",
        why,
    )
    assert d.status.percentage == 0 and not d.of_type(SetPercentage)
    assert [e.type for e in events(d) if e.reason == "VerificationFailed"] == ["Warning"]


# What the runner says of a failed Job (the Kubernetes adapter's wording: the CLI's line and
# "not retried" for a podFailurePolicy failure; the Job controller's for retries run out), and
# the Failed message the status carries: the Job named once, no claim of retries of its own.
POLICY = "(pod rag/docs-x7k2p exited {code}, not retried)"
FAILED_MESSAGES = [
    pytest.param(
        JobKind.SETUP,
        "setup refused the database as it is " + POLICY.format(code=4),
        "setup Job {job} failed: setup refused the database as it is " + POLICY.format(code=4),
        id="setup-by-policy",
    ),
    pytest.param(
        JobKind.MIGRATE,
        "spec.migration.categories: no row has category 'nope' " + POLICY.format(code=2),
        "migrate Job {job} failed: spec.migration.categories: no row has category 'nope' "
        + POLICY.format(code=2),
        id="migrate-by-policy",
    ),
    pytest.param(
        JobKind.MIGRATE,
        "BackoffLimitExceeded: Job has reached the specified backoff limit",
        "migrate Job {job} failed: BackoffLimitExceeded: Job has reached the specified backoff "
        "limit",
        id="migrate-retries-ran-out",
    ),
    pytest.param(
        JobKind.VERIFY,
        "verification failed: index_recall: 0.61 < 0.9 " + POLICY.format(code=3),
        "verify Job {job}: verification failed: index_recall: 0.61 < 0.9 " + POLICY.format(code=3),
        id="verify-by-policy",
    ),
    pytest.param(
        JobKind.VERIFY,
        "failed 3 times (backoffLimit reached)",
        "verify Job {job}: failed 3 times (backoffLimit reached)",
        id="verify-retries-ran-out",
    ),
]


@pytest.mark.parametrize(("kind", "observed", "expected"), FAILED_MESSAGES)
def test_the_failed_message_names_the_job_and_keeps_the_runners_account(
    kind: JobKind, observed: str, expected: str
) -> None:
    spec = make_spec()
    phase = next(p.values[0] for p in PIPELINE if p.values[1] is kind)
    assert isinstance(phase, Phase)
    name = _job_of(spec, kind)
    status = tick(spec, status_at(spec, phase)).status
    d = tick(
        spec, status, Observations(jobs=seen({name: JobState.FAILED}, observed)), at(minutes=2)
    )
    assert d.status.phase is Phase.FAILED
    assert d.status.message == expected.format(job=name)
    assert d.status.message.count(observed) == 1 and "\n" not in d.status.message
    assert "past its retries" not in d.status.message
    (event,) = [e for e in events(d) if e.type == "Warning"]
    assert event.message == d.status.message


def _failed(spec: EmbeddingMigrationSpec) -> EmbeddingMigrationStatus:
    name = job(spec, JobKind.SETUP)
    started = tick(spec, status_at(spec, Phase.PREPARING)).status
    obs = Observations(jobs=seen({name: JobState.FAILED}, "lock_timeout"))
    failed = tick(spec, started, obs, at(minutes=1)).status
    assert failed.phase is Phase.FAILED
    return failed


def test_failed_holds_until_the_spec_changes() -> None:
    spec = make_spec()
    failed = _failed(spec)
    obs = Observations(
        jobs={job(spec, JobKind.SETUP): JobObservation(JobState.FAILED, "lock_timeout")},
        analysis=all_pass(spec),
        alerts=("EmbeddingV2ErrorRate",),
        routing=RoutingObservation(percentage=0, emergency=True),
    )
    status = failed
    for hour in range(1, 4):
        d = tick(spec, status, obs, at(hours=hour))
        assert d.actions == ()  # no Job, no follower, no routing write, no event
        assert d.status == failed
        status = d.status


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"migration": {"budgetUSD": 50.0}}, id="budget-raised"),
        pytest.param({"migration": {"image": "embedshift:1.0.1"}}, id="image-fixed"),
        pytest.param({"migration": {"batchSize": 50}}, id="batch-size"),
        pytest.param({"analysis": {"successfulChecks": 5}}, id="analysis"),
    ],
)
def test_a_spec_change_retries_a_failed_migration_with_new_job_names(
    change: dict[str, Any],
) -> None:
    spec = make_spec()
    failed = _failed(spec)
    fixed = changed(spec, **change)
    d = tick(fixed, failed, Observations(), at(hours=2))
    assert d.status.phase is Phase.PREPARING
    assert d.status.attempt == 2
    assert d.status.history[-1].reason == "Retrying"
    assert "attempt 2" in d.status.history[-1].message
    assert d.status.spec_hash == spec_hash(fixed)
    [run] = run_jobs(d)
    assert run.name == job(fixed, JobKind.SETUP, attempt=2)
    assert run.name != job(spec, JobKind.SETUP)
    assert run.name.endswith("-r2")
    assert [j.name for j in d.status.migration.jobs] == [run.name]  # the failed one is gone
    assert d.status.verification is None
    # The retry's Jobs carry on under their new names.
    name = job(fixed, JobKind.SETUP, attempt=2)
    done = tick(fixed, d.status, Observations(jobs=seen({name: JobState.SUCCEEDED})), at(hours=3))
    assert done.status.phase is Phase.MIGRATING
    assert run_jobs(tick(fixed, done.status, Observations(), at(hours=3, minutes=1)))[
        0
    ].name == job(fixed, JobKind.MIGRATE, shard=0, attempt=2)


def test_a_second_failure_and_retry_counts_attempts_on() -> None:
    spec = make_spec()
    failed = _failed(spec)
    retry = changed(spec, migration={"budgetUSD": 10.0})
    status = tick(retry, failed, Observations(), at(hours=1)).status
    name = job(retry, JobKind.SETUP, attempt=2)
    status = tick(
        retry, status, Observations(jobs=seen({name: JobState.FAILED})), at(hours=2)
    ).status
    assert status.phase is Phase.FAILED
    again = changed(retry, migration={"budgetUSD": 20.0})
    d = tick(again, status, Observations(), at(hours=3))
    assert d.status.attempt == 3
    assert run_jobs(d)[0].name == job(again, JobKind.SETUP, attempt=3)


def test_a_new_target_after_a_failure_re_migrates_from_attempt_one() -> None:
    spec = make_spec()
    failed = _failed(spec)
    other = changed(spec, target={"provider": "google", "model": "gemini-embedding-001"})
    d = tick(other, failed, Observations(), at(hours=1))
    assert d.status.phase is Phase.PREPARING
    assert d.status.attempt == 1
    assert d.status.history[-1].reason == "DataPlaneChanged"
    assert run_jobs(d)[0].name == job(other, JobKind.SETUP)
    assert run_jobs(d)[0].name != job(spec, JobKind.SETUP)


# ---- restart safety ------------------------------------------------------------------------------


def _situations() -> list[Any]:
    spec = make_spec(migration={"shards": 4, "parallelism": 2})
    return [
        pytest.param(spec, EmbeddingMigrationStatus(), Observations(), id="new"),
        pytest.param(
            spec,
            tick(spec, status_at(spec, Phase.MIGRATING)).status,
            Observations(jobs=seen({job(spec, JobKind.MIGRATE, shard=0): JobState.SUCCEEDED})),
            id="migrating",
        ),
        pytest.param(
            spec,
            status_at(spec, Phase.PROGRESSING, passes=2),
            Observations(analysis=all_pass(spec), routing=RoutingObservation(10)),
            id="promoting",
        ),
        pytest.param(
            spec,
            status_at(spec, Phase.PROGRESSING, step=2),
            Observations(alerts=("HighErrorRate",)),
            id="rolling-back",
        ),
        pytest.param(
            spec,
            status_at(spec, Phase.PROMOTED, step=4, since=at(hours=-2)),
            Observations(),
            id="succeeding",
        ),
    ]


@pytest.mark.parametrize(("spec", "status", "obs"), _situations())
def test_the_same_inputs_decide_the_same(
    spec: EmbeddingMigrationSpec, status: EmbeddingMigrationStatus, obs: Observations
) -> None:
    # A driver that dies after carrying out the actions but before persisting the status asks
    # again with the same inputs: the same status and the same (idempotent) actions come back.
    assert tick(spec, status, obs, at(hours=1)) == tick(spec, status, obs, at(hours=1))


def _persisted(status: EmbeddingMigrationStatus) -> EmbeddingMigrationStatus:
    """The status as the API server (or rollout run's state file) hands it back."""
    raw = json.loads(json.dumps(status.model_dump(mode="json", by_alias=True, exclude_none=True)))
    return EmbeddingMigrationStatus.model_validate(raw)


@pytest.mark.parametrize(("spec", "status", "obs"), _situations())
def test_a_persisted_status_decides_the_same(
    spec: EmbeddingMigrationSpec, status: EmbeddingMigrationStatus, obs: Observations
) -> None:
    assert _persisted(status) == status
    assert tick(spec, _persisted(status), obs, at(hours=1)) == tick(spec, status, obs, at(hours=1))


def test_a_driver_restarted_every_tick_decides_like_one_that_never_stopped() -> None:
    spec = make_spec(migration={"shards": 2, "parallelism": 1}, analysis={"successfulChecks": 2})
    kept = EmbeddingMigrationStatus()
    reloaded = EmbeddingMigrationStatus()
    runner: dict[str, JobState] = {}
    for minute in range(0, 8 * 60, 10):
        routed = kept.phase in (Phase.PROGRESSING, Phase.PROMOTED)
        obs = Observations(
            jobs=seen(runner),
            analysis=all_pass(spec) if routed else None,
            routing=RoutingObservation(kept.percentage),
        )
        a = tick(spec, kept, obs, at(minutes=minute))
        b = tick(spec, _persisted(reloaded), obs, at(minutes=minute))
        assert a == b
        kept, reloaded = a.status, b.status
        runner.update({r.name: JobState.SUCCEEDED for r in run_jobs(a)})
    assert kept.phase is Phase.SUCCEEDED


# ---- the follower --------------------------------------------------------------------------------

FOLLOWING = [
    Phase.MIGRATING,
    Phase.INDEXING,
    Phase.VERIFYING,
    Phase.PROGRESSING,
    Phase.PAUSED,
    Phase.PROMOTED,
    Phase.SUCCEEDED,
    Phase.ROLLED_BACK,
]


@pytest.mark.parametrize("phase", FOLLOWING, ids=lambda p: p.value)
def test_the_follower_runs_from_migrating_on(phase: Phase) -> None:
    spec = make_spec(rollout={"paused": phase is Phase.PAUSED})
    d = tick(spec, status_at(spec, phase), Observations(), at(minutes=1))
    assert d.status.phase is phase
    name = follower_name(NAME, data_hash=spec_hash(spec).data_plane)
    assert d.of_type(EnsureFollower) == [EnsureFollower(name=name, args=("migrate", "follow"))]


@pytest.mark.parametrize("phase", [Phase.PREPARING, Phase.FAILED], ids=lambda p: p.value)
def test_no_follower_before_the_side_table_exists_or_after_a_failure(phase: Phase) -> None:
    spec = make_spec()
    d = tick(spec, status_at(spec, phase), Observations(), at(minutes=1))
    assert d.status.phase is phase
    assert d.of_type(EnsureFollower) == []


def test_a_new_target_gets_a_new_follower_once_it_migrates() -> None:
    spec = make_spec()
    other = changed(spec, target={"dimensions": 512})
    d = tick(other, status_at(spec, Phase.PROGRESSING, step=1), Observations(), at(hours=1))
    assert d.status.phase is Phase.PREPARING
    assert d.of_type(EnsureFollower) == []  # the old one is stopped by the driver's policy
    setup = job(other, JobKind.SETUP)
    d = tick(other, d.status, Observations(jobs=seen({setup: JobState.SUCCEEDED})), at(hours=2))
    [follower] = d.of_type(EnsureFollower)
    assert follower.name == follower_name(NAME, data_hash=spec_hash(other).data_plane)
    assert follower.name != follower_name(NAME, data_hash=spec_hash(spec).data_plane)


def test_the_routing_row_stays_at_zero_before_the_rollout() -> None:
    spec = make_spec()
    d = tick(spec, status_at(spec, Phase.INDEXING), Observations(routing=RoutingObservation(0)))
    assert percentages(d) == []


@pytest.mark.parametrize("counts", list(CountsKind))
def test_status_says_how_the_progress_was_counted(counts: CountsKind) -> None:
    """A person reading status.migration learns whether the figures came from the maintained
    counters (cheap, every tick) or a full comparison (an older setup: a cost on every tick)."""
    spec = make_spec()
    seeded = at(hours=-3) if counts is CountsKind.MAINTAINED else None
    progress = ProgressObservation(
        total=100,
        migrated=40,
        pending=60,
        by_category={"faq": (100, 40)},
        counts=counts,
        counted_since=seeded,
    )
    status = status_at(spec, Phase.MIGRATING)
    migration = tick(spec, status, Observations(progress=progress)).status.migration
    assert (migration.total, migration.migrated, migration.pending) == (100, 40, 60)
    assert migration.counts is counts and migration.counted_since == seeded
    written = migration.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert written["counts"] == counts.value
    assert ("countedSince" in written) is (counts is CountsKind.MAINTAINED)
