"""A till's bill as the service keeps it, and the booking fields of its results (bill.py)."""

from __future__ import annotations

import uuid
from typing import Any

from voucher_bridge.evoucher.bill import NO_BILL, NO_PRICE, NOT_SCANNED, Bill, bill_id_of, book
from voucher_contracts import CommandEnvelope, Outcome, ResultData

SOURCE = "/stores/limassol-3/pos"


def command(type_: str, data: dict[str, Any], id: str | None = None) -> CommandEnvelope:
    return CommandEnvelope.model_validate(
        {
            "specversion": "1.0",
            "id": id or str(uuid.uuid4()),
            "source": SOURCE,
            "type": type_,
            "subject": "till-1",
            "data": data,
        }
    )


def answer(c: CommandEnvelope, outcome: Outcome = Outcome.SUCCEEDED, **extra: Any) -> ResultData:
    return ResultData(
        command_id=c.id,
        command_source=c.source,
        command_type=c.type,
        outcome=outcome,
        **extra,
    )


def run(bill: Bill, type_: str, data: dict[str, Any], **extra: Any) -> tuple[Bill, dict[str, Any]]:
    c = command(type_, data)
    return book(bill, c, answer(c, **extra))


def test_a_bill_from_its_total_through_scans_removal_and_re_scan_to_the_redeem() -> None:
    total = command("pos.bill_total", {"bill_total": "120.00"})
    bill, fields = book(Bill(), total, answer(total, bill_total="120.00"))
    assert fields == {"bill_id": bill_id_of(total), "remaining_due": "120.00"}
    bill, fields = run(bill, "pos.scan", {"voucher_code": "A"}, amount="50.00")
    assert fields["remaining_due"] == "70.00"
    bill, _ = run(bill, "pos.scan", {"voucher_code": "B"}, amount="30.00")
    bill, fields = run(bill, "pos.remove", {"voucher_code": "B"})
    assert fields["remaining_due"] == "70.00"
    bill, _ = run(bill, "pos.scan", {"voucher_code": "B"}, amount="25.00")  # priced anew
    # A refused scan changes nothing.
    bill, fields = run(bill, "pos.scan", {"voucher_code": "C"}, outcome=Outcome.REJECTED)
    assert fields["remaining_due"] == "45.00"
    redeem = command("pos.redeem", {"voucher_codes": ["A", "B"]})
    bill, fields = book(bill, redeem, answer(redeem, voucher_codes=["A", "B"]))
    assert fields == {
        "bill_id": bill_id_of(total),
        "vouchers": [{"code": "A", "amount": "50.00"}, {"code": "B", "amount": "25.00"}],
        "vouchers_total": "75.00",
        "bill_total": "120.00",
        "remaining_due": "45.00",
    }
    assert bill.ended_by == redeem.id
    # The same redeem answered again (after a crash): the same fields, the bill unchanged.
    again, same = book(bill, redeem, answer(redeem))
    assert same == fields and again == bill
    # What follows without a new total is on a bill the service did not see begin.
    _, after = run(bill, "pos.scan", {"voucher_code": "D"}, amount="5.00")
    assert after == {"bill_id": None, "remaining_due": None, "bill_unknown": NO_BILL}


def test_amounts_it_cannot_know_are_null_with_a_reason() -> None:
    # A bill begun before the service kept bills: no id, no total.
    bill, _ = run(Bill(), "pos.scan", {"voucher_code": "A"})  # no price in the answer
    c = command("pos.redeem", {"voucher_codes": ["A", "Z"]})
    _, fields = book(bill, c, answer(c))
    assert fields["vouchers"] == [
        {"code": "A", "amount": None, "amount_unknown": NO_PRICE},
        {"code": "Z", "amount": None, "amount_unknown": NOT_SCANNED},
    ]
    assert fields["vouchers_total"] is None and fields["remaining_due"] is None
    assert fields["bill_id"] is None and fields["bill_unknown"] == NO_BILL


def test_a_cancel_releases_the_named_vouchers_or_all_the_bill_holds() -> None:
    bill, _ = run(Bill(), "pos.bill_total", {"bill_total": 30}, bill_total="30.00")
    bill, _ = run(bill, "pos.scan", {"voucher_code": "A"}, amount="10.00")
    bill, _ = run(bill, "pos.scan", {"voucher_code": "B"}, amount="20.00")
    _, named = run(bill, "pos.cancel", {"voucher_codes": ["B"]})
    assert named["vouchers"] == [{"code": "B", "amount": "20.00"}] and "vouchers_total" not in named
    ended, everything = run(bill, "pos.cancel", {})
    assert [v["code"] for v in everything["vouchers"]] == ["A", "B"]
    assert ended.ended_by is not None
    # A failed cancel does not end the bill.
    still, _ = run(bill, "pos.cancel", {}, outcome=Outcome.FAILED)
    assert still.ended_by is None


def test_a_bill_survives_the_store_as_it_was() -> None:
    bill, _ = run(Bill(), "pos.bill_total", {"bill_total": "12.5"}, bill_total="12.50")
    bill, _ = run(bill, "pos.scan", {"voucher_code": "A"}, amount="2.00")
    bill, _ = run(bill, "pos.remove", {"voucher_code": "A"})
    bill, _ = run(bill, "pos.scan", {"voucher_code": "B"})
    assert Bill.loads(bill.dumps()) == bill
    assert Bill.loads(None) == Bill()
