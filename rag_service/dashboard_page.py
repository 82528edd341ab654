"""The built-in dashboard page (``GET /dashboard``) and the rollout view it reads.

The page is one HTML file with inline CSS and JS (``rag_service/static/dashboard.html``, a
package resource): no build step, no external assets. Every 5 s it fetches the service's JSON:
``/api/monitoring/dashboard`` (per-version figures), ``/api/monitoring/circuit-breaker`` and
``/api/monitoring/rollout`` (below: the routing row, the rollout's phase, verdicts and events).
Those need the service's bearer token (``ALERT_WEBHOOK_SECRET``): the page itself is public, and
asks the user for the token (a password field, kept in the tab's sessionStorage only), sends it
as ``Authorization: Bearer`` and says so when the service refuses it (401, 403, 503).

Where the phase, verdicts and events come from: the local driver (``embedshift rollout run``)
saves the resource's status in ``embedshift_rollout_status``, next to the routing row, and the
service reads it. The kopf operator keeps status on the Kubernetes resource, which the service
does not read (it has no Kubernetes credentials, by design); then the view has the routing row
only and says where the rest is (``kubectl describe``).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from rag_service.identifiers import TableName
from rag_service.schema import ident

# How many transitions the page lists: the recent story, not the whole history.
RECENT_EVENTS = 20


def page_html() -> str:
    """The page, read from the package (so an installed wheel serves it too)."""
    return resources.files("rag_service").joinpath("static/dashboard.html").read_text("utf-8")


async def read_rollout_status(
    conn: psycopg.AsyncConnection[Any], *, table: TableName, migration: str
) -> dict[str, Any] | None:
    """The local driver's saved status of ``migration``, trimmed to what the page shows, or
    None when there is no such table (no local driver ran here) or no row for it.

    The status is the resource's (camelCase, as the driver saved it): phase, percentage,
    message, migration progress, the last analysis's verdicts per criterion, and the most recent
    transitions (newest first)."""
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", [table.regclass_text])
    found = await cur.fetchone()
    if not found or not found[0]:
        return None
    cur = await conn.execute(
        sql.SQL("SELECT status, updated_at FROM {} WHERE migration = %s").format(ident(table)),
        [migration],
    )
    row = await cur.fetchone()
    if row is None:
        return None
    status: dict[str, Any] = dict(row[0])
    analysis: dict[str, Any] = status.get("analysis") or {}
    progress: dict[str, Any] = status.get("migration") or {}
    history: list[dict[str, Any]] = list(status.get("history") or [])
    return {
        "phase": status.get("phase"),
        "percentage": status.get("percentage"),
        "stepIndex": status.get("stepIndex"),
        "message": status.get("message", ""),
        "updatedAt": row[1].isoformat() if row[1] is not None else None,
        "progress": {k: progress.get(k) for k in ("total", "migrated", "pending", "failed")},
        "analysis": {
            "time": analysis.get("time"),
            "consecutivePasses": analysis.get("consecutivePasses"),
            "results": list(analysis.get("results") or []),
        },
        "events": list(reversed(history[-RECENT_EVENTS:])),
    }
