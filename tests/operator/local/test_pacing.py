"""The local driver's pacing: checks every ``analysis.interval``, not at the tick after it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from embedshift_operator.local import seconds_to_next_tick
from embedshift_operator.resource import AnalysisStatus, EmbeddingMigrationStatus, Phase
from tests.operator.core.builders import T0, make_spec

SPEC = make_spec(analysis={"interval": "2s"})


def _status(phase: Phase, checked_ago: float | None) -> EmbeddingMigrationStatus:
    time = None if checked_ago is None else T0 - timedelta(seconds=checked_ago)
    return EmbeddingMigrationStatus(phase=phase, analysis=AnalysisStatus(time=time))


@pytest.mark.parametrize(
    ("phase", "checked_ago", "expected"),
    [
        (Phase.PROGRESSING, 0.0, 0.5),  # due in 2 s: a whole tick first
        (Phase.PROGRESSING, 1.8, 0.2),  # due in 0.2 s: wake then, not 0.5 s later
        (Phase.PROMOTED, 1.9, 0.1),  # rollback thresholds act at 100 % too
        (Phase.PAUSED, 1.7, 0.3),  # and while paused
        (Phase.PROGRESSING, 5.0, 0.05),  # overdue: at once, but never a busy loop
        (Phase.PROGRESSING, None, 0.5),  # no check yet
        (Phase.MIGRATING, 1.9, 0.5),  # nothing routed, nothing to check
        (Phase.SUCCEEDED, 1.9, 0.5),  # its ticks record no check: waking early would spin
        (Phase.ROLLED_BACK, 1.9, 0.5),
    ],
)
def test_the_driver_wakes_when_a_check_falls_due(
    phase: Phase, checked_ago: float | None, expected: float
) -> None:
    pause = seconds_to_next_tick(SPEC, _status(phase, checked_ago), T0, tick=0.5)
    assert pause == pytest.approx(expected)
