"""`make demo`'s output: the story's blocks are not split by the driver's lines printed from
background threads, and the latency gap between v1 and v2 is explained, not left to mislead."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("embedshift_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


def test_background_lines_wait_for_a_story_block(
    demo: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    stop = threading.Event()

    def driver_events() -> None:  # what Driver._read_events and CheckLog do
        while not stop.is_set():
            demo.say("  [ 6.1s] JobStarted  migrate Job started")
            time.sleep(0.001)

    thread = threading.Thread(target=driver_events)
    thread.start()
    try:
        time.sleep(0.02)
        with demo.story():
            demo.say("$ embedshift serve --config .demo/local-demo.yaml &")
            time.sleep(0.1)  # waiting for it to be healthy: events arrive meanwhile
            demo.say("  300 users search at 30/s")
        time.sleep(0.02)
    finally:
        stop.set()
        thread.join()
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("$ embedshift serve --config .demo/local-demo.yaml &")
    assert lines[start + 1] == "  300 users search at 30/s"
    assert all(line.endswith("started") for line in lines[start + 2 :])  # held, not lost
    assert len(lines) > start + 2
    assert all(line.startswith(("  [", "$", "  300")) for line in lines)  # no line torn apart


def test_the_latency_gap_is_explained(demo: ModuleType) -> None:
    note = demo.latency_note(v2=0.0086, v1=0.0244)
    assert "9 ms against v1's 24 ms" in note
    assert "exact scan" in note and "HNSW" in note
    assert all(len(line) <= 100 for line in note.splitlines())  # fits a terminal
