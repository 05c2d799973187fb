"""epin.decisions: what each coupon command sends, and what every documented answer means.

The error bodies are the API's own shape (shared/upstream/epin-coupons-api.txt: HTTP 400
"Validation Error" with messages per field; HTTP 401 "Request Failed" for a disabled facility);
the last tests take the answers from the Epin sandbox's state machine itself.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from pydantic import SecretStr

from voucher_bridge.epin.decisions import MONEY_MOVING, PAGINATED, Request, decide, request_for
from voucher_bridge.upstream import Answer
from voucher_contracts import Outcome
from voucher_contracts.coupon import (
    COUPON_COMMAND_TYPES,
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
from voucher_sandboxes import SEEDS
from voucher_sandboxes.epin import EpinSandbox, token_checksum

SEED_PATH = SEEDS / "epin-seed.json"
MAIN, MAIN_PW, MAIN_TOKEN = "backoffice-cy", "sbx-backoffice-Pa55", "MT-BCY-482917"
API_KEY = "sbx-epin-apikey-6d1f0c9a3b7e4a25"

MAIL_TOKEN = "MT-SECRET-7731"
CHECKSUM = token_checksum(MAIL_TOKEN)

DATA: dict[str, dict[str, Any]] = {
    "coupon.list_active": {"wallet": "wallet1", "code": "BCY7K2Q9M4XA"},
    "coupon.transfer": {"user": "shop-nicosia", "epin": "1001"},
    "coupon.share": {"email": "anna@example.cy", "epin": "1003", "share_amount": "10.50"},
    "coupon.delete": {"epin": "1005"},
    "coupon.refund_status": {"epin": "1015"},
    "coupon.list_wallets": {},
    "coupon.create": {
        "wallet_type": "wallet1",
        "epin_amount": "20",
        "number_of_pins": "2",
        "transferable": True,
        "reusable": False,
        "token_field": MAIL_TOKEN,
        "token_checksum_field": CHECKSUM,
        "form_key": "3f2a9c",
    },
    "coupon.history": {"wallet": "wallet2"},
}


def data_of(command_type: str, **changes: Any) -> CouponCommandData:
    model = COUPON_COMMAND_TYPES[command_type]
    parsed: CouponCommandData = model.model_validate({**DATA[command_type], **changes})  # type: ignore[assignment]
    return parsed


def answer(status: int, body: dict[str, Any] | None) -> Answer:
    return Answer(status, body, 3)


def ok(data: dict[str, Any]) -> Answer:
    return answer(200, {"status_code": 200, "errors": {}, "data": data})


def validation_error(errors: dict[str, list[str]]) -> Answer:
    """A refusal exactly as the API answers it."""
    body = {"status_code": 400, "message": "Validation Error", "errors": errors, "data": {}}
    return answer(400, body)


def request_failed(detail: str) -> Answer:
    body = {
        "status_code": 401,
        "message": "Request Failed",
        "errors": {"detail": detail},
        "data": {},
    }
    return answer(401, body)


FACILITY = "Coupon facility is disabled, Please contact your administrator."
REQUIRED, BLANK = "This field is required.", "This field may not be blank."
NUMERIC = "Only numeric characters are allowed."

# Every error message the vendor's file documents, per endpoint and field (verbatim).
DOCUMENTED: list[tuple[str, str, str]] = [
    *[
        ("coupon.transfer", "user", m)
        for m in (
            "User is not found.",
            "Field may not be blank.",
            "Self transfer not allowed.",
            "User already has the maximum number of active coupons.",
        )
    ],
    *[
        ("coupon.transfer", "epin", m)
        for m in ("Coupon is not found.", "Coupon is not transferable.", "Invalid coupon.")
    ],
    *[("coupon.share", "email", m) for m in (REQUIRED, BLANK, "Enter a valid email address.")],
    *[
        ("coupon.share", "epin", m)
        for m in (REQUIRED, BLANK, NUMERIC, "Coupon is not found.", "Coupon is not transferable.")
    ],
    *[
        ("coupon.share", "share_amount", m)
        for m in (REQUIRED, BLANK, NUMERIC, "Insufficient Balance.")
    ],
    *[
        (t, "epin", m)
        for t in ("coupon.delete", "coupon.refund_status")
        for m in (REQUIRED, BLANK, NUMERIC, "Coupon is not found.")
    ],
    *[
        ("coupon.create", "wallet_type", m)
        for m in (
            REQUIRED,
            BLANK,
            "You don't have sufficient balance to continue with this operation.",
        )
    ],
    *[
        ("coupon.create", "epin_amount", m)
        for m in (
            "Invalid or empty Amount.",
            REQUIRED,
            BLANK,
            "Please enter an amount between 5 and 1000.",
            "Only integers are allowed.",
            "Ensure this field has no more than 7 characters.",
        )
    ],
    *[
        ("coupon.create", "number_of_pins", m)
        for m in (
            REQUIRED,
            BLANK,
            "This operation exceeds the maximum number of active Coupons.",
            "Invalid number of Coupon.",
            NUMERIC,
        )
    ],
    *[("coupon.create", "transferable", m) for m in (REQUIRED, BLANK, "Select True or False")],
    *[("coupon.create", "reusable", m) for m in (REQUIRED, BLANK, "Select True or False")],
    *[("coupon.create", "token_checksum_field", m) for m in (REQUIRED, BLANK)],
    *[("coupon.create", "token_field", m) for m in (REQUIRED, BLANK, "Token is not matching.")],
    ("coupon.create", "form_key", "You have another form running, Please reload."),
]


# --- what each command sends -------------------------------------------------------------------


def test_request_for_every_command() -> None:
    expected = {
        "coupon.list_active": Request(
            "GET", "user/get/active-epin/", {"wallet": "wallet1", "code": "BCY7K2Q9M4XA"}
        ),
        "coupon.transfer": Request(
            "POST", "user/transfer/epin/", form={"user": "shop-nicosia", "epin": "1001"}
        ),
        "coupon.share": Request(
            "POST",
            "user/share/epin/",
            form={"email": "anna@example.cy", "epin": "1003", "share_amount": "10.50"},
        ),
        "coupon.delete": Request("DELETE", "user/delete/epin/", {"epin": "1005", "status": "1"}),
        "coupon.refund_status": Request("DELETE", "user/delete/epin/", {"epin": "1015"}),
        "coupon.list_wallets": Request("GET", "user/generate/epin/"),
        "coupon.create": Request(
            "POST",
            "user/generate/epin/",
            form={
                "wallet_type": "wallet1",
                "epin_amount": "20",
                "number_of_pins": "2",
                "transferable": "True",
                "reusable": "False",
                "token_field": MAIL_TOKEN,
                "token_checksum_field": CHECKSUM,
                "form_key": "3f2a9c",
            },
        ),
        "coupon.history": Request("GET", "user/epin/history/", {"wallet": "wallet2"}),
    }
    assert set(expected) == set(COUPON_COMMAND_TYPES)
    for command_type, request in expected.items():
        assert request_for(data_of(command_type)) == request, command_type


def test_refund_status_has_no_status_and_delete_has_status_1() -> None:
    delete = request_for(Delete(epin="7"))
    status = request_for(RefundStatus(epin="7"))
    assert (delete.method, delete.path) == (status.method, status.path)
    assert delete.params == {"epin": "7", "status": "1"}
    assert status.params == {"epin": "7"} and "status" not in status.params
    assert delete.form is None and status.form is None


def test_optional_query_parameters_are_left_out() -> None:
    assert request_for(ListActive()) == Request("GET", "user/get/active-epin/", {})
    assert request_for(ListActive(wallet="wallet2")).params == {"wallet": "wallet2"}
    assert request_for(ListActive(code="PIN1")).params == {"code": "PIN1"}
    assert request_for(History()) == Request("GET", "user/epin/history/", {})
    assert request_for(ListWallets()).params is None


@pytest.mark.parametrize(
    ("given", "sent"),
    [("10.50", "10.50"), ("10.5", "10.50"), ("10", "10"), (10, "10"), (Decimal("0.01"), "0.01")],
)
def test_share_amount_is_sent_normalised(given: Any, sent: str) -> None:
    data = Share(email="a@example.cy", epin="1", share_amount=given)
    request = request_for(data)
    assert request.form is not None and request.form["share_amount"] == sent
    assert "E" not in request.form["share_amount"]


def test_share_amount_never_a_float() -> None:
    with pytest.raises(ValueError, match="float"):
        Share.model_validate({"email": "a@example.cy", "epin": "1", "share_amount": 10.5})


@pytest.mark.parametrize(
    ("transferable", "reusable", "sent"),
    [
        (True, False, ("True", "False")),
        (False, True, ("False", "True")),
        ("True", "False", ("True", "False")),
        ("false", "true", ("False", "True")),
    ],
)
def test_create_flags_are_true_or_false(transferable: Any, reusable: Any, sent: Any) -> None:
    data = data_of("coupon.create", transferable=transferable, reusable=reusable)
    form = request_for(data).form
    assert form is not None
    assert (form["transferable"], form["reusable"]) == sent


def test_ids_given_as_numbers_are_sent_as_text() -> None:
    assert request_for(Transfer.model_validate({"user": "u", "epin": 1001})).form == {
        "user": "u",
        "epin": "1001",
    }
    assert request_for(Delete.model_validate({"epin": 1005})).params == {
        "epin": "1005",
        "status": "1",
    }


def test_create_command_keeps_its_tokens_secret() -> None:
    data = data_of("coupon.create")
    assert isinstance(data, Create)
    assert isinstance(data.token_field, SecretStr)
    for text in (repr(data), str(data), data.model_dump_json()):
        assert MAIL_TOKEN not in text and CHECKSUM not in text
    # ... and still sends them: the API needs them.
    form = request_for(data).form
    assert form is not None
    assert (form["token_field"], form["token_checksum_field"]) == (MAIL_TOKEN, CHECKSUM)


def test_create_request_repr_does_not_leak_the_mail_token() -> None:
    request = request_for(data_of("coupon.create"))
    for text in (repr(request), str(request)):
        assert MAIL_TOKEN not in text
        assert CHECKSUM not in text


def test_money_moving_and_paginated_sets() -> None:
    assert {
        "coupon.transfer",
        "coupon.share",
        "coupon.create",
        "coupon.delete",
    } == MONEY_MOVING
    assert {"coupon.list_active", "coupon.history"} == PAGINATED
    assert set(COUPON_COMMAND_TYPES) >= MONEY_MOVING | PAGINATED


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command_type", "field", "message"), DOCUMENTED, ids=[f"{t}-{f}-{m}" for t, f, m in DOCUMENTED]
)
def test_every_documented_validation_error(command_type: str, field: str, message: str) -> None:
    decision = decide(command_type, data_of(command_type), validation_error({field: [message]}))
    assert decision.outcome is Outcome.REJECTED
    assert decision.reason == "validation_error"
    assert decision.message == message
    assert decision.details == {"errors": {field: [message]}}


def test_documented_list_covers_every_field_of_the_file() -> None:
    fields = {(t, f) for t, f, _ in DOCUMENTED}
    assert len(DOCUMENTED) == 53
    assert {f for t, f in fields if t == "coupon.create"} == {
        "wallet_type",
        "epin_amount",
        "number_of_pins",
        "transferable",
        "reusable",
        "token_field",
        "token_checksum_field",
        "form_key",
    }
    assert {f for t, f in fields if t == "coupon.share"} == {"email", "epin", "share_amount"}
    assert {f for t, f in fields if t == "coupon.transfer"} == {"user", "epin"}


def test_validation_error_keeps_every_field_and_message() -> None:
    errors = {
        "epin_amount": ["Only integers are allowed."],
        "number_of_pins": [NUMERIC, "Invalid number of Coupon."],
        "reusable": ["Select True or False"],
    }
    decision = decide("coupon.create", data_of("coupon.create"), validation_error(errors))
    assert decision.outcome is Outcome.REJECTED and decision.reason == "validation_error"
    assert decision.details == {"errors": errors}
    assert decision.message == "Only integers are allowed."


def test_validation_error_with_a_single_string_or_a_detail() -> None:
    body = {"status_code": 400, "errors": {"epin": "Coupon is not found."}, "data": {}}
    decision = decide("coupon.delete", data_of("coupon.delete"), answer(400, body))
    assert decision.details == {"errors": {"epin": ["Coupon is not found."]}}
    assert decision.message == "Coupon is not found."
    malformed = {"status_code": 400, "errors": {"detail": "Malformed request body."}, "data": {}}
    decision = decide("coupon.share", data_of("coupon.share"), answer(400, malformed))
    assert (decision.outcome, decision.reason) == (Outcome.REJECTED, "validation_error")
    assert decision.details == {"errors": {"detail": ["Malformed request body."]}}


def test_400_without_a_json_body_is_still_rejected() -> None:
    decision = decide("coupon.transfer", data_of("coupon.transfer"), answer(400, None))
    assert (decision.outcome, decision.reason) == (Outcome.REJECTED, "validation_error")
    assert decision.details == {"errors": {}}
    assert decision.message is None


@pytest.mark.parametrize("command_type", sorted(COUPON_COMMAND_TYPES))
def test_facility_disabled(command_type: str) -> None:
    decision = decide(command_type, data_of(command_type), request_failed(FACILITY))
    assert decision.outcome is Outcome.REJECTED
    assert decision.reason == "facility_disabled"
    assert decision.message == FACILITY


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (
            401,
            {
                "detail": "Given token not valid for any token type",
                "code": "token_not_valid",
                "messages": [{"token_class": "AccessToken", "message": "Token is invalid"}],
            },
            "Given token not valid for any token type",
        ),
        (401, {"detail": "User is inactive", "code": "user_inactive"}, "User is inactive"),
        (
            403,
            {"status_code": 403, "errors": {"detail": "Invalid API key."}, "data": {}},
            "Invalid API key.",
        ),
        (401, None, None),
        (403, {"detail": "You do not have permission to perform this action."}, None),
    ],
)
@pytest.mark.parametrize("command_type", ["coupon.transfer", "coupon.list_active"])
def test_unauthorized(
    command_type: str, status: int, body: dict[str, Any] | None, message: str | None
) -> None:
    decision = decide(command_type, data_of(command_type), answer(status, body))
    assert decision.outcome is Outcome.FAILED
    assert decision.reason == "unauthorized"
    if message is not None:
        assert decision.message == message


@pytest.mark.parametrize("command_type", sorted(COUPON_COMMAND_TYPES))
def test_too_many_requests_failed(command_type: str) -> None:
    decision = decide(command_type, data_of(command_type), answer(429, {"detail": "Slow down"}))
    assert decision.outcome is Outcome.FAILED
    assert decision.reason == "upstream_unavailable"
    assert decision.message == "Slow down"


@pytest.mark.parametrize("status", [500, 502, 503, 504])
@pytest.mark.parametrize("command_type", sorted(COUPON_COMMAND_TYPES))
def test_server_errors(command_type: str, status: int) -> None:
    decision = decide(command_type, data_of(command_type), answer(status, None))
    assert decision.reason == "upstream_unavailable"
    if command_type in MONEY_MOVING:
        # It may have been applied before the error: the ledger must reconcile.
        assert decision.outcome is Outcome.INDETERMINATE
    else:
        assert decision.outcome is Outcome.FAILED


@pytest.mark.parametrize("command_type", sorted(COUPON_COMMAND_TYPES))
def test_non_json_success(command_type: str) -> None:
    decision = decide(command_type, data_of(command_type), answer(200, None))
    if command_type in MONEY_MOVING:
        assert decision.outcome is Outcome.INDETERMINATE
        assert decision.reason == "upstream_unrecognised"
    else:
        assert decision.outcome is Outcome.REJECTED
        assert decision.reason == "upstream_rejected"


@pytest.mark.parametrize("command_type", sorted(COUPON_COMMAND_TYPES))
def test_success_without_a_data_object(command_type: str) -> None:
    body = {"status_code": 200, "errors": {}, "data": []}
    decision = decide(command_type, data_of(command_type), answer(200, body))
    expected = Outcome.INDETERMINATE if command_type in MONEY_MOVING else Outcome.REJECTED
    assert decision.outcome is expected


def test_other_statuses_are_rejected() -> None:
    invalid_page = {"status_code": 404, "errors": {"detail": "Invalid page."}, "data": {}}
    decision = decide("coupon.history", data_of("coupon.history"), answer(404, invalid_page))
    assert (decision.outcome, decision.reason) == (Outcome.REJECTED, "upstream_rejected")
    assert decision.message == "Invalid page."
    decision = decide("coupon.delete", data_of("coupon.delete"), answer(404, {"detail": "Nope"}))
    assert (decision.outcome, decision.reason, decision.message) == (
        Outcome.REJECTED,
        "upstream_rejected",
        "Nope",
    )


# --- success -------------------------------------------------------------------------------------

COUPON = {
    "id": 1001,
    "pin": "BCY7K2Q9M4XA",
    "charge": "50.00",
    "balance": "50.00",
    "reusable": False,
    "transferable": True,
    "wallet_type": "wallet1",
    "currecy_data": {"decimals": 2, "symbol_placement": "before", "symbol": "€", "rate": 1},
    "currency_code": "EUR",
}


def test_list_active_success_uses_every_page() -> None:
    page = {"results": [COUPON], "count": 3, "previous": None, "next": None}
    listed = [COUPON, {**COUPON, "id": 1002}, {**COUPON, "id": 1003}]
    data = data_of("coupon.list_active")
    decision = decide("coupon.list_active", data, ok(page), listed)
    assert decision.outcome is Outcome.SUCCEEDED and decision.reason is None
    assert decision.details == {"coupons": listed, "count": 3}
    # Without pages collected: the one page's results.
    assert decide("coupon.list_active", data, ok(page)).details == {
        "coupons": [COUPON],
        "count": 1,
    }


def test_history_success() -> None:
    entry = {"id": 1, "epin": 1001, "action": "transfer", "amount": "50.00"}
    decision = decide(
        "coupon.history", data_of("coupon.history"), ok({"results": [entry]}), [entry, entry]
    )
    assert decision.outcome is Outcome.SUCCEEDED
    assert decision.details == {"entries": [entry, entry], "count": 2}


@pytest.mark.parametrize(
    ("command_type", "payload", "details"),
    [
        (
            "coupon.transfer",
            {"epin": 1001, "user": "shop-nicosia"},
            {"epin": "1001", "user": "shop-nicosia"},
        ),
        (
            "coupon.share",
            {"epin": 1003, "share_amount": "10.50", "balance": "89.50", "email": "a@b.cy"},
            {"epin": "1003", "share_amount": Decimal("10.50"), "balance": "89.50"},
        ),
        (
            "coupon.delete",
            {"epin": 1005, "refund_status": "refunded", "refunded_amount": "20.00"},
            {"epin": "1005", "refund_status": "refunded", "refunded_amount": "20.00"},
        ),
        (
            "coupon.refund_status",
            {"epin": 1015, "refund_status": "refunded"},
            {"epin": "1015", "refund_status": "refunded"},
        ),
        (
            "coupon.list_wallets",
            {"wallets": [{"wallet_type": "wallet1"}], "form_key": "k1", "token_checksum": "x"},
            {"wallets": [{"wallet_type": "wallet1"}], "form_key": "k1"},
        ),
        (
            "coupon.create",
            {"coupons": [COUPON], "wallet_balance": "4960.00"},
            {"coupons": [COUPON], "wallet_balance": "4960.00"},
        ),
    ],
)
def test_success_details(
    command_type: str, payload: dict[str, Any], details: dict[str, Any]
) -> None:
    decision = decide(command_type, data_of(command_type), ok(payload))
    assert decision.outcome is Outcome.SUCCEEDED
    assert decision.reason is None and decision.message is None
    assert decision.details == details


def test_success_money_is_never_a_float() -> None:
    decision = decide("coupon.share", data_of("coupon.share"), ok({"balance": "89.50"}))
    assert isinstance(decision.details["share_amount"], Decimal)
    assert not any(isinstance(v, float) for v in decision.details.values())


# --- answers from the sandbox's own state machine -----------------------------------------------


@pytest.fixture
def state() -> EpinSandbox:
    # Not named `sandbox`/`epin`: conftest's autouse fixture treats those as sandbox processes.
    return EpinSandbox.from_seed_file(SEED_PATH)


def ask(state: EpinSandbox, command_type: str, data: CouponCommandData) -> Answer:
    """What the sandbox answers to the request `request_for` builds, as the client sees it."""
    status, body = state.dispatch(
        "login", apikey=API_KEY, fields={"username": MAIN, "password": MAIN_PW}
    )
    assert status == 200
    route = {
        "coupon.list_active": "active",
        "coupon.transfer": "transfer",
        "coupon.share": "share",
        "coupon.delete": "delete",
        "coupon.refund_status": "delete",
        "coupon.list_wallets": "wallets",
        "coupon.create": "create",
        "coupon.history": "history",
    }[command_type]
    request = request_for(data)
    status, body = state.dispatch(
        route,
        apikey=API_KEY,
        authorization=f"Bearer {body['access']}",
        fields=request.form or {},
        query=request.params or {},
        url="http://epin.test/api/v1/" + request.path,
    )
    return answer(status, body)


@pytest.mark.parametrize(
    ("command_type", "data", "errors"),
    [
        (
            "coupon.transfer",
            {"user": MAIN, "epin": "1001"},
            {"user": ["Self transfer not allowed."]},
        ),
        (
            "coupon.transfer",
            {"user": "nobody", "epin": "1009"},
            {"user": ["User is not found."], "epin": ["Coupon is not transferable."]},
        ),
        (
            "coupon.share",
            {"email": "not-an-email", "epin": "1007", "share_amount": "11"},
            {"email": ["Enter a valid email address."], "share_amount": ["Insufficient Balance."]},
        ),
        ("coupon.delete", {"epin": "999999"}, {"epin": ["Coupon is not found."]}),
        ("coupon.refund_status", {"epin": "2001"}, {"epin": ["Coupon is not found."]}),
        (
            "coupon.create",
            {"form_key": "never-issued"},
            {"form_key": ["You have another form running, Please reload."]},
        ),
    ],
)
def test_sandbox_refusals_are_validation_errors(
    state: EpinSandbox, command_type: str, data: dict[str, Any], errors: dict[str, list[str]]
) -> None:
    base = DATA[command_type] if command_type == "coupon.create" else {}
    parsed = COUPON_COMMAND_TYPES[command_type].model_validate({**base, **data})
    command_data: CouponCommandData = parsed  # type: ignore[assignment]
    got = ask(state, command_type, command_data)
    decision = decide(command_type, command_data, got)
    assert (decision.outcome, decision.reason) == (Outcome.REJECTED, "validation_error")
    assert decision.details == {"errors": errors}


def test_sandbox_create_with_a_real_form_key_and_mail_token(state: EpinSandbox) -> None:
    user = state.user(MAIN)
    assert user is not None
    key = state.wallet_list(user)[1]["data"]["form_key"]
    data = data_of(
        "coupon.create",
        form_key=key,
        token_field=MAIN_TOKEN,
        token_checksum_field=token_checksum(MAIN_TOKEN),
    )
    decision = decide("coupon.create", data, ask(state, "coupon.create", data))
    assert decision.outcome is Outcome.SUCCEEDED
    assert len(decision.details["coupons"]) == 2
    assert decision.details["wallet_balance"] == "4960.00"
    # The same form key again: refused, and nothing created.
    again = decide("coupon.create", data, ask(state, "coupon.create", data))
    assert (again.outcome, again.reason) == (Outcome.REJECTED, "validation_error")
    assert again.details["errors"] == {
        "form_key": ["You have another form running, Please reload."]
    }


def test_sandbox_facility_disabled(state: EpinSandbox) -> None:
    state.settings.facility_enabled = False
    for command_type in ("coupon.list_wallets", "coupon.create"):
        data = data_of(command_type)
        decision = decide(command_type, data, ask(state, command_type, data))
        assert (decision.outcome, decision.reason) == (Outcome.REJECTED, "facility_disabled")
        assert decision.message == FACILITY


def test_sandbox_successes(state: EpinSandbox) -> None:
    for command_type, data in [
        ("coupon.transfer", {"user": "shop-nicosia", "epin": "1001"}),
        ("coupon.share", {"email": "anna@example.cy", "epin": "1003", "share_amount": "10.5"}),
        ("coupon.delete", {"epin": "1005"}),
        ("coupon.refund_status", {"epin": "1005"}),
        ("coupon.list_active", {"wallet": "wallet2"}),
        ("coupon.history", {}),
    ]:
        parsed: CouponCommandData = COUPON_COMMAND_TYPES[command_type].model_validate(data)  # type: ignore[assignment]
        decision = decide(command_type, parsed, ask(state, command_type, parsed))
        assert decision.outcome is Outcome.SUCCEEDED, (command_type, decision)
    coupon = state.coupon(1003)
    assert coupon is not None and coupon.balance == Decimal("89.50")
