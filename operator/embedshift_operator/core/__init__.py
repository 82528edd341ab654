"""The rollout core: ``decide(spec, status, observations, now) -> Decision``. Pure.

No clock, no I/O, no kopf, kubernetes, httpx or psycopg (an import-linter contract says so).
"""

from embedshift_operator.core.allowlist import Allowlist, Refusal, refusals
from embedshift_operator.core.analysis import (
    AnalysisPlan,
    MetricSource,
    MetricSourceError,
    evaluate,
    measure,
    plan_analysis,
)
from embedshift_operator.core.decide import decide, settle_drop
from embedshift_operator.core.jobs import follower_name, job_name
from embedshift_operator.core.model import (
    Action,
    AnalysisObservation,
    Decision,
    DropSource,
    EmitEvent,
    EnsureFollower,
    JobObservation,
    Measurement,
    Observations,
    ProgressObservation,
    RoutingObservation,
    RunJob,
    SetPercentage,
)

__all__ = [
    "Action",
    "Allowlist",
    "AnalysisObservation",
    "AnalysisPlan",
    "Decision",
    "DropSource",
    "EmitEvent",
    "EnsureFollower",
    "JobObservation",
    "Measurement",
    "MetricSource",
    "MetricSourceError",
    "Observations",
    "ProgressObservation",
    "Refusal",
    "RoutingObservation",
    "RunJob",
    "SetPercentage",
    "decide",
    "evaluate",
    "follower_name",
    "job_name",
    "measure",
    "plan_analysis",
    "refusals",
    "settle_drop",
]
