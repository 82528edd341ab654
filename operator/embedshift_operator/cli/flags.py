"""The flags the commands share and their validators, each written once.

Every validator raises ``argparse.ArgumentTypeError``, so a bad value ends as argparse's one
line (``embedshift <command>: error: argument --flag: ...``) with exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from embedshift_operator.adapters.postgres import DEFAULT_STATEMENT_TIMEOUT
from embedshift_operator.resource import parse_duration
from rag_service.criteria import PROMQL_RANGE
from rag_service.errors import ConfigError
from rag_service.spec import (
    DataPlaneSpec,
    EmbeddingSpec,
    check_migration_key,
    load_resource,
    validation_message,
)

if TYPE_CHECKING:  # the data plane (numpy, the SDKs) is loaded by the commands that use it
    from rag_service.migrate import Shard
    from rag_service.providers.pricing import PriceTable

__all__ = [
    "EF_SEARCH_HELP",
    "MAX_COUNT",
    "MAX_SECONDS",
    "add_spec_flags",
    "config_file",
    "count_or_auto",
    "duration",
    "ef_search",
    "env",
    "fraction",
    "interval",
    "memory_size",
    "memory_size_or_auto",
    "port",
    "port_or_off",
    "positive",
    "promql_range",
    "resolve",
    "seconds_or_zero",
    "shard",
    "usd",
    "whole",
]

# The largest count a flag can mean: PostgreSQL's integer, where batch sizes, limits and sample
# sizes end up. A larger number is a typo, refused here rather than as an overflow later.
MAX_COUNT = 2**31 - 1
# The longest wait between two checks, refreshes or sweeps: a week. Longer is a typo (and
# ``inf`` or 1e300 would overflow the timers they feed).
MAX_SECONDS = 7 * 24 * 3600.0
# pgvector's range for hnsw.ef_search.
EF_SEARCH_RANGE = (1, 1000)
# One help text for every command's --ef-search (serve, verify, compare/baseline).
EF_SEARCH_HELP = (
    "hnsw.ef_search: how many candidates an HNSW search examines, recall against latency "
    f"({EF_SEARCH_RANGE[0]}-{EF_SEARCH_RANGE[1]}; default: the manifest's target.index.efSearch, "
    "100 if unset)"
)
# Seeds and priorities are stored as 64-bit integers (PostgreSQL bigint, Kubernetes int64).
_INT64 = (-(2**63), 2**63 - 1)


class FromEnvironment(str):
    """A flag's default read from the environment variable ``variable``: ``--help`` names the
    variable, never the value (it may hold a secret: a URL with a password, a key)."""

    variable: str


def env(name: str) -> str | None:
    """The environment variable ``name`` (a :class:`FromEnvironment`); empty counts as unset."""
    value = os.environ.get(name)
    if not value:
        return None
    found = FromEnvironment(value)
    found.variable = name
    return found


def add_spec_flags(parser: argparse.ArgumentParser, *, migration_help: str | None = None) -> None:
    """The flags every command takes to say what is migrated (they override ``--config``).
    ``migration_help``: what ``--migration`` means to this command, when it means more."""
    g = parser.add_argument_group("what to migrate (flags override --config)")
    g.add_argument(
        "--config",
        type=config_file,
        default=env("EMBEDSHIFT_CONFIG"),
        help="an EmbeddingMigration manifest (env EMBEDSHIFT_CONFIG)",
    )
    g.add_argument(
        "--database-url",
        default=env("DATABASE_URL"),
        help="PostgreSQL connection string (env DATABASE_URL)",
    )
    g.add_argument(
        "--table", default=env("EMBEDSHIFT_TABLE"), help="source table, e.g. public.documents"
    )
    g.add_argument(
        "--id-column", default=env("EMBEDSHIFT_ID_COLUMN"), help="unique id column (default id)"
    )
    g.add_argument(
        "--text-column",
        default=env("EMBEDSHIFT_TEXT_COLUMN"),
        help="text column (default content)",
    )
    g.add_argument(
        "--category-column", default=env("EMBEDSHIFT_CATEGORY_COLUMN"), help="category column"
    )
    g.add_argument(
        "--source-column", default=env("EMBEDSHIFT_SOURCE_COLUMN"), help="v1 embedding column"
    )
    g.add_argument(
        "--target",
        default=env("EMBEDSHIFT_TARGET"),
        help="target model as provider:model@dims, e.g. openai:text-embedding-3-small@768, "
        "google:gemini-embedding-001@1536, local:hash@768 (env EMBEDSHIFT_TARGET)",
    )
    g.add_argument(
        "--target-base-url", default=env("EMBEDSHIFT_TARGET_BASE_URL"), help="API base URL"
    )
    g.add_argument(
        "--source", default=env("EMBEDSHIFT_SOURCE"), help="v1 model, provider:model@dims"
    )
    g.add_argument(
        "--migration",
        type=migration_key,
        default=env("EMBEDSHIFT_MIGRATION"),
        help=migration_help
        or "routing key namespace/name (default: the manifest's, else default/<table>)",
    )
    g.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="PROVIDER:MODEL=USD",
        help="override a price in USD per 1M tokens (repeatable)",
    )
    g.add_argument(
        "--halfvec",
        action="store_true",
        default=None,
        help="store target vectors as halfvec (indexable up to 4000 dims; same on every command)",
    )
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def config_file(value: str) -> Path:
    """``--config``: an empty path is refused (``Path('')`` would read as the current directory)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty: name the manifest, or leave it out")
    return Path(value)


