"""evoucher.decisions against every request and response the vendor's Postman collection records.

The recorded bodies are copied here as literals (comments and all, as the vendor wrote them), so
that the tests stand alone; one test checks the copies against the collection when it is there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from voucher_bridge.evoucher.client import Route, encode_json
from voucher_bridge.evoucher.decisions import (
    MONEY_MOVING,
    Decision,
    decide,
    request_for,
)
from voucher_bridge.results import unanswered
from voucher_bridge.upstream import Answer
from voucher_contracts import Outcome
from voucher_contracts.pos import BillTotal, Cancel, PosCommandData, Redeem, Remove, Scan

COLLECTION = Path("/work/shared/upstream/evoucher-pos-api.postman_collection.json")
TERMINAL = "1st_floor_machine_1"


def strip_comments(text: str) -> str:
    """Remove `//` line comments outside JSON strings (the vendor's bodies have some)."""
    out: list[str] = []
    i, in_string = 0, False
    while i < len(text):
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\" and i + 1 < len(text):
                out.append(text[i + 1])
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif text.startswith("//", i):
            while i < len(text) and text[i] not in "\r\n":
                i += 1
            continue
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def parse(text: str) -> dict[str, Any]:
    body = json.loads(strip_comments(text))
    assert isinstance(body, dict)
    return body


def test_strip_comments() -> None:
    assert parse('{"a": "http://x//y" // c\n, "b": 1 //d\r\n}') == {"a": "http://x//y", "b": 1}
    assert parse('{"a": "q\\"//"}') == {"a": 'q"//'}


@dataclass(frozen=True)
class Recorded:
    request: str  # the collection's item name
    response: str  # the recorded response's name
    route: Route
    request_body: str  # originalRequest.body.raw, as recorded
    response_body: str  # body, as recorded
    command_type: str
    data: PosCommandData
    outcome: Outcome
    reason: str | None
    details: dict[str, Any]


CODE = "12345678"

RECORDED = [
    Recorded(
        "Send Bill Total",
        "Success",
        Route.BILL_TOTAL,
        '{\n    "bill_total": 50,\n    "machine_name": "{{machine_name}}"\n}',
        '{\n    "success": 1,\n    "bill_total": 50,\n'
        '    "message": "Bill total has been updated successfully"\n}',
        "pos.bill_total",
        BillTotal(bill_total=Decimal("50")),
        Outcome.SUCCEEDED,
        None,
        {"bill_total": Decimal("50.00")},
    ),
    Recorded(
        "Scan Voucher",
        "Success",
        Route.SCAN,
        '{\n    "voucher_code": "12345678"\n}',
        '{\n    "success": 1,\n    "price": "50.00",\n    "message": "The voucher is valid"\n}',
        "pos.scan",
        Scan(voucher_code=CODE),
        Outcome.SUCCEEDED,
        None,
        {"voucher_code": CODE, "amount": Decimal("50.00")},
    ),
    Recorded(
        "Scan Voucher",
        "Wrong code",
        Route.SCAN,
        '{\n    "voucher_code": "12345678"\n}',
        '{\n    "success": 0,\n    "message": "Voucher with code 12345678 does not exist!"\n}',
        "pos.scan",
        Scan(voucher_code=CODE),
        Outcome.REJECTED,
        "voucher_not_found",
        {"voucher_code": CODE},
    ),
    Recorded(
        "Scan Voucher",
        "Already redeemed",
        Route.SCAN,
        '{\n    "voucher_code": "12345678"\n}',
        '{\n    "success": 0,\n'
        '    "message": "Voucher with code 12345678 has already been redeemed!"\n}',
        "pos.scan",
        Scan(voucher_code=CODE),
        Outcome.REJECTED,
        "voucher_already_redeemed",
        {"voucher_code": CODE},
    ),
    Recorded(
        "Scan Voucher",
        "Expired voucher",
        Route.SCAN,
        '{\n    "voucher_code": "12345678"\n}',
        '{\n    "success": 0,\n'
        '    "message": "Voucher with code 12345678 expired on 30-11-2024."\n}',
        "pos.scan",
        Scan(voucher_code=CODE),
        Outcome.REJECTED,
        "voucher_expired",
        {"voucher_code": CODE, "expires_on": date(2024, 11, 30)},
    ),
    Recorded(
        "Scan Voucher",
        "Store not allowed to redeem",
        Route.SCAN,
        '{\n    "voucher_code": "12345678"\n}',
        '{\n    "success": 0,\n'
        '    "message": "Voucher with code 12345678 cannot be redeemed at your store!"'
        " //Trying to scan voucher of store A to store B\n}",
        "pos.scan",
        Scan(voucher_code=CODE),
        Outcome.REJECTED,
        "voucher_not_allowed_at_store",
        {"voucher_code": CODE},
    ),
    Recorded(
        "Scan Voucher",
        "No amount due",
        Route.SCAN,
        '{\n    "voucher_code": "12345678"\n}',
        '{\n    "success": 0,\n'
        '    "message": "Remaining bill total is 0, cannot redeem more vouchers."'
        " //Amount due is 0, no reason to scan more vouchers\n}",
        "pos.scan",
        Scan(voucher_code=CODE),
        Outcome.REJECTED,
        "no_amount_due",
        {},
    ),
    Recorded(
        "Redeem Vouchers",
        "Single code",
        Route.REDEEM,
        '{\n    "voucher_codes": "12345678"\n}',
        '{\n    "success": 1,\n'
        '    "message": "Voucher with code 12345678 have been successfully redeemed.!"\n}',
        "pos.redeem",
        Redeem(voucher_codes=[CODE]),
        Outcome.SUCCEEDED,
        None,
        {"voucher_codes": [CODE]},
    ),
    Recorded(
        "Redeem Vouchers",
        "Multiple codes",
        Route.REDEEM,
        '{\n    "voucher_codes": "12345678;12345679"\n}',
        '{\n    "success": 1,\n    "message": "Vouchers with codes 12345678,12345679 have been'
        ' successfully redeemed.!"\n}',
        "pos.redeem",
        Redeem(voucher_codes=[CODE, "12345679"]),
        Outcome.SUCCEEDED,
        None,
        {"voucher_codes": [CODE, "12345679"]},
    ),
    Recorded(
        "Remove Voucher",
        "Success",
        Route.REMOVE,
        '{\n    "voucher_code": "12345678"\n}',
        '{\n    "success": 1,\n    "message": "Voucher has been deleted."\n}',
        "pos.remove",
        Remove(voucher_code=CODE),
        Outcome.SUCCEEDED,
        None,
        {"voucher_code": CODE},
    ),
    Recorded(
        "Cancel Payment",
        "Single code",
        Route.CANCEL,
        '{\r\n    "voucher_codes": "12345678"\r\n}',
        '{\n    "success": 1,\n    "message": "Payment has been canceled."\n}',
        "pos.cancel",
        Cancel(voucher_codes=[CODE]),
        Outcome.SUCCEEDED,
        None,
        {"voucher_codes": [CODE]},
    ),
    Recorded(
        "Cancel Payment",
        "No codes",
        Route.CANCEL,
        "{\r\n}",
        '{\n    "success": 1,\n    "message": "Payment has been canceled."\n}',
        "pos.cancel",
        Cancel(),
        Outcome.SUCCEEDED,
        None,
        {"voucher_codes": []},
    ),
]

IDS = [f"{r.request}/{r.response}" for r in RECORDED]


def test_literals_match_the_collection() -> None:
    if not COLLECTION.exists():
        pytest.skip(f"{COLLECTION} not present")
    collection = json.loads(COLLECTION.read_text())
    found = []
    for item in collection["item"]:
        for response in item["response"]:
            original = response["originalRequest"]
            query = {q["key"]: q["value"] for q in original["url"]["query"]}
            found.append(
                (
                    item["name"],
                    response["name"],
                    original["method"],
                    query["route"],
                    parse(original["body"]["raw"]),
                    response["code"],
                    parse(response["body"]),
                )
            )
    mine = [
        (
            r.request,
            r.response,
            "POST",
            f"account/{r.route}",
            parse(r.request_body),
            200,
            parse(r.response_body),
        )
        for r in RECORDED
    ]
    assert sorted(mine, key=repr) == sorted(found, key=repr)


@pytest.mark.parametrize("recorded", RECORDED, ids=IDS)
def test_decision_for_every_recorded_response(recorded: Recorded) -> None:
    body = parse(recorded.response_body)
    decision = decide(recorded.command_type, recorded.data, Answer(200, body, 12))
    assert decision == Decision(
        recorded.outcome, recorded.reason, body["message"], recorded.details
    )


@pytest.mark.parametrize("recorded", RECORDED, ids=IDS)
def test_request_for_sends_what_the_collection_sends(recorded: Recorded) -> None:
    route, body = request_for(TERMINAL, recorded.data)
    assert route is recorded.route
    expected = parse(recorded.request_body.replace("{{machine_name}}", TERMINAL))
    sent = json.loads(encode_json(body))
    assert sent == expected
    # Same JSON types too: a number stays a number, codes are one string.
    assert [type(v) for v in sent.values()] == [type(v) for v in expected.values()]


@pytest.mark.parametrize(
    ("data", "route", "wire"),
    [
        (
            BillTotal(bill_total=Decimal("50")),
            Route.BILL_TOTAL,
            b'{"bill_total":50,"machine_name":"1st_floor_machine_1"}',
        ),
        (
            BillTotal(bill_total=Decimal("12.50")),
            Route.BILL_TOTAL,
            b'{"bill_total":12.5,"machine_name":"1st_floor_machine_1"}',
        ),
        (
            BillTotal(bill_total=Decimal("0.1")),
            Route.BILL_TOTAL,
            b'{"bill_total":0.1,"machine_name":"1st_floor_machine_1"}',
        ),
        (
            BillTotal(bill_total=Decimal("0")),
            Route.BILL_TOTAL,
            b'{"bill_total":0,"machine_name":"1st_floor_machine_1"}',
        ),
        (
            BillTotal(bill_total=Decimal("99999999.99")),
            Route.BILL_TOTAL,
            b'{"bill_total":99999999.99,"machine_name":"1st_floor_machine_1"}',
        ),
        (Scan(voucher_code="12345678"), Route.SCAN, b'{"voucher_code":"12345678"}'),
        (Remove(voucher_code="12345678"), Route.REMOVE, b'{"voucher_code":"12345678"}'),
        (Redeem(voucher_codes=["1", "2", "3"]), Route.REDEEM, b'{"voucher_codes":"1;2;3"}'),
        (Cancel(voucher_codes=["1", "2"]), Route.CANCEL, b'{"voucher_codes":"1;2"}'),
        (Cancel(voucher_codes=[]), Route.CANCEL, b"{}"),
    ],
)
def test_request_for_exact_bytes(data: PosCommandData, route: Route, wire: bytes) -> None:
    got_route, body = request_for(TERMINAL, data)
    assert got_route is route
    assert encode_json(body) == wire


def test_request_for_bill_total_keeps_the_decimal() -> None:
    _, body = request_for(TERMINAL, BillTotal(bill_total=Decimal("12.5")))
    assert body == {"bill_total": Decimal("12.50"), "machine_name": TERMINAL}
    assert type(body["bill_total"]) is Decimal


def test_request_for_rejects_other_objects() -> None:
    with pytest.raises(TypeError):
        request_for(TERMINAL, object())  # type: ignore[arg-type]


# -- failure texts beyond the recordings -------------------------------------------------------

SCAN = Scan(voucher_code="AB-12_x")


def failure(message: str, command_type: str = "pos.scan", data: PosCommandData = SCAN) -> Decision:
    return decide(command_type, data, Answer(200, {"success": 0, "message": message}, 0))


@pytest.mark.parametrize(
    ("message", "reason", "details"),
    [
        ("Voucher with code AB-12_x does not exist!", "voucher_not_found", {}),
        ("Voucher with code AB-12_x has already been redeemed!", "voucher_already_redeemed", {}),
        (
            "Voucher with code AB-12_x expired on 01-02-2023.",
            "voucher_expired",
            {"expires_on": date(2023, 2, 1)},
        ),
        (
            "Voucher with code AB-12_x cannot be redeemed at your store!",
            "voucher_not_allowed_at_store",
            {},
        ),
    ],
)
def test_failure_texts_capture_the_code(message: str, reason: str, details: dict[str, Any]) -> None:
    decision = failure(message)
    assert decision == Decision(
        Outcome.REJECTED, reason, message, {"voucher_code": "AB-12_x", **details}
    )
    # The same texts answer a redeem: a refusal, nothing moved.
    redeem = failure(message, "pos.redeem", Redeem(voucher_codes=["AB-12_x"]))
    assert (redeem.outcome, redeem.reason) == (Outcome.REJECTED, reason)


def test_failure_text_with_surrounding_whitespace_still_matches() -> None:
    message = "  Voucher with code 1 does not exist!\n"
    decision = failure(message)
    assert decision.reason == "voucher_not_found"
    assert decision.message == message  # kept as the upstream wrote it


@pytest.mark.parametrize(
    "message",
    [
        "Something else went wrong",
        "Voucher with code 1 does not exist",  # no '!'
        "voucher with code 1 does not exist!",  # case
        "Voucher with code 1 expired on 2024-11-30.",  # other date format
        "",
    ],
)
def test_unknown_failure_text_is_rejected_upstream_rejected_with_the_text(message: str) -> None:
    assert failure(message) == Decision(Outcome.REJECTED, "upstream_rejected", message)


def test_failure_without_message() -> None:
    decision = decide("pos.scan", SCAN, Answer(200, {"success": 0}, 0))
    assert decision == Decision(Outcome.REJECTED, "upstream_rejected", None)
    decision = decide("pos.scan", SCAN, Answer(200, {"success": 0, "message": ["x"]}, 0))
    assert decision == Decision(Outcome.REJECTED, "upstream_rejected", None)


def test_expired_with_an_impossible_date_does_not_raise() -> None:
    decision = failure("Voucher with code 1 expired on 00-00-0000.")
    assert (decision.outcome, decision.reason) == (Outcome.REJECTED, "voucher_expired")


# -- success flag, statuses ----------------------------------------------------------------------


@pytest.mark.parametrize("flag", [1, "1"])
def test_success_flag_int_or_string(flag: Any) -> None:
    decision = decide("pos.remove", Remove(voucher_code="1"), Answer(200, {"success": flag}, 0))
    assert decision == Decision(Outcome.SUCCEEDED, None, None, {"voucher_code": "1"})


def test_success_flag_zero_as_string() -> None:
    decision = failure_body({"success": "0", "message": "Voucher with code 1 does not exist!"})
    assert decision.reason == "voucher_not_found"


def failure_body(body: dict[str, Any] | None, command_type: str = "pos.scan") -> Decision:
    data: PosCommandData = Redeem(voucher_codes=["1"]) if command_type == "pos.redeem" else SCAN
    return decide(command_type, data, Answer(200, body, 0))


@pytest.mark.parametrize(
    "body", [None, {}, {"success": 2}, {"success": "yes"}, {"message": "hi", "success": None}]
)
def test_unrecognised_200_answer(body: dict[str, Any] | None) -> None:
    message = body.get("message") if body else None
    assert failure_body(body) == Decision(Outcome.REJECTED, "upstream_rejected", message)
    # A redeem may have gone through behind an answer we cannot read.
    assert failure_body(body, "pos.redeem") == Decision(
        Outcome.INDETERMINATE, "upstream_unrecognised", message
    )


@pytest.mark.parametrize("flag", [True, 1.0])
def test_redeem_with_boolean_or_float_success_is_not_rejected(flag: Any) -> None:
    decision = failure_body({"success": flag, "message": "redeemed"}, "pos.redeem")
    assert decision.outcome in (Outcome.SUCCEEDED, Outcome.INDETERMINATE)


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("command_type", ["pos.scan", "pos.redeem", "pos.bill_total"])
def test_unauthorized(status: int, command_type: str) -> None:
    body = {"success": 1, "message": "Invalid token"}
    data: PosCommandData = (
        Redeem(voucher_codes=["1"]) if command_type == "pos.redeem" else Scan(voucher_code="1")
    )
    decision = decide(command_type, data, Answer(status, body, 0))
    assert decision == Decision(Outcome.FAILED, "unauthorized", "Invalid token")


@pytest.mark.parametrize("status", [500, 502, 503, 504])
@pytest.mark.parametrize("command_type", ["pos.bill_total", "pos.scan", "pos.remove", "pos.cancel"])
def test_5xx_is_failed_upstream_unavailable(status: int, command_type: str) -> None:
    decision = decide(command_type, SCAN, Answer(status, None, 0))
    assert decision == Decision(Outcome.FAILED, "upstream_unavailable", None)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_for_a_redeem_is_indeterminate(status: int) -> None:
    decision = decide(
        "pos.redeem", Redeem(voucher_codes=["1"]), Answer(status, {"message": "oops"}, 0)
    )
    assert decision.outcome is Outcome.INDETERMINATE
    assert decision.message == "oops"


@pytest.mark.parametrize("status", [400, 404, 302])
def test_other_statuses_for_a_safe_call_are_rejected(status: int) -> None:
    decision = decide("pos.scan", SCAN, Answer(status, None, 0))
    assert decision == Decision(Outcome.REJECTED, "upstream_rejected", None)


def test_other_status_wins_over_a_success_body() -> None:
    decision = decide("pos.scan", SCAN, Answer(404, {"success": 1, "price": "5.00"}, 0))
    assert decision.outcome is Outcome.REJECTED


# -- success details -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("price", "amount"),
    [
        ("50.00", Decimal("50.00")),
        ("12.5", Decimal("12.50")),
        ("7", Decimal("7.00")),
        (20, Decimal("20.00")),
        (None, None),
        ("n/a", None),
        (12.5, None),  # a float is never money
        (True, None),
    ],
)
def test_scan_amount(price: Any, amount: Decimal | None) -> None:
    body = {"success": 1, "message": "The voucher is valid"}
    if price is not None:
        body["price"] = price
    decision = decide("pos.scan", Scan(voucher_code="1"), Answer(200, body, 0))
    assert decision.outcome is Outcome.SUCCEEDED
    assert decision.details == {"voucher_code": "1", "amount": amount}
    if amount is not None:
        assert str(decision.details["amount"]) == str(amount)


