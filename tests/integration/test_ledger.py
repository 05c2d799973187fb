"""A ledger books from the results alone (issue 15): the reference ledger (examples/ledger.py)
reads pos.results and its books match, to the cent, what the sandbox itself recorded as paid,
across a restart of the service mid-bill, removals, re-scans, cancels, and a redeem whose
answer was lost (settled by reconciling)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from examples.ledger import Ledger
from tests.conftest import Stack
from voucher_sandboxes.localstack import CommandProducer, ResultReader, SentCommand

pytestmark = pytest.mark.kafka


async def _play(
    s: Stack, steps: list[tuple[str, str, dict[str, Any] | None]], **service: Any
) -> list[SentCommand]:
    sent = []
    async with (
        s.service(**service),
        CommandProducer(s.bootstrap, s.commands) as producer,
        ResultReader(s.bootstrap, s.results) as reader,
    ):
        for till, type_, data in steps:
            command = await producer.send(type_, till, data)
            sent.append(command)
            await reader.wait_for({command.id}, 30)  # a till waits for each answer
    return sent


async def test_the_reference_ledger_books_what_the_sandbox_recorded_as_paid(stack: Any) -> None:
    s: Stack = await stack(partitions=2)
    a, b, c = s.terminal(), s.terminal(), s.terminal()
    a50, a20, a30 = s.sandbox.add_vouchers("50.00", "20.00", "30.00")
    b10, b50 = s.sandbox.add_vouchers("10.00", "50.00")
    c40 = s.sandbox.add_vouchers("40.00")[0]

    # Till A: a bill, a voucher removed and scanned again, then the service restarts mid-bill.
    first = await _play(
        s,
        [
            (a, "pos.bill_total", {"bill_total": "120.00"}),
            (a, "pos.scan", {"voucher_code": a50}),
            (a, "pos.scan", {"voucher_code": a20}),
            (a, "pos.remove", {"voucher_code": a20}),
            (a, "pos.scan", {"voucher_code": a30}),
            (a, "pos.scan", {"voucher_code": a20}),
            # Till B: a payment cancelled, then a new bill smaller than the voucher.
            (b, "pos.bill_total", {"bill_total": "30.00"}),
            (b, "pos.scan", {"voucher_code": b10}),
            (b, "pos.cancel", {"voucher_codes": [b10]}),
            (b, "pos.bill_total", {"bill_total": "25.00"}),
            (b, "pos.scan", {"voucher_code": b50}),
        ],
    )
    # A new service process (the bill comes back from the store, not from memory).
    second = await _play(
        s,
        [
            (a, "pos.redeem", {"voucher_codes": [a50, a30, a20]}),
            (b, "pos.redeem", {"voucher_codes": [b50]}),
            (c, "pos.bill_total", {"bill_total": "100.00"}),
            (c, "pos.scan", {"voucher_code": c40}),
        ],
    )
    # Till C: the redeem applies upstream but its answer is lost: reconciled by scanning.
    s.sandbox.faults(drop_after_apply_rate=1.0, routes=["redeem_voucher_api"])
    try:
        third = await _play(s, [(c, "pos.redeem", {"voucher_codes": [c40]})])
    finally:
        s.sandbox.faults(drop_after_apply_rate=0.0, routes=None)

    ledger = Ledger()
    async with ResultReader(s.bootstrap, s.results) as reader:
        results = await reader.wait_for({cmd.id for cmd in first + second + third}, 30)
        await reader.settle(1.0)
        for r in reader.records:  # every copy, in the topic's order
            ledger.take(r.event)
    by_id = {r.data["command_id"]: r.data for r in results}

    a_redeem, b_redeem = by_id[second[0].id], by_id[second[1].id]
    assert a_redeem["outcome"] == "succeeded"
    assert a_redeem["vouchers"] == [
        {"code": a50, "amount": "50.00"},
        {"code": a30, "amount": "30.00"},
        {"code": a20, "amount": "20.00"},
    ]
    assert (a_redeem["vouchers_total"], a_redeem["bill_total"], a_redeem["remaining_due"]) == (
        "100.00",
        "120.00",
        "20.00",
    )
    assert a_redeem["bill_id"] == by_id[first[0].id]["bill_id"] and a_redeem["terminal"] == a
    assert a_redeem["store"] == "demo"  # CommandProducer's source: /stores/demo/pos
    # What remained due after each step of till A, as the results said it.
    assert [by_id[cmd.id]["remaining_due"] for cmd in first[:6]] == [
        "120.00",
        "70.00",
        "50.00",
        "70.00",
        "40.00",
        "20.00",
    ]
    cancel = by_id[first[8].id]
    assert cancel["vouchers"] == [{"code": b10, "amount": "10.00"}]
    assert b_redeem["vouchers"] == [{"code": b50, "amount": "25.00"}]  # capped by the bill
    assert b_redeem["bill_id"] == by_id[first[9].id]["bill_id"] != by_id[first[6].id]["bill_id"]
    c_redeem = by_id[third[0].id]
    assert c_redeem["outcome"] == "succeeded" and c_redeem.get("reconciled") is True
    assert c_redeem["vouchers"] == [{"code": c40, "amount": "40.00"}]

    # The books, from the results alone, against the sandbox's own record, to the cent.
    codes = [a50, a20, a30, b10, b50, c40]
    state = s.sandbox.vouchers(codes)
    recorded = {
        code: Decimal(v["paid"]) for code, v in state.items() if v["redeemed"] and v["paid"]
    }
    assert set(recorded) == {a50, a20, a30, b50, c40}  # b10 was released, never paid
    assert ledger.paid() == recorded
    assert ledger.set_aside == []
    assert all(v["redeem_count"] == 1 for v in state.values() if v["redeemed"])
