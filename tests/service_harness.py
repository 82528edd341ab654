"""A running search service for tests: the real app under uvicorn on a free loopback port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import uvicorn

from rag_service.service import Service, ServiceSettings, create_app


@dataclass
class Running:
    url: str
    client: httpx.AsyncClient
    app_service: Service


@asynccontextmanager
async def serving(settings: ServiceSettings) -> AsyncIterator[Running]:
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False)
    )

    async def serve() -> None:
        # uvicorn ends a failed start-up with sys.exit(); a SystemExit escaping a task stops the
        # event loop itself, and the test would hang instead of failing with the reason.
        try:
            await server.serve()
        except SystemExit as exc:
            raise RuntimeError(
                f"the service did not start (uvicorn exit {exc.code}); the log above says why"
            ) from None

    task = asyncio.create_task(serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if task.done():
        task.result()  # raises what stopped the start
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield Running(url=url, client=client, app_service=app.state.service)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
