"""The one redaction rule (:mod:`rag_service.redaction`): a Secret's value, however malformed,
never appears in what embedshift says about it. Libpq itself parses each connection string, as
it will when embedshift connects; a random sentinel is the secret in every shape."""

from __future__ import annotations

import psycopg
import pytest

from rag_service.redaction import (
    database_url_problem,
    describe_database_url,
    header_value_problem,
    redact,
    url_secrets,
)
from tests.secret_shapes import database_urls, header_values, sentinel

SENTINEL = sentinel()


def _parsed(url: str) -> dict[str, str] | None:
    try:
        parsed = psycopg.conninfo.conninfo_to_dict(url).items()
        return {k: str(v) for k, v in parsed if v is not None}
    except psycopg.ProgrammingError:
        return None


# What each shape of tests.secret_shapes is told (None: usable, it fails only at connect).
PROBLEMS = {
    "not-a-url": "does not start with postgresql://",
    "bad-percent-encoding": "percent-encode",
    "unescaped-at": "host contains @",
    "unescaped-slash": "database name contains",
    "unescaped-colon": "port is not a number",
    "password-in-query": None,
    "newline": "line break",
    "64kib-password": None,
    "64kib-host": "not a host name",
    "stray-word": "percent-encode",
    "as-user": None,
    "well-formed": None,
}
URLS = [(shape, url, PROBLEMS[shape]) for shape, url in database_urls(SENTINEL).items()]
URLS += [
    ("a space in the host", f"postgresql://app@db {SENTINEL}/rag", "cannot parse"),
    ("empty", "", "empty"),
]


@pytest.mark.parametrize(("shape", "url", "problem"), URLS, ids=[u[0] for u in URLS])
def test_a_database_url_is_described_without_its_secret(
    shape: str, url: str, problem: str | None
) -> None:
    parsed = _parsed(url)
    said = database_url_problem(url, parsed)
    if problem is None:
        assert said is None, said
    else:
        assert said is not None and problem in said, said
    hidden = url_secrets(url, parsed)
    described = describe_database_url(parsed)
    for text in (said or "", described):
        assert SENTINEL not in text and SENTINEL[:6] not in text, text
    # Whatever libpq or a server says about it, redacted with those secrets, loses them too.
    if said is not None:  # refused before libpq connects: nothing of libpq's is shown
        return
    password = (parsed or {}).get("password", "")
    for message in (f'password {password!r} refused for "{(parsed or {}).get("user")}"',):
        shown = redact(message, hidden)
        assert SENTINEL not in shown, shown
        assert len(shown) <= 300


def test_a_usable_url_shows_where_the_database_is() -> None:
    url = f"postgresql://app:{SENTINEL}@db.internal:5433/rag"
    parsed = _parsed(url)
    assert describe_database_url(parsed) == ("host=db.internal port=5433 dbname=rag")
    assert describe_database_url(_parsed("postgresql:///rag?host=/run/pg")) == (
        "host=/run/pg port=5432 dbname=rag"
    )


HEADER_PROBLEMS = {
    "inner-newline": "line break",
    "carriage-return": "line break",
    "control-character": "control character",
    "non-ascii": "outside ASCII",
    "64kib": "longer than",
}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        *((value, HEADER_PROBLEMS[shape]) for shape, value in header_values(SENTINEL).items()),
        (f" {SENTINEL}", "starts or ends with a space"),
        ("", "empty"),
        (f"sk-{SENTINEL}", None),
    ],
)
def test_a_header_value_is_refused_without_quoting_it(value: str, problem: str | None) -> None:
    said = header_value_problem(value)
    if problem is None:
        assert said is None
    else:
        assert said is not None and problem in said and SENTINEL not in said


def test_redact_removes_pieces_and_key_shapes() -> None:
    secret = f"{SENTINEL}@{SENTINEL[::-1]}"
    text = f"host {SENTINEL[::-1]} unknown; key sk-proj-abc123 refused; user {SENTINEL}"
    shown = redact(text, [secret])
    assert SENTINEL not in shown and SENTINEL[::-1] not in shown and "sk-proj" not in shown
    assert shown.startswith("host [redacted] unknown")


def test_the_service_settings_repr_holds_no_secret() -> None:
    from rag_service.service import ServiceSettings
    from tests.helpers import spec_for

    settings = ServiceSettings(
        database_url=f"postgresql://app:{SENTINEL}@db/rag",
        spec=spec_for("docs"),
        migration="rag/docs",
        webhook_secret=f"w{SENTINEL}",
        source_api_key=f"sk-{SENTINEL}",
        target_api_key=f"AIza{SENTINEL}",
    )
    assert SENTINEL not in repr(settings) and "rag/docs" in repr(settings)
