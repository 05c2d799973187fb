"""A till's bill as the service saw it, and the booking fields its results carry (pure).

The eVOUCHER API keeps each till's bill upstream, but its redeem answer names no amounts: the
money each voucher paid is in the answers to the till's earlier scans. The service sees every
command of a till, in order, so it keeps the bill beside the till's upstream session (in the
store: it survives restarts and moves with the partition) and puts on each result what a ledger
books from, so that no reader has to rebuild the bill from the result stream:

- `pos.bill_total` starts a new bill (`bill_id` from the command: stable for the bill);
- `pos.scan` grants a voucher the amount its answer priced (a re-scan prices it again);
  `pos.remove` takes it off; `remaining_due` follows each;
- a `succeeded` `pos.redeem` or `pos.cancel` ends the bill, and carries the vouchers with their
  amounts (`null` with a reason where the service cannot know one: a voucher it never saw
  scanned in this bill, a bill begun before it kept bills); what it answered is kept with the
  bill, so that the same command answered again (after a crash) carries the same.

Every update is keyed by what the command names (a code, the bill's command), so applying one
twice changes nothing: a command run again after a crash leaves the bill as it was.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from voucher_contracts import CommandEnvelope, Outcome, ResultData

# Why an amount is null (`amount_unknown` on the voucher, `bill_unknown` on the bill).
NOT_SCANNED = "not_scanned_in_this_bill"  # redeemed without a scan the service saw
NO_PRICE = "scan_answer_had_no_price"  # the scan's answer carried no readable price
NO_BILL = "bill_not_seen"  # the bill began before the service kept bills, or elsewhere


def bill_id_of(command: CommandEnvelope) -> str:
    """A bill's id: from its `pos.bill_total` command's (source, id), so stable for the bill
    whichever instance computes it."""
    digest = hashlib.sha256(f"{command.source}\n{command.id}".encode()).hexdigest()
    return f"bill-{digest[:24]}"


@dataclass(frozen=True)
class Line:
    amount: Decimal | None  # as the scan's answer priced it
    removed: bool = False


@dataclass(frozen=True)
class Bill:
    bill_id: str | None = None  # None: no bill total seen for this till
    total: Decimal | None = None
    lines: dict[str, Line] = field(default_factory=dict)  # by voucher code, in scan order
    # Set by the redeem or cancel that ended it: that command's id and what it was answered
    # (so the same command, run again, is answered the same).
    ended_by: str | None = None
    ended_with: dict[str, Any] | None = None

    @property
    def granted(self) -> dict[str, Line]:
        return {code: line for code, line in self.lines.items() if not line.removed}

    @property
    def remaining_due(self) -> Decimal | None:
        """The total less what the vouchers on it take off; None when either is unknown."""
        amounts = [line.amount for line in self.granted.values()]
        if self.total is None or any(a is None for a in amounts):
            return None
        return max(Decimal("0.00"), self.total - sum(a for a in amounts if a is not None))

    # -- as the store keeps it ------------------------------------------------------------

    def dumps(self) -> str:
        return json.dumps(
            {
                "bill_id": self.bill_id,
                "total": _text(self.total),
                "lines": [
                    {"code": code, "amount": _text(line.amount), "removed": line.removed}
                    for code, line in self.lines.items()
                ],
                "ended_by": self.ended_by,
                "ended_with": self.ended_with,
            }
        )

    @classmethod
    def loads(cls, text: str | None) -> Bill:
        if not text:
            return cls()
        raw = json.loads(text)
        return cls(
            raw.get("bill_id"),
            _amount(raw.get("total")),
            {
                line["code"]: Line(_amount(line.get("amount")), bool(line.get("removed")))
                for line in raw.get("lines", [])
            },
            raw.get("ended_by"),
            raw.get("ended_with"),
        )


def book(bill: Bill, command: CommandEnvelope, data: ResultData) -> tuple[Bill, dict[str, Any]]:
    """The bill after this command's result, and the booking fields the result gains."""
    payload = command.data if isinstance(command.data, dict) else {}
    answered = data.model_extra or {}
    succeeded = data.outcome is Outcome.SUCCEEDED
    ended_it = command.type in ("pos.redeem", "pos.cancel") and bill.ended_by == command.id
    if ended_it and bill.ended_with is not None:
        return bill, dict(bill.ended_with)  # answered before: the same again
    # A bill a redeem or cancel ended is over: what follows without a new bill total is on a
    # bill the service did not see begin.
    current = bill if bill.ended_by is None else Bill()
    match command.type:
        case "pos.bill_total":
            if not succeeded:
                return bill, _where(current)
            started = Bill(bill_id_of(command), _amount(answered.get("bill_total")))
            return started, _where(started)
        case "pos.scan":
            code = str(payload.get("voucher_code", ""))
            if not (succeeded and code):
                return bill, _where(current)
            after = replace(
                current, lines={**current.lines, code: Line(_amount(answered.get("amount")))}
            )
            return after, _where(after)
        case "pos.remove":
            code = str(payload.get("voucher_code", ""))
            if not (succeeded and code in current.lines):
                return bill, _where(current)
            line = Line(current.lines[code].amount, removed=True)
            after = replace(current, lines={**current.lines, code: line})
            return after, _where(after)
        case "pos.redeem" | "pos.cancel":
            bill = current
            codes = [str(c) for c in payload.get("voucher_codes") or []]
            if command.type == "pos.cancel" and not codes:
                codes = list(bill.granted)  # a cancel naming none releases what the bill holds
            fields = _vouchers(bill, codes, with_totals=command.type == "pos.redeem")
            if succeeded:
                bill = replace(bill, ended_by=command.id, ended_with=fields)
            return bill, fields
    return bill, {}


