"""What the operator may use on a migration's behalf: the images its Jobs run, the hosts its URLs
name. Pure: the one place that decides; the handlers, the Jobs runner and the Prometheus source
all ask it.

Whoever may create an ``EmbeddingMigration`` names the image its Jobs run (``spec.migration.image``)
and the hosts that receive its Secrets (the Prometheus bearer token goes to
``spec.analysis.prometheus.url``, the API keys to the providers' ``baseURL``). The operator's admin
narrows both with ``operator run --allowed-image`` / ``--allowed-endpoint`` (the chart's
``operator.allowedImages`` / ``operator.allowedEndpoints``); a spec outside them is refused
before anything runs (:func:`refusals`), and a token is attached only for an allowed host
(:meth:`Allowlist.url_allowed`).

**Image patterns** (``--allowed-image``), matched against the image reference as a container
runtime reads it (``nginx`` is ``docker.io/library/nginx``, ``index.docker.io`` is ``docker.io``,
the registry host in any case):

- ``*``: any image;
- a repository, ``ghcr.io/embedshift/embedshift``: that repository, any tag or digest (not
  ``ghcr.io/embedshift/embedshift-evil``, not ``ghcr.io/embedshift/embedshift/sub``);
- a prefix ending in ``/``, ``ghcr.io/embedshift/`` or ``registry.example.com/``: every
  repository under it (not ``ghcr.io/embedshift-evil/x``);
- a reference with a tag or digest, ``ghcr.io/embedshift/embedshift:0.1.0`` or ``…@sha256:…``:
  exactly that image (an image with a digest matches only a pattern with the same digest).

No other wildcards. The operator's own image (``--operator-image``, which a migration without
``spec.migration.image`` runs) is always allowed; no pattern at all allows only that one.

**Endpoint patterns** (``--allowed-endpoint``), matched against the host (and port) of a URL:

- ``*``: any host;
- a host, ``prometheus.monitoring.svc``, ``10.0.0.5``, ``[fd00::1]``: that host, any port;
- ``host:port``, ``prometheus.monitoring.svc:9090``: that host on that port only (a URL without
  a port has its scheme's, 80 or 443);
- ``*.openai.azure.com``: any name under ``openai.azure.com`` (not ``openai.azure.com`` itself,
  never an IP address), optionally ``:port``.

Hosts compare case-insensitively and without a trailing dot; IP addresses by value. No pattern
at all: no restriction. A URL's user and password are never part of its host
(``http://prometheus.monitoring.svc@evil.example/`` goes to ``evil.example``), and no message
here ever quotes a URL: only its host.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from embedshift_operator.resource import EmbeddingMigrationSpec

__all__ = [
    "ANY",
    "ENDPOINT_NOT_ALLOWED",
    "IMAGE_NOT_ALLOWED",
    "PROMETHEUS_URL",
    "REFUSAL_REASONS",
    "Allowlist",
    "Endpoint",
    "ImageReference",
    "Refusal",
    "analysis_refusals",
    "endpoint_pattern_problem",
    "image_pattern_problem",
    "job_refusals",
    "parse_endpoint",
    "parse_image",
    "refusals",
    "url_refusal",
]

ANY = "*"
IMAGE_NOT_ALLOWED = "ImageNotAllowed"
ENDPOINT_NOT_ALLOWED = "EndpointNotAllowed"
REFUSAL_REASONS = (IMAGE_NOT_ALLOWED, ENDPOINT_NOT_ALLOWED)
PROMETHEUS_URL = "spec.analysis.prometheus.url"
IMAGE_FIELD = "spec.migration.image"

_DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# The image reference grammar of github.com/distribution/reference.
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# What RFC 3986 lets an authority hold: a backslash, a space or a non-ASCII character is refused
# rather than guessed at (clients disagree on what host `http://a\@b/` names).
_AUTHORITY = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@%\[\]]+")
_NUMERIC = re.compile(r"[0-9a-fx.]+")
_SHOWN = 200  # characters of a refused image a message quotes


# ---- images -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageReference:
    """An image reference as a runtime reads it: ``repository`` normalised (registry host
    lower-cased, Docker Hub's implicit ``docker.io/library/``), ``tag`` and ``digest`` as given."""

    repository: str
    tag: str | None = None
    digest: str | None = None


def _is_domain(component: str) -> bool:
    """Whether the first component of a name is a registry host (the runtime's rule)."""
    return (
        "." in component
        or ":" in component
        or component == "localhost"
        or component != component.lower()
    )


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if slash and _is_domain(first):
        domain = first.lower()
        return (_DOCKER_HUB if domain in _DOCKER_HUB_ALIASES else domain), rest
    return _DOCKER_HUB, name


def _path_problem(path: str) -> str | None:
    if not path:
        return "it names no repository"
    for component in path.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            return (
                f"{component!r} is not a repository path component (lower-case letters, digits "
                "and single separators . _ __ -)"
            )
    return None


def parse_image(reference: str) -> ImageReference:
    """``reference`` as a runtime reads it; ValueError saying what is wrong with it."""
    if not reference or reference != reference.strip() or any(c.isspace() for c in reference):
        raise ValueError("an image reference is one word without spaces")
    name, at, digest = reference.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise ValueError(f"{digest!r} is not a digest (algorithm:hex, e.g. sha256:…)")
    tag = None
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise ValueError(f"{tag!r} is not a tag")
    domain, path = _split_domain(name)
    if domain != _DOCKER_HUB and not _DOMAIN.fullmatch(domain):
        raise ValueError(f"{domain!r} is not a registry host")
    problem = _path_problem(path)
    if problem:
        raise ValueError(problem)
    if domain == _DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return ImageReference(f"{domain}/{path}", tag, digest if at else None)


@dataclass(frozen=True)
class _ImagePattern:
    text: str
    prefix: str | None = None  # "ghcr.io/embedshift/": repositories under it
    exact: ImageReference | None = None  # a repository (any tag) or a reference (tag/digest)

    def matches(self, image: ImageReference) -> bool:
        if self.text == ANY:
            return True
        if self.prefix is not None:
            return image.repository.startswith(self.prefix)
        wanted = self.exact
        assert wanted is not None
        if image.repository != wanted.repository:
            return False
        if wanted.digest is not None:
            return image.digest == wanted.digest
        if wanted.tag is not None:  # the runtime pulls an image's digest, whatever its tag says
            return image.digest is None and (image.tag or "latest") == wanted.tag
        return True


def _image_pattern(text: str) -> _ImagePattern:
    """ValueError saying what is wrong with the pattern."""
    if text == ANY:
        return _ImagePattern(text)
    if any(c in text for c in "*?[]"):
        raise ValueError(
            "the only wildcard is a lone *; use a repository, a prefix ending in /, or an "
            "image with a tag or digest"
        )
    if text.endswith("/"):
        body = text[:-1]
        if "/" not in body and _is_domain(body):  # a whole registry
            domain = body.lower()
            if not _DOMAIN.fullmatch(domain):
                raise ValueError(f"{body!r} is not a registry host")
            domain = _DOCKER_HUB if domain in _DOCKER_HUB_ALIASES else domain
            return _ImagePattern(text, prefix=f"{domain}/")
        if "@" in body or ":" in body.rpartition("/")[2]:
            raise ValueError("a prefix ending in / names no tag or digest")
        domain, path = _split_domain(body)
        if domain != _DOCKER_HUB and not _DOMAIN.fullmatch(domain):
            raise ValueError(f"{domain!r} is not a registry host")
        problem = _path_problem(path)
        if problem:
            raise ValueError(problem)
        return _ImagePattern(text, prefix=f"{domain}/{path}/")
    return _ImagePattern(text, exact=parse_image(text))


def image_pattern_problem(pattern: str) -> str | None:
    """What is wrong with an ``--allowed-image`` pattern (None: nothing)."""
    return _problem(_image_pattern, pattern)


def _problem(parse: Callable[[str], object], pattern: str) -> str | None:
    """``parse``'s ValueError for ``pattern`` as a message; None when it parses. Pure."""
    try:
        parse(pattern)
    except ValueError as exc:
        return str(exc)
    return None


# ---- endpoints ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where a URL connects: its host (lower-case, no trailing dot; an IP address in its
    canonical form, IPv6 without brackets) and port (the scheme's when the URL names none)."""

    host: str
    port: int

    @property
    def shown(self) -> str:
        """``host:port`` as a message names it (IPv6 in brackets)."""
        return f"{_bracketed(self.host)}:{self.port}"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _ip(host: str) -> str | None:
    """The canonical form of an IP address, None for a name."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _host(host: str) -> str:
    """A host as compared: lower-case, no trailing dot, an IP in canonical form. ValueError."""
    host = host.lower()
    ip = _ip(host)
    if ip is not None:
        return ip
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253 or not all(_HOST_LABEL.fullmatch(p) for p in name.split(".")):
        raise ValueError("not a host name (ASCII letters, digits, - and . only)")
    if _NUMERIC.fullmatch(name):
        # 2130706433, 0x7f.1, 127.1: what a resolver (inet_aton) reads as 127.0.0.1.
        with contextlib.suppress(OSError):
            return socket.inet_ntoa(socket.inet_aton(name))
    return name


def parse_endpoint(url: str) -> Endpoint:
    """The host and port ``url`` connects to; ValueError saying what is wrong, never quoting
    the URL (it may hold a password)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("not a URL") from None
    if parts.scheme.lower() not in _DEFAULT_PORTS:
        raise ValueError("not an http:// or https:// URL")
    if not parts.netloc or not _AUTHORITY.fullmatch(parts.netloc):
        raise ValueError("its host part holds characters a URL's authority cannot")
    hostinfo = parts.netloc.rpartition("@")[2]
    if not hostinfo or "%" in hostinfo:
        raise ValueError("its host is missing or percent-encoded")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("its port is not a number from 0 to 65535") from None
    if hostinfo.startswith("[") and _ip(hostinfo[1:].partition("]")[0]) is None:
        raise ValueError("its host is not an IPv6 address in brackets")
    host = _host(parts.hostname or "")
    return Endpoint(host, port if port is not None else _DEFAULT_PORTS[parts.scheme.lower()])


@dataclass(frozen=True)
class _EndpointPattern:
    text: str
    host: str = ""  # "" for *
    wildcard: bool = False  # *.host: names under it
    port: int | None = None

    def matches(self, endpoint: Endpoint) -> bool:
        if self.text == ANY:
            return True
        if self.port is not None and endpoint.port != self.port:
            return False
        if self.wildcard:
            return _ip(endpoint.host) is None and endpoint.host.endswith(f".{self.host}")
        return endpoint.host == self.host


def _endpoint_pattern(text: str) -> _EndpointPattern:
    """ValueError saying what is wrong with the pattern."""
    if text == ANY:
        return _EndpointPattern(text)
    if "/" in text or "@" in text:
        raise ValueError("a host pattern names a host (and port), not a URL")
    brackets = "an IPv6 address is written in brackets, e.g. [fd00::1] or [fd00::1]:9090"
    if text.startswith("["):
        inner, bracket, rest = text[1:].partition("]")
        ip = _ip(inner) if ":" in inner else None
        if not bracket or ip is None or (rest and not rest.startswith(":")):
            raise ValueError(brackets)
        return _EndpointPattern(text, host=ip, port=_port(rest[1:]) if rest else None)
    if text.count(":") > 1:
        raise ValueError(brackets)
    body, colon, digits = text.partition(":")
    wildcard = body.startswith("*.")
    if wildcard:
        body = body[2:]
    if "*" in body:
        raise ValueError("the only wildcards are a lone * and a leading *.")
    host = _host(body)
    if wildcard and _ip(host) is not None:
        raise ValueError("*. names DNS names under a domain, not IP addresses")
    return _EndpointPattern(
        text, host=host, wildcard=wildcard, port=_port(digits) if colon else None
    )


def _port(digits: str) -> int:
    if not digits.isdigit() or not 0 < int(digits) < 65536:
        raise ValueError("a port is a number from 1 to 65535")
    return int(digits)


def endpoint_pattern_problem(pattern: str) -> str | None:
    """What is wrong with an ``--allowed-endpoint`` pattern (None: nothing)."""
    return _problem(_endpoint_pattern, pattern)


# ---- the operator's allowlists ------------------------------------------------------------------


@dataclass(frozen=True)
class Allowlist:
    """The operator's ``--allowed-image`` and ``--allowed-endpoint`` patterns.

    ``images`` empty: only the operator's own image; ``("*",)``: any. ``endpoints`` empty: any
    host. A bad pattern raises ValueError naming it.
    """

    images: tuple[str, ...]
    endpoints: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for kind, patterns, parse in (
            ("image", self.images, _image_pattern),
            ("endpoint", self.endpoints, _endpoint_pattern),
        ):
            for pattern in patterns:
                try:
                    parse(pattern)
                except ValueError as exc:
                    raise ValueError(f"allowed {kind} {pattern!r}: {exc}") from None

    @classmethod
    def unrestricted(cls) -> Allowlist:
        """Any image, any host (what a library caller gets unless it says otherwise)."""
        return cls(images=(ANY,))

    def image_allowed(self, image: str, *, operator_image: str | None) -> bool:
        """Whether a Job may run ``image`` (the operator's own always may)."""
        if image == operator_image or ANY in self.images:
            return True
        try:
            reference = parse_image(image)
        except ValueError:
            return False
        if operator_image and _same_image(reference, operator_image):
            return True
        return any(_image_pattern(p).matches(reference) for p in self.images)

    def endpoint_allowed(self, endpoint: Endpoint) -> bool:
        return not self.endpoints or any(
            _endpoint_pattern(p).matches(endpoint) for p in self.endpoints
        )

    def url_allowed(self, url: str) -> bool:
        """Whether ``url``'s host may be contacted (and sent a token): any URL when no endpoint
        pattern is set; else only a URL whose host and port a pattern matches."""
        if not self.endpoints:
            return True
        try:
            return self.endpoint_allowed(parse_endpoint(url))
        except ValueError:
            return False


def _same_image(reference: ImageReference, other: str) -> bool:
    try:
        return parse_image(other) == reference
    except ValueError:
        return False


@dataclass(frozen=True)
class Refusal:
    """A part of the spec this operator may not use: the condition's reason and its message."""

    reason: str  # ImageNotAllowed | EndpointNotAllowed
    field: str  # spec.migration.image, spec.target.baseURL…
    message: str


def _listed(patterns: tuple[str, ...], own: str | None = None) -> str:
    shown = [*patterns, *([f"{own} (the operator's own)"] if own else [])]
    return ", ".join(shown) if shown else "none"


def job_refusals(
    spec: EmbeddingMigrationSpec, allowlist: Allowlist, *, operator_image: str | None
) -> tuple[Refusal, ...]:
    """What the Jobs would use and may not: their image, the providers' ``baseURL`` (where the
    Jobs send the API keys). Empty: the Jobs may run. Pure."""
    found: list[Refusal] = []
    image = spec.migration.image
    if image and not allowlist.image_allowed(image, operator_image=operator_image):
        try:
            parse_image(image)
            why = "is not an image this operator may run"
        except ValueError as exc:
            why = f"is not an image reference this operator can check ({exc})"
        shown = image if len(image) <= _SHOWN else f"{image[:_SHOWN]}…"
        found.append(
            Refusal(
                IMAGE_NOT_ALLOWED,
                IMAGE_FIELD,
                f"{IMAGE_FIELD}: {shown!r} {why} (allowed: "
                f"{_listed(allowlist.images, operator_image)}); nothing was run. Use an allowed "
                "image, or leave the field out for the operator's own, or ask the operator's "
                "admin to add it to operator.allowedImages (--allowed-image)",
            )
        )
    for role in ("source", "target"):
        model = getattr(spec, role)
        if model is not None and model.base_url is not None:
            refusal = url_refusal(f"spec.{role}.baseURL", model.base_url, allowlist)
            if refusal is not None:
                found.append(refusal)
    return tuple(found)


def analysis_refusals(spec: EmbeddingMigrationSpec, allowlist: Allowlist) -> tuple[Refusal, ...]:
    """Prometheus' URL, when the operator may not contact it (nor send it the token). Pure."""
    prometheus = spec.analysis.prometheus
    if prometheus is None:
        return ()
    refusal = url_refusal(PROMETHEUS_URL, prometheus.url, allowlist)
    return () if refusal is None else (refusal,)


def refusals(
    spec: EmbeddingMigrationSpec, allowlist: Allowlist, *, operator_image: str | None
) -> tuple[Refusal, ...]:
    """Everything in ``spec`` this operator may not use, image first. Pure."""
    return job_refusals(spec, allowlist, operator_image=operator_image) + analysis_refusals(
        spec, allowlist
    )


def url_refusal(field: str, url: str, allowlist: Allowlist) -> Refusal | None:
    """None when ``url`` may be used; else why not, naming its host, never the URL."""
    if allowlist.url_allowed(url):
        return None
    allowed = _listed(allowlist.endpoints)
    try:
        endpoint = parse_endpoint(url)
    except ValueError as exc:
        message = (
            f"{field}: its host cannot be checked against operator.allowedEndpoints ({allowed}): "
            f"{exc}; nothing was sent to it. Write it as http(s)://HOST[:PORT]/…"
        )
    else:
        message = (
            f"{field}: host {endpoint.shown} is not in operator.allowedEndpoints ({allowed}); "
            "nothing was sent to it. Point it at an allowed host, or ask the operator's admin "
            "to add the host to operator.allowedEndpoints (--allowed-endpoint)"
        )
    return Refusal(ENDPOINT_NOT_ALLOWED, field, message)
