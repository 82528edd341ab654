"""SQL identifiers from user input: validated as plain identifiers, then always quoted.

Pure functions. A name that is not ``[A-Za-z_][A-Za-z0-9_$]*`` (≤ 63 bytes, PostgreSQL's limit)
is refused rather than escaped, so a typo or an injection attempt fails loudly with the field name.
No database library is imported here, so the spec (and the operator's pure core) load without
psycopg; ``rag_service.schema.ident`` quotes a :class:`TableName` for SQL.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from rag_service.errors import ConfigError

MAX_IDENTIFIER_BYTES = 63
# A plain identifier's characters: a letter or underscore, then letters, digits, _ and $.
_FIRST, _REST = "[A-Za-z_]", "[A-Za-z0-9_$]"
_IDENTIFIER = re.compile(f"{_FIRST}{_REST}*")  # fullmatch: Python's $ allows a final newline
# The same check whole, unanchored, for patterns that embed it (the CRD's, run in Go's RE2):
# ASCII only, one byte a character, so the byte limit is a length.
IDENTIFIER_PATTERN = f"{_FIRST}{_REST}{{0,{MAX_IDENTIFIER_BYTES - 1}}}"
# How to write one, for messages.
IDENTIFIER_FIX = "use letters, digits and underscores, starting with a letter or underscore"


def check_identifier(value: str, *, field: str) -> str:
    """Return ``value`` if it is a plain SQL identifier, else raise ConfigError naming ``field``."""
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise ConfigError(f"{field}: {value!r} is not a plain SQL identifier; {IDENTIFIER_FIX}")
    if len(value.encode()) > MAX_IDENTIFIER_BYTES:
        raise ConfigError(
            f"{field}: {value!r} is longer than PostgreSQL's {MAX_IDENTIFIER_BYTES}-byte limit"
        )
    return value


@dataclass(frozen=True)
class TableName:
    """A possibly schema-qualified table name, validated part by part."""

    name: str
    schema: str | None = None

    @classmethod
    def parse(cls, value: str, *, field: str) -> TableName:
        parts = value.split(".") if isinstance(value, str) else [value]
        if len(parts) == 1:
            return cls(name=check_identifier(parts[0], field=field))
        if len(parts) == 2:
            return cls(
                schema=check_identifier(parts[0], field=field),
                name=check_identifier(parts[1], field=field),
            )
        raise ConfigError(f"{field}: {value!r} must be 'table' or 'schema.table'")

    def sibling(self, name: str) -> TableName:
        """Another table in the same schema."""
        return TableName(name=name, schema=self.schema)

    @property
    def regclass_text(self) -> str:
        """The quoted name, for ``'...'::regclass`` lookups."""
        quoted = f'"{self.name}"'
        return f'"{self.schema}".{quoted}' if self.schema else quoted

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


def derived_identifier(*parts: str) -> str:
    """Join ``parts`` into one identifier, slugged, shortened with a hash suffix if too long.

    Deterministic: the same parts always give the same name, so reruns find their own tables.
    """
    raw = "_".join(parts)
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", raw).strip("_").lower()
    if not slug or not (slug[0].isalpha() or slug[0] == "_"):
        slug = f"t_{slug}"
    if len(slug) <= MAX_IDENTIFIER_BYTES:
        return slug
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{slug[: MAX_IDENTIFIER_BYTES - 9]}_{digest}"
