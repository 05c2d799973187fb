"""Liveness, readiness and metrics over HTTP (and the operator console, console/web.py),
served from a thread of their own.

Why a thread: the probes must tell the truth when the service's event loop cannot. A loop
blocked by a bug answers nothing, so a liveness endpoint served on it could only time out; here
liveness is judged from outside the loop and says why. The same goes for `/metrics` (an SRE
wants the figures most when the service is struggling). Readiness asks the loop itself (what is
assigned, whether the producer can send) and is false, saying so, when the loop does not
answer in time.

Liveness fails only when the process cannot make progress (a restart would help):
- the event loop has not run for `loop_blocked_s`;
- the consumer loop has not polled Kafka for `poll_idle_s` while it runs (aiokafka counts the
  time since the last fetch ended; a paused partition is still polled, so back-pressure and
  the fence do not count).
A broker or PostgreSQL outage is not a liveness failure: readiness says it, and the service
carries on by itself once they are back (a restart of every pod at once would not help).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp

log = logging.getLogger(__name__)


class LoopWatch:
    """Ticks on the event loop it runs on; any thread can read how long it has been stuck."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self._interval_s = interval_s
        self._last = time.monotonic()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        while True:
            self._last = time.monotonic()
            await asyncio.sleep(self._interval_s)

    def blocked_for(self) -> float:
        """How much longer than its tick the loop has gone without running (0 when well)."""
        return max(0.0, time.monotonic() - self._last - self._interval_s)


@dataclass(frozen=True)
class LivenessBounds:
    loop_blocked_s: float = 30.0
    poll_idle_s: float = 120.0


def liveness(
    loop_blocked_for: float, poll_idle_for: float | None, bounds: LivenessBounds
) -> dict[str, Any]:
    """The liveness report: `live`, and when not, why. `poll_idle_for` is None while the
    consumer does not run (starting, waiting for the cluster, stopping): nothing to judge."""
    report: dict[str, Any] = {"live": True, "loop_blocked_s": round(loop_blocked_for, 3)}
    if poll_idle_for is not None:
        report["poll_idle_s"] = round(poll_idle_for, 3)
    if loop_blocked_for > bounds.loop_blocked_s:
        report.update(live=False, reason=f"the event loop has not run for {loop_blocked_for:.0f} s")
    elif poll_idle_for is not None and poll_idle_for > bounds.poll_idle_s:
        report.update(live=False, reason=f"Kafka has not been polled for {poll_idle_for:.0f} s")
    return report


@dataclass
class Probes:
    """What the HTTP thread needs from the service. `readiness` and `poll_idle_s` run on the
    service's loop (the thread hands them over); `metrics` is read on the thread."""

    watch: LoopWatch
    bounds: LivenessBounds
    readiness: Callable[[], Awaitable[dict[str, Any]]]
    poll_idle_s: Callable[[], float | None]
    registry: CollectorRegistry
    readiness_timeout_s: float = 8.0
    # The operator console (console/web.py), served under /console/ beside the probes.
    console: ASGIApp | None = None


class HealthServer:
    """`/health/live`, `/health/ready` and `/metrics` on their own thread and event loop."""

    def __init__(self, probes: Probes, host: str, port: int) -> None:
        self._probes = probes
        routes: list[BaseRoute] = [
            Route("/health/live", self._live),
            Route("/health/ready", self._ready),
            Route("/metrics", self._metrics),
        ]
        if probes.console is not None:
            routes.append(Mount("/console", app=probes.console))
        app = Starlette(routes=routes)
        # The service's own loop is uvloop; this one serves a few probes a minute.
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", loop="asyncio")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="health-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)

    def _serve(self) -> None:
        # Not the main thread: uvicorn installs no signal handlers here (the service's own
        # loop handles SIGTERM and drains).
        asyncio.run(self._server.serve())

    async def _live(self, request: Request) -> Response:
        probes = self._probes
        idle = await self._on_service_loop(_as_coroutine(probes.poll_idle_s), timeout_s=1.0)
        report = liveness(
            probes.watch.blocked_for(), idle if isinstance(idle, float) else None, probes.bounds
        )
        return JSONResponse(report, status_code=200 if report["live"] else 503)

    async def _ready(self, request: Request) -> Response:
        probes = self._probes
        report = await self._on_service_loop(probes.readiness(), probes.readiness_timeout_s)
        if not isinstance(report, dict):
            report = {"ready": False, "reason": report}
        return Response(
            json.dumps(report, default=str),
            status_code=200 if report.get("ready") else 503,
            media_type="application/json",
        )

    async def _metrics(self, request: Request) -> Response:
        body = await asyncio.to_thread(generate_latest, self._probes.registry)
        return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _on_service_loop(self, work: Awaitable[Any], timeout_s: float) -> Any:
        """Run `work` on the service's loop; a string saying why not when it cannot."""
        try:
            return await on_loop(self._probes.watch.loop, work, timeout_s)
        except ServiceNotRunning as exc:
            return str(exc)
        except TimeoutError:
            return f"the service's event loop did not answer within {timeout_s:g} s"


class ServiceNotRunning(Exception):
    """The service's loop does not run (yet, or any more)."""


async def on_loop(
    loop: asyncio.AbstractEventLoop | None, work: Awaitable[Any], timeout_s: float
) -> Any:
    """Run `work` on `loop` (the service's) from this thread's loop: its answer, or
    ServiceNotRunning, or TimeoutError past `timeout_s` (the work is cancelled then)."""
    if loop is None or loop.is_closed():
        _close(work)
        raise ServiceNotRunning("the service is not running yet")
    try:
        future = asyncio.run_coroutine_threadsafe(_awaited(work), loop)
    except RuntimeError:
        _close(work)
        raise ServiceNotRunning("the service is not running") from None
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
    except TimeoutError:
        future.cancel()
        raise


async def _awaited(work: Awaitable[Any]) -> Any:
    return await work


async def _as_coroutine(value: Callable[[], Any]) -> Any:
    return value()


def _close(work: Awaitable[Any]) -> None:
    close = getattr(work, "close", None)
    if close is not None:
        close()
