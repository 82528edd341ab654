"""GET /dashboard in a real browser: the real service on a real PostgreSQL, a little traffic,
Debian's headless Chromium loading the page and running its JS, and the DOM compared with the
JSON APIs the page reads. The local driver's status is written by the operator's own
ControlStore (the code `embedshift rollout run` saves it with).

Set EMBEDSHIFT_DASHBOARD_SCREENSHOT=docs/dashboard.png (``make dashboard-screenshot``) to
refresh the screenshot in the docs; otherwise it goes to a temporary directory.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import httpx
import psycopg
import pytest
import websockets

from embedshift_operator.adapters.postgres import ControlStore
from embedshift_operator.resource import (
    AnalysisStatus,
    CriterionResult,
    EmbeddingMigrationSpec,
    EmbeddingMigrationStatus,
    HistoryEntry,
    MigrationProgress,
    Phase,
)
from rag_service.criteria import (
    DEFAULT_ROLLBACK_THRESHOLDS,
    DEFAULT_SUCCESS_CRITERIA,
    Verdict,
    judge,
)
from rag_service.dashboard_page import page_html
from rag_service.indexes import build_index
from rag_service.migrate import RunOptions, run_migration
from rag_service.providers import make_provider
from rag_service.routing import bucket
from rag_service.schema import setup
from rag_service.service import ServiceSettings
from rag_service.spec import DataPlaneSpec
from rag_service.testing.corpus import corpus_spec, create_corpus
from tests.service_harness import Running, serving

TABLE = "page_docs"
MIGRATION = "rag/page"
SECRET = "page-webhook-s3cret"
AUTH = {"Authorization": f"Bearer {SECRET}"}


# ---- the browser ---------------------------------------------------------------------------------


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("chromium is missing: run scripts/install-chromium.sh (make test does)")
    return found


async def browse(url: str, *, tmp: Path) -> str:
    """The DOM after the page's JS ran (``--virtual-time-budget`` lets its fetches finish)."""
    args = [
        chromium(),
        "--headless",
        "--no-sandbox",  # root in CI containers; the page is our own
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'profile'}",
        "--virtual-time-budget=4000",
        "--dump-dom",
    ]
    process = await asyncio.create_subprocess_exec(
        *args,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


class LivePage:
    """A page left open in headless Chromium, driven through the DevTools protocol (a
    websocket): typed into as a user would, and read after its first load, which ``--dump-dom``
    cannot see."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self._ws = ws
        self._next = 0

    async def _call(self, method: str, **params: object) -> dict[str, object]:
        self._next += 1
        await self._ws.send(json.dumps({"id": self._next, "method": method, "params": params}))
        while True:
            message = json.loads(await self._ws.recv())
            if message.get("id") == self._next:
                result: dict[str, object] = message["result"]
                return result

    async def evaluate(self, expression: str) -> object:
        """The value of a JavaScript expression in the page; None when it throws (before the
        page has loaded, there is no such element yet: nothing shown)."""
        result = await self._call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            return None
        value = result["result"]
        assert isinstance(value, dict)
        return value.get("value")

    async def text_of(self, element_id: str) -> str:
        value = await self.evaluate(
            f"document.getElementById({json.dumps(element_id)}).textContent"
        )
        return "" if value is None else str(value)

    async def html(self) -> str:
        return str(await self.evaluate("document.documentElement.outerHTML"))

    async def enter_token(self, token: str) -> None:
        """Type ``token`` into the page's token field and submit it, as a user does (once the
        page has loaded and refreshed: a user sees it first)."""
        for _ in range(400):
            if await self.evaluate("document.body.dataset.state"):
                break
            await asyncio.sleep(0.05)
        typed = await self._call(
            "Runtime.evaluate",
            expression=f"document.getElementById('token').value = {json.dumps(token)};"
            " document.getElementById('token-form').requestSubmit();",
        )
        assert "exceptionDetails" not in typed, typed

    async def wait_for_state(self, state: str, *, within: float = 20.0) -> None:
        """Until the page's last refresh ended in ``state`` (``document.body.dataset.state``)."""
        seen: object = None
        for _ in range(int(within / 0.05)):
            seen = await self.evaluate("document.body.dataset.state")
            if seen == state:
                return
            await asyncio.sleep(0.05)
        said = await self.text_of("error")
        raise AssertionError(f"the page never reached {state!r} (last {seen!r}: {said!r})")

    async def screenshot(self, path: Path) -> None:
        shot = await self._call(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": 1200, "height": 1300, "scale": 1},
        )
        data = shot["data"]
        assert isinstance(data, str)
        await asyncio.to_thread(path.write_bytes, base64.b64decode(data))


