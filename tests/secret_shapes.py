"""Secret values in every malformed shape a person can paste into a Secret, each carrying a
random sentinel: what the redaction tests (:mod:`tests.rag_service.test_redaction`, the CLI's,
the cluster's) grep for. A closed local port (1) stands for the database's host, so a value
libpq accepts fails at once, as an unreachable server does."""

from __future__ import annotations

import secrets


def sentinel() -> str:
    return f"snt{secrets.token_hex(8)}"


def database_urls(mark: str) -> dict[str, str]:
    """Shape → a database URL carrying ``mark`` (in the password, the host, or all of it)."""
    return {
        "not-a-url": mark,
        "bad-percent-encoding": f"postgresql://app:{mark}%zz@127.0.0.1:1/rag",
        "unescaped-at": f"postgresql://app:{mark[:8]}@{mark[8:]}@127.0.0.1:1/rag",
        "unescaped-slash": f"postgresql://app:pa/{mark}@127.0.0.1:1/rag",
        "unescaped-colon": f"postgresql://app:{mark}:x@127.0.0.1:1x/rag",
        "password-in-query": f"postgresql://127.0.0.1:1/rag?password={mark}",
        "newline": f"postgresql://app:{mark}\n@127.0.0.1:1/rag",
        "64kib-password": "postgresql://app:" + mark * 3000 + "@127.0.0.1:1/rag",
        "64kib-host": "postgresql://" + mark * 3000 + "/rag",
        "stray-word": f"host=127.0.0.1 port=1 password={mark} dbname",
        "as-user": f"postgresql://{mark}:pw@127.0.0.1:1/rag",
        "well-formed": f"postgresql://app:{mark}@127.0.0.1:1/rag",
    }


def header_values(mark: str) -> dict[str, str]:
    """Shape → a token or API key carrying ``mark`` that no HTTP header can carry as it is."""
    return {
        "inner-newline": f"sk-{mark}\nX-Injected: 1",
        "carriage-return": f"{mark}\rX-Injected: 1",
        "control-character": f"{mark}\x1b[2J",  # an escape sequence: no NUL, env cannot hold one
        "non-ascii": f"{mark}é",
        "64kib": mark * 3000,
    }
