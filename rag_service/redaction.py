"""What may be shown of a secret: embedshift's one redaction rule. Pure.

The rule: a message derived from a connection string, a URL, a token or any Secret's value
(status, Events, logs, termination messages, exceptions, ``--help``, reprs, metric labels)
passes :func:`redact` with the secret values it may carry, and a library's own text about a
value it could not parse is never shown. :func:`database_url_problem` and
:func:`header_value_problem` say, in words of their own, what is wrong with such a value,
without quoting it; :func:`describe_database_url` shows only the parts of a connection string
that locate the database (host, port, database name), and only when each looks like what it is.

Secrets are matched in pieces as well as whole: a library that splits a malformed value (a
password with an unescaped ``@`` becomes part of the host) quotes pieces of it, so each piece
of four characters or more, cut at the characters URLs and headers are cut at, is removed too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "MAX_DETAIL",
    "REDACTED",
    "database_url_problem",
    "describe_database_url",
    "display_url",
    "header_value_problem",
    "redact",
    "secret_pieces",
    "url_secrets",
]

REDACTED = "[redacted]"
MAX_DETAIL = 300  # characters of one redacted line
_MIN_PIECE = 4  # shorter pieces ("5432", "tcp") would cut ordinary words; the whole still goes
_CUTS = re.compile(r"[\s:/@?&=#%;,'\"\\]+")
# APIs echo masked keys back ("sk-abc***xyz"): anything shaped like an OpenAI or Google key.
_KEY_SHAPES = re.compile(r"sk-[A-Za-z0-9_\-*]{3,}|AIza[0-9A-Za-z_\-]{10,}")
_URL_SCHEMES = ("postgresql://", "postgres://")
# Connection parameters whose values are not secret, and locate the database (libpq's names).
_LOCATING = frozenset({"host", "hostaddr", "port", "dbname"})
_PASSWORDS = frozenset({"password", "sslpassword"})
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+|\[?[0-9A-Fa-f:.]+\]?")
_SOCKET_DIR = re.compile(r"/[A-Za-z0-9._/-]{0,200}")
_DBNAME = re.compile(r"[A-Za-z0-9_.-]{1,63}")
_PORT = re.compile(r"[0-9]{1,5}")
_MAX_HEADER = 8192


def secret_pieces(secret: str) -> list[str]:
    """``secret`` and its pieces of 4 characters or more, longest first (so a piece inside a
    longer one is removed after it)."""
    pieces = {secret, *(p for p in _CUTS.split(secret) if len(p) >= _MIN_PIECE)}
    return sorted((p for p in pieces if len(p) >= _MIN_PIECE), key=len, reverse=True)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """One line of ``text`` that is safe to show: every secret (whole and in pieces) and
    anything shaped like an API key removed, whitespace folded, the length bounded."""
    for secret in secrets:
        if secret:
            for piece in secret_pieces(secret):
                text = text.replace(piece, REDACTED)
    text = _KEY_SHAPES.sub(REDACTED, text)
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1] + "…"


def header_value_problem(value: str) -> str | None:
    """What makes ``value`` unusable as an HTTP header value (a token, an API key), in words
    that do not quote it; None when it can be sent."""
    if not value.strip():
        return "it is empty"
    if any(c in value for c in "\r\n"):
        return "it contains a line break (a trailing newline from `echo` into the Secret?)"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "it contains a control character"
    if not value.isascii():
        return "it contains characters outside ASCII"
    if value != value.strip():
        return "it starts or ends with a space"
    if len(value) > _MAX_HEADER:
        return f"it is longer than {_MAX_HEADER} characters ({len(value)})"
    return None


def database_url_problem(url: str, parsed: Mapping[str, str] | None) -> str | None:
    """What is wrong with ``url`` as a PostgreSQL connection string, in words that do not quote
    it; None when it is usable. ``parsed`` is libpq's reading of it (None: libpq refused it)."""
    if not url.strip():
        return "it is empty"
    if any(c in url for c in "\r\n"):
        return "it contains a line break (a trailing newline from `echo` into the Secret?)"
    if parsed is None:
        if url.lstrip().startswith(_URL_SCHEMES) or "=" in url:
            return (
                "libpq cannot parse it: percent-encode the special characters of the user and "
                "password (@ as %40, / as %2F, % as %25, : as %3A)"
            )
        return "it does not start with postgresql:// (nor is it key=value pairs)"
    host = parsed.get("host") or ""
    if "@" in host:
        return "its host contains @: percent-encode an @ in the user or password as %40"
    if host and not all(_valid_host(h) for h in host.split(",")):
        return "its host is not a host name, an IP address or a socket directory"
    if any(c in (parsed.get("dbname") or "") for c in "@/"):
        return "its database name contains @ or /: percent-encode / in the password as %2F"
    port = parsed.get("port") or ""
    if port and not all(p.isdigit() for p in port.split(",")):
        return "its port is not a number: percent-encode a : or / in the password (%3A, %2F)"
    return None


def _valid_host(host: str) -> bool:
    pattern = _SOCKET_DIR if host.startswith("/") else _HOST
    return len(host) <= 253 and pattern.fullmatch(host) is not None


def url_secrets(url: str, parsed: Mapping[str, str] | None) -> list[str]:
    """The values of ``url`` a message must not carry: every parameter but those that locate
    the database (libpq's parse), or all of it when libpq could not parse it."""
    if parsed is None:
        return [url]
    return [v for k, v in parsed.items() if k not in _LOCATING and v]


def describe_database_url(parsed: Mapping[str, str] | None) -> str:
    """Host, port and database name, each only when it looks like one and carries no piece of
    a password (split by a stray character); never the password."""
    if parsed is None:
        return "an unparseable connection string"
    hidden = [v for k, v in parsed.items() if k in _PASSWORDS and v]
    pieces = [p for s in hidden for p in secret_pieces(s)]

    def shown(value: str, pattern: re.Pattern[str], *, default: str) -> str:
        if not value:
            return default
        if len(value) > 253 or not pattern.fullmatch(value):
            return "(unusual)"
        return REDACTED if any(p in value for p in pieces) else value

    host = parsed.get("host") or ""
    return (
        f"host={shown(host, _SOCKET_DIR if host.startswith('/') else _HOST, default='localhost')} "
        f"port={shown(parsed.get('port') or '', _PORT, default='5432')} "
        f"dbname={shown(parsed.get('dbname') or '', _DBNAME, default='?')}"
    )


def display_url(url: str) -> str:
    """``url`` as messages show it: without user and password (an HTTP client turns them into
    basic auth) and without a trailing slash."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host)).rstrip("/")
