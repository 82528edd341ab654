"""A real Prometheus for tests, benchmarks and the demo: Debian's ``prometheus`` binary (no Docker).

::

    with serving_metrics(registry) as target, running_prometheus(targets=[target]) as prom:
        prom.wait_for_scrape()
        ...  # PrometheusClient(url=prom.url).query(...)

Each :func:`running_prometheus` gets a free loopback port, a fresh TSDB in a temporary
directory, ``--web.enable-lifecycle`` (for :meth:`PrometheusProcess.reload`) and one scrape job,
``embedshift``. Start-up takes ~0.1 s, but the first scrape of a target comes up to ~5 s later:
Prometheus's discovery manager hands new targets to the scrapers on a fixed 5 s tick, which no
flag changes in 2.42. The same holds for targets added by a reload. Share one instance per test
module where the targets allow it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import start_http_server
from prometheus_client.registry import Collector

from rag_service.errors import EmbedshiftError
from rag_service.testing.service_process import free_port

__all__ = [
    "JOB",
    "PrometheusNotInstalled",
    "PrometheusProcess",
    "prometheus_binary",
    "running_prometheus",
    "serving_metrics",
]

JOB = "embedshift"

_DEBIAN_BINARY = Path("/usr/bin/prometheus")
_INSTALL_HINT = (
    "install Debian's 'prometheus' package (scripts/install-prometheus.sh does it; "
    "`make test` runs that script)"
)
_START_ATTEMPTS = 3
_READY_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0
_POLL = 0.05


class PrometheusNotInstalled(EmbedshiftError):
    """No ``prometheus`` binary on ``PATH`` or at ``/usr/bin/prometheus``."""


def prometheus_binary() -> Path:
    """The ``prometheus`` binary: the one on ``PATH``, else Debian's ``/usr/bin/prometheus``."""
    found = shutil.which("prometheus")
    if found:
        return Path(found)
    # PATH may be minimal (a subprocess env, cron); Debian's location is still worth a look.
    if _DEBIAN_BINARY.is_file():
        return _DEBIAN_BINARY
    raise PrometheusNotInstalled(
        f"prometheus is not installed (not on PATH, not at {_DEBIAN_BINARY}): {_INSTALL_HINT}"
    )


class PrometheusProcess:
    """A running Prometheus that scrapes ``targets`` (``host:port``) at ``/metrics``."""

    def __init__(
        self,
        *,
        url: str,
        process: subprocess.Popen[bytes],
        config_path: Path,
        log_path: Path,
        targets: Sequence[str],
        scrape_interval: str,
        rule_files: Sequence[Path],
    ) -> None:
        self.url = url
        self.process = process
        self.config_path = config_path
        self.log_path = log_path
        self._targets = tuple(targets)
        self._scrape_interval = scrape_interval
        self._rule_files = tuple(rule_files)

    @property
    def targets(self) -> tuple[str, ...]:
        return self._targets

    def wait_for_scrape(self, timeout: float = 15.0, *, scrapes: int = 1) -> None:
        """Block until every target has been scraped successfully ``scrapes`` times, counting
        only scrapes that started after this call, so what a test did before calling is in
        Prometheus afterwards.

        Raises :class:`TimeoutError` naming each target's health and last scrape error.
        """
        deadline = time.monotonic() + timeout
        for _ in range(scrapes):
            since = time.time()
            while not self._all_scraped_since(since):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"Prometheus at {self.url} did not scrape all targets within "
                        f"{timeout}s: {self._describe_targets()}"
                    )
                self._check_alive()
                time.sleep(_POLL)

    async def wait_for_scrape_async(
        self,
        timeout: float = 15.0,  # noqa: ASYNC109 (asyncio.timeout cannot stop the worker thread)
        *,
        scrapes: int = 1,
    ) -> None:
        """:meth:`wait_for_scrape` off the event loop, for a server in the test's own loop
        that Prometheus must be able to scrape meanwhile."""
        await asyncio.to_thread(self.wait_for_scrape, timeout, scrapes=scrapes)

    def reload(self) -> None:
        """Re-read the config file (``POST /-/reload``); raises if Prometheus rejects it."""
        request = urllib.request.Request(f"{self.url}/-/reload", method="POST")  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=30):  # noqa: S310 (our loopback server)
                pass
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace").strip()
            raise RuntimeError(
                f"Prometheus at {self.url} rejected its new config: {detail}"
            ) from None

    def add_targets(self, *targets: str) -> None:
        """Scrape these ``host:port`` targets too: rewrite the config and reload.

        New targets reach the scrapers on the discovery manager's next 5 s tick; follow with
        :meth:`wait_for_scrape`.
        """
        fresh = [target for target in targets if target not in self._targets]
        if not fresh:
            return
        self._targets = (*self._targets, *fresh)
        _write_config(
            self.config_path,
            targets=self._targets,
            scrape_interval=self._scrape_interval,
            rule_files=self._rule_files,
        )
        self.reload()

    def _all_scraped_since(self, since: float) -> bool:
        # timestamp() gives the scrape's own time only when applied directly to a selector, so
        # the up == 1 condition is joined on afterwards rather than nested inside it.
        answer = self._query(
            f'timestamp(up{{job="{JOB}"}}) and on (instance) (up{{job="{JOB}"}} == 1)'
        )
        scraped_at = {item["metric"]["instance"]: float(item["value"][1]) for item in answer}
        return all(scraped_at.get(target, 0.0) > since for target in self._targets)

    def _query(self, promql: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(  # noqa: S310 (our loopback server)
            f"{self.url}/api/v1/query?{query}", timeout=10
        ) as response:
            body = json.load(response)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def _describe_targets(self) -> str:
        try:
            with urllib.request.urlopen(  # noqa: S310 (our loopback server)
                f"{self.url}/api/v1/targets", timeout=10
            ) as response:
                active = json.load(response)["data"]["activeTargets"]
        except (OSError, ValueError, KeyError) as error:
            return f"cannot list targets ({error})"
        known = {item["labels"].get("instance"): item for item in active}
        parts = []
        for target in self._targets:
            item = known.get(target)
            if item is None:
                parts.append(f"{target}: not discovered yet")
            else:
                last_error = item.get("lastError") or "no error"
                parts.append(f"{target}: {item.get('health')} ({last_error})")
        return "; ".join(parts)

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"Prometheus exited with code {self.process.returncode}: {_log_tail(self.log_path)}"
            )


