"""What a coupon command asks of the Epin API, and what the API's answer means. Pure.

Success is `{"status_code": 200, "errors": {}, "data": {…}}`; refusals are HTTP 400
"Validation Error" with messages per field, and HTTP 401 "Request Failed" when the coupon
facility is disabled (shared/upstream/epin-coupons-api.txt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from voucher_bridge.results import Decision
from voucher_bridge.upstream import Answer
from voucher_contracts import Outcome
from voucher_contracts.coupon import (
    CouponCommandData,
    Create,
    Delete,
    History,
    ListActive,
    ListWallets,
    RefundStatus,
    Share,
    Transfer,
)
from voucher_contracts.money import amount_text

# Calls that move value and are not idempotent upstream: never resent once they may have
# reached it.
MONEY_MOVING = frozenset({"coupon.transfer", "coupon.share", "coupon.create", "coupon.delete"})
# Lists whose `next` is followed to the end.
PAGINATED = frozenset({"coupon.list_active", "coupon.history"})

FACILITY_DISABLED = "Coupon facility is disabled"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: dict[str, str] | None = None
    # Kept out of the repr: a create's form holds the mail token and its checksum.
    form: dict[str, str] | None = field(default=None, repr=False)


def request_for(data: CouponCommandData) -> Request:
    match data:
        case ListActive(wallet=wallet, code=code):
            return Request("GET", "user/get/active-epin/", _present(wallet=wallet, code=code))
        case Transfer(user=user, epin=epin):
            return Request("POST", "user/transfer/epin/", form={"user": user, "epin": epin})
        case Share(email=email, epin=epin, share_amount=amount):
            form = {"email": email, "epin": epin, "share_amount": amount_text(amount)}
            return Request("POST", "user/share/epin/", form=form)
        case Delete(epin=epin):
            return Request("DELETE", "user/delete/epin/", {"epin": epin, "status": "1"})
        case RefundStatus(epin=epin):
            # The same endpoint without `status` reports the refund status.
            return Request("DELETE", "user/delete/epin/", {"epin": epin})
        case ListWallets():
            return Request("GET", "user/generate/epin/")
        case Create() as create:
            return Request("POST", "user/generate/epin/", form=_create_form(create))
        case History(wallet=wallet):
            return Request("GET", "user/epin/history/", _present(wallet=wallet))
    raise TypeError(f"not a coupon command: {type(data).__name__}")


def _create_form(create: Create) -> dict[str, str]:
    return {
        "wallet_type": create.wallet_type,
        "epin_amount": amount_text(create.epin_amount),
        "number_of_pins": create.number_of_pins,
        "transferable": "True" if create.transferable else "False",
        "reusable": "True" if create.reusable else "False",
        "token_field": create.token_field.get_secret_value(),
        "token_checksum_field": create.token_checksum_field.get_secret_value(),
        "form_key": create.form_key,
    }


def _present(**values: str | None) -> dict[str, str]:
    return {k: v for k, v in values.items() if v is not None}


def decide(
    command_type: str,
    data: CouponCommandData,
    answer: Answer,
    listed: list[dict[str, Any]] | None = None,
) -> Decision:
    """What the answer means; `listed` holds every page's results for a paginated list."""
    body = answer.body or {}
    if answer.status == 401 and facility_disabled(body):
        return Decision(Outcome.REJECTED, "facility_disabled", _first_message(body))
    if answer.status in (401, 403):
        return Decision(Outcome.FAILED, "unauthorized", _first_message(body))
    if answer.status == 400:
        errors = _field_errors(body)
        return Decision(
            Outcome.REJECTED, "validation_error", _first_message(body), {"errors": errors}
        )
    if answer.status == 429:
        return Decision(Outcome.FAILED, "upstream_unavailable", _first_message(body))
    if answer.status >= 500:
        if command_type in MONEY_MOVING:
            return Decision(Outcome.INDETERMINATE, "upstream_unavailable", _first_message(body))
        return Decision(Outcome.FAILED, "upstream_unavailable", _first_message(body))
    payload = body.get("data")
    if answer.status != 200 or not isinstance(payload, dict):
        if command_type in MONEY_MOVING and answer.status < 300:
            return Decision(Outcome.INDETERMINATE, "upstream_unrecognised", _first_message(body))
        return Decision(Outcome.REJECTED, "upstream_rejected", _first_message(body))
    return Decision(Outcome.SUCCEEDED, None, None, _details(data, payload, listed))


def _details(
    data: CouponCommandData, payload: dict[str, Any], listed: list[dict[str, Any]] | None
) -> dict[str, Any]:
    match data:
        case ListActive():
            coupons = listed if listed is not None else payload.get("results", [])
            return {"coupons": coupons, "count": len(coupons)}
        case History():
            entries = listed if listed is not None else payload.get("results", [])
            return {"entries": entries, "count": len(entries)}
        case Transfer(user=user, epin=epin):
            return {"epin": epin, "user": user}
        case Share(epin=epin, share_amount=amount):
            return {"epin": epin, "share_amount": amount, **_pick(payload, "balance")}
        case Delete(epin=epin) | RefundStatus(epin=epin):
            return {"epin": epin, **_pick(payload, "refund_status", "refunded_amount")}
        case ListWallets():
            return {"wallets": payload.get("wallets", []), **_pick(payload, "form_key")}
        case Create():
            return {"coupons": payload.get("coupons", []), **_pick(payload, "wallet_balance")}
    return {}


# What a coupon's PIN becomes in a result unless COUPON_RESULT_PINS=shown: a PIN is bearer
# value (whoever reads it can spend the coupon), and analytics reads coupon.results too.
PIN_MASK = "****"


def without_pins(value: Any) -> Any:
    """`value` with every `pin` member, at any depth, replaced by PIN_MASK."""
    if isinstance(value, dict):
        return {
            k: (PIN_MASK if k == "pin" and v not in (None, "") else without_pins(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [without_pins(v) for v in value]
    return value


def _pick(payload: dict[str, Any], *names: str) -> dict[str, Any]:
    return {n: payload[n] for n in names if n in payload}


def _field_errors(body: dict[str, Any]) -> dict[str, list[str]]:
    errors = body.get("errors")
    if not isinstance(errors, dict):
        return {}
    found: dict[str, list[str]] = {}
    for name, messages in errors.items():
        if isinstance(messages, str):
            found[str(name)] = [messages]
        elif isinstance(messages, list):
            found[str(name)] = [str(m) for m in messages]
    return found


def _first_message(body: dict[str, Any]) -> str | None:
    """The upstream's own words: the first field message, else `detail`, else `message`."""
    texts = _all_text(body.get("errors"))
    if texts:
        return texts[0]
    for key in ("detail", "message"):
        if isinstance(body.get(key), str):
            return str(body[key])
    return None


def _all_text(value: Any) -> list[str]:
    """Every string inside an error body, in order (fields' lists, `detail`, ...)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [t for v in value for t in _all_text(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _all_text(v)]
    return []


def facility_disabled(body: dict[str, Any] | None) -> bool:
    """The documented 401 of a disabled coupon facility (every other 401 is a refused token
    or refused credentials)."""
    return FACILITY_DISABLED in all_text(body)


def all_text(body: dict[str, Any] | None) -> str:
    return " ".join(_all_text(body or {}))
