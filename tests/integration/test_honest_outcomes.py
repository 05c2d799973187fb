"""Honest outcomes, on the real broker and both sandboxes: `failed` only when the money provably
did not move; settling in the till's order, once; old commands never sent; one store per group;
a refused Epin token renewed, never a failed command."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EpinSandbox, Stack
from tests.support.workload import final_results, service_env, wait_for_log
from voucher_sandboxes.localstack import (
    CommandProducer,
    ResultReader,
    SentCommand,
    start_service,
)

BOTH_STORES = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
MONEY_ROUTES_EPIN = ["transfer", "share", "delete", "create"]
# A lost answer is read again at once (nothing yet: the call lands 2.5 s after it was sent),
# settled every half second, and called `failed` only 6 s after the call.
QUICK = {
    "evoucher_read_timeout_s": 1,
    "epin_read_timeout_s": 1,
    "evoucher_apply_grace_s": 6,
    "epin_apply_grace_s": 6,
    "settle_interval_s": 0.5,
    "settle_window_s": 60,
    "epin_settle_window_s": 60,
}


def _coupons(start: int, n: int, balance: str = "40.00") -> list[dict[str, Any]]:
    return [{"id": start + i, "balance": balance, "wallet_type": "wallet1"} for i in range(n)]


async def _finals(
    reader: ResultReader, ids: set[str], settled: bool = True, timeout_s: float = 60
) -> dict[str, dict[str, Any]]:
    """Each command's last result; with `settled`, once none is indeterminate any more."""
    deadline = time.monotonic() + timeout_s
    while True:
        final = final_results(reader.records, ids)
        done = set(final) >= ids
        if done and (not settled or all(f["outcome"] != "indeterminate" for f in final.values())):
            return final
        if time.monotonic() > deadline:
            return final
        await reader.poll(0.3)


def _all_outcomes(reader: ResultReader, ids: Iterable[str]) -> Counter[str]:
    wanted = set(ids)
    return Counter(r.data["outcome"] for r in reader.records if r.data.get("command_id") in wanted)


def _create(epin: EpinSandbox, account: str, form_key: str) -> dict[str, Any]:
    token = epin.users[account]["mail_token"]
    return {
        "wallet_type": "wallet1",
        "epin_amount": "25",
        "number_of_pins": 2,
        "transferable": True,
        "reusable": False,
        "token_field": token,
        "token_checksum_field": hashlib.sha256(token.encode()).hexdigest()[:16],
        "form_key": form_key,
    }


# -- failed needs proof ---------------------------------------------------------------------------