def carried(previous: ResultData) -> dict[str, Any]:
    """The booking fields of an earlier result of the same command (a superseding result of
    an indeterminate redeem carries what the first one did)."""
    extra = previous.model_extra or {}
    return {k: extra[k] for k in _BOOKING if k in extra}


def _where(bill: Bill) -> dict[str, Any]:
    fields: dict[str, Any] = {"bill_id": bill.bill_id, "remaining_due": _text(bill.remaining_due)}
    if bill.bill_id is None:
        fields["bill_unknown"] = NO_BILL
    return fields


def _vouchers(bill: Bill, codes: list[str], *, with_totals: bool) -> dict[str, Any]:
    vouchers = []
    for code in codes:
        line = bill.granted.get(code)
        if line is None:
            vouchers.append({"code": code, "amount": None, "amount_unknown": NOT_SCANNED})
        elif line.amount is None:
            vouchers.append({"code": code, "amount": None, "amount_unknown": NO_PRICE})
        else:
            vouchers.append({"code": code, "amount": _text(line.amount)})
    fields: dict[str, Any] = {"bill_id": bill.bill_id, "vouchers": vouchers}
    if bill.bill_id is None:
        fields["bill_unknown"] = NO_BILL
    if with_totals:
        known = all(v["amount"] is not None for v in vouchers)
        paid = sum((Decimal(v["amount"]) for v in vouchers if v["amount"] is not None), Decimal(0))
        fields["vouchers_total"] = _text(paid) if known else None
        fields["bill_total"] = _text(bill.total)
        fields["remaining_due"] = (
            _text(max(Decimal("0.00"), bill.total - paid))
            if known and bill.total is not None
            else None
        )
    return fields


_BOOKING = (
    "bill_id",
    "bill_unknown",
    "vouchers",
    "vouchers_total",
    "bill_total",
    "remaining_due",
)


def _text(amount: Decimal | None) -> str | None:
    return None if amount is None else f"{amount.quantize(Decimal('0.01'))}"


def _amount(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool | float):
        return None
    try:
        amount = Decimal(str(value))
    except ArithmeticError:
        return None
    return amount.quantize(Decimal("0.01")) if amount.is_finite() else None