@asynccontextmanager
async def live_page(url: str, *, tmp: Path) -> AsyncIterator[LivePage]:
    # A profile of its own: a second page must not read the first one's DevToolsActivePort.
    profile = Path(tempfile.mkdtemp(prefix="live-profile-", dir=tmp))
    process = await asyncio.create_subprocess_exec(
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--remote-debugging-port=0",  # Chromium picks one and writes it to DevToolsActivePort
        "--hide-scrollbars",
        "--window-size=1200,1300",
        f"--user-data-dir={profile}",
        url,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if await asyncio.to_thread(port_file.exists):
                lines = (await asyncio.to_thread(port_file.read_text)).split()
                if lines:
                    break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("chromium did not open its DevTools port")
        async with httpx.AsyncClient() as client:
            targets = (await client.get(f"http://127.0.0.1:{lines[0]}/json/list")).json()
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        async with websockets.connect(ws_url, max_size=None) as ws:
            yield LivePage(ws)
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 30)


class Dom(HTMLParser):
    """The text of elements by id and of every tagged cell: enough to read the page back."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.cells: dict[tuple[str, str], str] = {}  # (data-version, data-metric) → text
        self.fields: dict[tuple[str, str], str] = {}  # (row's data-*, data-field) → text
        self.criteria: dict[str, list[str]] = {}  # data-criterion → cell texts
        self.events: list[tuple[str, str]] = []  # (data-kind, text)
        self.body_attrs: dict[str, str] = {}
        self._open: list[tuple[str, dict[str, str], list[str]]] = []
        self._row: dict[str, str] = {}
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body_attrs = a
        if tag == "tr":
            self._row = a
            if "data-criterion" in a:
                self.criteria[a["data-criterion"]] = []
        self._open.append((tag, a, []))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            t, a, parts = self._open.pop()
            text = " ".join("".join(parts).split())
            if self._open:
                self._open[-1][2].append("".join(parts))
            if "id" in a:
                self.by_id[a["id"]] = text
            if t == "td" and "data-metric" in a:
                self.cells[(a["data-version"], a["data-metric"])] = text
            if t == "td" and "data-field" in a and "data-version" in self._row:
                self.fields[(self._row["data-version"], a["data-field"])] = text
            if t in ("td", "th") and "data-criterion" in self._row:
                self.criteria[self._row["data-criterion"]].append(text)
            if t == "li" and "data-kind" in a:
                self.events.append((a["data-kind"], text))
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._open:
            self._open[-1][2].append(data)


# ---- the world -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec(database_url: str) -> Iterator[DataPlaneSpec]:
    """400 documents with v1 vectors, migrated to local:hash@768 with an HNSW index."""
    create_corpus(database_url, table=TABLE, count=400, source_dimensions=384)
    data_plane = corpus_spec(TABLE, source_dimensions=384)

    async def prepare() -> None:
        await setup(database_url, data_plane, migration=MIGRATION)
        provider = make_provider(data_plane.target, api_key=None, role="target")
        await run_migration(
            database_url,
            data_plane,
            provider=provider,
            options=RunOptions(batch_size=200),
            migration=MIGRATION,
        )
        await provider.aclose()
        await build_index(database_url, data_plane)

    asyncio.run(prepare())
    yield data_plane


def settings_for(database_url: str, spec: DataPlaneSpec) -> ServiceSettings:
    return ServiceSettings(
        database_url=database_url,
        spec=spec,
        migration=MIGRATION,
        webhook_secret=SECRET,
        reread_seconds=0.5,
    )


def set_percentage(url: str, percentage: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE embedshift_rollout SET percentage = %s, emergency = false, reason = %s,"
            " updated_at = now() WHERE migration = %s",
            [percentage, "StepReached", MIGRATION],
        )
        conn.execute("SELECT pg_notify('embedshift_rollout', %s)", [MIGRATION])


async def traffic(svc: Running) -> None:
    """Users on both sides of 50 %, each asking twice (the second time from the cache)."""
    users = [f"user-{i}" for i in range(30)]
    assert {bucket(migration=MIGRATION, key=u) < 50 for u in users} == {True, False}
    for round_ in range(2):
        for i, user in enumerate(users):
            response = await svc.client.post(
                "/api/rag/search",
                json={"query": f"pool opening hours {i}", "k": 3},
                headers={"X-User-Id": user},
            )
            assert response.status_code == 200, response.text
            assert response.json()["cache_hit"] == (round_ == 1)


async def save_local_status(
    url: str, spec: DataPlaneSpec, versions: dict[str, dict[str, float | None]]
) -> EmbeddingMigrationStatus:
    """What `embedshift rollout run` saves mid-rollout, through its own ControlStore: the
    default criteria judged on the service's figures ``versions``, and a dry-run rollback
    threshold breached."""
    v1, v2 = versions["v1"], versions["v2"]
    now = datetime.now(UTC)
    results = [
        CriterionResult(
            name=c.name,
            kind="success",
            value=v2[c.metric],
            bound=c.bound.describe(),
            verdict=judge(v2[c.metric], c.bound, v1_value=v1[c.metric]),
        )
        for c in DEFAULT_SUCCESS_CRITERIA
        if c.metric in v2
    ] + [
        CriterionResult(
            name=DEFAULT_ROLLBACK_THRESHOLDS[0].name,
            kind="rollback",
            value=0.5,
            bound=DEFAULT_ROLLBACK_THRESHOLDS[0].bound.describe(),
            verdict=Verdict.FAIL,
            dry_run=True,
            message="dry run: recorded only",
        )
    ]
    status = EmbeddingMigrationStatus(
        phase=Phase.PROGRESSING,
        percentage=50,
        step_index=2,
        message="Step 3 of 4: 50 %",
        migration=MigrationProgress(total=400, migrated=400, pending=0),
        analysis=AnalysisStatus(time=now, consecutive_passes=0, results=results),
        history=[
            HistoryEntry(
                time=now - timedelta(minutes=m),
                phase=Phase.PROGRESSING,
                percentage=p,
                reason="StepReached",
                message=f"{p} % after the analysis passed",
            )
            for m, p in ((9, 10), (5, 25), (1, 50))
        ],
    )
    store = ControlStore(
        url=url,
        spec=EmbeddingMigrationSpec.model_validate(
            spec.model_dump(mode="json", by_alias=True, exclude_none=True)
        ),
        migration=MIGRATION,
    )
    await store.ensure_tables()
    await store.save_status(status)
    return status


# ---- formatting the page promises ----------------------------------------------------------------

UNITS = {
    "requests": ("", 1.0, 0.0),
    "avg_latency_seconds": (" ms", 1000.0, 0.05),
    "p95_latency_seconds": (" ms", 1000.0, 0.05),
    "error_rate": (" %", 100.0, 0.05),
    "cache_hit_rate": (" %", 100.0, 0.05),
    "avg_top_similarity": ("", 1.0, 0.0005),
    "cost_per_1k_queries_usd": ("", 1.0, 0.00005),
}


def assert_shows(text: str, value: float | None, metric: str) -> None:
    """``text`` is ``value`` as the page formats it (the last digit rounded either way)."""
    if value is None:
        assert text == "—", (metric, text)
        return
    suffix, scale, half_unit = UNITS[metric]
    assert text.endswith(suffix), (metric, text)
    shown = float(re.sub(r"[^0-9.\-]", "", text))
    assert abs(shown - value * scale) <= half_unit + 1e-9, (metric, text, value)


# ---- the tests -----------------------------------------------------------------------------------


@pytest.fixture
def screenshot(tmp_path: Path) -> Path:
    """Where the screenshot goes: EMBEDSHIFT_DASHBOARD_SCREENSHOT or a temporary file."""
    return Path(
        os.environ.get("EMBEDSHIFT_DASHBOARD_SCREENSHOT") or tmp_path / "page.png"
    ).resolve()


async def post_alert(
    client: httpx.AsyncClient, name: str, severity: str, summary: str
) -> httpx.Response:
    """One firing Alertmanager alert through the service's webhook, with the secret."""
    return await client.post(
        "/api/alerts/webhook",
        headers={"Authorization": f"Bearer {SECRET}"},
        json={
            "alerts": [
                {
                    "status": "firing",
                    "labels": {"alertname": name, "severity": severity},
                    "annotations": {"summary": summary},
                }
            ]
        },
    )


