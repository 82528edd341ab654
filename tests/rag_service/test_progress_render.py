"""`migrate run`'s progress keeps its count, rate and ETA: at 80 and 60 columns, and piped."""

from __future__ import annotations

import io
import json
import os
import re

import pytest
from rich.console import Console

from rag_service.migrate import RunReport
from rag_service.terminal import ProgressState, RichProgress
from rag_service.testing.corpus import create_corpus
from tests.helpers import cli_subprocess, flags

TARGET = "openai:text-embedding-3-small@768"  # a long description, as a real run has
# 3,766 of 10,000 rows after 10 s: 377 rows/s, 6,234 rows left, 17 s to go.
COUNT, RATE, ETA = "3,766/10,000 rows", "377 rows/s", "ETA 0:00:17"


def state() -> ProgressState:
    return ProgressState(
        description=f"backfill → {TARGET}",
        done=3766,
        total=10_000,
        elapsed=10.0,
        tokens=123_456,
        cost_usd=0.0123,
    )


@pytest.mark.parametrize("width", [80, 60])
def test_the_progress_line_keeps_count_rate_and_eta(width: int) -> None:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(state())
    text = out.getvalue()
    for part in (COUNT, RATE, ETA):
        assert part in text, text
    assert all(len(line) <= width for line in text.splitlines()), text
    assert "backfill → openai:" in text  # the description moved to its own line, not lost


def test_at_80_columns_the_spend_and_a_bar_fit_too() -> None:
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(state())
    assert "123,456 tokens  $0.0123" in out.getvalue()
    assert "━" in out.getvalue()


def test_on_a_terminal_the_last_frame_keeps_them() -> None:
    """The live bar itself, redrawn in place on an 80-column terminal."""
    out = io.StringIO()
    clock = iter([0.0] + [10.0] * 100)  # started at 0 s; every later reading at 10 s
    progress = RichProgress(
        Console(file=out, width=80, force_terminal=True, color_system=None),
        now=lambda: next(clock),
    )
    progress.started(total=10_000, target=TARGET, phase="backfill")
    progress.advanced(rows=3766, tokens=123_456, cost_usd=0.0123)
    progress.finished(RunReport(target=TARGET, embedded=3766))
    last_frame = out.getvalue().split("\x1b[2K")[-1]  # each redraw starts by erasing the line
    for part in (COUNT, RATE, ETA):
        assert part in last_frame, repr(last_frame)


def test_piped_progress_prints_lines_with_count_rate_and_eta(database_url: str) -> None:
    """`embedshift migrate run 2>&1 | tee run.log`: stderr is a pipe, not a terminal."""
    table = "docs_progress_piped"
    create_corpus(database_url, table=table, count=400, source_dimensions=0)
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    base = flags(database_url, table, target="local:hash@64")
    assert cli_subprocess(["migrate", "setup", *base], env=env).code == 0
    result = cli_subprocess(["migrate", "run", *base, "--batch-size", "100"], env=env)
    assert result.code == 0, result.err
    lines = [line for line in result.err.splitlines() if "rows/s" in line]
    assert "\x1b[" not in result.err  # no cursor control in a log file
    first, *_, last = lines
    assert first.startswith("backfill → local:hash@64: 0/400 rows, 0 rows/s, ETA -:--:--")
    # After the first batch: a real rate and ETA, well before the end.
    early = lines[1]
    assert re.search(r": 100/400 rows, [\d,]+ rows/s, ETA \d+:\d\d:\d\d, ", early), early
    assert re.search(r": 400/400 rows, [\d,]+ rows/s, ETA 0:00:00, [\d,]+ tokens, \$", last), last


def test_piped_json_lines_carry_count_rate_and_eta(database_url: str) -> None:
    table = "docs_progress_json"
    create_corpus(database_url, table=table, count=300, source_dimensions=0)
    base = flags(database_url, table, target="local:hash@64")
    assert cli_subprocess(["migrate", "setup", *base]).code == 0
    result = cli_subprocess(["migrate", "run", *base, "--batch-size", "100", "--json"])
    assert result.code == 0, result.err
    batches = [e for e in map(json.loads, result.out.splitlines()) if e["event"] == "batch"]
    assert [b["done"] for b in batches] == [100, 200, 300]
    assert all(b["total"] == 300 and b["rowsPerSecond"] > 0 for b in batches)
    assert batches[0]["etaSeconds"] is not None and batches[-1]["etaSeconds"] == 0
