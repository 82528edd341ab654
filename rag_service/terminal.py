"""How a run shows its progress: a rich progress bar for people, JSON lines for machines."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TextIO

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from rag_service.migrate import Phase, RunReport
from rag_service.providers.pricing import spend_text

# A bar narrower than this says nothing; wider than this only takes room from the numbers.
MIN_BAR, MAX_BAR = 10, 40
# Piped output (a log file, `| tee`): a line per this many seconds, not a redraw per batch.
PIPED_EVERY_SECONDS = 10.0


def clock(seconds: float | None) -> str:
    """``H:MM:SS``, as a time remaining reads; ``-:--:--`` while it is unknown."""
    if seconds is None:
        return "-:--:--"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


@dataclass(frozen=True)
class ProgressState:
    """Where a run stands, and the words for it. The count, rate and ETA come first: a
    narrow terminal drops the bar, the spend and the description's line before them."""

    description: str
    done: int
    total: int
    elapsed: float
    tokens: int
    cost_usd: float | None  # None: the model's price is unknown, so the spend is too

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        if self.done >= self.total:
            return 0.0
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    def _numbers(self) -> tuple[str, str, str]:
        return (
            f"{self.done:,}/{self.total:,} rows",
            f"{self.rate:,.0f} rows/s",
            f"ETA {clock(self.eta_seconds)}",
        )

    def _spend(self) -> tuple[str, str]:
        return f"{self.tokens:,} tokens", spend_text(self.cost_usd)

    @property
    def numbers(self) -> str:
        return "  ".join(self._numbers())

    @property
    def spend(self) -> str:
        return "  ".join(self._spend())

    def line(self) -> str:
        """One plain line with everything, for piped output."""
        return f"{self.description}: {', '.join((*self._numbers(), *self._spend()))}"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        numbers, spend = Text(self.numbers), Text(self.spend)
        cells: list[tuple[RenderableType, int]] = [(numbers, len(self.numbers))]
        if len(self.numbers) + 2 + len(self.spend) <= width:
            cells.append((spend, len(self.spend)))
        used = sum(w for _, w in cells) + 2 * (len(cells) - 1)
        own_line = len(self.description) + 1 + MIN_BAR + 1 + used > width
        if not own_line:  # the description fits on the bar's line
            cells.insert(0, (Text(self.description, style="bold"), len(self.description)))
            used += len(self.description) + 2
        else:
            yield Text(self.description, style="bold", no_wrap=True, overflow="ellipsis")
        bar = min(MAX_BAR, width - used - 2)
        if bar >= MIN_BAR:
            at = 1 if not own_line else 0
            cells.insert(at, (ProgressBar(total=self.total, completed=self.done, width=bar), bar))
        grid = Table.grid(padding=(0, 2) if len(cells) > 1 else 0)
        for _, cell_width in cells:
            grid.add_column(width=cell_width, no_wrap=True)
        grid.add_row(*(cell for cell, _ in cells))
        yield grid


class RichProgress:
    """Rows done/total, rows/s, ETA, tokens and cost; on stderr so stdout stays parseable.

    On a terminal: a line redrawn in place that keeps count, rate and ETA down to 60 columns.
    Piped: plain lines with everything, at the start, after the first batch (the first real
    rate and ETA), every :data:`PIPED_EVERY_SECONDS` and at the end."""

    def __init__(
        self,
        console: Console,
        *,
        priced: bool = True,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        """``priced=False``: the model's price is unknown; the spend says so instead of $0."""
        self._console = console
        self._priced = priced
        self._now = now
        self._live: Live | None = None
        self._description = ""
        self._started = 0.0
        self._done = 0
        self._total = 0
        self._tokens = 0
        self._cost = 0.0
        self._printed_at: float | None = None
        self._printed_done: int | None = None

    @property
    def state(self) -> ProgressState:
        return ProgressState(
            description=self._description,
            done=self._done,
            total=max(self._total, self._done),  # rows written during the run raise it
            elapsed=max(self._now() - self._started, 0.0),
            tokens=self._tokens,
            cost_usd=self._cost if self._priced else None,
        )

    def started(self, *, total: int, target: str, phase: Phase) -> None:
        self._started = self._now()
        self._description = f"{phase} → {target}"
        self._done, self._total = 0, total
        if self._console.is_terminal:
            self._live = Live(
                get_renderable=lambda: self.state,
                console=self._console,
                refresh_per_second=4,
                transient=False,
            )
            self._live.start()
        else:
            self._print()

    def advanced(self, *, rows: int, tokens: int, cost_usd: float) -> None:
        if not self._description:  # not started: nothing to show progress against
            return
        first = self._done == 0
        self._done += rows
        self._tokens += tokens
        self._cost += cost_usd
        if self._live is None and (
            first
            or self._printed_at is None
            or self._now() - self._printed_at >= PIPED_EVERY_SECONDS
        ):
            self._print()

    def finished(self, report: RunReport) -> None:
        if self._live is not None:
            self._live.stop()  # draws the last state and leaves it on screen
            self._live = None
        elif self._printed_done != self._done:  # the last line printed is not the end
            self._print()

    def _print(self) -> None:
        self._printed_at, self._printed_done = self._now(), self._done
        self._console.print(self.state.line(), soft_wrap=True, highlight=False, markup=False)


class JsonLinesProgress:
    """One JSON object per line: ``started``, one ``batch`` per committed batch, ``finished``."""

    def __init__(self, stream: TextIO, *, priced: bool = True) -> None:
        """``priced=False``: the model's price is unknown; ``costUSD`` is null, not 0."""
        self._stream = stream
        self._priced = priced
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
                "costUSD": round(self._cost, 6) if self._priced else None,
            }
        )

    def finished(self, report: RunReport) -> None:
        event: dict[str, object] = {"event": "finished", **asdict(report)}
        if not self._priced:
            event["cost_usd"] = None
        self._emit(event)
