"""Coupon commands end to end: Kafka → voucher-bridge → the Epin sandbox → coupon.results."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import pytest

from tests.conftest import EpinSandbox, Stack
from voucher_contracts import result_id
from voucher_sandboxes.localstack import CommandProducer, ResultReader

BOTH_STORES = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)


def coupons(*balances: str, start: int, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"id": start + i, "balance": b, "wallet_type": "wallet1", **extra}
        for i, b in enumerate(balances)
    ]


async def _stack(stack: Any, epin: EpinSandbox) -> Stack:
    s: Stack = await stack(partitions=2)
    s.use_epin(epin)
    return s


async def _run(
    s: Stack, commands: list[tuple[str, str, dict[str, Any] | None]], **overrides: Any
) -> list[dict[str, Any]]:
    """Send the commands in order; the result data of each, in the same order."""
    async with (
        s.service(**overrides),
        CommandProducer(s.bootstrap, s.coupon_commands, source="/backoffice") as producer,
    ):
        sent = [await producer.send(t, account, data) for account, t, data in commands]
        async with ResultReader(s.bootstrap, s.coupon_results) as reader:
            results = await reader.wait_for({c.id for c in sent}, 60)
    by_id = {r.data["command_id"]: r for r in results}
    for command in sent:
        result = by_id[command.id]
        assert result.event["id"] == result_id(command.source, command.id)
        assert result.event["type"] == command.type + ".result"
        assert result.key == command.subject.encode()
    return [by_id[c.id].data for c in sent]


def _new_id() -> int:
    import random

    return random.randint(100_000, 9_000_000)


async def test_every_coupon_command_end_to_end(stack: Any, epin: EpinSandbox) -> None:
    s = await _stack(stack, epin)
    base = _new_id()
    held = coupons(*["10.00"] * 23, "30.00", "40.00", start=base)
    pin = held[0]["pin"] = "".join(
        secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(12)
    )
    owner = epin.add_account(coupons=held)
    target = epin.add_account()
    token = epin.users[owner]["mail_token"]
    checksum = hashlib.sha256(token.encode()).hexdigest()[:16]
    listed, wallets = await _run(
        s, [(owner, "coupon.list_active", None), (owner, "coupon.list_wallets", None)]
    )
    assert listed["outcome"] == "succeeded"
    assert listed["count"] == 25  # three pages of 10, followed to the end
    assert {c["id"] for c in listed["coupons"]} == set(range(base, base + 25))
    # PINs are bearer value: masked in coupon.results by default (COUPON_RESULT_PINS).
    assert {c["pin"] for c in listed["coupons"]} == {"****"}
    form_key = wallets["form_key"]
    assert wallets["wallets"][0]["wallet_type"] == "wallet1"

    results = await _run(
        s,
        [
            (owner, "coupon.list_active", {"code": pin}),
            (owner, "coupon.transfer", {"user": target, "epin": base}),
            (
                owner,
                "coupon.share",
                {"email": "a@example.cy", "epin": base + 24, "share_amount": "12.50"},
            ),
            (
                owner,
                "coupon.share",
                {"email": "a@example.cy", "epin": base + 23, "share_amount": "500"},
            ),
            (owner, "coupon.delete", {"epin": base + 2}),
            (owner, "coupon.refund_status", {"epin": base + 2}),
            (
                owner,
                "coupon.create",
                {
                    "wallet_type": "wallet1",
                    "epin_amount": "25",
                    "number_of_pins": 2,
                    "transferable": True,
                    "reusable": False,
                    "token_field": token,
                    "token_checksum_field": checksum,
                    "form_key": form_key,
                },
            ),
            (
                owner,
                "coupon.create",
                {
                    "wallet_type": "wallet1",
                    "epin_amount": "25",
                    "number_of_pins": 2,
                    "transferable": True,
                    "reusable": False,
                    "token_field": token,
                    "token_checksum_field": checksum,
                    "form_key": form_key,
                },
            ),
            (owner, "coupon.history", {"wallet": "wallet1"}),
        ],
    )
    one, transfer, share, too_much, delete, status, create, reused_key, history = results
    assert one["count"] == 1
    assert (transfer["outcome"], transfer["user"]) == ("succeeded", target)
    assert share["outcome"] == "succeeded"
    assert share["share_amount"] == "12.50" and share["balance"] == "27.50"
    assert (too_much["outcome"], too_much["reason"]) == ("rejected", "validation_error")
    assert too_much["errors"] == {"share_amount": ["Insufficient Balance."]}
    assert delete["outcome"] == "succeeded" and delete["refund_status"] == "refunded"
    assert status["refund_status"] == "refunded"
    assert create["outcome"] == "succeeded" and len(create["coupons"]) == 2
    assert (reused_key["reason"], reused_key["errors"]) == (
        "validation_error",
        {"form_key": ["You have another form running, Please reload."]},
    )
    assert history["outcome"] == "succeeded" and history["count"] >= 4
    for data in results:
        assert token not in str(data) and checksum not in str(data)


async def test_refusals_become_the_right_results(stack: Any, epin: EpinSandbox) -> None:
    s = await _stack(stack, epin)
    base = _new_id()
    owner = epin.add_account(
        coupons=[
            *coupons("20.00", start=base),
            *coupons("20.00", start=base + 1, transferable=False),
        ]
    )
    closed = epin.add_account(facility_enabled=False)
    wrong = epin.add_account()
    epin.users[wrong] = {**epin.users[wrong], "password": "not-the-password"}
    results = await _run(
        s,
        [
            (owner, "coupon.transfer", {"user": "nobody-by-that-name", "epin": base}),
            (owner, "coupon.transfer", {"user": owner, "epin": base}),
            (owner, "coupon.transfer", {"user": closed, "epin": 999_999_999}),
            (owner, "coupon.transfer", {"user": closed, "epin": base + 1}),
            (owner, "coupon.share", {"email": "not-an-email", "epin": base, "share_amount": "1"}),
            (closed, "coupon.list_wallets", None),
            (wrong, "coupon.list_active", None),
            ("no-such-account", "coupon.list_active", None),
            (owner, "coupon.share", {"email": "a@example.cy", "epin": base, "share_amount": 1.5}),
        ],
    )
    reasons = [(r["outcome"], r.get("reason")) for r in results]
    assert reasons == [
        ("rejected", "validation_error"),
        ("rejected", "validation_error"),
        ("rejected", "validation_error"),
        ("rejected", "validation_error"),
        ("rejected", "validation_error"),
        ("rejected", "facility_disabled"),
        ("failed", "unauthorized"),
        ("rejected", "unknown_account"),
        ("succeeded", None),  # a JSON number is read as an exact decimal
    ]
    assert results[0]["errors"] == {"user": ["User is not found."]}
    assert results[1]["errors"] == {"user": ["Self transfer not allowed."]}
    assert results[2]["errors"] == {"epin": ["Coupon is not found."]}
    assert results[3]["errors"] == {"epin": ["Coupon is not transferable."]}
    assert results[4]["errors"] == {"email": ["Enter a valid email address."]}
    assert results[5]["message"].startswith("Coupon facility is disabled")
    assert results[6]["message"] == "Authentication failed"


async def test_an_expired_access_token_is_renewed_without_a_failed_command(
    stack: Any, epin: EpinSandbox
) -> None:
    s = await _stack(stack, epin)
    owner = epin.add_account(coupons=coupons("10.00", start=_new_id()))
    before = epin.state(coupons="0")["counters"]
    async with (
        s.service(),
        CommandProducer(s.bootstrap, s.coupon_commands, source="/backoffice") as producer,
        ResultReader(s.bootstrap, s.coupon_results) as reader,
    ):
        ids = set()
        for round_ in range(3):
            for _ in range(5):
                ids.add((await producer.send("coupon.list_active", owner, None)).id)
            await reader.wait_for(ids, 30)
            if round_ == 0:
                epin.admin.post("expire-tokens").raise_for_status()
            if round_ == 1:
                epin.admin.post("expire-tokens", json={"refresh": True}).raise_for_status()
    outcomes = {r.data["outcome"] for r in reader.for_commands(ids)}
    assert outcomes == {"succeeded"}
    after = epin.state(coupons="0")["counters"]
    assert after["refreshes"] - before["refreshes"] >= 1  # renewed by refreshing...
    assert after["logins"] - before["logins"] == 2  # ...and by logging in again when that failed


@BOTH_STORES
async def test_money_moving_coupon_commands_are_applied_once(stack: Any, epin: EpinSandbox) -> None:
    """Answers lost after the upstream acted: reconciled, never sent again; a duplicate
    command makes no second call."""
    s = await _stack(stack, epin)
    base = _new_id()
    owner = epin.add_account(coupons=coupons("50.00", "50.00", "50.00", start=base))
    target = epin.add_account()
    epin.faults(drop_after_apply_rate=1.0, routes=["transfer", "share", "delete"])
    async with (
        s.service(),
        CommandProducer(s.bootstrap, s.coupon_commands, source="/backoffice") as producer,
        ResultReader(s.bootstrap, s.coupon_results) as reader,
    ):
        transfer = await producer.send("coupon.transfer", owner, {"user": target, "epin": base})
        share = await producer.send(
            "coupon.share",
            owner,
            {"email": "x@example.cy", "epin": base + 1, "share_amount": "20"},
        )
        delete = await producer.send("coupon.delete", owner, {"epin": base + 2})
        ids = {transfer.id, share.id, delete.id}
        await reader.wait_for(ids, 60)
        epin.faults(drop_after_apply_rate=0, routes=None)
        again = await producer.send(
            "coupon.share",
            owner,
            {"email": "x@example.cy", "epin": base + 1, "share_amount": "20"},
            command_id=share.id,
            source=share.source,
        )
        # The delete's refund-status query goes to the same (faulty) route: it may come out
        # indeterminate first and be superseded once the upstream answers again.
        while len(reader.for_commands({again.id})) < 2 or any(
            _final(reader, c.id)["outcome"] == "indeterminate" for c in (transfer, share, delete)
        ):
            await reader.poll(0.2)
    for command in (transfer, share, delete):
        data = _final(reader, command.id)
        assert (data["outcome"], data.get("reconciled")) == ("succeeded", True), data
    state = {c["id"]: c for c in epin.state(coupons=f"{base},{base + 1},{base + 2}")["coupons"]}
    assert state[base]["transfers"] == 1 and state[base]["owner"] == target
    assert state[base + 1]["shares"] == 1 and state[base + 1]["balance"] == "30.00"
    assert state[base + 2]["deletes"] == 1


def _final(reader: ResultReader, command_id: str) -> dict[str, Any]:
    """The last word on a command: a superseding result wins over the one it supersedes."""
    results = reader.for_commands({command_id})
    superseded = {r.data.get("supersedes") for r in results}
    return next(r.data for r in reversed(results) if r.event["id"] not in superseded)
