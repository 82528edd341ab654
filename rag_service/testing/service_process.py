"""`embedshift serve` as a child process, for the demo and the benchmarks: start it, wait for it.

A separate process, as deployed: the service's CPU is its own (benchmarks read it from /proc),
and a replica's routing follows the database, not shared memory.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_serve(
    flags: Sequence[str], *, env: Mapping[str, str], log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``embedshift serve FLAGS`` on a free loopback port, output to ``log``.

    Returns the process and its base URL; it may not answer yet (see ``wait_healthy``).
    """
    port = free_port()
    command = [
        sys.executable, "-m", "embedshift_operator.cli", "serve", *flags,
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=dict(env), stdout=out, stderr=out)  # noqa: S603
    return process, f"http://127.0.0.1:{port}"


def wait_healthy(
    process: subprocess.Popen[bytes],
    base: str,
    log: Path,
    *,
    version: str = "v2",
    path: str | None = None,
    timeout: float = 60.0,
) -> None:
    """Return once ``path`` (default ``/api/rag/{version}/health``) answers 200.

    Raises RuntimeError, with the service's log, if it exits or is not healthy in ``timeout``.
    """
    path = path or f"/api/rag/{version}/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited ({process.returncode}):\n{log.read_text()}")
        try:
            if httpx.get(f"{base}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the service was not healthy in {timeout:.0f}s:\n{log.read_text()}")
