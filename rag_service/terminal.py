"""How a run shows its progress: a rich progress bar for people, JSON lines for machines."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from rag_service.migrate import Phase, RunReport


class RichProgress:
    """Rows done/total, rows/s, ETA, tokens and cost; on stderr so stdout stays parseable."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rows"),
            TextColumn("{task.fields[rate]:>7.0f} rows/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[tokens]:>12,} tokens  ${task.fields[cost]:.4f}"),
            console=console,
            transient=False,
        )
        self._task: TaskID | None = None
        self._started = 0.0
        self._rows = 0
        self._tokens = 0
        self._cost = 0.0

    def started(self, *, total: int, target: str, phase: Phase) -> None:
        self._started = time.monotonic()
        self._progress.start()
        self._task = self._progress.add_task(
            f"{phase} → {target}", total=total, rate=0.0, tokens=0, cost=0.0
        )

    def advanced(self, *, rows: int, tokens: int, cost_usd: float) -> None:
        self._rows += rows
        self._tokens += tokens
        self._cost += cost_usd
        if self._task is None:
            return
        task = self._progress.tasks[self._task]
        if task.total is not None and task.completed + rows > task.total:
            # Rows written during the run raise the total; the bar should not overflow.
            self._progress.update(self._task, total=task.completed + rows)
        elapsed = max(time.monotonic() - self._started, 1e-6)
        self._progress.update(
            self._task,
            advance=rows,
            rate=self._rows / elapsed,
            tokens=self._tokens,
            cost=self._cost,
        )

    def finished(self, report: RunReport) -> None:
        self._progress.stop()


class JsonLinesProgress:
    """One JSON object per line: ``started``, one ``batch`` per committed batch, ``finished``."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._started = 0.0
        self._done = 0
        self._total = 0
        self._tokens = 0
        self._cost = 0.0

    def _emit(self, event: dict[str, object]) -> None:
        self._stream.write(json.dumps(event) + "\n")
        self._stream.flush()

    def started(self, *, total: int, target: str, phase: Phase) -> None:
        self._started = time.monotonic()
        self._total = total
        self._emit({"event": "started", "phase": phase, "target": target, "total": total})

    def advanced(self, *, rows: int, tokens: int, cost_usd: float) -> None:
        self._done += rows
        self._tokens += tokens
        self._cost += cost_usd
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = self._done / elapsed
        remaining = max(self._total - self._done, 0)
        self._emit(
            {
                "event": "batch",
                "rows": rows,
                "done": self._done,
                "total": max(self._total, self._done),
                "rowsPerSecond": round(rate, 1),
                "etaSeconds": round(remaining / rate, 1) if rate > 0 else None,
                "tokens": self._tokens,
                "costUSD": round(self._cost, 6),
            }
        )

    def finished(self, report: RunReport) -> None:
        self._emit({"event": "finished", **asdict(report)})
