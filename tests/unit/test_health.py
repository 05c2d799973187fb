"""Probes from a thread of their own: liveness judged from outside the service's loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from voucher_bridge.health import HealthServer, LivenessBounds, LoopWatch, Probes, liveness
from voucher_sandboxes.localstack import free_port

BOUNDS = LivenessBounds(loop_blocked_s=1.0, poll_idle_s=5.0)


def test_liveness_fails_only_on_a_blocked_loop_or_a_consumer_that_stopped_polling() -> None:
    assert liveness(0.0, 0.1, BOUNDS)["live"]
    assert liveness(0.0, None, BOUNDS)["live"]  # not consuming (starting, cluster away)
    blocked = liveness(2.5, 0.1, BOUNDS)
    assert not blocked["live"] and blocked["reason"] == "the event loop has not run for 2 s"
    idle = liveness(0.0, 9.0, BOUNDS)
    assert not idle["live"] and idle["reason"] == "Kafka has not been polled for 9 s"


class State:
    poll_idle: float | None = 0.2
    ready: dict[str, Any] = {"ready": True, "partitions": ["t[0]"]}


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, LoopWatch, State]]:
    watch = LoopWatch(interval_s=0.05)
    ticking = asyncio.create_task(watch.run())
    state = State()
    registry = CollectorRegistry()
    Counter("probe_test_total", "a metric", registry=registry).inc()

    async def readiness() -> dict[str, Any]:
        return state.ready

    probes = Probes(watch, BOUNDS, readiness, lambda: state.poll_idle, registry, 1.0)
    port = free_port()
    health = HealthServer(probes, "127.0.0.1", port)
    health.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            await asyncio.to_thread(httpx.get, url + "/health/live", timeout=1)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    yield url, watch, state
    health.stop()
    ticking.cancel()


async def get(url: str) -> httpx.Response:
    return await asyncio.to_thread(httpx.get, url, timeout=5)


async def test_probes_and_metrics(server: tuple[str, LoopWatch, State]) -> None:
    url, _, state = server
    live = await get(url + "/health/live")
    assert live.status_code == 200 and live.json()["live"] is True
    ready = await get(url + "/health/ready")
    assert ready.status_code == 200 and ready.json()["partitions"] == ["t[0]"]
    state.ready = {"ready": False, "broker": False, "reason": "authentication failed"}
    not_ready = await get(url + "/health/ready")
    assert not_ready.status_code == 503 and not_ready.json()["reason"] == "authentication failed"
    state.poll_idle = 30.0
    idle = await get(url + "/health/live")
    assert idle.status_code == 503 and "not been polled" in idle.json()["reason"]
    assert "probe_test_total 1.0" in (await get(url + "/metrics")).text


async def test_a_blocked_loop_makes_liveness_false_and_readiness_says_why(
    server: tuple[str, LoopWatch, State],
) -> None:
    url, _, _ = server
    seen: dict[str, httpx.Response] = {}

    def probe() -> None:
        time.sleep(1.6)  # while the loop below is blocked
        seen["live"] = httpx.get(url + "/health/live", timeout=5)
        seen["ready"] = httpx.get(url + "/health/ready", timeout=5)
        seen["metrics"] = httpx.get(url + "/metrics", timeout=5)

    prober = threading.Thread(target=probe)
    prober.start()
    time.sleep(4.0)  # a bug: the service's loop does not run
    prober.join()
    assert seen["live"].status_code == 503
    assert seen["live"].json()["reason"].startswith("the event loop has not run for")
    assert seen["ready"].status_code == 503
    assert "did not answer" in seen["ready"].json()["reason"]
    assert seen["metrics"].status_code == 200  # the figures stay readable
    await asyncio.sleep(0.2)
    assert (await get(url + "/health/live")).status_code == 200  # and well again
