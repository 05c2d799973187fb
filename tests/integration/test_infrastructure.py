"""The service survives its infrastructure, as processes, with tills at work: the Kafka broker
restarted (stopped, 10 s, started), PostgreSQL restarted, the upstream hanging for longer than
the drain timeout while the group rebalances. Afterwards every command has its one result, no
voucher was redeemed twice, no till was answered out of order, and the same service process
goes on answering without a restart of its own. And a stop (SIGTERM) while the broker is away
still ends within its bound, the next instance answering what it left."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Sandbox, Stack
from tests.support.infra import PrivateBroker, PrivatePostgres
from tests.support.kafka import create_topic
from tests.support.workload import (
    TillWorkload,
    check_till_results,
    http_ready,
    read_until_answered,
    service_env,
    until,
    wait_for_log,
)
from voucher_bridge.serving import SHUTDOWN_MARGIN_S, UNFINISHED_STOP_STATUS
from voucher_sandboxes.localstack import (
    CommandProducer,
    Process,
    ResultReader,
    free_port,
    start_service,
)

TILLS = 10
BILLS = 4


async def _topics(s: Stack, partitions: int = 3) -> None:
    for topic in (s.commands, s.results, s.dlq, s.coupon_commands, s.coupon_results, s.coupon_dlq):
        await create_topic(s.bootstrap, topic, partitions)


def _tills(s: Stack, bills: int = BILLS) -> tuple[list[str], dict[str, list[str]]]:
    tills = [s.terminal() for _ in range(TILLS)]
    return tills, {t: s.sandbox.add_vouchers(*["10.00"] * (2 * bills)) for t in tills}


def _double_redemptions(sandbox: Sandbox) -> int:
    totals = sandbox.admin.get("state", params={"vouchers": "0"}).json()["totals"]
    return int(totals["double_redemptions"])


@asynccontextmanager
async def _on_a_broker_of_its_own(
    sandbox: Sandbox, tmp_path: Path
) -> AsyncIterator[tuple[PrivateBroker, Stack]]:
    """A broker only this test uses (it stops it), the topics on it, and a SQLite store."""
    broker = PrivateBroker(tmp_path / "kafka")
    await asyncio.to_thread(broker.up)
    try:
        s = Stack(broker.bootstrap, sandbox, f"sqlite:///{tmp_path / 'store.sqlite3'}")
        await _topics(s)
        yield broker, s
    finally:
        await asyncio.to_thread(broker.down)


async def _finish(
    s: Stack, workload: TillWorkload, service: Process, double_before: int, label: str
) -> dict[str, int]:
    """Wait for every answer, check the guarantees, and that the same process still answers."""
    ids = {c.id for c in workload.sent}
    async with ResultReader(s.bootstrap, s.results) as reader:
        await read_until_answered(reader, ids, 180, service.alive)
        async with CommandProducer(s.bootstrap, s.commands) as producer:
            after = await producer.send("pos.bill_total", workload.tills[0], {"bill_total": "1"})
        await read_until_answered(reader, {after.id}, 30, service.alive)
        await reader.settle(1.0)
        results = reader.records
    codes = [code for codes in workload.vouchers.values() for code in codes]
    outcomes = check_till_results(
        workload,
        results,
        s.sandbox.vouchers(codes),
        _double_redemptions(s.sandbox) - double_before,
    )
    assert service.alive()
    print(
        f"\n{label}: {len(workload.sent)} commands from {len(workload.tills)} tills "
        f"({workload.resends} sent again by the tills meanwhile), {len(results)} results; "
        f"final outcomes {dict(sorted(outcomes.items()))}"
    )
    return outcomes


async def _probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    response = await asyncio.to_thread(
        httpx.get, f"http://127.0.0.1:{port}/health/{path}", timeout=6
    )
    return response.status_code, response.json()


async def test_a_broker_restart_mid_run(sandbox: Sandbox, tmp_path: Path) -> None:
    """...and the probes through it: liveness true all along (a restart would not help),
    readiness false saying the broker is away, then ready again without a restart."""
    async with _on_a_broker_of_its_own(sandbox, tmp_path) as (broker, s):
        service: Process | None = None
        try:
            tills, vouchers = _tills(s)
            double_before = _double_redemptions(sandbox)
            port = free_port()
            service = start_service(service_env(s), tmp_path / "service.log", http_port=port)
            # Ready first (its workers started: a few seconds on a busy machine), then at work.
            await until(lambda: http_ready(port), 60, "the service ready")
            workload = TillWorkload(broker.bootstrap, s.commands, tills, vouchers, pause_s=0.4)
            async with workload.running(BILLS) as run:
                await asyncio.sleep(3)  # commands flowing
                status, report = await _probe(port, "ready")
                assert status == 200, report
                await asyncio.to_thread(broker.down)
                lives, readies = [], []
                for _ in range(8):
                    await asyncio.sleep(1.2)
                    lives.append(await _probe(port, "live"))
                    readies.append(await _probe(port, "ready"))
                await asyncio.to_thread(broker.up)
                assert all(status == 200 and body["live"] for status, body in lives), lives
                status, report = readies[-1]
                assert status == 503 and not report["ready"] and not report["broker"], report
                assert not report["producer"] and "producer" in report["why"], report
                await asyncio.wait_for(run, 180)
            deadline = time.monotonic() + 60
            while (await _probe(port, "ready"))[0] != 200:
                assert time.monotonic() < deadline, "not ready again after the broker came back"
                await asyncio.sleep(0.5)
            await _finish(s, workload, service, double_before, "broker restart")
        finally:
            if service is not None:
                service.stop()


async def test_a_postgres_restart_mid_run(
    kafka_bootstrap: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    postgres = PrivatePostgres()
    url = await asyncio.to_thread(postgres.up)
    service: Process | None = None
    try:
        s = Stack(kafka_bootstrap, sandbox, url)
        await _topics(s)
        tills, vouchers = _tills(s)
        double_before = _double_redemptions(sandbox)
        service = start_service(service_env(s), tmp_path / "service.log")
        workload = TillWorkload(kafka_bootstrap, s.commands, tills, vouchers, pause_s=0.4)
        async with workload.running(BILLS) as run:
            await asyncio.sleep(4)
            await asyncio.to_thread(postgres.down)
            await asyncio.sleep(8)
            await asyncio.to_thread(postgres.up)
            await asyncio.wait_for(run, 180)
        outcomes = await _finish(s, workload, service, double_before, "PostgreSQL restart")
        # The outage (8 s) was well inside a command's bound: nothing was answered `failed`.
        assert not [k for k in outcomes if k.endswith(":failed")], outcomes
    finally:
        if service is not None:
            service.stop()
        await asyncio.to_thread(postgres.remove)


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_an_upstream_hanging_past_the_drain_timeout_during_a_rebalance(
    stack: Any, tmp_path: Path
) -> None:
    """Scans hang (15 s) when a second instance joins: the first one's drain gives up after
    1 s and cancels them. Their claims are given back at once, so the new owner resumes them
    straight away: with `INSTANCE_STALE_AFTER_S` at 120 s, waiting for the first instance to
    look dead would take minutes."""
    s: Stack = await stack(partitions=3)
    tills, vouchers = _tills(s, bills=1)
    double_before = _double_redemptions(s.sandbox)
    env = service_env(
        s,
        DRAIN_TIMEOUT_S="1",
        EVOUCHER_READ_TIMEOUT_S="30",
        INSTANCE_STALE_AFTER_S="120",
        SESSION_TIMEOUT_MS="10000",
    )
    workload = TillWorkload(s.bootstrap, s.commands, tills, vouchers, pause_s=0)
    first = start_service(env, tmp_path / "first.log")
    second: Process | None = None
    try:
        s.sandbox.faults(latency_ms=15_000, routes=["scan_voucher_api"])
        started = time.monotonic()
        async with workload.running(1) as run:
            await asyncio.sleep(3)  # the first scans hang in the first instance
            second = start_service(env, tmp_path / "second.log")
            await wait_for_log(first, "drain timed out", within_s=30)
            s.sandbox.faults(latency_ms=0, routes=None)
            await asyncio.wait_for(run, 120)
        await _finish(s, workload, first, double_before, "upstream hanging during a rebalance")
        assert time.monotonic() - started < 60
        assert second.alive()
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_a_stop_while_the_broker_is_away_ends_within_its_bound(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """SIGTERM with calls in flight and the broker gone (a node drained during an outage): the
    process still ends within DRAIN_TIMEOUT_S + the margin that terminationGracePeriodSeconds
    covers, with status 70 and saying so where its results and commits could not be made, and
    the next instance answers every command once, through the store: the drain gave up calls
    whose outcome it could not know."""
    async with _on_a_broker_of_its_own(sandbox, tmp_path) as (broker, s):
        first: Process | None = None
        second: Process | None = None
        try:
            tills, vouchers = _tills(s)
            double_before = _double_redemptions(sandbox)
            drain_timeout_s = 5.0
            env = service_env(s, DRAIN_TIMEOUT_S=str(drain_timeout_s), EVOUCHER_READ_TIMEOUT_S="15")
            port = free_port()
            first = start_service(env, tmp_path / "first.log", http_port=port)
            await until(lambda: http_ready(port), 60, "the service ready")
            sandbox.faults(latency_ms=3000)  # calls in flight when the broker goes, then the stop
            workload = TillWorkload(broker.bootstrap, s.commands, tills, vouchers, pause_s=0.2)
            async with workload.running(BILLS) as run:

                async def busy() -> bool:
                    return (await _probe(port, "ready"))[1]["in_flight"] >= 5

                await until(busy, 30, "commands in flight")
                await asyncio.to_thread(broker.down)
                started = time.monotonic()
                status = first.stop(timeout_s=drain_timeout_s + SHUTDOWN_MARGIN_S + 30)
                took = time.monotonic() - started
                assert took < drain_timeout_s + SHUTDOWN_MARGIN_S + 1, took
                log = (tmp_path / "first.log").read_text()
                assert "drain timed out" in log
                assert status in (0, UNFINISHED_STOP_STATUS), status
                if status == UNFINISHED_STOP_STATUS:
                    assert "the stop did not finish within" in log
                sandbox.faults(latency_ms=0)
                await asyncio.to_thread(broker.up)
                second = start_service(env, tmp_path / "second.log")
                await asyncio.wait_for(run, 180)
            print(f"\nstopped with the broker away: status {status} after {took:.1f} s")
            await _finish(s, workload, second, double_before, "a stop with the broker away")
        finally:
            sandbox.faults(latency_ms=0)
            for service in (first, second):
                if service is not None:
                    service.stop()
