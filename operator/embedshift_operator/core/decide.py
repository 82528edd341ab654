"""The rollout's one decision: ``decide(spec, status, observations, now) -> Decision``. Pure.

No clock (``now`` is an argument), no I/O, no kopf or kubernetes: the kopf operator and
``embedshift rollout run`` are two drivers of this function, and every rule below is a row in a
table-driven test. Every counter a decision needs lives in ``status``, so a restarted driver
decides the same.

The rules (DESIGN.md "Phases"), in the order they are applied each tick:

1. **Spec changes**, seen through the hashes in status: the data-plane part (table, source,
   target) → re-migrate from Preparing at 0 %; the rollout part (steps, analysis) → restart at
   the first step; the Jobs' settings → nothing, except that any change retries a Failed one.
2. **Safety** while v2 takes traffic: a firing alert for this migration or the routing row's
   ``emergency`` flag → RolledBack at once; ``maxPercentage: 0`` → RolledBack (manual).
3. **The phase's own work**: setup → one migrate Job per shard (≤ ``parallelism`` at once) →
   index → verify → the steps. In a step: rollback thresholds breached for their ``for`` checks →
   RolledBack (paused or not: safety never pauses); ``paused`` → hold; after ``minDuration`` and
   ``successfulChecks`` consecutive all-pass checks → the next step. The last step (100 %) is
   Promoted, which holds for its ``minDuration`` with rollback thresholds active, then Succeeded.
   A step capped below its percentage by ``maxPercentage`` holds, and its checks do not count.
4. The follower runs from Migrating on; the routing row is kept at the effective percentage
   (repaired if it drifted); conditions are derived from the phase and the last check.

A spec naming what the operator may not use (``Observations.refusals``: an image or a host
outside its allowlists, :mod:`embedshift_operator.core.allowlist`) is **held**: its changes are
not taken in (the spec hash stays, so they are once it is allowed), no Job, follower, step,
retry or cleanup runs, and no percentage rises; the safety rules (alerts, the emergency flag,
``maxPercentage``, rollback thresholds) still act. Ready is False and Stalled True with the
refusal's reason (ImageNotAllowed, EndpointNotAllowed), and a Warning Event says it once.

RolledBack holds 0 % until a spec hash changes (a Git commit), or, after a manual rollback,
until ``maxPercentage`` is raised again. Failed holds until the spec changes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from embedshift_operator.core.analysis import all_passing, breached_thresholds, evaluate
from embedshift_operator.core.cleanup import drop_due, drop_outcome, source_condition
from embedshift_operator.core.jobs import follower_name, job_name
from embedshift_operator.core.model import (
    Action,
    Decision,
    DropSource,
    EmitEvent,
    EnsureFollower,
    JobObservation,
    Observations,
    ProgressObservation,
    RunJob,
    SetPercentage,
)
from embedshift_operator.resource import (
    HISTORY_LIMIT,
    AnalysisStatus,
    CategoryProgress,
    Condition,
    ConditionType,
    EmbeddingMigrationSpec,
    EmbeddingMigrationStatus,
    HistoryEntry,
    JobKind,
    JobRecord,
    JobState,
    MigrationProgress,
    Phase,
    SpecHash,
    VerificationStatus,
    parse_duration,
    spec_hash,
)
from rag_service.criteria import Verdict

__all__ = ["decide", "settle_drop"]

_Done = Callable[[], None]  # what follows a Job's success

# Phases in which v2 takes traffic and the safety rules act.
_ROUTED = (Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTED)
# Phases in which the follower keeps the side table current.
_FOLLOWING = (
    Phase.MIGRATING,
    Phase.INDEXING,
    Phase.VERIFYING,
    Phase.PROGRESSING,
    Phase.PAUSED,
    Phase.PROMOTED,
    Phase.SUCCEEDED,
    Phase.ROLLED_BACK,
)
_MANUAL = "ManualRollback"
# Phases only a spec change leaves (a retry is a commit): the Stalled condition is True in them.
_STALLED = (Phase.FAILED, Phase.ROLLED_BACK)


def decide(
    spec: EmbeddingMigrationSpec,
    status: EmbeddingMigrationStatus,
    observations: Observations,
    now: datetime,
    *,
    name: str,
) -> Decision:
    """The next status and the actions that carry it out. Pure.

    ``name`` is the resource's name (Job and follower names derive from it). Drivers carry out
    the actions first and then persist the status: if they die in between, the next tick decides
    the same again, and every action is idempotent.
    """
    tick = _Tick(spec, status, observations, now, name)
    tick.run()
    return Decision(status=tick.status, actions=tuple(tick.actions))


def settle_drop(
    spec: EmbeddingMigrationSpec,
    status: EmbeddingMigrationStatus,
    action: DropSource,
    *,
    error: str | None,
    now: datetime,
) -> Decision:
    """What a :class:`DropSource` the driver ran changes, ``error`` None when it committed: the
    status to save instead of the decision's (``sourceDroppedAt``, or the failure its backoff
    counts, and the SourceDropped condition) and the Event to emit (a failure's is a Warning).
    Pure; both drivers call it (:mod:`embedshift_operator.core.cleanup`)."""
    settled, reason, message = drop_outcome(spec, status, action, error=error, now=now)
    tick = _Tick(spec, settled, Observations(), now, "")
    dropped = next(c for c in tick.conditions() if c.type is ConditionType.SOURCE_DROPPED)
    others = [c for c in settled.conditions if c.type is not ConditionType.SOURCE_DROPPED]
    tick.set(conditions=[*others, dropped])
    tick.event(reason, message, warning=error is not None)
    return Decision(status=tick.status, actions=tuple(tick.actions))


class _Tick:
    """One call of :func:`decide`: the status being built and the actions gathered."""

    def __init__(
        self,
        spec: EmbeddingMigrationSpec,
        status: EmbeddingMigrationStatus,
        observations: Observations,
        now: datetime,
        name: str,
    ) -> None:
        self.spec = spec
        self.status = status
        self.obs = observations
        self.now = now
        self.name = name
        self.actions: list[Action] = []
        self._routed = False  # a SetPercentage was issued this tick
        self._clearing_emergency = False  # a SetPercentage this tick clears the emergency flag
        self._entered = False  # a transition happened this tick (its message is status.message)
        self.refused = bool(observations.refusals)  # the spec is held (see the module doc)

    # ---- the rules, in order ------------------------------------------------------------------

    def run(self) -> None:
        hashes = spec_hash(self.spec)
        if self.refused:
            pass  # a held spec's changes wait until it is allowed
        elif self.status.spec_hash is None:
            self.set(spec_hash=hashes)
            self.enter(Phase.PREPARING, "Started", "migration started: running setup")
        else:
            self.spec_changes(hashes)
        self.record_progress()
        if not (self.safety() or self.manual_cap()):
            self.phase_work()
        if not self.refused:
            self.follower()
        self.reconcile_routing()
        self.report_refusal()
        self.set(conditions=self.conditions())

    def spec_changes(self, new: SpecHash) -> None:
        old = self.status.spec_hash
        assert old is not None
        if old == new:
            return
        self.set(spec_hash=new)
        phase = self.status.phase
        if old.data_plane != new.data_plane:
            self.reset_pipeline(attempt=1)
            self.enter(
                Phase.PREPARING,
                "DataPlaneChanged",
                "the table, source or target changed: re-migrating; v2 gets no traffic until "
                "it is verified",
                percentage=0,
            )
        elif old.rollout != new.rollout and phase in (*_ROUTED, Phase.ROLLED_BACK):
            self.start_rollout("RolloutChanged", "the steps or analysis changed: restarting")
        elif phase is Phase.FAILED:
            self.reset_pipeline(attempt=self.status.attempt + 1)
            self.enter(
                Phase.PREPARING,
                "Retrying",
                f"the spec changed after a failure: retrying (attempt {self.status.attempt})",
            )

    def safety(self) -> bool:
        if self.status.phase not in _ROUTED:
            return False
        if self.obs.alerts:
            self.roll_back(
                "AlertFiring",
                f"alert {', '.join(sorted(self.obs.alerts))} firing for this migration",
            )
            return True
        routing = self.obs.routing
        # A retry commit that restarted the rollout this tick clears the flag (SetPercentage
        # with clear_emergency): the flag observed was read before that write, so acting on it
        # would undo the very retry DESIGN asks for. A flag set again is seen next tick.
        if routing is not None and routing.emergency and not self._clearing_emergency:
            why = f" ({routing.reason})" if routing.reason else ""
            self.roll_back("EmergencyFlag", f"the routing row's emergency flag is set{why}")
            return True
        return False

    def manual_cap(self) -> bool:
        cap = self.spec.rollout.max_percentage
        phase = self.status.phase
        if cap == 0 and phase in (*_ROUTED, Phase.SUCCEEDED):
            self.roll_back(_MANUAL, "spec.rollout.maxPercentage is 0: manual rollback")
            return True
        if (
            cap > 0
            and phase is Phase.ROLLED_BACK
            and self.rolled_back_by() == _MANUAL
            and not self.refused
        ):
            self.start_rollout(
                "Retrying", f"spec.rollout.maxPercentage raised to {cap}: retrying from step 1"
            )
            return True
        return False

    def phase_work(self) -> None:
        phase = self.status.phase
        if self.refused and phase not in _ROUTED:
            return  # held: nothing runs (a routed step still rolls back: see step())
        if phase is Phase.PENDING:
            self.enter(Phase.PREPARING, "Started", "migration started: running setup")
        elif phase is Phase.PREPARING:
            self.single_job(JobKind.SETUP, ("migrate", "setup"), self.setup_done)
        elif phase is Phase.MIGRATING:
            self.migrate_jobs()
        elif phase is Phase.INDEXING:
            self.single_job(JobKind.INDEX, ("migrate", "index"), self.index_done)
        elif phase is Phase.VERIFYING:
            self.single_job(JobKind.VERIFY, ("migrate", "verify"), self.verified)
        elif phase in _ROUTED:
            self.step()
        elif phase is Phase.SUCCEEDED:
            self.cleanup()
        # RolledBack and Failed hold until the spec changes (handled above).

    # ---- jobs ---------------------------------------------------------------------------------

    def job(self, kind: JobKind, shard: int | None = None) -> str:
        assert self.status.spec_hash is not None
        return job_name(
            self.name,
            kind,
            data_hash=self.status.spec_hash.data_plane,
            attempt=self.status.attempt,
            shard=shard,
            shards=self.spec.migration.shards if kind is JobKind.MIGRATE else None,
        )

    def single_job(self, kind: JobKind, args: tuple[str, ...], done: _Done) -> None:
        state = self.track(self.job(kind), kind, args)
        if state is JobState.SUCCEEDED:
            done()
        elif state is JobState.FAILED:
            self.fail_job(self.job(kind), kind)

    def track(
        self, name: str, kind: JobKind, args: tuple[str, ...], shard: int | None = None
    ) -> JobState:
        """Launch the Job if it is new, and record what its runner says about it."""
        jobs = list(self.status.migration.jobs)
        record = next((j for j in jobs if j.name == name), None)
        seen: JobObservation | None = self.obs.jobs.get(name)
        if record is None:
            record = JobRecord(name=name, kind=kind, shard=shard, attempt=self.status.attempt)
            jobs.append(record)
            self.event("JobStarted", f"{kind.value} Job {name} started")
        if seen is not None:
            updated = record.model_copy(update={"state": seen.state, "message": seen.message})
            jobs = [updated if j.name == name else j for j in jobs]
            record = updated
        if seen is None and record.state in (JobState.PENDING, JobState.RUNNING):
            # Not seen yet, or no longer seen while unfinished (a local Job interrupted by
            # Ctrl-C, a Kubernetes Job deleted by hand): ask again under the same name. Creating
            # a Job that exists is success, so this never runs one twice.
            self.actions.append(RunJob(name=name, kind=kind, args=args, shard=shard))
        self.set(migration=self.status.migration.model_copy(update={"jobs": jobs}))
        return record.state

    def migrate_jobs(self) -> None:
        shards = self.spec.migration.shards
        parallelism = self.spec.migration.parallelism
        states: list[JobState | None] = []
        active = 0
        for shard in range(shards):
            name = self.job(JobKind.MIGRATE, shard)
            known = any(j.name == name for j in self.status.migration.jobs)
            if not known and active >= parallelism:
                states.append(None)  # waits for a slot
                continue
            args = ("migrate", "run", "--shard", f"{shard}/{shards}")
            state = self.track(name, JobKind.MIGRATE, args, shard)
            states.append(state)
            if state in (JobState.PENDING, JobState.RUNNING):
                active += 1
            elif state is JobState.FAILED:
                self.fail_job(name, JobKind.MIGRATE)
                return
        if all(s is JobState.SUCCEEDED for s in states):
            self.enter(Phase.INDEXING, "Migrated", f"all {shards} shard(s) embedded: indexing")

    def fail_job(self, name: str, kind: JobKind) -> None:
        """Failed, naming the Job and the runner's account of it. Whether the Job was retried is
        the runner's to say (it knows the exit code): "…, not retried" when an exit code no
        retry mends failed it at once, "failed 3 times…" when its retries ran out."""
        record = next((j for j in self.status.migration.jobs if j.name == name), None)
        why = record.message if record and record.message else "no error recorded"
        # A failure is a Warning event, as Kubernetes reports failed Jobs and Pods.
        if kind is JobKind.VERIFY:
            self.set(verification=VerificationStatus(ok=False, time=self.now, failed_checks=[why]))
            # The verify Job's own line already says what failed ("verification failed: …").
            self.enter(
                Phase.FAILED, "VerificationFailed", f"{kind.value} Job {name}: {why}", warning=True
            )
            return
        self.enter(
            Phase.FAILED, "JobFailed", f"{kind.value} Job {name} failed: {why}", warning=True
        )

    def setup_done(self) -> None:
        self.enter(Phase.MIGRATING, "SetUp", "side table, change queue and trigger in place")

    def index_done(self) -> None:
        self.enter(Phase.VERIFYING, "Indexed", "the v2 index is built: verifying")

    def verified(self) -> None:
        self.set(verification=VerificationStatus(ok=True, time=self.now))
        self.start_rollout("Verified", "verification passed: starting the rollout")

    def reset_pipeline(self, *, attempt: int) -> None:
        self.set(
            attempt=attempt,
            migration=MigrationProgress(),
            verification=None,
            analysis=AnalysisStatus(),
            step_index=0,
            step_started_at=None,
        )

    # ---- the steps ----------------------------------------------------------------------------

    def start_rollout(self, reason: str, message: str) -> None:
        steps = self.spec.rollout.steps
        self.set(step_index=0, step_started_at=self.now, analysis=AnalysisStatus())
        phase = Phase.PROMOTED if len(steps) == 1 else Phase.PROGRESSING
        percentage = min(steps[0].percentage, self.spec.rollout.max_percentage)
        self.enter(
            phase,
            reason,
            f"{message}; step 1 of {len(steps)}: {percentage} % to v2",
            percentage=percentage,
            clear_emergency=True,
        )

    def step(self) -> None:
        spec = self.spec
        steps = spec.rollout.steps
        index = min(self.status.step_index, len(steps) - 1)
        current = steps[index]
        wanted = min(current.percentage, spec.rollout.max_percentage)
        if wanted != self.status.percentage and not (
            self.refused and wanted > self.status.percentage
        ):
            self.route(wanted, f"step {index + 1}: {wanted} % (maxPercentage caps it)")
        checked = self.obs.analysis is not None
        if self.obs.analysis is not None:
            self.set(analysis=evaluate(spec, self.obs.analysis, self.status.analysis, now=self.now))
            breached = breached_thresholds(spec, self.status.analysis)
            if breached:
                self.roll_back("ThresholdBreached", self.breach_message(breached))
                return
        if self.refused:
            return  # held: no pause, promotion or success until the spec is allowed
        last = index == len(steps) - 1
        resting = Phase.PROMOTED if last else Phase.PROGRESSING
        if spec.rollout.paused:
            if self.status.phase is not Phase.PAUSED:
                self.enter(
                    Phase.PAUSED,
                    "Paused",
                    f"spec.rollout.paused: holding {wanted} %; rollback thresholds still act",
                )
            return
        if self.status.phase is Phase.PAUSED:
            self.enter(resting, "Resumed", f"resumed at step {index + 1} ({wanted} %)")
        if wanted < current.percentage:
            # Capped below the step: its checks say nothing about the step's traffic, so they
            # do not count toward promoting it (the count restarts once the cap is lifted), and
            # a capped last step is not "100 % held": Promoted does not become Succeeded.
            self.set(analysis=self.status.analysis.model_copy(update={"consecutive_passes": 0}))
            return
        started = self.status.step_started_at or self.now
        ends = started + parse_duration(current.min_duration)
        if last:
            if self.now >= ends:
                self.enter(
                    Phase.SUCCEEDED,
                    "Succeeded",
                    f"100 % held for {current.min_duration} without a breach: migration complete",
                )
            return
        passes = self.status.analysis.consecutive_passes
        if not checked or self.now < ends or passes < spec.analysis.successful_checks:
            return
        following = steps[index + 1]
        percentage = min(following.percentage, spec.rollout.max_percentage)
        final = index + 1 == len(steps) - 1
        self.set(
            step_index=index + 1,
            step_started_at=self.now,
            analysis=self.status.analysis.model_copy(update={"consecutive_passes": 0}),
        )
        self.enter(
            Phase.PROMOTED if final else Phase.PROGRESSING,
            "Promoted" if final else "StepPromoted",
            f"{passes} consecutive checks passed after {current.min_duration} at "
            f"{current.percentage} %: step {index + 2} of {len(steps)}, {percentage} % to v2",
            percentage=percentage,
        )

    def breach_message(self, names: list[str]) -> str:
        results = {r.name: r for r in self.status.analysis.results}
        parts = []
        for name in names:
            result = results[name]
            value = "no data" if result.value is None else f"{result.value:.6g}"
            if result.verdict is Verdict.ERROR:
                value = f"error: {result.message}"
            parts.append(f"{name} = {value} (healthy {result.bound})")
        return "rollback threshold breached: " + "; ".join(parts)

    def roll_back(self, reason: str, message: str) -> None:
        self.enter(Phase.ROLLED_BACK, reason, f"{message}: v2 at 0 %", percentage=0, warning=True)

    def rolled_back_by(self) -> str:
        """The reason of the latest rollback (ManualRollback, ThresholdBreached, …)."""
        return self.entered_by(Phase.ROLLED_BACK)

    def entered_by(self, phase: Phase) -> str:
        """The reason of the latest transition into ``phase`` ("" if history has none)."""
        for entry in reversed(self.status.history):
            if entry.phase is phase:
                return entry.reason
        return ""

    def cleanup(self) -> None:
        # Recorded by settle_drop once the driver ran it (core.cleanup), never here.
        drop = drop_due(self.spec, self.status, self.now)
        if drop is not None:
            self.actions.append(drop)

    # ---- follower, routing, progress, conditions ------------------------------------------------

    def follower(self) -> None:
        if self.status.phase in _FOLLOWING and self.status.spec_hash is not None:
            name = follower_name(self.name, data_hash=self.status.spec_hash.data_plane)
            self.actions.append(EnsureFollower(name=name, args=("migrate", "follow")))

    def reconcile_routing(self) -> None:
        routing = self.obs.routing
        if routing is None or self._routed:
            return
        if routing.percentage != self.status.percentage:
            self.route(
                self.status.percentage,
                f"the routing row said {routing.percentage} %; restoring "
                f"{self.status.percentage} %",
            )

    def record_progress(self) -> None:
        progress: ProgressObservation | None = self.obs.progress
        if progress is None:
            return
        self.set(
            migration=self.status.migration.model_copy(
                update={
                    "total": progress.total,
                    "migrated": progress.migrated,
                    "pending": progress.pending,
                    "failed": progress.failed_batches,
                    "oldest_pending_seconds": progress.oldest_pending_seconds,
                    "by_category": {
                        c: CategoryProgress(total=t, migrated=m)
                        for c, (t, m) in progress.by_category.items()
                    },
                    "counts": progress.counts,
                    "counted_since": progress.counted_since,
                }
            )
        )

    def refusal(self) -> tuple[str, str] | None:
        """(reason, message) of a held spec: the first refusal's reason, every message."""
        found = self.obs.refusals
        if not found:
            return None
        return found[0].reason, "; ".join(r.message for r in found)

    def report_refusal(self) -> None:
        """A Warning Event when the spec is refused, or refused for another reason: once, not
        every tick (the Ready condition keeps saying it); the message becomes status.message
        unless a transition (a rollback) wrote its own this tick."""
        refusal = self.refusal()
        if refusal is None:
            return
        before = next((c for c in self.status.conditions if c.type is ConditionType.READY), None)
        if before is None or (before.reason, before.message) != refusal:
            self.event(*refusal, warning=True)
        if not self._entered:
            self.set(message=refusal[1])

    def conditions(self) -> list[Condition]:
        phase = self.status.phase
        refusal = self.refusal()
        migrated = phase in (*_ROUTED, Phase.INDEXING, Phase.VERIFYING, Phase.SUCCEEDED) or (
            phase is Phase.ROLLED_BACK
        )
        verification = self.status.verification
        analysis = self.status.analysis
        wanted: list[tuple[ConditionType, str, str, str]] = []
        if refusal is not None:
            wanted.append((ConditionType.READY, "False", *refusal))
        elif self.obs.database_error:
            wanted.append(
                (ConditionType.READY, "False", "DatabaseUnreachable", self.obs.database_error)
            )
        elif phase is Phase.SUCCEEDED:
            wanted.append((ConditionType.READY, "True", "Succeeded", "migration complete"))
        else:
            wanted.append((ConditionType.READY, "False", phase.value, self.status.message))
        wanted.append(
            (ConditionType.MIGRATED, "True", "Migrated", "every shard embedded")
            if migrated
            else (ConditionType.MIGRATED, "False", phase.value, "re-embedding not finished")
        )
        if verification is None:
            wanted.append((ConditionType.VERIFIED, "Unknown", "NotVerified", "not verified yet"))
        elif verification.ok:
            wanted.append((ConditionType.VERIFIED, "True", "Verified", "migrate verify passed"))
        else:
            detail = "; ".join(verification.failed_checks)
            wanted.append((ConditionType.VERIFIED, "False", "VerificationFailed", detail))
        if not analysis.results:
            wanted.append((ConditionType.ANALYSIS_PASSING, "Unknown", "NoCheck", "no check yet"))
        elif all_passing(analysis):
            wanted.append(
                (ConditionType.ANALYSIS_PASSING, "True", "AllPassing", "every criterion passes")
            )
        else:
            failing = [
                f"{r.name}: {r.verdict.value}"
                for r in analysis.results
                if r.verdict is not Verdict.PASS
            ]
            wanted.append(
                (ConditionType.ANALYSIS_PASSING, "False", "NotPassing", ", ".join(failing))
            )
        if phase is Phase.ROLLED_BACK:
            wanted.append(
                (ConditionType.ROLLED_BACK, "True", self.rolled_back_by(), self.status.message)
            )
        else:
            wanted.append((ConditionType.ROLLED_BACK, "False", "NotRolledBack", ""))
        wanted.append(self.stalled(refusal))
        dropped = source_condition(self.spec, self.status)
        if dropped is not None:
            wanted.append(dropped)
        return self.stamped(wanted)

    def stalled(self, refusal: tuple[str, str] | None) -> tuple[ConditionType, str, str, str]:
        """Stalled: kstatus (Flux) reads Stalled=True as Failed; Ready=False alone reads as
        InProgress for ever. Present as False otherwise, as RolledBack is: kstatus reads False
        as absent."""
        if refusal is not None:
            reason, message = refusal
            return (
                ConditionType.STALLED,
                "True",
                reason,
                f"{message} (held until the spec or the operator's allowlist changes)",
            )
        phase = self.status.phase
        if phase in _STALLED:
            return (
                ConditionType.STALLED,
                "True",
                self.entered_by(phase) or phase.value,
                f"{phase.value}: {self.status.message} (held until the spec changes)",
            )
        return (ConditionType.STALLED, "False", "NotStalled", "")

    def stamped(self, wanted: list[tuple[ConditionType, str, str, str]]) -> list[Condition]:
        """``wanted`` as Conditions, each keeping its lastTransitionTime unless its status
        changed."""
        previous = {c.type: c for c in self.status.conditions}
        result = []
        for kind, state, reason, message in wanted:
            before = previous.get(kind)
            changed = before is None or before.status != state
            result.append(
                Condition(
                    type=kind,
                    status=state,
                    reason=reason,
                    message=message,
                    last_transition_time=self.now
                    if changed or before is None
                    else (before.last_transition_time),
                )
            )
        return result

    # ---- building blocks ----------------------------------------------------------------------

    def set(self, **changes: object) -> None:
        self.status = self.status.model_copy(update=changes)

    def route(self, percentage: int, reason: str, *, clear_emergency: bool = False) -> None:
        self.actions.append(
            SetPercentage(percentage=percentage, reason=reason, clear_emergency=clear_emergency)
        )
        self._routed = True
        self._clearing_emergency = self._clearing_emergency or clear_emergency
        self.set(percentage=percentage)

    def enter(
        self,
        phase: Phase,
        reason: str,
        message: str,
        *,
        percentage: int | None = None,
        warning: bool = False,
        clear_emergency: bool = False,
    ) -> None:
        """A transition: the phase and percentage, a history entry, an event."""
        if percentage is not None and (percentage != self.status.percentage or clear_emergency):
            self.route(percentage, message, clear_emergency=clear_emergency)
        entry = HistoryEntry(
            time=self.now,
            phase=phase,
            percentage=self.status.percentage,
            reason=reason,
            message=message,
        )
        history = [*self.status.history, entry][-HISTORY_LIMIT:]
        self._entered = True
        started = self.now if phase is not self.status.phase else self.status.phase_started_at
        self.set(phase=phase, history=history, message=message, phase_started_at=started)
        self.event(reason, message, warning=warning)

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        self.actions.append(
            EmitEvent(type="Warning" if warning else "Normal", reason=reason, message=message)
        )