@BOTH_STORES
async def test_money_that_moves_late_is_never_called_failed(stack: Any, epin: EpinSandbox) -> None:
    """Every money-moving call is held by the upstream past the client's timeout and applied
    2.5 s later: the first answer is `indeterminate` (nothing seen yet), never `failed`; once
    the change shows, a superseding `succeeded`; each applied exactly once."""
    s: Stack = await stack(partitions=2)
    s.use_epin(epin)
    till = s.terminal()
    codes = s.sandbox.add_vouchers("10.00", "10.00")
    base = random.randint(10_000_000, 90_000_000)
    account = epin.add_account(coupons=_coupons(base, 3))
    target = epin.add_account()
    pos: list[SentCommand] = []
    coupon: list[SentCommand] = []
    async with (
        s.service(**QUICK),
        CommandProducer(s.bootstrap, s.commands) as tills,
        CommandProducer(s.bootstrap, s.coupon_commands, source="/backoffice") as office,
        ResultReader(s.bootstrap, s.results) as pos_results,
        ResultReader(s.bootstrap, s.coupon_results) as coupon_results,
    ):
        wallets = await office.send("coupon.list_wallets", account, None)
        [listed] = await coupon_results.wait_for({wallets.id}, 20)
        form_key = listed.data["form_key"]
        pos.append(await tills.send("pos.bill_total", till, {"bill_total": "20"}))
        for code in codes:
            pos.append(await tills.send("pos.scan", till, {"voucher_code": code}))
        scanned = await pos_results.wait_for({c.id for c in pos}, 20)
        assert {r.data["outcome"] for r in scanned} == {"succeeded"}
        s.sandbox.faults(apply_late_rate=1.0, apply_delay_s=2.5, routes=["redeem_voucher_api"])
        epin.faults(apply_late_rate=1.0, apply_delay_s=2.5, routes=MONEY_ROUTES_EPIN)
        redeem = await tills.send("pos.redeem", till, {"voucher_codes": codes})
        moves = [
            ("coupon.transfer", {"user": target, "epin": base}),
            ("coupon.share", {"email": "a@example.cy", "epin": base + 1, "share_amount": "5"}),
            ("coupon.delete", {"epin": base + 2}),
            ("coupon.create", _create(epin, account, form_key)),
        ]
        for type_, data in moves:
            coupon.append(await office.send(type_, account, data))
        finals = {
            **await _finals(pos_results, {redeem.id}),
            **await _finals(coupon_results, {c.id for c in coupon}),
        }
        injected = epin.state(coupons="0")["faults"]["injected"]["apply_late"]
        firsts = {
            c: next(r.data for r in reader.records if r.data.get("command_id") == c)
            for reader, ids in (
                (pos_results, [redeem.id]),
                (coupon_results, [c.id for c in coupon]),
            )
            for c in ids
        }
        outcomes = _all_outcomes(pos_results, [redeem.id]) + _all_outcomes(
            coupon_results, [c.id for c in coupon]
        )
    assert injected >= 4
    failed = [
        r.data
        for reader in (pos_results, coupon_results)
        for r in reader.records
        if r.data["outcome"] == "failed"
    ]
    assert outcomes["failed"] == 0, json.dumps(failed, default=str)
    assert all(f["outcome"] == "succeeded" for f in finals.values()), finals
    assert all(f.get("supersedes") for f in finals.values())  # settled later, not at once
    assert all(first["outcome"] == "indeterminate" for first in firsts.values()), firsts
    # Each applied exactly once.
    assert all(v["redeem_count"] == 1 for v in s.sandbox.vouchers(codes).values())
    recorded = {c["id"]: c for c in epin.state()["coupons"]}
    assert recorded[base]["transfers"] == 1
    assert recorded[base + 1]["shares"] == 1
    assert recorded[base + 2]["deletes"] == 1
    keys = {k["key"]: k for k in epin.state(coupons="0")["form_keys"]}
    assert keys[form_key]["uses"] == 1  # the create went through once


async def test_a_redeem_that_never_applied_is_failed_only_after_the_grace(stack: Any) -> None:
    """The shop answers 504 after 0.3 s and applies nothing: `indeterminate` at first (it may
    still be under way behind the gateway), then `failed` once the grace (6 s) has passed and
    a scan still shows the vouchers unredeemed."""
    s: Stack = await stack()
    till = s.terminal()
    codes = s.sandbox.add_vouchers("10.00")
    async with (
        s.service(**QUICK),
        CommandProducer(s.bootstrap, s.commands) as tills,
        ResultReader(s.bootstrap, s.results) as results,
    ):
        bill = await tills.send("pos.bill_total", till, {"bill_total": "20"})
        scan = await tills.send("pos.scan", till, {"voucher_code": codes[0]})
        scanned = await results.wait_for({bill.id, scan.id}, 20)
        assert {r.data["outcome"] for r in scanned} == {"succeeded"}
        s.sandbox.faults(timeout_rate=1.0, timeout_sleep_s=0.3, routes=["redeem_voucher_api"])
        started = time.monotonic()
        redeem = await tills.send("pos.redeem", till, {"voucher_codes": codes})
        final = (await _finals(results, {redeem.id}))[redeem.id]
        elapsed = time.monotonic() - started
        [first, *_] = [r.data for r in results.records if r.data.get("command_id") == redeem.id]
    assert first["outcome"] == "indeterminate"
    assert (final["outcome"], final["reason"]) == ("failed", "upstream_unavailable")
    assert final["reconciled"] is True and final["supersedes"]
    assert elapsed >= QUICK["evoucher_apply_grace_s"]
    assert s.sandbox.vouchers(codes)[codes[0]]["redeem_count"] == 0


