"""Errors a user can cause or fix. Each carries one line that names the problem and the fix.

The CLI prints ``embedshift: error: <message>`` and exits non-zero for these; anything else is a
bug and keeps its traceback. Messages never contain secrets (API keys, database passwords).

The exit code tells a retry that can mend the failure from one that cannot: a Kubernetes Job
retries the first kind (``backoffLimit``) and fails at once on the second (its
``podFailurePolicy`` lists :data:`PERMANENT_EXIT_CODES`), so a refused spec is not run three
times. Only failures that no rerun can mend without a person's change get a permanent code; a
failure that may be either (a lock timeout, a dropped connection, a provider's 5xx) keeps 1,
because failing a transient failure at once loses more than retrying a permanent one twice.
"""

from __future__ import annotations

from typing import Final

EXIT_RETRYABLE: Final = 1
"""Transient, or not known to be permanent: the database or the API unreachable, retries ran
out, another worker holds the lock (and Python's own code for an unexpected exception)."""
EXIT_CONFIG: Final = 2
"""The spec, flags or environment are refused (argparse's usage errors exit 2 too)."""
EXIT_VERIFICATION: Final = 3
"""``migrate verify`` ran and a check failed (recall, counts, norms, staleness...)."""
EXIT_SCHEMA_REFUSED: Final = 4
"""``setup`` refuses to change the database as it is: a partitioned source table, an id column
that is not unique, a side table of another vector type, a routing row that routes traffic."""
EXIT_PROVIDER_REFUSED: Final = 5
"""The embedding API refuses the work for good (key, quota, dimensions) or the budget is spent."""

PERMANENT_EXIT_CODES: Final = {
    EXIT_CONFIG: "the spec was refused",
    EXIT_VERIFICATION: "verification failed",
    EXIT_SCHEMA_REFUSED: "setup refused the database as it is",
    EXIT_PROVIDER_REFUSED: "the embedding API or the budget refused the work",
}
"""The exit codes a rerun cannot mend, with what each means to the person who reads a status."""


class EmbedshiftError(Exception):
    """A problem the user can fix; ``str(error)`` is the one line to show them."""

    exit_code: int = EXIT_RETRYABLE


class ConfigError(EmbedshiftError):
    """Bad flags, environment or spec: a field is missing, malformed or contradictory."""

    exit_code = EXIT_CONFIG


class VerificationFailed(EmbedshiftError):
    """``migrate verify`` found the target incomplete, stale or badly indexed."""

    exit_code = EXIT_VERIFICATION


class DatabaseError(EmbedshiftError):
    """The database is unreachable, or the schema is not what the spec says."""


class DatabaseUnavailable(DatabaseError):
    """The server cannot be reached or dropped the session (psycopg's OperationalError class).

    Separate from DatabaseError so a long-running process (``migrate follow``) can reconnect and
    retry this one, while a missing table or a refused schema still stops it.
    """


class SchemaRefused(DatabaseError):
    """``setup`` will not change a schema it cannot handle safely (nothing was changed)."""

    exit_code = EXIT_SCHEMA_REFUSED


class ProviderError(EmbedshiftError):
    """An embedding API failed in a way retrying will not fix (or retries ran out).

    ``spent_tokens``/``spent_usd``: what the call's requests that did succeed were billed
    before the failure, so budgets count money already spent.
    """

    spent_tokens: int = 0
    spent_usd: float = 0.0


class QuotaExceeded(ProviderError):
    """The API account is out of quota (OpenAI ``insufficient_quota``): never retried."""

    exit_code = EXIT_PROVIDER_REFUSED


class AuthenticationFailed(ProviderError):
    """The API key is missing or refused."""

    exit_code = EXIT_PROVIDER_REFUSED


class DimensionMismatch(ProviderError):
    """The API returned vectors of another dimension than the spec asks for."""

    exit_code = EXIT_PROVIDER_REFUSED


class BudgetExceeded(EmbedshiftError):
    """The next batch would take the spend above ``--budget-usd``."""

    exit_code = EXIT_PROVIDER_REFUSED


class WorkerBusy(EmbedshiftError):
    """Another worker holds this shard's advisory lock."""