def _whole(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None


def positive(value: str) -> int:
    """A count: a whole number from 1 to :data:`MAX_COUNT`."""
    number = _whole(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    if number > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{value} is too large (at most {MAX_COUNT})")
    return number


def _whole_within(value: str, bounds: tuple[int, int], *, what: str) -> int:
    number = _whole(value)
    low, high = bounds
    if not low <= number <= high:
        raise argparse.ArgumentTypeError(f"{value} is outside {what} {low} to {high}")
    return number


def whole(value: str) -> int:
    """Any whole number a 64-bit integer holds (a seed, a priority)."""
    return _whole_within(value, _INT64, what="the range")


def ef_search(value: str) -> int:
    """hnsw.ef_search, within pgvector's range (else PostgreSQL refuses it mid-run)."""
    return _whole_within(value, EF_SEARCH_RANGE, what="pgvector's range")


def fraction(value: str) -> float:
    """A share from 0 to 1 (a rate, a recall)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number from 0 to 1") from None
    if not 0 <= number <= 1:  # also refuses nan, which compares false with everything
        raise argparse.ArgumentTypeError(f"{value} must be from 0 to 1, e.g. 0.9")
    return number


def usd(value: str) -> float:
    """A finite amount of US dollars, zero or more (``nan`` would compare false with any spend
    and ``inf`` would never stop it: both are refused)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an amount of US dollars") from None
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"{value} must be a finite amount, zero or more")
    return number


def shard(value: str) -> Shard:
    from rag_service.migrate import Shard

    try:
        return Shard.parse(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--shard: ")) from None


def memory_size(value: str) -> int:
    """A PostgreSQL memory setting (``512MB``, ``4GB``) in bytes."""
    from rag_service.indexes import parse_memory

    try:
        return parse_memory(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def memory_size_or_auto(value: str) -> int | None:
    """``auto`` (None: sized by the step itself) or a memory setting in bytes."""
    return None if value == "auto" else memory_size(value)


def count_or_auto(value: str) -> int | None:
    """``auto`` (None) or a whole number from 0 to 1024."""
    return None if value == "auto" else _whole_within(value, (0, 1024), what="the range")


def migration_key(value: str) -> str:
    """``namespace/name``; empty means none given (``serve`` then serves its flags)."""
    if not value.strip():
        return value
    try:
        return check_migration_key(value, field="")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(": ")) from None


def promql_range(value: str) -> str:
    """A Prometheus range (``24h``), as :func:`rag_service.criteria.metric_query` accepts it."""
    if not re.match(PROMQL_RANGE, value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a Prometheus range such as 24h or 30m")
    return value


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if seconds > MAX_SECONDS:  # inf too; nan is left to the caller's lower bound
        raise argparse.ArgumentTypeError(f"{value} is too long (at most {MAX_SECONDS:.0f} s)")
    return seconds


def interval(value: str) -> float:
    """A positive number of seconds, at most :data:`MAX_SECONDS`."""
    seconds = _seconds(value)
    if not seconds > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value} must be more than 0 seconds")
    return seconds


def seconds_or_zero(value: str) -> float:
    """A number of seconds from 0 (at once) to :data:`MAX_SECONDS`."""
    seconds = _seconds(value)
    if not seconds >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more seconds")
    return seconds


def duration(value: str) -> float:
    """A positive Go duration (``5m``, ``90s``, ``1h30m``), as the resource writes them; seconds."""
    try:
        seconds = parse_duration(value).total_seconds()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    except OverflowError:  # longer than a timedelta holds (about 2.7 million years)
        raise argparse.ArgumentTypeError(f"{value!r} is too long") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be longer than zero, e.g. 5m")
    return seconds


def duration_or_off(value: str) -> float | None:
    """A positive Go duration in seconds, or 0 (off): None."""
    if value.strip() in ("0", "0s"):
        return None
    return duration(value)


def add_statement_timeout_flag(parser: argparse.ArgumentParser) -> None:
    """``--statement-timeout``, for the drivers of the control loop (``operator run``,
    ``rollout run``); see :mod:`embedshift_operator.adapters.postgres`."""
    parser.add_argument(
        "--statement-timeout",
        type=duration_or_off,
        default=DEFAULT_STATEMENT_TIMEOUT,
        metavar="DURATION",
        help="cancel any one statement of the control loop (the routing row, progress, status) "
        "after this long: a hung database is a held observation error, not a stuck loop. The "
        "Jobs' statements (migrate, index, verify) never have it. A Go duration; 0 sends none, "
        f"for a pooler that refuses libpq's options parameter (default "
        f"{DEFAULT_STATEMENT_TIMEOUT:g}s)",
    )


def _port(value: str, low: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not low <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number ({low}-65535)")
    return number


def port(value: str) -> int:
    """A TCP port to listen on, 1-65535."""
    return _port(value, 1)


def port_or_off(value: str) -> int:
    """A TCP port, or 0: the flag's server is turned off."""
    return _port(value, 0)


# add_spec_flags' string flags, by dest (``--price`` and ``--config`` refuse an empty value
# themselves: ``PriceTable.parse_override``, ``config_file``).
_SPEC_STRING_FLAGS = (
    "database_url",
    "table",
    "id_column",
    "text_column",
    "category_column",
    "source_column",
    "target",
    "target_base_url",
    "source",
    "migration",
)


def resolve(
    args: argparse.Namespace, *, needs_database: bool = True
) -> tuple[DataPlaneSpec, str, str, PriceTable]:
    """(spec, migration key, database url, prices) from --config, flags and environment.

    ``needs_database=False``: the command reads no database this time (Prometheus alone), so a
    missing URL is returned as ``""`` instead of refused."""
    from rag_service.providers.pricing import PriceTable

    for flag in _SPEC_STRING_FLAGS:
        value = getattr(args, flag, None)
        if value is not None and not value.strip():
            # Read as "not given", the config or a default would silently win over it.
            raise ConfigError(
                f"--{flag.replace('_', '-')}: empty; give a value, or leave the flag out to use "
                "the config"
            )
    migration: str | None = None
    raw: dict[str, Any] = {}
    if args.config:
        resource = load_resource(args.config)
        raw = resource.spec.model_dump(by_alias=True, exclude_none=True)
        migration = resource.key
    database = raw.setdefault("database", {})
    for flag, field in (
        ("table", "table"),
        ("id_column", "idColumn"),
        ("text_column", "textColumn"),
        ("category_column", "categoryColumn"),
        ("source_column", "sourceEmbeddingColumn"),
    ):
        if getattr(args, flag):
            database[field] = getattr(args, flag)
    if "table" not in database:
        raise ConfigError("--table: which source table? pass --table (or --config FILE)")
    if args.target:
        target = EmbeddingSpec.parse(args.target, field="--target")
        raw["target"] = {
            **raw.get("target", {}),
            **target.model_dump(by_alias=True, include={"provider", "model", "dimensions"}),
        }
    if "target" not in raw:
        raise ConfigError(
            "--target: which model to migrate to? e.g. --target openai:text-embedding-3-small@768 "
            "(or --config FILE)"
        )
    if args.target_base_url:
        raw["target"]["baseURL"] = args.target_base_url
    if getattr(args, "halfvec", None):
        raw["target"].setdefault("index", {})["halfvec"] = True
    if args.source:
        source = EmbeddingSpec.parse(args.source, field="--source")
        raw["source"] = {
            **raw.get("source", {}),
            **source.model_dump(by_alias=True, include={"provider", "model", "dimensions"}),
        }
    try:
        spec = DataPlaneSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, prefix="spec", model=DataPlaneSpec)) from None
    spec.target.check_indexable()
    url = args.database_url or ""
    if needs_database and not url:
        raise ConfigError(
            "DATABASE_URL is not set: export DATABASE_URL=postgresql://user@host/db "
            "(or pass --database-url)"
        )
    migration = args.migration or migration or f"default/{spec.database.table_name.name}"
    prices = (
        PriceTable()
        .with_spec_prices(spec.source, spec.target)
        .with_overrides(dict(PriceTable.parse_override(p) for p in args.price))
    )
    return spec, migration, url, prices