async def test_the_page_shows_what_the_apis_report(
    database_url: str, spec: DataPlaneSpec, tmp_path: Path, screenshot: Path
) -> None:
    async with serving(settings_for(database_url, spec)) as svc:
        set_percentage(database_url, 50)
        await asyncio.sleep(1.0)  # the follower re-reads within reread_seconds
        await traffic(svc)
        alert = await post_alert(svc.client, "HighLatency", "warning", "v2 p95 above 500 ms")
        assert alert.status_code == 200, alert.text
        figures = (await svc.client.get("/api/monitoring/dashboard", headers=AUTH)).json()
        saved = await save_local_status(database_url, spec, figures["versions"])

        page = await svc.client.get("/dashboard")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        # No external assets: nothing but this page and this service (the CSP enforces it).
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)

        async with live_page(f"{svc.url}/dashboard", tmp=tmp_path) as live:
            await live.wait_for_state("needs-token")  # nothing shown to a stranger
            await live.enter_token(SECRET)
            await live.wait_for_state("ok")
            html = await live.html()
            await live.screenshot(screenshot)
        dom = Dom(html)
        assert SECRET not in html  # the field is emptied once the token is taken
        dashboard = (await svc.client.get("/api/monitoring/dashboard", headers=AUTH)).json()
        breakers = (await svc.client.get("/api/monitoring/circuit-breaker", headers=AUTH)).json()
        rollout = (await svc.client.get("/api/monitoring/rollout", headers=AUTH)).json()

        assert dom.body_attrs.get("data-loaded") == "true", "the page's JS did not finish"
        assert dom.by_id["error"] == ""
        assert dom.by_id["migration"] == MIGRATION
        # Percentage and phase: the routing row's and the local driver's.
        assert rollout["routing"]["percentage"] == 50
        assert dom.by_id["percentage"] == "50"
        assert rollout["status"]["phase"] == saved.phase.value == dom.by_id["phase"]
        assert dom.by_id["step"] == "3"
        assert dom.by_id["progress"] == "400 of 400 rows (0 pending)"
        assert dom.by_id["emergency"] == "no"
        # Per-version figures, every one, as the JSON API reports them.
        assert dashboard["versions"]["v1"]["requests"] > 0
        assert dashboard["versions"]["v2"]["requests"] > 0
        assert dashboard["versions"]["v2"]["cache_hit_rate"] == pytest.approx(0.5)
        for version, figures in dashboard["versions"].items():
            for metric, value in figures.items():
                assert_shows(dom.cells[(version, metric)], value, metric)
        for version, breaker in breakers.items():
            assert dom.fields[(version, "state")] == breaker["state"] == "closed"
        # The criteria's verdicts, one row each.
        assert set(dom.criteria) == {r.name for r in saved.analysis.results}
        for result in saved.analysis.results:
            cells = dom.criteria[result.name]
            assert cells[1] == result.kind.value
            assert cells[4] == result.verdict.value
            assert ("(dry run)" in cells[0]) == result.dry_run
        # Recent events: the three transitions, newest first, and the alert.
        transitions = [t for kind, t in dom.events if kind == "transition"]
        assert [t.split(" ", 1)[1] for t in transitions][:1] == [
            "Progressing at 50 %: StepReached — 50 % after the analysis passed"
        ]
        assert len(transitions) == 3
        assert any("HighLatency" in t for kind, t in dom.events if kind == "alert")

        png = await asyncio.to_thread(screenshot.read_bytes)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


