"""A loopback HTTP server on the test's event loop that stands in for Prometheus's API.

It records every request (path and headers) and answers as the test says: a fixed status and
body, or never (to test timeouts). For what a real Prometheus cannot show: which headers a
client sent, a 5xx from a proxy in front of it, a server that accepts and then hangs.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

__all__ = ["RecordedRequest", "StubPrometheus", "vector"]

_REASONS = {200: "OK", 400: "Bad Request", 500: "Internal Server Error", 502: "Bad Gateway"}


def vector(value: str, timestamp: float = 1_700_000_000.0) -> dict[str, Any]:
    """Prometheus's answer to an instant query with one unlabelled sample."""
    return {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [timestamp, value]}]},
    }


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    target: str  # path and query string
    headers: dict[str, str]  # names lowercased


@dataclass
class StubPrometheus:
    """``async with StubPrometheus() as stub``: serving at ``stub.url`` until the block ends.

    Set ``status``/``body``/``content_type`` for the answer, or ``hang = True`` to accept each
    request and never answer.
    """

    status: int = 200
    body: bytes = field(default_factory=lambda: json.dumps(vector("1")).encode())
    content_type: str = "application/json"
    hang: bool = False
    requests: list[RecordedRequest] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _url: str = ""
    _connections: dict[asyncio.Task[None], asyncio.StreamWriter] = field(default_factory=dict)

    @property
    def url(self) -> str:
        assert self._url, "use `async with StubPrometheus()`"
        return self._url

    def answer(self, status: int, body: bytes | dict[str, Any], content_type: str = "") -> None:
        self.status = status
        if isinstance(body, dict):
            self.body, self.content_type = json.dumps(body).encode(), "application/json"
        else:
            self.body, self.content_type = body, content_type or "text/plain"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        self._url = f"http://{host}:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        # Connections a client keeps alive (or a hanging answer) would otherwise outlive the
        # test's event loop. Closing them ends their handlers at EOF; cancelling a handler
        # would make Python 3.11's asyncio log it as an unhandled exception.
        handlers = list(self._connections)
        for writer in self._connections.values():
            writer.close()
        await asyncio.gather(*handlers)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._connections[handler] = writer
        try:
            while request := await _read_request(reader):
                self.requests.append(request)
                if self.hang:
                    await reader.read()  # until the client gives up and closes
                    return
                reason = _REASONS.get(self.status, "Status")
                head = (
                    f"HTTP/1.1 {self.status} {reason}\r\n"
                    f"Content-Type: {self.content_type}\r\n"
                    f"Content-Length: {len(self.body)}\r\n\r\n"
                )
                writer.write(head.encode() + self.body)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            del self._connections[handler]
            writer.close()


async def _read_request(reader: asyncio.StreamReader) -> RecordedRequest | None:
    """One GET request's head (the clients under test send no bodies); None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return RecordedRequest(method, target, headers)
