"""``embedshift rollout status`` and ``rollout replay`` as users run them, and the live view."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console

from embedshift_operator.adapters.postgres import ControlStore
from embedshift_operator.cli.rollout import render_status
from embedshift_operator.replay import Replayer, parse_series, replay, verified_status
from embedshift_operator.resource import load_migration
from rag_service.testing.rollout import manifest, write
from tests.helpers import cli

REPO = Path(__file__).resolve().parents[3]
SERIES = REPO / "tests" / "operator" / "core" / "data" / "replay-latency-breach.jsonl"
EXAMPLE = REPO / "examples" / "migration.yaml"


def test_replay_prints_each_transition(capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, "rollout", "replay", str(EXAMPLE), "--metrics", str(SERIES))
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("2026-11-17 10:00:00  Progressing   10 %")
    assert any("RolledBack" in line and "p95-latency-critical = 1.52" in line for line in lines)
    assert lines[-1].startswith("-- 13 checks replayed; ended RolledBack at 0 %")


def test_replay_json_has_one_object_per_decision(capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(
        capsys, "rollout", "replay", str(EXAMPLE), "--metrics", str(SERIES), "--json", "--all"
    )
    assert result.code == 0, result.err
    decisions = [json.loads(line) for line in result.out.splitlines()]
    assert len(decisions) == 13
    assert decisions[-1]["phase"] == "RolledBack" and decisions[-1]["percentage"] == 0
    breach = next(d for d in decisions if d["reason"] == "ThresholdBreached")
    assert breach["verdicts"]["p95-latency-critical"] == "fail"
    assert decisions[-1]["verdicts"] == {}  # rolled back: nothing is judged at 0 %
    # The CLI prints what the library decides, nothing else.
    spec = load_migration(EXAMPLE).spec
    expected = list(replay(spec, parse_series(spec, SERIES.read_text().splitlines())))
    assert [d["reason"] for d in decisions] == [d.reason for d in expected]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"at": "2026-11-17T10:00:00Z", "p95-latncy": 0.3}\n', "line 1"),
        ("not json\n", "line 1"),
        ('{"at": "yesterday"}\n', '"at"'),
        ("", "has no lines"),
    ],
)
def test_replay_refuses_a_bad_series_naming_the_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str, message: str
) -> None:
    series = tmp_path / "series.jsonl"
    series.write_text(content)
    result = cli(capsys, "rollout", "replay", str(EXAMPLE), "--metrics", str(series))
    assert result.code == 2
    assert result.err.startswith("embedshift: error: ") and message in result.err
    assert "Traceback" not in result.err


def test_status_before_and_after_a_run(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    path = tmp_path / "m.yaml"
    write(path, manifest(name="shown", prometheus_url="http://127.0.0.1:9"))
    before = cli(capsys, "rollout", "status", str(path))
    assert before.code == 0, before.err
    assert "default/shown: not started" in before.out

    # A status as the driver saves it: decide() run through the pipeline to the first step.
    resource = load_migration(path)
    spec = resource.spec
    saved = verified_status(spec, datetime(2026, 11, 24, 10, tzinfo=UTC), name="shown")
    store = ControlStore(url=database_url, spec=spec, migration=resource.key)
    asyncio.run(store.ensure_tables())
    asyncio.run(store.save_status(saved))

    shown = cli(capsys, "rollout", "status", str(path))
    assert shown.code == 0, shown.err
    assert "default/shown" in shown.out and "Progressing" in shown.out and "10 %" in shown.out
    assert "Verified" in shown.out  # the history's reasons
    as_json = cli(capsys, "rollout", "status", str(path), "--json")
    document = json.loads(as_json.out)
    assert document["migration"] == "default/shown"
    assert document["status"]["phase"] == "Progressing"
    assert document["status"]["percentage"] == 10


def test_the_live_view_shows_phase_step_progress_and_each_criterion(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    write(path, manifest(name="view", prometheus_url="http://127.0.0.1:9"))
    spec = load_migration(path).spec
    lines = [
        json.dumps(
            {
                "at": f"2026-11-24T10:00:0{i}Z",
                "requests": 500,
                "p95-latency": 0.31,
                "p95-latency-critical": 0.31,
                "error-rate": 0.0,
                "error-rate-critical": 0.0,
                "avg-similarity": 0.8,
                "cache-hit-rate": 0.9,
                "critical-errors": 0,
                "cost-vs-v1": 0.0,
                "p95-latency-vs-v1": 0.31,
            }
        )
        for i in range(2)
    ]
    replayer = Replayer(spec, datetime(2026, 11, 24, 10, tzinfo=UTC), name="view")
    for point in parse_series(spec, lines):
        replayer.feed(point)
    status = replayer.status
    console = Console(record=True, width=120)
    now = datetime(2026, 11, 24, 10, 0, 30, tzinfo=UTC)
    console.print(
        render_status(load_migration(path), status, events=["10:00:01 Verified go"], now=now)
    )
    text = console.export_text()
    assert "default/view" in text and status.phase.value in text
    assert "step 2/5 (25 %, 29s in it)" in text and "v2 25 %" in text  # promoted once
    assert "traffic to v2" in text and "2 consecutive checks passed" in text
    assert "p95-latency" in text and "≤ 0.8" in text and "pass" in text
    assert "10:00:01 Verified go" in text