async def test_without_a_local_status_the_page_says_where_the_rest_is(
    database_url: str, spec: DataPlaneSpec, tmp_path: Path
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS embedshift_rollout_status")
    async with serving(settings_for(database_url, spec)) as svc:
        set_percentage(database_url, 25)

        async def followed() -> bool:
            view = (await svc.client.get("/api/monitoring/rollout", headers=AUTH)).json()
            return bool(view["routing"]["percentage"] == 25)

        for _ in range(100):
            if await followed():
                break
            await asyncio.sleep(0.05)
        view = (await svc.client.get("/api/monitoring/rollout", headers=AUTH)).json()
        assert view["status"] is None and view["statusError"] is None

        async with live_page(f"{svc.url}/dashboard", tmp=tmp_path) as live:
            await live.enter_token(SECRET)
            await live.wait_for_state("ok")
            dom = Dom(await live.html())
        assert dom.by_id["percentage"] == "25"
        assert dom.by_id["phase"] == "unknown here"
        assert "kubectl describe embeddingmigration" in dom.by_id["status-note"]
        assert dom.by_id["analysis-note"] == "No verdicts available here."
        assert dom.criteria == {}
        # Without traffic every figure is "no data", never a made-up zero.
        assert dom.cells[("v2", "p95_latency_seconds")] == "—"


async def test_the_page_reports_an_unreachable_api(tmp_path: Path) -> None:
    """Served from a file with no service behind it, the page says so instead of going blank."""
    page = tmp_path / "dashboard.html"
    page.write_text(page_html())
    dom = Dom(await browse(page.as_uri(), tmp=tmp_path))
    assert dom.by_id["error"].startswith("Could not refresh:")
    assert dom.by_id["percentage"] == "—"


async def test_the_page_asks_for_the_token_and_says_when_it_is_refused(
    database_url: str, spec: DataPlaneSpec, tmp_path: Path
) -> None:
    """The page is public, the rollout is not: it asks for the service's token (a password
    field), keeps it in the tab's sessionStorage only, and says what is wrong when the service
    refuses it: no token, a wrong one, a service with no ALERT_WEBHOOK_SECRET."""
    async with (
        serving(settings_for(database_url, spec)) as svc,
        live_page(f"{svc.url}/dashboard", tmp=tmp_path) as page,
    ):
        await page.wait_for_state("needs-token")
        assert "needs the service's token" in await page.text_of("error")
        assert await page.text_of("percentage") == "—"  # nothing of the rollout shown
        assert await page.evaluate("document.getElementById('token').type") == "password"
        await page.enter_token("not-the-secret")
        await page.wait_for_state("wrong-token")
        assert "refused this token" in await page.text_of("error")
        await page.enter_token(SECRET)
        await page.wait_for_state("ok")
        assert await page.text_of("error") == ""
        assert await page.text_of("token-state") == "token set for this tab"
        kept = await page.evaluate(
            "JSON.stringify([sessionStorage.getItem('embedshift.token'), localStorage.length,"
            " document.cookie, location.href, document.getElementById('token').value])"
        )
        assert json.loads(str(kept)) == [SECRET, 0, "", f"{svc.url}/dashboard", ""]
        await page.evaluate("document.getElementById('forget').click()")
        await page.wait_for_state("needs-token")
        assert await page.evaluate("sessionStorage.getItem('embedshift.token')") is None

    no_secret = replace(settings_for(database_url, spec), webhook_secret=None)
    async with (
        serving(no_secret) as svc,
        live_page(f"{svc.url}/dashboard", tmp=tmp_path) as page,
    ):
        await page.enter_token(SECRET)
        await page.wait_for_state("unavailable")
        said = await page.text_of("error")
        assert said.startswith("The service does not show the rollout:")
        assert "ALERT_WEBHOOK_SECRET is not set on the service" in said


async def test_the_page_refreshes_itself_and_shows_an_emergency(
    database_url: str, spec: DataPlaneSpec, tmp_path: Path
) -> None:
    """Left open, the page follows the service: a critical alert switches everything to v1 and
    the open page shows it at its next refresh, without anyone reloading it."""
    async with serving(settings_for(database_url, spec)) as svc:
        set_percentage(database_url, 25)
        async with live_page(f"{svc.url}/dashboard", tmp=tmp_path) as page:

            async def shows(element_id: str, text: str) -> None:
                for _ in range(200):  # a refresh is every 5 s; allow three
                    if await page.text_of(element_id) == text:
                        return
                    await asyncio.sleep(0.075)
                raise AssertionError(f"#{element_id} never showed {text!r}")

            await page.enter_token(SECRET)
            await shows("percentage", "25")
            assert await page.text_of("emergency") == "no"
            alert = await post_alert(svc.client, "V2ErrorRate", "critical", "v2 errors above 5 %")
            assert alert.json()["emergency"] is True
            await shows("percentage", "0")
            assert await page.text_of("emergency") == "YES: every request goes to v1"
            assert "V2ErrorRate" in await page.text_of("events")
