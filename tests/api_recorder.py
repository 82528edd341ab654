"""The Pods' way to the API server, recording every request they make: the test node's
``kubernetes`` Service (``10.0.0.1:PORT``), as an HTTPS reverse proxy in front of the real API
server.

A Pod calls the API server at ``10.0.0.1`` (``KUBERNETES_SERVICE_HOST``) with its
ServiceAccount's token; :class:`ApiRecorder` terminates TLS there with a certificate of its own
CA (the Pod runner gives the Pods that CA as their ServiceAccount's ``ca.crt``), forwards the
request unchanged (token included: the real server authenticates and authorises it) to the API
server the kubeconfig names, streams the answer back (watches included), and records what was
asked and what the real server answered: :class:`Request` (the Pod's address, method, path,
User-Agent, status). This is the operator's request log as the real server saw it, the record
``api-calls.yaml`` is generated from (:mod:`tests.api_calls`); the control plane's script has
no audit flags to ask the server itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from yarl import URL

__all__ = ["ApiRecorder", "Request"]

# Hop-by-hop headers (RFC 9110 §7.6.1) and those aiohttp sets for the leg it writes itself.
_NOT_FORWARDED = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer", "host"}
)
_BODY_LIMIT = 64 * 1024 * 1024  # the API server's own request limit is 3 MiB per object


@dataclass(frozen=True)
class Request:
    """One request a Pod made, and the real server's status code for it."""

    client: str  # the Pod's IP
    method: str
    path: str  # as sent, query included (still percent-encoded)
    user_agent: str
    status: int


def _certificate(directory: Path, ip: str) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for ``ip``: (certificate, key) files."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "recorder.crt", directory / "recorder.key"
    san = f"subjectAltName=IP:{ip},DNS:kubernetes,DNS:kubernetes.default.svc"
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt"]
    command += ["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=kubernetes"]
    command += ["-addext", san, "-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        command,
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


class ApiRecorder:
    """``https://ip:port`` → ``upstream`` (the real API server), recording each request."""

    def __init__(
        self, *, ip: str, port: int, upstream: str, upstream_ca: str, directory: Path
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.address = f"{ip}:{port}"
        cert, key = _certificate(directory, ip)
        self.ca_pem = cert.read_text()  # what the Pods trust as their ServiceAccount's ca.crt
        self._server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_tls.load_cert_chain(cert, key)
        self._upstream_tls = ssl.create_default_context(cafile=upstream_ca)
        self._requests: list[Request] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(
            target=self._serve, args=(ip, port), name="api-recorder", daemon=True
        )
        self._thread.start()
        self._started.wait(timeout=30)
        if self._failure is not None:
            raise RuntimeError(f"the API recorder could not listen on {ip}:{port}") from (
                self._failure
            )

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def close(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    # -- the server

    def _serve(self, ip: str, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(web.Application(client_max_size=_BODY_LIMIT), handle_signals=False)
        try:
            self._loop.run_until_complete(self._start(runner, ip, port))
        except BaseException as exc:  # reported by __init__
            self._failure = exc
            self._started.set()
            return
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._session.close())
            self._loop.run_until_complete(runner.cleanup())
            self._loop.close()

    async def _start(self, runner: web.AppRunner, ip: str, port: int) -> None:
        runner.app.router.add_route("*", "/{tail:.*}", self._forward)
        # Watches stay open for minutes: no total timeout, and no limit on connections.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._upstream_tls, limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,  # bytes through as the server sent them
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        )
        await runner.setup()
        await web.TCPSite(runner, ip, port, ssl_context=self._server_tls).start()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        url = URL(self.upstream + request.raw_path, encoded=True)
        async with self._session.request(
            request.method, url, headers=headers, data=body or None, allow_redirects=False
        ) as answer:
            self._record(request, answer.status)
            response = web.StreamResponse(
                status=answer.status,
                reason=answer.reason,
                headers={
                    k: v for k, v in answer.headers.items() if k.lower() not in _NOT_FORWARDED
                },
            )
            # A Pod that hangs up (a watch it ends, a Pod deleted) ends it here; the upstream
            # leg closes with it.
            with contextlib.suppress(ConnectionError):
                await response.prepare(request)
                async for chunk in answer.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            return response

    def _record(self, request: web.Request, status: int) -> None:
        entry = Request(
            client=request.remote or "",
            method=request.method,
            path=request.raw_path,
            user_agent=request.headers.get("User-Agent", ""),
            status=status,
        )
        with self._lock:
            self._requests.append(entry)
