"""The crash test: many tills, redeems among their commands, the service killed with SIGKILL
at random moments and restarted, the upstream injecting faults; then a second instance joins
and leaves the consumer group mid-run. Checked against what the sandbox recorded."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EpinSandbox, Stack
from tests.support.workload import service_env
from voucher_sandboxes.localstack import (
    CommandProducer,
    Process,
    ResultReader,
    SentCommand,
    start_service,
)

TILLS = 80
SESSIONS_PER_TILL = 5  # each: bill, two scans, then a redeem of both (or a cancel)
KILLS = 8


ACCOUNTS = 10
COUPONS_PER_ACCOUNT = 12  # a third transferred, a third shared from, a third deleted


def _env(s: Stack) -> dict[str, str]:
    # A lost answer is `failed` only 5 s after its call (the apply-late faults land 2 s late).
    return service_env(s, EVOUCHER_APPLY_GRACE_S="5", EPIN_APPLY_GRACE_S="5")


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_sigkill_restarts_and_a_rebalance_neither_double_apply_nor_lose(
    stack: Any, epin: EpinSandbox, tmp_path: Path
) -> None:
    s: Stack = await stack(partitions=6)
    s.use_epin(epin)
    rng = random.Random(20261121)
    first_coupon = random.Random().randint(10_000_000, 90_000_000)
    accounts = [
        epin.add_account(
            coupons=[
                {"id": first_coupon + a * COUPONS_PER_ACCOUNT + i, "balance": "40.00"}
                for i in range(COUPONS_PER_ACCOUNT)
            ]
        )
        for a in range(ACCOUNTS)
    ]
    tills = [s.terminal() for _ in range(TILLS)]
    vouchers = {t: s.sandbox.add_vouchers(*["10.00"] * (2 * SESSIONS_PER_TILL)) for t in tills}
    redeem_codes: dict[str, list[str]] = {}
    before = s.sandbox.admin.get("state", params={"vouchers": "0"}).json()["totals"]
    faults = {
        "latency_ms": 2,
        "latency_jitter_ms": 8,
        "error_rate": 0.03,
        "timeout_rate": 0.01,
        "timeout_sleep_s": 2,
        "drop_after_apply_rate": 0.04,
        # Held past the client's 1 s timeout, then applied: a late landing, never a `failed`.
        "apply_late_rate": 0.02,
        "apply_delay_s": 2,
        "seed": 7,
    }
    s.sandbox.faults(**faults)
    epin.faults(**faults)

    sent: list[SentCommand] = []
    # Coupon commands: each coupon is moved by exactly one command.
    coupon_commands: dict[str, tuple[str, int, str]] = {}  # id → (type, coupon, target)
    async with CommandProducer(s.bootstrap, s.coupon_commands, source="/backoffice") as producer:
        for i in range(COUPONS_PER_ACCOUNT):
            for a, account in enumerate(accounts):
                coupon = first_coupon + a * COUPONS_PER_ACCOUNT + i
                target = accounts[(a + 1) % ACCOUNTS]
                if i % 3 == 0:
                    data: dict[str, Any] = {"user": target, "epin": coupon}
                    command = await producer.send("coupon.transfer", account, data)
                elif i % 3 == 1:
                    data = {"email": "x@example.cy", "epin": coupon, "share_amount": "15"}
                    command = await producer.send("coupon.share", account, data)
                else:
                    command = await producer.send("coupon.delete", account, {"epin": coupon})
                coupon_commands[command.id] = (command.type, coupon, target)
                sent.append(command)
    async with CommandProducer(s.bootstrap, s.commands) as producer:
        for session in range(SESSIONS_PER_TILL):
            for till in tills:
                codes = vouchers[till][2 * session : 2 * session + 2]
                sent.append(await producer.send("pos.bill_total", till, {"bill_total": 15}))
                for code in codes:
                    sent.append(await producer.send("pos.scan", till, {"voucher_code": code}))
                if rng.random() < 0.75:
                    redeem = await producer.send("pos.redeem", till, {"voucher_codes": codes})
                    redeem_codes[redeem.id] = codes
                    sent.append(redeem)
                else:
                    sent.append(await producer.send("pos.cancel", till, {"voucher_codes": codes}))
    ids = {c.id for c in sent}
    logs = tmp_path / "logs"

    async with (
        ResultReader(s.bootstrap, s.results) as pos_reader,
        ResultReader(s.bootstrap, s.coupon_results) as coupon_reader,
    ):
        reader = _Both(pos_reader, coupon_reader)
        # Phase 1: kill -9 at random moments.
        for n in range(KILLS):
            service = start_service(_env(s), logs / f"run-{n}.log")
            await _run_for(reader, rng.uniform(1.5, 4.0))
            service.kill()
        # Phase 2: two instances; the second leaves (gracefully) in the middle.
        first = start_service(_env(s), logs / "first.log")
        second = start_service(_env(s), logs / "second.log")
        await _run_for(reader, 4.0)
        second.stop()
        try:
            await _wait_all(reader, ids, first, timeout_s=240)
            # The faults stop, so that what is indeterminate can settle; then read on.
            injected = _injected(s, epin)
            calm = {"error_rate": 0, "timeout_rate": 0, "drop_after_apply_rate": 0}
            s.sandbox.faults(**calm, apply_late_rate=0)
            epin.faults(**calm, apply_late_rate=0)
            await _run_for(reader, 8.0)  # past the 5 s grace: what did not land is failed
            await reader.settle(2.0)
        finally:
            first.stop()

    after = s.sandbox.admin.get("state", params={"vouchers": "0"}).json()
    epin_state = epin.state()
    results = reader.for_commands(ids)
    final: dict[str, dict[str, Any]] = {}
    by_result_id: dict[str, dict[str, Any]] = {}
    for r in results:
        data = r.data
        # A result published again (a replay after a crash) is the same result.
        if r.event["id"] in by_result_id:
            assert by_result_id[r.event["id"]] == _comparable(data)
        by_result_id[r.event["id"]] = _comparable(data)
        current = final.get(data["command_id"])
        if current is None or data.get("supersedes") == current["_id"]:
            final[data["command_id"]] = {**data, "_id": r.event["id"]}

    # Every command has a final result.
    assert set(final) == ids

    # No voucher redeemed twice upstream.
    state = s.sandbox.vouchers([c for codes in redeem_codes.values() for c in codes])
    assert after["totals"]["double_redemptions"] == before["double_redemptions"]
    assert all(v["redeem_count"] <= 1 for v in state.values())

    # No result contradicts what the sandbox recorded; indeterminate only for money movers.
    outcomes: Counter[str] = Counter()
    for command_id, data in final.items():
        outcomes[f"{data['command_type']}:{data['outcome']}"] += 1
        if data["outcome"] == "indeterminate":
            assert data["command_type"] in ("pos.redeem", *_MONEY_MOVING_COUPONS)
        if command_id not in redeem_codes:
            continue
        counts = {state[c]["redeem_count"] for c in redeem_codes[command_id]}
        if data["outcome"] == "succeeded":
            assert counts == {1}, (data, counts)
        elif data["outcome"] in ("rejected", "failed"):
            assert counts == {0}, (data, counts)

    # No coupon moved twice; each final result agrees with what the Epin sandbox recorded.
    recorded_by_id = {c["id"]: c for c in epin_state["coupons"]}
    for command_id, (type_, coupon, target) in coupon_commands.items():
        data, recorded = final[command_id], recorded_by_id[coupon]
        assert recorded["transfers"] <= 1 and recorded["shares"] <= 1, recorded
        assert recorded["deletes"] <= 1, recorded
        done = {
            "coupon.transfer": recorded["transfers"],
            "coupon.share": recorded["shares"],
            "coupon.delete": recorded["deletes"],
        }[type_]
        if data["outcome"] == "succeeded":
            assert done == 1, (data, recorded)
        elif data["outcome"] in ("rejected", "failed"):
            assert done == 0, (data, recorded)
        if type_ == "coupon.transfer" and done:
            assert recorded["owner"] == target

    indeterminate = sum(n for k, n in outcomes.items() if k.endswith(":indeterminate"))
    print(
        f"\ncrash test ({s.store_url.split(':')[0]}): {len(sent)} commands "
        f"({len(redeem_codes)} redeems, {len(coupon_commands)} coupon transfers, shares and "
        f"deletes), {KILLS} SIGKILLs + a rebalance; {len(results)} results "
        f"({len(results) - len(ids)} replays or superseding); faults injected {injected}; "
        f"final outcomes {dict(sorted(outcomes.items()))}; indeterminate: {indeterminate}"
    )
    # An indeterminate result needs a lost or failed answer, or a crash mid-call.
    assert indeterminate <= sum(injected.values()) + KILLS


_MONEY_MOVING_COUPONS = ("coupon.transfer", "coupon.share", "coupon.delete", "coupon.create")


def _injected(s: Stack, epin: EpinSandbox) -> dict[str, int]:
    evoucher = s.sandbox.admin.get("state", params={"vouchers": "0"}).json()
    counts = Counter(evoucher["faults"]["injected"])
    counts.update(epin.state(coupons="0")["faults"]["injected"])
    return dict(counts)


class _Both:
    """Two result readers read as one."""

    def __init__(self, *readers: ResultReader) -> None:
        self._readers = readers

    async def poll(self, timeout_s: float = 0.2) -> None:
        for reader in self._readers:
            await reader.poll(timeout_s / len(self._readers))

    async def settle(self, quiet_s: float = 1.0) -> None:
        for reader in self._readers:
            await reader.settle(quiet_s)

    def for_commands(self, ids: set[str]) -> list[Any]:
        return [r for reader in self._readers for r in reader.for_commands(ids)]


def _comparable(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "upstream"}


async def _run_for(reader: _Both, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await reader.poll(0.2)


async def _wait_all(reader: _Both, ids: set[str], service: Process, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        answered = {r.data["command_id"] for r in reader.for_commands(ids)}
        if answered >= ids:
            return
        assert service.alive(), f"the service died; see {service.log_path}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids - answered)} commands unanswered")
        await reader.poll(0.5)
        await asyncio.sleep(0)