def test_redeem_success_details_are_a_copy() -> None:
    data = Redeem(voucher_codes=["1", "2"])
    decision = decide("pos.redeem", data, Answer(200, {"success": 1}, 0))
    assert decision.details == {"voucher_codes": ["1", "2"]}
    assert decision.details["voucher_codes"] is not data.voucher_codes


# -- no answer -------------------------------------------------------------------------------


def test_money_moving() -> None:
    assert frozenset({"pos.redeem"}) == MONEY_MOVING


@pytest.mark.parametrize(
    ("command_type", "may_have_reached", "outcome"),
    [
        ("pos.redeem", True, Outcome.INDETERMINATE),
        ("pos.redeem", False, Outcome.FAILED),
        ("pos.scan", True, Outcome.FAILED),
        ("pos.scan", False, Outcome.FAILED),
        ("pos.bill_total", True, Outcome.FAILED),
        ("pos.cancel", True, Outcome.FAILED),
        ("pos.remove", True, Outcome.FAILED),
    ],
)
def test_unanswered(command_type: str, may_have_reached: bool, outcome: Outcome) -> None:
    decision = unanswered(
        moves_money=command_type in MONEY_MOVING, may_have_reached=may_have_reached
    )
    assert decision == Decision(outcome, "upstream_unavailable")
