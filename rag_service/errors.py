"""Errors a user can cause or fix. Each carries one line that names the problem and the fix.

The CLI prints ``embedshift: error: <message>`` and exits non-zero for these; anything else is a
bug and keeps its traceback. Messages never contain secrets (API keys, database passwords).
"""

from __future__ import annotations


class EmbedshiftError(Exception):
    """A problem the user can fix; ``str(error)`` is the one line to show them."""

    exit_code: int = 1


class ConfigError(EmbedshiftError):
    """Bad flags, environment or spec: a field is missing, malformed or contradictory."""

    exit_code = 2


class DatabaseError(EmbedshiftError):
    """The database is unreachable, or the schema is not what the spec says."""


class DatabaseUnavailable(DatabaseError):
    """The server cannot be reached or dropped the session (psycopg's OperationalError class).

    Separate from DatabaseError so a long-running process (``migrate follow``) can reconnect and
    retry this one, while a missing table or a refused schema still stops it.
    """


class SchemaRefused(DatabaseError):
    """``setup`` will not change a schema it cannot handle safely (nothing was changed)."""


class ProviderError(EmbedshiftError):
    """An embedding API failed in a way retrying will not fix (or retries ran out).

    ``spent_tokens``/``spent_usd``: what the call's requests that did succeed were billed
    before the failure, so budgets count money already spent.
    """

    spent_tokens: int = 0
    spent_usd: float = 0.0


class QuotaExceeded(ProviderError):
    """The API account is out of quota (OpenAI ``insufficient_quota``): never retried."""


class AuthenticationFailed(ProviderError):
    """The API key is missing or refused."""


class DimensionMismatch(ProviderError):
    """The API returned vectors of another dimension than the spec asks for."""


class BudgetExceeded(EmbedshiftError):
    """The next batch would take the spend above ``--budget-usd``."""


class WorkerBusy(EmbedshiftError):
    """Another worker holds this shard's advisory lock."""