async def test_a_share_like_an_earlier_one_is_not_taken_for_it(
    stack: Any, epin: EpinSandbox
) -> None:
    s: Stack = await stack(partitions=2)
    s.use_epin(epin)
    base = random.randint(10_000_000, 90_000_000)
    account = epin.add_account(coupons=_coupons(base, 1))
    data = {"email": "a@example.cy", "epin": base, "share_amount": "2"}
    async with (
        s.service(**QUICK),
        CommandProducer(s.bootstrap, s.coupon_commands, source="/backoffice") as office,
        ResultReader(s.bootstrap, s.coupon_results) as results,
    ):
        first = await office.send("coupon.share", account, data)
        await results.wait_for({first.id}, 20)
        # The same share a moment later never applies (a gateway 504), its answer lost.
        epin.faults(timeout_rate=1.0, timeout_sleep_s=0.3, routes=["share"])
        second = await office.send("coupon.share", account, data)
        finals = await _finals(results, {first.id, second.id})
    assert finals[first.id]["outcome"] == "succeeded"
    assert finals[second.id]["outcome"] == "failed", finals[second.id]  # not the first one's
    assert {c["id"]: c for c in epin.state()["coupons"]}[base]["shares"] == 1


# -- settling in the till's order ---------------------------------------------------------------


@BOTH_STORES
async def test_settling_runs_between_the_tills_commands(stack: Any) -> None:
    """A redeem's answer is lost and the till goes straight on to the next customer, whose
    bill abandons the old payment (the redeem lands late, on nothing: it never applies). The
    service never scans the old vouchers while the redeem may still be under way (a scan would
    lock them into the new bill); after the grace it scans them once, as one block between
    the till's own calls, removes them again, and answers `failed`. The next customer's scans
    are told full amounts throughout."""
    s: Stack = await stack()
    till = s.terminal()
    old = s.sandbox.add_vouchers("10.00", "10.00")
    new = s.sandbox.add_vouchers("10.00", "10.00", "10.00")
    async with (
        s.service(**QUICK),
        CommandProducer(s.bootstrap, s.commands) as tills,
        ResultReader(s.bootstrap, s.results) as results,
    ):
        sent = [await tills.send("pos.bill_total", till, {"bill_total": "20"})]
        sent += [await tills.send("pos.scan", till, {"voucher_code": c}) for c in old]
        await results.wait_for({c.id for c in sent}, 20)
        s.sandbox.faults(apply_late_rate=1.0, apply_delay_s=2.5, routes=["redeem_voucher_api"])
        redeem = await tills.send("pos.redeem", till, {"voucher_codes": old})
        await results.wait_for({redeem.id}, 20)
        s.sandbox.faults(apply_late_rate=0)
        redeemed_at = time.time()
        # The next customers, command after command, while the redeem is being settled; the
        # last bill stays open (a lost redeem of a till can be told only while it has an
        # amount due: a scan answers nothing else).
        following: list[SentCommand] = []
        for n in range(9):
            following.append(await tills.send("pos.bill_total", till, {"bill_total": "100"}))
            for code in new:
                following.append(await tills.send("pos.scan", till, {"voucher_code": code}))
            if n < 8:
                following.append(await tills.send("pos.cancel", till, {"voucher_codes": new}))
            await asyncio.sleep(0.3)
        finals = await _finals(results, {redeem.id, *(c.id for c in following)})
    final = finals[redeem.id]
    assert (final["outcome"], final["reason"]) == ("failed", "upstream_unavailable"), final
    assert all(v["redeem_count"] == 0 for v in s.sandbox.vouchers(old).values())
    calls = s.sandbox.calls(till)
    redeem_seq = next(i for i, c in enumerate(calls) if c["route"] == "redeem_voucher_api")
    settling = [
        i for i, c in enumerate(calls) if i > redeem_seq and c["body"].get("voucher_code") in old
    ]
    # Nothing of the old vouchers while the redeem might still land.
    assert all(
        calls[i]["at"] >= redeemed_at + QUICK["evoucher_apply_grace_s"] - 1 for i in settling
    )
    # One block: each scanned and removed again, with none of the till's calls between.
    [block] = _runs(settling)
    assert [calls[i]["route"] for i in block] == ["scan_voucher_api", "remove_voucher_api"] * 2
    # The next customers' scans were told what their vouchers are worth, settling or not.
    for command in following:
        if command.type == "pos.scan":
            assert finals[command.id]["outcome"] == "succeeded", finals[command.id]
            assert finals[command.id]["amount"] == "10.00", finals[command.id]


