"""What a POS command asks of the eVOUCHER API, and what the API's answer means.

Pure functions, no I/O. The upstream says success or failure in the body's `success` (1 or 0),
never in the HTTP status, and the kind of failure only in the human text of `message`; the
patterns below are every failure text the vendor's collection records.
"""

from __future__ import annotations

import contextlib
import re
from datetime import date
from typing import Any

from voucher_bridge.evoucher.client import Route
from voucher_bridge.results import Decision
from voucher_bridge.upstream import Answer, money
from voucher_contracts import Outcome
from voucher_contracts.pos import BillTotal, Cancel, PosCommandData, Redeem, Remove, Scan

# Commands whose call moves money: never resent blindly once it may have reached the upstream.
MONEY_MOVING = frozenset({"pos.redeem"})


def request_for(terminal: str, data: PosCommandData) -> tuple[Route, dict[str, Any]]:
    """The route and JSON body the collection sends for this command."""
    match data:
        case BillTotal(bill_total=total):
            return Route.BILL_TOTAL, {"bill_total": total, "machine_name": terminal}
        case Scan(voucher_code=code):
            return Route.SCAN, {"voucher_code": code}
        case Remove(voucher_code=code):
            return Route.REMOVE, {"voucher_code": code}
        case Redeem(voucher_codes=codes):
            return Route.REDEEM, {"voucher_codes": ";".join(codes)}
        case Cancel(voucher_codes=codes):
            # A cancel with nothing scanned is sent as `{}`, as the collection records it.
            return Route.CANCEL, ({"voucher_codes": ";".join(codes)} if codes else {})
    raise TypeError(f"not a POS command: {type(data).__name__}")


_CODE = r"(?P<code>\S+)"
_FAILURES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(rf"^Voucher with code {_CODE} does not exist!$"), "voucher_not_found"),
    (
        re.compile(rf"^Voucher with code {_CODE} has already been redeemed!$"),
        "voucher_already_redeemed",
    ),
    (
        re.compile(
            rf"^Voucher with code {_CODE} expired on "
            r"(?P<d>\d{2})-(?P<m>\d{2})-(?P<y>\d{4})\.$"
        ),
        "voucher_expired",
    ),
    (
        re.compile(rf"^Voucher with code {_CODE} cannot be redeemed at your store!$"),
        "voucher_not_allowed_at_store",
    ),
    (re.compile(r"^Remaining bill total is 0, cannot redeem more vouchers\.$"), "no_amount_due"),
]


def decide(command_type: str, data: PosCommandData, answer: Answer) -> Decision:
    """What the upstream's answer to this command means."""
    body = answer.body
    if answer.status in (401, 403):
        return Decision(Outcome.FAILED, "unauthorized", _message(body))
    if answer.status == 429:
        # Turned away before it was looked at: nothing happened, for any command.
        return Decision(Outcome.FAILED, "upstream_unavailable", _message(body))
    if answer.status >= 500:
        # An error page from the shop: a redeem may or may not have gone through behind it.
        if command_type in MONEY_MOVING:
            return Decision(Outcome.INDETERMINATE, "upstream_unavailable", _message(body))
        return Decision(Outcome.FAILED, "upstream_unavailable", _message(body))
    success = body.get("success") if body is not None else None
    # Only 1/0 (or "1"/"0"): True and 1.0 equal 1 but are not what the API sends.
    if answer.status != 200 or type(success) not in (int, str) or str(success) not in ("0", "1"):
        if command_type in MONEY_MOVING and answer.status == 200:
            return Decision(Outcome.INDETERMINATE, "upstream_unrecognised", _message(body))
        return Decision(Outcome.REJECTED, "upstream_rejected", _message(body))
    message = _message(body)
    assert body is not None
    if str(success) == "1":
        return Decision(Outcome.SUCCEEDED, None, message, _success_details(data, body))
    return _failure(message)


def _failure(message: str | None) -> Decision:
    text = (message or "").strip()
    for pattern, reason in _FAILURES:
        match = pattern.match(text)
        if match is None:
            continue
        details: dict[str, Any] = {}
        groups = match.groupdict()
        if groups.get("code"):
            details["voucher_code"] = groups["code"]
        if reason == "voucher_expired":
            with contextlib.suppress(ValueError):  # e.g. OpenCart's zero date 00-00-0000
                details["expires_on"] = date(int(groups["y"]), int(groups["m"]), int(groups["d"]))
        return Decision(Outcome.REJECTED, reason, message, details)
    # Unknown failure text: nothing changed upstream (success 0), so it is a refusal; keep
    # the text so that people can read it.
    return Decision(Outcome.REJECTED, "upstream_rejected", message)


def _success_details(data: PosCommandData, body: dict[str, Any]) -> dict[str, Any]:
    match data:
        case BillTotal(bill_total=total):
            return {"bill_total": total}
        case Scan(voucher_code=code):
            return {"voucher_code": code, "amount": money(body.get("price"))}
        case Remove(voucher_code=code):
            return {"voucher_code": code}
        case Redeem(voucher_codes=codes) | Cancel(voucher_codes=codes):
            return {"voucher_codes": list(codes)}
    return {}


def _message(body: dict[str, Any] | None) -> str | None:
    message = body.get("message") if body else None
    return message if isinstance(message, str) else None
