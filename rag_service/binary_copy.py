"""PostgreSQL's binary COPY format for (id, vector, hash) rows, built by numpy in one piece.

Per-row ``write_row`` costs microseconds of Python per row; for integer ids every row has the
same layout, so one structured array serialises a whole batch. Pure functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rag_service.providers.base import Vectors

HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
TRAILER = b"\xff\xff"
_ID_TYPES = {"int8": ">i8", "int4": ">i4", "int2": ">i2"}
HASH_BYTES = 32


def supports(id_typname: str) -> bool:
    """Fixed-width integer ids can take the fast path; others use psycopg's ``write_row``."""
    return id_typname in _ID_TYPES


def encode_rows(
    *,
    id_typname: str,
    ids: Sequence[int],
    vectors: Vectors,
    hashes: Sequence[bytes],
    halfvec: bool = False,
    categories: Sequence[str | None] | None = None,
) -> bytes:
    """A complete ``COPY … FROM STDIN (FORMAT BINARY)`` stream of (id, vector|halfvec, bytea)
    and, when ``categories`` is given, a fourth text column.

    HEADER and TRAILER included: one call is one COPY.
    """
    count, dims = vectors.shape
    id_format = _ID_TYPES[id_typname]
    element = ">f2" if halfvec else ">f4"
    row = np.dtype(
        [
            ("fields", ">i2"),
            ("id_len", ">i4"),
            ("id", id_format),
            ("vec_len", ">i4"),
            ("dims", ">u2"),
            ("unused", ">u2"),
            ("vec", element, (dims,)),
            ("hash_len", ">i4"),
            ("hash", f"S{HASH_BYTES}"),
        ]
    )
    rows = np.empty(count, dtype=row)
    rows["fields"] = 3 if categories is None else 4
    rows["id_len"] = np.dtype(id_format).itemsize
    rows["id"] = np.asarray(ids, dtype=np.int64)
    rows["vec_len"] = 4 + np.dtype(element).itemsize * dims
    rows["dims"] = dims
    rows["unused"] = 0
    rows["vec"] = vectors
    rows["hash_len"] = HASH_BYTES
    if any(len(h) != HASH_BYTES for h in hashes):
        raise ValueError("content hashes must be 32-byte sha256 digests")
    rows["hash"] = np.asarray(hashes, dtype=f"S{HASH_BYTES}")
    fixed = rows.tobytes()
    if categories is None:
        return HEADER + fixed + TRAILER
    # The text column varies in length, so each row is its fixed part plus its own tail.
    size = row.itemsize
    parts = [HEADER]
    for i, category in enumerate(categories):
        parts.append(fixed[i * size : (i + 1) * size])
        parts.append(_text_field(category))
    parts.append(TRAILER)
    return b"".join(parts)


_NULL = b"\xff\xff\xff\xff"


def _text_field(value: str | None) -> bytes:
    if value is None:
        return _NULL
    data = value.encode()
    return len(data).to_bytes(4, "big") + data