def _runs(positions: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
async def test_two_instances_settle_each_result_once(stack: Any) -> None:
    s: Stack = await stack(partitions=4)
    tills = [s.terminal() for _ in range(6)]
    vouchers = {t: s.sandbox.add_vouchers("10.00") for t in tills}
    async with (
        s.service(**QUICK),
        s.service(**QUICK),
        CommandProducer(s.bootstrap, s.commands) as producer,
        ResultReader(s.bootstrap, s.results) as results,
    ):
        scans = [await producer.send("pos.bill_total", t, {"bill_total": "20"}) for t in tills]
        scans += [
            await producer.send("pos.scan", t, {"voucher_code": vouchers[t][0]}) for t in tills
        ]
        scanned = await results.wait_for({c.id for c in scans}, 30)
        assert {r.data["outcome"] for r in scanned} == {"succeeded"}
        s.sandbox.faults(apply_late_rate=1.0, apply_delay_s=2.5, routes=["redeem_voucher_api"])
        redeems = [
            await producer.send("pos.redeem", t, {"voucher_codes": vouchers[t]}) for t in tills
        ]
        finals = await _finals(results, {c.id for c in redeems})
        await results.settle(2.0)
    assert all(f["outcome"] == "succeeded" for f in finals.values()), finals
    superseding = Counter(
        r.event["id"] for r in results.records if r.data.get("supersedes") is not None
    )
    by_command = Counter(
        r.data["command_id"] for r in results.records if r.data.get("supersedes") is not None
    )
    # One superseding result per command (a copy, same id, may be published again).
    assert len(superseding) == len(redeems) and set(by_command) == {c.id for c in redeems}


# -- forgetting safely --------------------------------------------------------------------------


async def test_a_replay_older_than_the_retention_is_rejected_never_sent(stack: Any) -> None:
    s: Stack = await stack()
    till = s.terminal()
    codes = s.sandbox.add_vouchers("10.00")
    long_ago = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    async with (
        s.service(idempotency_retention_s=3600),
        CommandProducer(s.bootstrap, s.commands) as producer,
        ResultReader(s.bootstrap, s.results) as results,
    ):
        before = len(s.sandbox.calls(till))
        old = []
        for type_, data in [
            ("pos.bill_total", {"bill_total": "10"}),
            ("pos.scan", {"voucher_code": codes[0]}),
            ("pos.redeem", {"voucher_codes": codes}),
        ]:
            record = {
                "specversion": "1.0",
                "id": f"old-{type_}-{random.random()}",
                "source": f"/stores/test/pos/{till}",
                "type": type_,
                "subject": till,
                "time": long_ago,
                "data": data,
            }
            await producer.send_raw(
                till.encode(),
                json.dumps(record).encode(),
                [("content-type", b"application/cloudevents+json")],
            )
            old.append(record["id"])
        answered = await results.wait_for(set(old), 20)
    assert {(r.data["outcome"], r.data["reason"]) for r in answered} == {
        ("rejected", "command_expired")
    }
    assert len(s.sandbox.calls(till)) == before  # nothing sent
    assert s.sandbox.vouchers(codes)[codes[0]]["redeem_count"] == 0


async def test_an_instance_with_a_store_of_its_own_is_refused(stack: Any, tmp_path: Path) -> None:
    s: Stack = await stack()
    s.terminal()
    env = service_env(s)
    first = start_service(env, tmp_path / "first.log")
    try:
        await wait_for_log(first, "assigned", 30)
        own = start_service(
            {**env, "IDEMPOTENCY_STORE_URL": f"sqlite:///{tmp_path / 'other.sqlite3'}"},
            tmp_path / "own.log",
        )
        code = await asyncio.to_thread(own.popen.wait, 60)
        text = own.log_path.read_text()
        assert code != 0 and "IDEMPOTENCY_STORE_URL" in text, text[-2000:]
        # Sharing the first one's store, it joins.
        sharing = start_service(env, tmp_path / "sharing.log")
        try:
            await asyncio.sleep(8)
            assert sharing.alive(), sharing.log_path.read_text()[-2000:]
        finally:
            sharing.stop()
        assert first.alive()
    finally:
        first.stop()


async def test_two_instances_started_at_once_with_stores_of_their_own_send_nothing_twice(
    stack: Any, tmp_path: Path
) -> None:
    """Both start before either is in the group, so neither is refused at start; once both
    are in it, each sees the other's store is not its own and takes nothing new (or one was
    refused). No command reaches the upstream twice."""
    s: Stack = await stack()
    till = s.terminal()
    codes = s.sandbox.add_vouchers("10.00", "10.00", "10.00")
    env = service_env(s)
    one = start_service(
        {**env, "IDEMPOTENCY_STORE_URL": f"sqlite:///{tmp_path / 'one.sqlite3'}"},
        tmp_path / "one.log",
    )
    two = start_service(
        {**env, "IDEMPOTENCY_STORE_URL": f"sqlite:///{tmp_path / 'two.sqlite3'}"},
        tmp_path / "two.log",
    )
    try:
        await asyncio.sleep(8)  # both in the group (or one refused)
        async with CommandProducer(s.bootstrap, s.commands) as producer:
            await producer.send("pos.bill_total", till, {"bill_total": "30"})
            for code in codes:
                await producer.send("pos.scan", till, {"voucher_code": code})
        await asyncio.sleep(8)
        logs = [p.log_path.read_text(errors="replace") for p in (one, two)]
        running = [p for p in (one, two) if p.alive()]
        fenced = [text for text in logs if "taking no new records" in text]
        assert len(running) <= 1 or len(fenced) == 2, logs
        scans = [c for c in s.sandbox.calls(till) if c["route"] == "scan_voucher_api"]
        assert len(scans) == len({c["body"]["voucher_code"] for c in scans}), scans
    finally:
        one.stop()
        two.stop()


# -- Epin tokens refused before their exp -------------------------------------------------------


@pytest.mark.parametrize("shape", ["envelope", "simplejwt"])
async def test_a_token_refused_before_its_exp_fails_no_command(
    stack: Any, epin: EpinSandbox, shape: str
) -> None:
    s: Stack = await stack(partitions=2)
    s.use_epin(epin)
    base = random.randint(10_000_000, 90_000_000)
    account = epin.add_account(coupons=_coupons(base, 4))
    epin.admin.post("settings", json={"refused_token_shape": shape}).raise_for_status()
    try:
        async with (
            s.service(),
            CommandProducer(s.bootstrap, s.coupon_commands, source="/backoffice") as office,
            ResultReader(s.bootstrap, s.coupon_results) as results,
        ):
            ids = set()
            for n in range(4):
                ids.add((await office.send("coupon.list_active", account, None)).id)
                await results.wait_for(ids, 20)
                epin.revoke(account, "access" if n % 2 == 0 else "all")
            share = {"email": "a@example.cy", "epin": base, "share_amount": "1"}
            ids.add((await office.send("coupon.share", account, share)).id)
            finals = await _finals(results, ids)
    finally:
        epin.admin.post("settings", json={"refused_token_shape": "envelope"}).raise_for_status()
    assert {f["outcome"] for f in finals.values()} == {"succeeded"}, finals
    assert {c["id"]: c for c in epin.state()["coupons"]}[base]["shares"] == 1


async def test_a_fresh_token_refused_too_is_unauthorized_after_one_renewal(
    stack: Any, epin: EpinSandbox
) -> None:
    s: Stack = await stack(partitions=2)
    s.use_epin(epin)
    account = epin.add_account()
    ttl = epin.admin.get("settings").json()["access_ttl_s"]
    # Every access token is expired by the time it is used: the renewed one too.
    epin.admin.post("settings", json={"access_ttl_s": 0.001}).raise_for_status()
    try:
        async with (
            s.service(),
            CommandProducer(s.bootstrap, s.coupon_commands, source="/backoffice") as office,
            ResultReader(s.bootstrap, s.coupon_results) as results,
        ):
            listed = await office.send("coupon.list_active", account, None)
            [answer] = await results.wait_for({listed.id}, 20)
    finally:
        epin.admin.post("settings", json={"access_ttl_s": ttl}).raise_for_status()
    assert (answer.data["outcome"], answer.data["reason"]) == ("failed", "unauthorized")
    calls = [c["route"] for c in epin.calls(account)]
    assert calls.count("/api/v1/user/get/active-epin/") == 2  # sent, and once more renewed
