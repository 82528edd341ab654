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

from embedshift_operator.resource import parse_duration
from rag_service.criteria import PROMQL_RANGE
from rag_service.errors import ConfigError
from rag_service.spec import DataPlaneSpec, EmbeddingSpec, load_resource, validation_message

if TYPE_CHECKING:  # the data plane (numpy, the SDKs) is loaded by the commands that use it
    from rag_service.migrate import Shard
    from rag_service.providers.pricing import PriceTable

__all__ = [
    "add_spec_flags",
    "config_file",
    "duration",
    "env",
    "interval",
    "port",
    "positive",
    "promql_range",
    "resolve",
    "shard",
]


def env(name: str) -> str | None:
    """The environment variable ``name``; empty counts as unset."""
    return os.environ.get(name) or None


def add_spec_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every command takes to say what is migrated (they override ``--config``)."""
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
        default=env("EMBEDSHIFT_MIGRATION"),
        help="routing key namespace/name (default: the manifest's, else default/<table>)",
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


def positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
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


def promql_range(value: str) -> str:
    """A Prometheus range (``24h``), as :func:`rag_service.criteria.metric_query` accepts it."""
    if not re.match(PROMQL_RANGE, value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a Prometheus range such as 24h or 30m")
    return value


def interval(value: str) -> float:
    """A positive number of seconds."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{value} must be more than 0 seconds")
    return seconds


def duration(value: str) -> float:
    """A positive Go duration (``5m``, ``90s``, ``1h30m``), as the resource writes them; seconds."""
    try:
        seconds = parse_duration(value).total_seconds()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be longer than zero, e.g. 5m")
    return seconds


def port(value: str) -> int:
    """A TCP port, 0-65535 (what 0 means is the flag's to say)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return number


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


def resolve(args: argparse.Namespace) -> tuple[DataPlaneSpec, str, str, PriceTable]:
    """(spec, migration key, database url, prices) from --config, flags and environment."""
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
    url = args.database_url
    if not url:
        raise ConfigError(
            "DATABASE_URL is not set: export DATABASE_URL=postgresql://user@host/db "
            "(or pass --database-url)"
        )
    migration = args.migration or migration or f"default/{spec.database.table_name.name}"
    prices = PriceTable().with_overrides(dict(PriceTable.parse_override(p) for p in args.price))
    return spec, migration, url, prices
