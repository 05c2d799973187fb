"""Worker processes (WORKERS=2), against the real broker: a worker killed with SIGKILL at
random moments mid-run is replaced, and its commands go on through the store: every command
has its one result, no voucher is redeemed twice, no till is answered out of order. The
workers' metrics are served by the service, and a stop ends them all.

The other guarantee tests (crash, ordering, commits, revocation, every record ends, honest
outcomes) run with workers on too: `make test` runs them again with WORKERS=2."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Sandbox
from tests.support.workload import (
    TillWorkload,
    check_till_results,
    http_ready,
    read_until_answered,
    service_env,
    until,
)
from voucher_sandboxes.localstack import ResultReader, free_port, start_service

TILLS = 20
BILLS = 6
KILLS = 4


def workers_of(pid: int) -> list[int]:
    """The worker processes of the service process `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) == pid and state != "Z" and b"voucher_bridge.workers.worker" in cmdline:
            found.append(int(entry))
    return sorted(found)


def _double_redemptions(sandbox: Sandbox) -> int:
    totals = sandbox.admin.get("state", params={"vouchers": "0"}).json()["totals"]
    return int(totals["double_redemptions"])


async def test_killed_workers_are_replaced_and_nothing_is_applied_twice_or_lost(
    stack: Any, tmp_path: Path
) -> None:
    s = await stack(partitions=2)
    tills = [s.terminal() for _ in range(TILLS)]
    vouchers = {t: s.sandbox.add_vouchers(*["10.00"] * (2 * BILLS)) for t in tills}
    double_before = _double_redemptions(s.sandbox)
    # Slow enough calls that a kill meets some in flight, and answers lost after the apply.
    s.sandbox.faults(latency_ms=150, drop_after_apply_rate=0.05, seed=16)
    port = free_port()
    users = json.dumps({"viewer": {"password": "seen-not-touched", "role": "viewer"}})
    service = start_service(
        service_env(s, WORKERS="2", EVOUCHER_APPLY_GRACE_S="3", CONSOLE_USERS=users),
        tmp_path / "service.log",
        http_port=port,
    )
    rng = random.Random(16)
    try:
        await until(lambda: http_ready(port), 60, "the service ready")
        first = workers_of(service.popen.pid)
        assert len(first) == 2, first
        # The tills send for about 6 s (24 commands each, 0.25 s apart), so that every kill
        # falls inside the run however fast the machine is; with 40 ms calls and 0.05 s the
        # whole run could be answered before the first kill, which then met nothing.
        workload = TillWorkload(s.bootstrap, s.commands, tills, vouchers, pause_s=0.25)
        async with workload.running(BILLS) as run:
            killed: list[int] = []
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(0.3, 0.8))
                # Both workers started (the last one killed replaced) and commands in flight.
                await until(lambda: _busy(port), 30, "both workers up, commands in flight")
                alive = workers_of(service.popen.pid)
                victim = rng.choice(alive)
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
            await run
        s.sandbox.faults(latency_ms=0, drop_after_apply_rate=0)
        ids = {c.id for c in workload.sent}
        async with ResultReader(s.bootstrap, s.results) as reader:
            await read_until_answered(reader, ids, 180, service.alive)
            await reader.settle(1.0)
            results = reader.records
        codes = [code for codes in vouchers.values() for code in codes]
        outcomes = check_till_results(
            workload,
            results,
            s.sandbox.vouchers(codes),
            _double_redemptions(s.sandbox) - double_before,
        )
        # The kills met records in flight (else this test would prove nothing of them).
        log = (tmp_path / "service.log").read_text()
        assert "handing it to the worker's replacement" in log
        # Replaced: two workers again, none of the killed ones.
        await until(lambda: _two_workers(service.popen.pid), 30, "two workers")
        now = workers_of(service.popen.pid)
        assert not set(now) & set(killed)
        # The workers' metrics, served by the service, each series by worker.
        text = (await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/metrics")).text
        lost = _sample(text, "voucher_bridge_workers_lost_total")
        assert lost >= KILLS, lost
        assert 'voucher_bridge_worker="0"' in text and 'voucher_bridge_worker="1"' in text
        assert 'voucher_bridge_worker="service"' in text
        # Commands were answered in the workers (a killed worker's counts go with it, as a
        # restarted process's do: Prometheus reads that as a counter reset).
        assert any(
            line.startswith("voucher_bridge_commands_total{")
            and 'voucher_bridge_worker="service"' not in line
            for line in text.splitlines()
        )
        # The console's overview counts what the workers answered, and their circuits.
        overview = (
            await asyncio.to_thread(
                httpx.get,
                f"http://127.0.0.1:{port}/console/api/overview",
                auth=("viewer", "seen-not-touched"),
            )
        ).json()
        # (a killed worker's since its last report, 2 s or less before the kill, go with it)
        assert sum(overview["outcome_totals"].values()) > 0, overview
        assert {u["name"]: u["breaker"] for u in overview["upstreams"]}["evoucher"] == "closed"
        # Ready again once the last replacement is (it takes a second or two to start).
        await until(lambda: http_ready(port), 30, "ready, with both workers up")
        url = f"http://127.0.0.1:{port}/health/ready"
        assert (await asyncio.to_thread(httpx.get, url)).json()["workers"] is True
        print(
            f"\nworkers: {len(ids)} commands from {TILLS} tills, {KILLS} workers killed "
            f"({lost:.0f} lost and replaced); {len(results)} results; final outcomes "
            f"{dict(sorted(outcomes.items()))}"
        )
    finally:
        children = workers_of(service.popen.pid)
        code = service.stop()
    assert code == 0
    deadline = time.monotonic() + 10
    while _running(children):
        assert time.monotonic() < deadline, "workers left running after the service stopped"
        await asyncio.sleep(0.1)


async def _two_workers(pid: int) -> bool:
    return len(workers_of(pid)) == 2


async def _busy(port: int) -> bool:
    """Every worker ready, and at least four commands in flight."""
    url = f"http://127.0.0.1:{port}/health/ready"
    state = (await asyncio.to_thread(httpx.get, url, timeout=6)).json()
    return state.get("workers") is True and state.get("in_flight", 0) >= 4


def _running(pids: list[int]) -> bool:
    return any(Path(f"/proc/{pid}").exists() for pid in pids)


def _sample(text: str, name: str) -> float:
    """The sum of a metric's samples in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_a_frozen_worker_is_killed_and_its_commands_go_on(stack: Any, tmp_path: Path) -> None:
    """A worker whose event loop says nothing (here SIGSTOP: as a loop blocked for good) is
    killed after LIVENESS_LOOP_BLOCKED_S and replaced; its commands are answered."""
    s = await stack(partitions=1)
    tills = [s.terminal() for _ in range(8)]
    vouchers = {t: s.sandbox.add_vouchers(*["10.00"] * 4) for t in tills}
    double_before = _double_redemptions(s.sandbox)
    s.sandbox.faults(latency_ms=100)  # the frozen worker has calls in flight
    port = free_port()
    service = start_service(
        service_env(s, WORKERS="2", LIVENESS_LOOP_BLOCKED_S="3"),
        tmp_path / "service.log",
        http_port=port,
    )
    try:
        await until(lambda: http_ready(port), 60, "the service ready")
        workload = TillWorkload(s.bootstrap, s.commands, tills, vouchers, pause_s=0.1)
        async with workload.running(2) as run:
            await asyncio.sleep(0.3)
            frozen = workers_of(service.popen.pid)[0]
            os.kill(frozen, signal.SIGSTOP)
            await run
        ids = {c.id for c in workload.sent}
        async with ResultReader(s.bootstrap, s.results) as reader:
            await read_until_answered(reader, ids, 120, service.alive)
            await reader.settle(1.0)
            results = reader.records
        codes = [code for codes in vouchers.values() for code in codes]
        check_till_results(
            workload,
            results,
            s.sandbox.vouchers(codes),
            _double_redemptions(s.sandbox) - double_before,
        )
        log = (tmp_path / "service.log").read_text()
        assert f"(pid {frozen}) has said nothing" in log
        assert frozen not in workers_of(service.popen.pid)
    finally:
        code = service.stop()
    assert code == 0