@contextmanager
def running_prometheus(
    *,
    targets: Sequence[str],
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (),
    extra_flags: Sequence[str] = (),
    host: str = "127.0.0.1",
) -> Iterator[PrometheusProcess]:
    """Run Prometheus on a free loopback port until the block ends; yield it once ready.

    ``host`` is the local address it listens on (another one than 127.0.0.1 when processes in
    other network namespaces of this machine query it).

    Rules are evaluated every ``scrape_interval`` too, so alerts and recording rules keep up
    with the data in tests. Everything (config, TSDB, log) lives in a temporary directory that
    is removed afterwards.
    """
    binary = prometheus_binary()
    workdir = Path(tempfile.mkdtemp(prefix="embedshift-prometheus-"))
    try:
        config_path = workdir / "prometheus.yml"
        log_path = workdir / "prometheus.log"
        rules = [Path(path).resolve() for path in rule_files]
        _write_config(
            config_path, targets=targets, scrape_interval=scrape_interval, rule_files=rules
        )
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = free_port()
            with log_path.open("wb") as log:
                process = subprocess.Popen(  # noqa: S603 (fixed binary, our own flags)
                    [
                        str(binary),
                        f"--config.file={config_path}",
                        f"--storage.tsdb.path={workdir / 'data'}",
                        f"--web.listen-address={host}:{port}",
                        "--web.enable-lifecycle",
                        *extra_flags,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                )
            prometheus = PrometheusProcess(
                url=f"http://{host}:{port}",
                process=process,
                config_path=config_path,
                log_path=log_path,
                targets=targets,
                scrape_interval=scrape_interval,
                rule_files=rules,
            )
            try:
                if _wait_ready(prometheus):
                    break
                log_text = _log_tail(log_path)
                # Another process may take the free port between our probe and the bind.
                if "address already in use" in log_text and attempt < _START_ATTEMPTS:
                    continue
                raise RuntimeError(
                    f"Prometheus ({binary}) exited with code {process.returncode} "
                    f"before it was ready: {log_text}"
                )
            except BaseException:
                _stop(process)
                raise
        try:
            yield prometheus
        finally:
            _stop(prometheus.process)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def serving_metrics(registry: Collector) -> Iterator[str]:
    """Serve ``registry`` (a ``prometheus_client`` registry) at ``/metrics`` on a free loopback
    port, in a thread; yield its ``host:port`` target."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=_STOP_TIMEOUT)


def _write_config(
    path: Path, *, targets: Sequence[str], scrape_interval: str, rule_files: Sequence[Path]
) -> None:
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(rule) for rule in rule_files],
        "scrape_configs": [
            {
                "job_name": JOB,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    # Written whole and renamed, so a reload never reads half a file.
    staging = path.with_suffix(".tmp")
    staging.write_text(yaml.safe_dump(config, sort_keys=False))
    staging.replace(path)


def _wait_ready(prometheus: PrometheusProcess) -> bool:
    """True once ``/-/ready`` answers 200; False if the process exits first."""
    deadline = time.monotonic() + _READY_TIMEOUT
    while time.monotonic() < deadline:
        if prometheus.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(  # noqa: S310 (our loopback server)
                f"{prometheus.url}/-/ready", timeout=1
            ) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(_POLL)
    raise TimeoutError(
        f"Prometheus at {prometheus.url} was not ready within {_READY_TIMEOUT}s: "
        f"{_log_tail(prometheus.log_path)}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail) or "(empty log)"
