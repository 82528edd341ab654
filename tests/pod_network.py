"""Each Pod of the test Pod runner gets a network of its own, as a kubelet's CNI gives it.

A Linux network namespace per Pod with a veth pair to the host: the Pod has its own IP
(``10.203.R.N``; R is random per runner, so two runners on one machine do not meet) and its own
ports, so two Pods may listen on one port (a rolling update's surge, a standby operator).
Towards the cluster, every Pod sees ``10.0.0.1``: the ``kubernetes`` Service's address in the
control plane's service range (the API server's certificate names it), held by the host's
loopback link. A host service bound to 127.0.0.1 (the API server) is exposed there by
:class:`Forwarder` (``10.0.0.1:PORT`` → ``127.0.0.1:PORT``), as a Service would be; one the test
starts itself may simply listen on ``10.0.0.1`` (the story's Prometheus does). A database
reached through a Unix socket needs nothing: the file system is shared.

Needs root and iproute2 (``ip netns``), as a kubelet does; :func:`check` says what is missing.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field

SERVICE_IP = "10.0.0.1"  # the control plane's `kubernetes` Service (--service-cluster-ip-range)


class NetworkUnavailable(Exception):
    """This machine cannot give Pods networks of their own (not root, or no iproute2)."""


def check() -> None:
    if os.geteuid() != 0:
        raise NetworkUnavailable("the Pod runner gives each Pod a network namespace: run as root")
    for tool in ("ip", "mount"):
        if shutil.which(tool) is None:
            raise NetworkUnavailable(f"the Pod runner needs `{tool}` (Debian: iproute2, mount)")


def _ip(*args: str, namespace: str | None = None, ok_if: str = "") -> None:
    argv = ["ip", *args] if namespace is None else ["ip", "netns", "exec", namespace, "ip", *args]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0 and not (ok_if and ok_if in result.stderr):
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")


def ensure_service_address() -> None:
    """``10.0.0.1/32`` on the host's loopback link (where no packet leaves the machine; shared
    by every runner, kept afterwards). The host answers the Pods' ARP for it on their veth."""
    _ip("addr", "add", f"{SERVICE_IP}/32", "dev", "lo", ok_if="already assigned")


@dataclass
class PodNetwork:
    """One Pod's namespace, veth pair and address."""

    namespace: str
    host_link: str
    ip: str

    def create(self) -> None:
        _ip("netns", "add", self.namespace)
        _ip("link", "add", self.host_link, "type", "veth", "peer", "name", "eth0",
            "netns", self.namespace)  # fmt: skip
        _ip("link", "set", self.host_link, "up")
        _ip("route", "add", f"{self.ip}/32", "dev", self.host_link, "src", SERVICE_IP)
        for args in (
            ("addr", "add", f"{self.ip}/32", "dev", "eth0"),
            ("link", "set", "eth0", "up"),
            ("link", "set", "lo", "up"),
            ("route", "add", f"{SERVICE_IP}/32", "dev", "eth0"),
            ("route", "add", "default", "via", SERVICE_IP, "dev", "eth0"),
        ):
            _ip(*args, namespace=self.namespace)

    def delete(self) -> None:
        """The namespace goes, and its veth pair (and the host's route) with it."""
        _ip("netns", "delete", self.namespace, ok_if="No such file")

    def wrap(self, argv: list[str], binds: dict[str, str]) -> list[str]:
        """``argv`` run in this network, with ``binds`` (host dir → path) mounted in a mount
        namespace of its own (``ip netns exec`` makes one), as a kubelet mounts volumes."""
        script = "".join(
            f'mkdir -p "{target}" && mount --bind "{source}" "{target}" && '
            for source, target in binds.items()
        )
        return ["ip", "netns", "exec", self.namespace, "sh", "-c", script + 'exec "$@"', "sh",
                *argv]  # fmt: skip


@dataclass
class Addresses:
    """Hands out Pod networks from one runner's block ``10.203.R.0/24`` (then R+1, ...)."""

    block: int = field(default_factory=lambda: random.randrange(256))
    tag: str = field(default_factory=lambda: f"{random.randrange(16**4):04x}")
    next: int = 2
    lock: threading.Lock = field(default_factory=threading.Lock)

    def allocate(self) -> PodNetwork:
        with self.lock:
            n = self.next
            self.next += 1
        third, fourth = (self.block + n // 250) % 256, 2 + n % 250
        name = f"es{self.tag}p{n}"  # interface names are at most 15 characters
        return PodNetwork(namespace=name, host_link=name, ip=f"10.203.{third}.{fourth}")


class Forwarder:
    """``10.0.0.1:PORT`` → ``127.0.0.1:PORT``: a host service reachable from the Pods."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._listener = socket.create_server((SERVICE_IP, port), reuse_port=False)
        self._listener.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name=f"fwd-{port}")
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{SERVICE_IP}:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                inbound, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                outbound = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            except OSError:
                inbound.close()
                continue
            for a, b in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=2)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    for end in (source, sink):
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)
