"""CouponCommandHandler against the Epin sandbox in-process: every command, refusals, retries,
and money-moving calls that are never sent twice, whose lost answers are reconciled."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette

from voucher_bridge.epin.client import Credentials, EpinClient
from voucher_bridge.epin.handler import CouponCommandHandler
from voucher_bridge.once import SentCall
from voucher_bridge.upstream import RetryPolicy
from voucher_contracts import CommandEnvelope, Outcome, ResultData, UpstreamReport
from voucher_contracts.coupon import COUPON_COMMAND_TYPES
from voucher_sandboxes import SEEDS
from voucher_sandboxes.epin import EpinSandbox, User, create_app, token_checksum
from voucher_sandboxes.faults import ConnectionDropped, FaultConfig, FaultInjector

SEED_PATH = SEEDS / "epin-seed.json"
BASE = "http://epin.test/api/v1"
API_KEY = "sbx-epin-apikey-6d1f0c9a3b7e4a25"
MAIN, MAIN_PW, MAIN_TOKEN = "backoffice-cy", "sbx-backoffice-Pa55", "MT-BCY-482917"
NIC = "shop-nicosia"
ACCOUNT = "cy-backoffice"  # the account name the commands use; its username is MAIN
ACCOUNTS = {
    ACCOUNT: Credentials(MAIN, SecretStr(MAIN_PW)),
    "limassol": Credentials("shop-limassol", SecretStr("sbx-limassol-Pa55")),
    "wrong-password": Credentials(MAIN, SecretStr("not-the-Pa55word-4410")),
    "closed": Credentials("shop-paphos-closed", SecretStr("sbx-paphos-Pa55")),
}
SOURCE = "/backoffice/cy"
MAIN_ACTIVE = [1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013]

TRANSFER = "POST user/transfer/epin/"
SHARE = "POST user/share/epin/"
DELETE = "DELETE user/delete/epin/"
GENERATE_POST = "POST user/generate/epin/"
ACTIVE = "GET user/get/active-epin/"
LOGIN = "POST user/login/"


class Upstream(httpx.AsyncBaseTransport):
    """The sandbox app in-process, with transport faults scripted per call ("METHOD path").

    Actions: "pass"; "refuse" (ConnectError: never arrived); "vanish" (ReadError before the
    sandbox saw it: may have arrived, did not); "lose" (applied by the sandbox, then ReadError:
    the answer is lost); "429"/"503" (answered by a proxy, nothing applied). The sandbox's own
    drop-after-apply fault comes out as RemoteProtocolError, as over a real socket.
    """

    def __init__(self, app: Starlette) -> None:
        self._asgi = httpx.ASGITransport(app=app)
        self.plan: dict[str, list[str]] = {}
        self.requests: list[httpx.Request] = []

    def fault(self, key: str, *actions: str) -> Upstream:
        self.plan.setdefault(key, []).extend(actions)
        return self

    def keys(self) -> list[str]:
        return [_key(r) for r in self.requests]

    def count(self, key: str) -> int:
        return self.keys().count(key)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        key = _key(request)
        self.requests.append(request)
        queue = self.plan.get(key)
        action = queue.pop(0) if queue else "pass"
        if action == "refuse":
            raise httpx.ConnectError("connection refused", request=request)
        if action == "vanish":
            raise httpx.ReadError("connection reset", request=request)
        if action in ("429", "503"):
            return httpx.Response(int(action), text=f"<html>{action}</html>", request=request)
        try:
            response = await self._asgi.handle_async_request(request)
        except ConnectionDropped:
            message = "Server disconnected without sending a response."
            raise httpx.RemoteProtocolError(message, request=request) from None
        body = await response.aread()
        if action == "lose":
            raise httpx.ReadError("connection reset", request=request)
        return httpx.Response(response.status_code, headers=response.headers, content=body)


def _key(request: httpx.Request) -> str:
    return f"{request.method} {request.url.path.removeprefix('/api/v1/')}"


class NoWait(RetryPolicy):
    def delay(self, attempt: int) -> float:
        return 0.0


@pytest.fixture
def state() -> EpinSandbox:
    # Not named `sandbox`/`epin`: conftest's autouse fixture treats those as sandbox processes.
    return EpinSandbox.from_seed_file(SEED_PATH)


@pytest.fixture
def app(state: EpinSandbox) -> Starlette:
    return create_app(state, FaultConfig())


@pytest.fixture
def upstream(app: Starlette) -> Upstream:
    return Upstream(app)


@pytest.fixture
async def client(upstream: Upstream) -> AsyncIterator[EpinClient]:
    client = EpinClient(BASE, SecretStr(API_KEY), ACCOUNTS, transport=upstream)
    yield client
    await client.aclose()


@pytest.fixture
def handler(client: EpinClient) -> CouponCommandHandler:
    return CouponCommandHandler(client, NoWait(attempts=3))


GRACE_S = 120.0
LONG_AGO = SentCall(at=time.time() - GRACE_S - 1)  # past the grace, nothing from before


async def before_image(handler: CouponCommandHandler, cmd: CommandEnvelope) -> str:
    """What the handler keeps with the recovery point just before the call goes out."""
    data = COUPON_COMMAND_TYPES[cmd.type].model_validate(cmd.data)
    return (await handler._before(cmd.subject, data)).as_json()  # type: ignore[arg-type]


def command(
    type_: str,
    data: Any,
    subject: str = ACCOUNT,
    id_: str = "cmd-1",
    time: datetime | None = None,
) -> CommandEnvelope:
    return CommandEnvelope(
        id=id_,
        source=SOURCE,
        type=type_,
        subject=subject,
        time=time or datetime.now(UTC),
        data=data,
    )


def extras(result: ResultData) -> dict[str, Any]:
    return dict(result.model_extra or {})


def main_user(state: EpinSandbox) -> User:
    user = state.user(MAIN)
    assert user is not None
    return user


def new_form_key(state: EpinSandbox) -> str:
    key: str = state.wallet_list(main_user(state))[1]["data"]["form_key"]
    return key


def create_data(key: str, **changes: Any) -> dict[str, Any]:
    return {
        "wallet_type": "wallet1",
        "epin_amount": "20",
        "number_of_pins": "2",
        "transferable": True,
        "reusable": False,
        "token_field": MAIN_TOKEN,
        "token_checksum_field": token_checksum(MAIN_TOKEN),
        "form_key": key,
        **changes,
    }


def coupon(state: EpinSandbox, coupon_id: int) -> Any:
    found = state.coupon(coupon_id)
    assert found is not None
    return found


def wallet(state: EpinSandbox, wallet_type: str = "wallet1") -> Decimal:
    return main_user(state).wallets[wallet_type].balance


def faults(app: Starlette) -> FaultInjector:
    injector: FaultInjector = app.state.faults
    return injector


# --- every command -----------------------------------------------------------------------------


async def test_list_active_follows_every_page(
    handler: CouponCommandHandler, upstream: Upstream
) -> None:
    result = await handler.handle(command("coupon.list_active", {}), ACCOUNT)
    assert result.outcome is Outcome.SUCCEEDED and result.reason is None
    found = extras(result)
    assert [c["id"] for c in found["coupons"]] == MAIN_ACTIVE  # 13 coupons, pages of 10
    assert found["count"] == 13
    assert found["coupons"][0]["currecy_data"]["decimals"] == 2
    assert upstream.count(ACTIVE) == 2
    assert result.upstream.attempts == 1 and result.upstream.last_status == 200

    only = await handler.handle(command("coupon.list_active", {"wallet": "wallet2"}), ACCOUNT)
    assert [c["id"] for c in extras(only)["coupons"]] == [1012, 1013]
    by_pin = await handler.handle(command("coupon.list_active", {"code": "BCY3N8R5T2WE"}), None)
    assert [c["id"] for c in extras(by_pin)["coupons"]] == [1002]


async def test_pins_are_masked_in_results_unless_the_setting_shows_them(
    client: EpinClient, state: EpinSandbox
) -> None:
    """A PIN is bearer value and analytics reads coupon.results: masked by default, in lists
    and in what a create made; COUPON_RESULT_PINS=shown passes them on."""
    pins = {i: coupon(state, i).pin for i in MAIN_ACTIVE}
    masked = CouponCommandHandler(client, NoWait(attempts=3))
    listed = await masked.handle(command("coupon.list_active", {}), ACCOUNT)
    assert {c["pin"] for c in extras(listed)["coupons"]} == {"****"}
    assert not any(pin in listed.model_dump_json() for pin in pins.values())

    wallets = await masked.handle(command("coupon.list_wallets", None), ACCOUNT)
    made = await masked.handle(
        command("coupon.create", create_data(extras(wallets)["form_key"]), id_="c2"), ACCOUNT
    )
    assert made.outcome is Outcome.SUCCEEDED
    created = extras(made)["coupons"]
    assert created and {c["pin"] for c in created} == {"****"}
    assert not any(coupon(state, c["id"]).pin in made.model_dump_json() for c in created)

    shown = CouponCommandHandler(client, NoWait(attempts=3), show_pins=True)
    listed = await shown.handle(command("coupon.list_active", {}, id_="c3"), ACCOUNT)
    shown_pins = {c["id"]: c["pin"] for c in extras(listed)["coupons"]}
    assert {i: shown_pins[i] for i in MAIN_ACTIVE} == pins
    assert "****" not in shown_pins.values()


async def test_transfer(handler: CouponCommandHandler, state: EpinSandbox) -> None:
    data = {"user": NIC, "epin": 1001}
    result = await handler.handle(command("coupon.transfer", data), ACCOUNT)
    assert result.outcome is Outcome.SUCCEEDED
    assert extras(result) == {"epin": "1001", "user": NIC}
    moved = coupon(state, 1001)
    assert (moved.owner, moved.transfers) == (NIC, 1)


async def test_share(handler: CouponCommandHandler, state: EpinSandbox) -> None:
    data = {"email": "anna@example.cy", "epin": "1003", "share_amount": "10.50"}
    result = await handler.handle(command("coupon.share", data), ACCOUNT)
    assert result.outcome is Outcome.SUCCEEDED
    assert extras(result) == {
        "epin": "1003",
        "share_amount": Decimal("10.50"),
        "balance": "89.50",
    }
    assert (coupon(state, 1003).balance, coupon(state, 1003).shares) == (Decimal("89.50"), 1)


async def test_delete_and_refund_status(handler: CouponCommandHandler, state: EpinSandbox) -> None:
    before = wallet(state)
    status = await handler.handle(command("coupon.refund_status", {"epin": "1005"}), ACCOUNT)
    assert status.outcome is Outcome.SUCCEEDED
    assert extras(status) == {"epin": "1005", "refund_status": "not_refunded"}
    deleted = await handler.handle(command("coupon.delete", {"epin": "1005"}), ACCOUNT)
    assert deleted.outcome is Outcome.SUCCEEDED
    assert extras(deleted) == {
        "epin": "1005",
        "refund_status": "refunded",
        "refunded_amount": "20.00",
    }
    assert wallet(state) == before + Decimal("20.00")
    assert coupon(state, 1005).deletes == 1
    status = await handler.handle(command("coupon.refund_status", {"epin": "1005"}), ACCOUNT)
    assert extras(status)["refund_status"] == "refunded"
    # Asking for the refund status changes nothing.
    assert coupon(state, 1005).deletes == 1


async def test_list_wallets_then_create(handler: CouponCommandHandler, state: EpinSandbox) -> None:
    wallets = await handler.handle(command("coupon.list_wallets", {}), ACCOUNT)
    assert wallets.outcome is Outcome.SUCCEEDED
    found = extras(wallets)
    assert [w["wallet_type"] for w in found["wallets"]] == ["wallet1", "wallet2"]
    assert set(found) == {"wallets", "form_key"}  # token_checksum is not passed on

    create = command("coupon.create", create_data(found["form_key"]), id_="cmd-2")
    result = await handler.handle(create, ACCOUNT)
    assert result.outcome is Outcome.SUCCEEDED, result
    created = extras(result)
    assert len(created["coupons"]) == 2
    assert {c["balance"] for c in created["coupons"]} == {"20.00"}
    assert created["wallet_balance"] == "4960.00"
    form_key = state.form_key(found["form_key"])
    assert form_key is not None and form_key.uses == 1
    assert MAIN_TOKEN not in result.model_dump_json()


async def test_history(handler: CouponCommandHandler, state: EpinSandbox) -> None:
    state.settings.page_size = 2
    for epin in ("1001", "1002", "1003"):
        await handler.handle(command("coupon.transfer", {"user": NIC, "epin": epin}), ACCOUNT)
    result = await handler.handle(command("coupon.history", {}), ACCOUNT)
    assert result.outcome is Outcome.SUCCEEDED
    entries = extras(result)["entries"]
    assert [(e["action"], e["epin"]) for e in entries] == [
        ("transfer", 1003),
        ("transfer", 1002),
        ("transfer", 1001),
    ]
    assert extras(result)["count"] == 3
    other = await handler.handle(command("coupon.history", {"wallet": "wallet2"}), ACCOUNT)
    assert extras(other)["entries"] == []


# --- refusals, before any call and from the API ------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "data", "field"),
    [
        ("coupon.transfer", {"user": NIC}, "epin"),
        ("coupon.transfer", None, "user"),
        ("coupon.share", {"email": "a@b.cy", "epin": "1", "share_amount": 1.5}, "share_amount"),
        ("coupon.share", {"email": "a@b.cy", "epin": "1", "share_amount": "0"}, "share_amount"),
        ("coupon.delete", {"epin": ""}, "epin"),
        ("coupon.create", {"wallet_type": "wallet1", "token_field": MAIN_TOKEN}, "form_key"),
        ("coupon.list_active", ["not", "an", "object"], "data"),
    ],
)
async def test_invalid_data_is_rejected_without_any_call(
    handler: CouponCommandHandler, upstream: Upstream, type_: str, data: Any, field: str
) -> None:
    result = await handler.handle(command(type_, data), ACCOUNT)
    assert result.outcome is Outcome.REJECTED
    assert result.reason == "validation_error"
    assert any(name.startswith(field) for name in extras(result)["errors"]), extras(result)
    assert upstream.requests == []
    assert MAIN_TOKEN not in result.model_dump_json()


async def test_subject_must_equal_the_record_key(
    handler: CouponCommandHandler, upstream: Upstream
) -> None:
    result = await handler.handle(command("coupon.list_wallets", {}), "limassol")
    assert (result.outcome, result.reason) == (Outcome.REJECTED, "validation_error")
    assert extras(result)["errors"] == {"subject": ["must equal the record key"]}
    assert upstream.requests == []


async def test_unknown_account_makes_no_call(
    handler: CouponCommandHandler, upstream: Upstream
) -> None:
    for type_, data in [
        ("coupon.transfer", {"user": NIC, "epin": "1001"}),
        ("coupon.list_active", {}),
    ]:
        # The account name is the key: a username is not an account name.
        result = await handler.handle(command(type_, data, subject=MAIN), MAIN)
        assert (result.outcome, result.reason) == (Outcome.REJECTED, "unknown_account")
        assert result.upstream == UpstreamReport(attempts=0, last_status=None, elapsed_ms=0)
    assert upstream.requests == []


async def test_no_api_key_means_unknown_account(upstream: Upstream) -> None:
    client = EpinClient(BASE, None, ACCOUNTS, transport=upstream)
    result = await CouponCommandHandler(client).handle(command("coupon.list_wallets", {}), None)
    assert (result.outcome, result.reason) == (Outcome.REJECTED, "unknown_account")
    assert upstream.requests == []
    await client.aclose()


@pytest.mark.parametrize(
    ("account", "message"),
    [("wrong-password", "Authentication failed"), ("closed", "Inactive Account")],
)
async def test_credentials_refused(
    handler: CouponCommandHandler,
    upstream: Upstream,
    state: EpinSandbox,
    account: str,
    message: str,
) -> None:
    data = {"user": NIC, "epin": "1001"}
    result = await handler.handle(command("coupon.transfer", data, subject=account), account)
    assert (result.outcome, result.reason, result.message) == (
        Outcome.FAILED,
        "unauthorized",
        message,
    )
    assert upstream.keys() == [LOGIN]  # not retried, and the transfer never sent
    assert state.calls["transfer"] == 0
    assert "not-the-Pa55word-4410" not in result.model_dump_json()


async def test_api_refusal_keeps_the_field_messages(
    handler: CouponCommandHandler, state: EpinSandbox, upstream: Upstream
) -> None:
    result = await handler.handle(
        command("coupon.transfer", {"user": MAIN, "epin": "1009"}), ACCOUNT
    )
    assert (result.outcome, result.reason) == (Outcome.REJECTED, "validation_error")
    assert extras(result)["errors"] == {
        "user": ["Self transfer not allowed."],
        "epin": ["Coupon is not transferable."],
    }
    assert result.message == "Self transfer not allowed."
    assert result.upstream.last_status == 400 and result.upstream.attempts == 1
    assert upstream.count(TRANSFER) == 1


async def test_facility_disabled(handler: CouponCommandHandler, state: EpinSandbox) -> None:
    state.settings.facility_enabled = False
    for type_ in ("coupon.list_wallets", "coupon.create"):
        data = {} if type_ == "coupon.list_wallets" else create_data("k")
        result = await handler.handle(command(type_, data), ACCOUNT)
        assert (result.outcome, result.reason) == (Outcome.REJECTED, "facility_disabled")
        assert result.message is not None and "Coupon facility is disabled" in result.message


async def test_expired_token_renewed_within_a_command(
    handler: CouponCommandHandler, state: EpinSandbox, client: EpinClient
) -> None:
    await handler.handle(command("coupon.list_wallets", {}), ACCOUNT)
    state.expire_tokens(refresh=True)
    result = await handler.handle(command("coupon.transfer", {"user": NIC, "epin": "1004"}), None)
    assert result.outcome is Outcome.SUCCEEDED
    assert result.upstream.attempts == 1
    assert (client.logins, client.refreshes) == (2, 1)
    assert coupon(state, 1004).transfers == 1


# --- retries -----------------------------------------------------------------------------------


async def test_safe_calls_are_retried(handler: CouponCommandHandler, upstream: Upstream) -> None:
    upstream.fault(ACTIVE, "503", "vanish")
    result = await handler.handle(command("coupon.list_active", {}), ACCOUNT)
    assert result.outcome is Outcome.SUCCEEDED
    assert result.upstream.attempts == 3 and result.upstream.last_status == 200
    assert len(extras(result)["coupons"]) == 13

    upstream.fault("DELETE user/delete/epin/", "refuse", "429")
    status = await handler.handle(command("coupon.refund_status", {"epin": "1015"}), ACCOUNT)
    assert status.outcome is Outcome.SUCCEEDED and status.upstream.attempts == 3


@pytest.mark.parametrize(
    ("actions", "last_status"),
    [(("503", "503", "503"), 503), (("refuse", "vanish", "refuse"), None)],
)
async def test_safe_calls_fail_after_the_budget(
    handler: CouponCommandHandler,
    upstream: Upstream,
    actions: tuple[str, ...],
    last_status: int | None,
) -> None:
    upstream.fault("GET user/generate/epin/", *actions, "pass")
    result = await handler.handle(command("coupon.list_wallets", {}), ACCOUNT)
    assert (result.outcome, result.reason) == (Outcome.FAILED, "upstream_unavailable")
    assert result.upstream.attempts == 3
    assert result.upstream.last_status == last_status
    assert upstream.count("GET user/generate/epin/") == 3


async def test_money_moving_call_retried_only_while_it_cannot_have_arrived(
    handler: CouponCommandHandler, upstream: Upstream, state: EpinSandbox
) -> None:
    upstream.fault(TRANSFER, "refuse", "429")
    result = await handler.handle(command("coupon.transfer", {"user": NIC, "epin": "1001"}), None)
    assert result.outcome is Outcome.SUCCEEDED
    assert result.upstream.attempts == 3
    assert upstream.count(TRANSFER) == 3 and state.calls["transfer"] == 1
    assert coupon(state, 1001).transfers == 1


async def test_money_moving_call_never_sent_fails(
    handler: CouponCommandHandler, upstream: Upstream, state: EpinSandbox
) -> None:
    upstream.fault(SHARE, "refuse", "refuse", "refuse")
    data = {"email": "a@example.cy", "epin": "1003", "share_amount": "5"}
    result = await handler.handle(command("coupon.share", data), ACCOUNT)
    assert (result.outcome, result.reason) == (Outcome.FAILED, "upstream_unavailable")
    assert result.upstream.attempts == 3
    assert state.calls["share"] == 0 and coupon(state, 1003).balance == Decimal("100.00")


async def test_money_moving_5xx_is_not_resent(
    handler: CouponCommandHandler, upstream: Upstream, state: EpinSandbox
) -> None:
    upstream.fault(TRANSFER, "503")
    result = await handler.handle(command("coupon.transfer", {"user": NIC, "epin": "1001"}), None)
    # Not resent; the active list shows the coupon is still ours so far, but the transfer may
    # still be under way behind the proxy's 503: indeterminate, never failed on one read.
    assert (result.outcome, result.reason) == (Outcome.INDETERMINATE, "upstream_unavailable")
    assert extras(result) == {"seen": "the coupon is still in the account"}
    assert result.message is not None and "still in the account" in result.message
    assert result.upstream.attempts == 1 and result.upstream.last_status == 503
    assert upstream.count(TRANSFER) == 1 and coupon(state, 1001).transfers == 0


async def test_before_send_is_awaited_once_before_a_money_moving_call(
    handler: CouponCommandHandler, upstream: Upstream
) -> None:
    seen: list[list[str]] = []
    images: list[str | None] = []

    async def before_send(before: str | None) -> None:
        seen.append(upstream.keys())
        images.append(before)

    upstream.fault(TRANSFER, "refuse")
    data = {"user": NIC, "epin": "1002"}
    await handler.handle(command("coupon.transfer", data), ACCOUNT, before_send)
    assert len(seen) == 1 and TRANSFER not in seen[0]
    # The before-image goes with it: the coupon was in the account just before.
    assert images[0] is not None and json.loads(images[0])["held"] is True
    await handler.handle(command("coupon.list_active", {}), ACCOUNT, before_send)
    await handler.handle(command("coupon.refund_status", {"epin": "1"}), ACCOUNT, before_send)
    assert len(seen) == 1
    # A command refused before any call never reaches it either.
    await handler.handle(command("coupon.transfer", {"user": NIC}), ACCOUNT, before_send)
    assert len(seen) == 1


# --- lost answers: reconciled, never resent ----------------------------------------------------


async def test_lost_transfer_answer_is_reconciled(
    handler: CouponCommandHandler, upstream: Upstream, state: EpinSandbox
) -> None:
    upstream.fault(TRANSFER, "lose")
    result = await handler.handle(command("coupon.transfer", {"user": NIC, "epin": "1001"}), None)
    assert result.outcome is Outcome.SUCCEEDED, result
    assert extras(result) == {"epin": "1001", "user": NIC, "reconciled": True}
    assert result.message is not None and result.message.startswith("reconciled:")
    assert upstream.count(TRANSFER) == 1 and coupon(state, 1001).transfers == 1
    assert result.upstream.attempts == 1


async def test_lost_share_answer_is_reconciled_from_the_balance(
    handler: CouponCommandHandler, upstream: Upstream, state: EpinSandbox
) -> None:
    upstream.fault(SHARE, "lose")
    data = {"email": "anna@example.cy", "epin": "1003", "share_amount": "10.5"}
    result = await handler.handle(command("coupon.share", data), ACCOUNT)
    assert result.outcome is Outcome.SUCCEEDED, result
    assert extras(result) == {"epin": "1003", "share_amount": Decimal("10.50"), "reconciled": True}
    assert upstream.count(SHARE) == 1 and coupon(state, 1003).shares == 1


async def test_lost_share_that_emptied_the_coupon(
    handler: CouponCommandHandler, upstream: Upstream, state: EpinSandbox
) -> None:
    upstream.fault(SHARE, "lose")
    data = {"email": "anna@example.cy", "epin": "1007", "share_amount": "10.00"}
    result = await handler.handle(command("coupon.share", data), ACCOUNT)
    assert result.outcome is Outcome.SUCCEEDED, result
    assert coupon(state, 1007).shares == 1


async def test_lost_delete_answer_is_reconciled_from_the_refund_status(
    handler: CouponCommandHandler, upstream: Upstream, state: EpinSandbox
) -> None:
    before = wallet(state)
    upstream.fault(DELETE, "pass", "lose")  # the refund status before, then the delete
    result = await handler.handle(command("coupon.delete", {"epin": "1005"}), ACCOUNT)
    assert result.outcome is Outcome.SUCCEEDED, result
    assert extras(result) == {"epin": "1005", "reconciled": True}
    deletes = [r for r in upstream.requests if _key(r) == DELETE]
    # The refund status before (the before-image), the delete, the refund status after.
    assert [r.url.params.get("status") for r in deletes] == [None, "1", None]
    assert coupon(state, 1005).deletes == 1
    assert wallet(state) == before + Decimal("20.00")


async def test_lost_create_answer_is_reconciled_from_the_history(
    handler: CouponCommandHandler, upstream: Upstream, state: EpinSandbox
) -> None:
    key = new_form_key(state)
    upstream.fault(GENERATE_POST, "lose")
    result = await handler.handle(command("coupon.create", create_data(key)), ACCOUNT)
    assert result.outcome is Outcome.SUCCEEDED, result
    assert extras(result) == {"reconciled": True}
    assert upstream.count(GENERATE_POST) == 1 and state.calls["create"] == 1
    form_key = state.form_key(key)
    assert form_key is not None and form_key.uses == 1
    assert wallet(state) == Decimal("4960.00")
    # The history is read for the create's wallet only, before and after the call.
    history = [r for r in upstream.requests if _key(r) == "GET user/epin/history/"]
    assert len(history) >= 2
    assert {r.url.params.get("wallet") for r in history} == {"wallet1"}


@pytest.mark.parametrize(
    ("route", "type_", "data", "applied"),
    [
        ("transfer", "coupon.transfer", {"user": NIC, "epin": "1006"}, "transfers"),
        (
            "share",
            "coupon.share",
            {"email": "b@example.cy", "epin": "1004", "share_amount": "40"},
            "shares",
        ),
    ],
)
async def test_sandbox_drop_after_apply_is_reconciled(
    handler: CouponCommandHandler,
    app: Starlette,
    state: EpinSandbox,
    route: str,
    type_: str,
    data: dict[str, Any],
    applied: str,
) -> None:
    faults(app).update({"drop_after_apply_rate": 1.0, "routes": [route]})
    result = await handler.handle(command(type_, data), ACCOUNT)
    assert result.outcome is Outcome.SUCCEEDED, result
    assert extras(result)["reconciled"] is True
    assert state.calls[route] == 1
    assert getattr(coupon(state, int(data["epin"])), applied) == 1
    assert faults(app).injected["drop_after_apply"] == 1


async def test_sandbox_drop_after_apply_of_a_create(
    handler: CouponCommandHandler, app: Starlette, state: EpinSandbox
) -> None:
    key = new_form_key(state)
    faults(app).update({"drop_after_apply_rate": 1.0, "routes": ["create"]})
    result = await handler.handle(command("coupon.create", create_data(key)), ACCOUNT)
    assert result.outcome is Outcome.SUCCEEDED, result
    form_key = state.form_key(key)
    assert form_key is not None and form_key.uses == 1 and state.calls["create"] == 1


@pytest.mark.parametrize(
    ("type_", "data", "key", "said"),
    [
        ("coupon.transfer", {"user": NIC, "epin": "1001"}, TRANSFER, "still in the account"),
        (
            "coupon.share",
            {"email": "a@example.cy", "epin": "1003", "share_amount": "1"},
            SHARE,
            "neither the history nor the balance changed",
        ),
        ("coupon.delete", {"epin": "1005"}, DELETE, "not refunded"),
    ],
)
async def test_request_lost_before_it_applied(
    handler: CouponCommandHandler,
    upstream: Upstream,
    state: EpinSandbox,
    type_: str,
    data: dict[str, Any],
    key: str,
    said: str,
) -> None:
    cmd = command(type_, data)
    before = await before_image(handler, cmd)
    # The delete's before-image is a DELETE too (its refund status, without `status`).
    upstream.fault(key, *(["pass"] if key == DELETE else []), "vanish")
    result = await handler.handle(cmd, ACCOUNT)
    # Not applied so far, but it may still be under way at the API: indeterminate.
    assert (result.outcome, result.reason) == (Outcome.INDETERMINATE, "upstream_unavailable")
    assert result.message is not None and said in result.message
    # Once it can no longer be under way, the same reads prove it did not happen.
    settled = await handler.settle(cmd, result, SentCall(LONG_AGO.at, before, later=()))
    assert settled is not None
    assert (settled.outcome, settled.reason) == (Outcome.FAILED, "upstream_unavailable")
    assert settled.message is not None and said in settled.message
    assert extras(settled) == {"reconciled": True}
    # Never resent: only the reconciliation's reads went out after it (the refund status is
    # a DELETE without `status`, counted with deletes by the sandbox).
    assert state.snapshot()["totals"]["deletes"] == 0
    money = [
        r
        for r in upstream.requests
        if _key(r) == key and (r.method != "DELETE" or "status" in r.url.params)
    ]
    assert len(money) == 1
    assert state.snapshot()["totals"]["transfers"] == 0
    assert state.snapshot()["totals"]["shares"] == 0
    assert state.snapshot()["totals"]["deletes"] == 0


async def test_create_lost_before_it_applied_stays_indeterminate(
    handler: CouponCommandHandler, upstream: Upstream, state: EpinSandbox
) -> None:
    key = new_form_key(state)
    upstream.fault(GENERATE_POST, "vanish")
    result = await handler.handle(command("coupon.create", create_data(key)), ACCOUNT)
    # Nothing in the history, but a create may still show up: it cannot tell yet.
    assert (result.outcome, result.reason) == (Outcome.INDETERMINATE, "upstream_unavailable")
    assert upstream.count(GENERATE_POST) == 1 and state.calls["create"] == 0
    form_key = state.form_key(key)
    assert form_key is not None and form_key.uses == 0  # never presented: still usable


async def test_create_that_never_arrived_is_retried_with_the_same_key(
    handler: CouponCommandHandler, upstream: Upstream, state: EpinSandbox
) -> None:
    key = new_form_key(state)
    upstream.fault(GENERATE_POST, "refuse")
    result = await handler.handle(command("coupon.create", create_data(key)), ACCOUNT)
    assert result.outcome is Outcome.SUCCEEDED, result
    assert len(extras(result)["coupons"]) == 2
    assert result.upstream.attempts == 2
    assert upstream.count(GENERATE_POST) == 2 and state.calls["create"] == 1
    form_keys = [r for r in upstream.requests if _key(r) == GENERATE_POST]
    assert all(key.encode() in r.content for r in form_keys)
    form_key = state.form_key(key)
    assert form_key is not None and form_key.uses == 1
    assert state.snapshot()["totals"]["form_key_reuses"] == 0


# --- recover: never resend ---------------------------------------------------------------------


def apply_directly(state: EpinSandbox, type_: str, data: dict[str, Any]) -> None:
    """What a previous instance's call did upstream before it died."""
    user = main_user(state)
    fields = {k: str(v) for k, v in data.items()}
    if type_ == "coupon.transfer":
        status, _ = state.transfer(user, fields)
    elif type_ == "coupon.share":
        status, _ = state.share(user, fields)
    elif type_ == "coupon.delete":
        status, _ = state.delete(user, {**fields, "status": "1"})
    else:
        fields = {**fields, "transferable": "True", "reusable": "False"}
        status, _ = state.create(user, fields)
    assert status == 200


def totals(state: EpinSandbox) -> dict[str, Any]:
    """What the upstream holds (not the access tokens it issued to our reads)."""
    found: dict[str, Any] = state.snapshot()["totals"]
    found.pop("live_access_tokens")
    return found


RECOVERABLE: list[tuple[str, dict[str, Any]]] = [
    ("coupon.transfer", {"user": NIC, "epin": "1001"}),
    ("coupon.share", {"email": "a@example.cy", "epin": "1003", "share_amount": "7.25"}),
    ("coupon.delete", {"epin": "1005"}),
    ("coupon.create", {}),
]


@pytest.mark.parametrize("sent_ago", [5.0, GRACE_S + 1], ids=["just-sent", "long-ago"])
@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-applied"])
@pytest.mark.parametrize(("type_", "data"), RECOVERABLE, ids=[t for t, _ in RECOVERABLE])
async def test_recover_never_resends(
    handler: CouponCommandHandler,
    upstream: Upstream,
    state: EpinSandbox,
    type_: str,
    data: dict[str, Any],
    applied: bool,
    sent_ago: float,
) -> None:
    if type_ == "coupon.create":
        data = create_data(new_form_key(state))
    cmd = command(type_, data)
    # The instance that died had kept its before-image with the recovery point.
    image = await before_image(handler, cmd)
    if applied:
        apply_directly(state, type_, data)
    before = totals(state)
    calls_before = dict(state.calls)
    upstream.requests.clear()

    result = await handler.recover(cmd, ACCOUNT, SentCall(time.time() - sent_ago, image))

    if applied:
        assert result.outcome is Outcome.SUCCEEDED, result
        assert extras(result)["reconciled"] is True
        assert result.message is not None and result.message.startswith("reconciled:")
    elif sent_ago < GRACE_S:
        # Not applied so far, but the call may still be under way at the API.
        assert (result.outcome, result.reason) == (Outcome.INDETERMINATE, "upstream_unavailable")
    else:
        assert (result.outcome, result.reason) == (Outcome.FAILED, "upstream_unavailable")
    assert result.upstream.attempts == 0
    # Nothing was sent again: only reads (and a refund-status query) went out.
    for route in ("transfer", "share", "create"):
        assert state.calls[route] == calls_before[route]
    assert all("status" not in r.url.params for r in upstream.requests if r.method == "DELETE")
    assert totals(state) == before
    assert {_key(r) for r in upstream.requests} <= {
        LOGIN,
        ACTIVE,
        "GET user/epin/history/",
        DELETE,
    }


async def test_recover_of_a_safe_command_sends_it(
    handler: CouponCommandHandler, upstream: Upstream
) -> None:
    result = await handler.recover(
        command("coupon.refund_status", {"epin": "1015"}), ACCOUNT, SentCall()
    )
    assert result.outcome is Outcome.SUCCEEDED
    assert extras(result)["refund_status"] == "refunded"
    assert result.upstream.attempts == 1


async def test_recover_when_the_upstream_is_unreachable(
    handler: CouponCommandHandler, upstream: Upstream
) -> None:
    upstream.fault(LOGIN, "refuse", "refuse", "refuse")
    result = await handler.recover(
        command("coupon.transfer", {"user": NIC, "epin": "1001"}), ACCOUNT, LONG_AGO
    )
    assert result.outcome is Outcome.INDETERMINATE
    assert upstream.keys() == [LOGIN]


# --- settle --------------------------------------------------------------------------------------


def indeterminate(cmd: CommandEnvelope) -> ResultData:
    return ResultData(
        command_id=cmd.id,
        command_source=cmd.source,
        command_type=cmd.type,
        outcome=Outcome.INDETERMINATE,
        reason="upstream_unavailable",
        upstream=UpstreamReport(attempts=1, last_status=None, elapsed_ms=15000),
    )


async def test_settle_returns_none_while_it_cannot_tell(
    handler: CouponCommandHandler, upstream: Upstream, state: EpinSandbox
) -> None:
    # Nothing from before the call: history and balance cannot be told apart from earlier.
    create = command("coupon.create", create_data(new_form_key(state)))
    assert await handler.settle(create, indeterminate(create), LONG_AGO) is None
    share = command("coupon.share", {"email": "a@example.cy", "epin": "1003", "share_amount": "2"})
    assert await handler.settle(share, indeterminate(share), LONG_AGO) is None
    upstream.fault(ACTIVE, "refuse")
    transfer = command("coupon.transfer", {"user": NIC, "epin": "1001"})
    assert await handler.settle(transfer, indeterminate(transfer), LONG_AGO) is None
    # Not applied so far, but just sent: it may still show up.
    delete = command("coupon.delete", {"epin": "1005"})
    young = SentCall(time.time() - 5, await before_image(handler, delete))
    assert await handler.settle(delete, indeterminate(delete), young) is None
    assert state.calls["create"] == state.calls["share"] == state.calls["transfer"] == 0


async def test_settle_returns_the_decision_once_it_can_tell(
    handler: CouponCommandHandler, state: EpinSandbox
) -> None:
    transfer = command("coupon.transfer", {"user": NIC, "epin": "1001"})
    image = await before_image(handler, transfer)
    apply_directly(state, "coupon.transfer", {"user": NIC, "epin": "1001"})
    settled = await handler.settle(
        transfer, indeterminate(transfer), SentCall(time.time(), image, later=())
    )
    assert settled is not None
    assert settled.outcome is Outcome.SUCCEEDED
    assert (settled.command_id, settled.command_type) == ("cmd-1", "coupon.transfer")
    assert settled.upstream == indeterminate(transfer).upstream
    assert extras(settled) == {"epin": "1001", "user": NIC, "reconciled": True}

    delete = command("coupon.delete", {"epin": "1005"}, id_="cmd-2")
    image = await before_image(handler, delete)
    settled = await handler.settle(
        delete, indeterminate(delete), SentCall(LONG_AGO.at, image, later=())
    )
    assert settled is not None and settled.outcome is Outcome.FAILED  # known not applied

    data = create_data(new_form_key(state))
    create = command("coupon.create", data, id_="cmd-3")
    image = await before_image(handler, create)
    apply_directly(state, "coupon.create", data)
    settled = await handler.settle(
        create, indeterminate(create), SentCall(time.time(), image, later=())
    )
    assert settled is not None and settled.outcome is Outcome.SUCCEEDED
    # Only reads went out (the refund status is a DELETE without `status`).
    assert state.calls["transfer"] == 0
    assert coupon(state, 1005).deletes == 0


async def test_what_a_later_command_of_the_account_did_is_not_taken_for_this_one(
    handler: CouponCommandHandler, state: EpinSandbox
) -> None:
    # A share whose answer was lost (it never applied), then the same share by a new command
    # that went through: the history's new entry is the later one's.
    data = {"email": "a@example.cy", "epin": "1003", "share_amount": "2"}
    lost = command("coupon.share", data, id_="lost")
    image = await before_image(handler, lost)
    later = command("coupon.share", data, id_="later")
    assert (await handler.handle(later, ACCOUNT)).outcome is Outcome.SUCCEEDED
    young = SentCall(time.time() - 5, image, later=(later,))
    assert await handler.settle(lost, indeterminate(lost), young) is None
    # What shows it not applied still counts: a transfer's coupon still in the account.
    transfer = command("coupon.transfer", {"user": NIC, "epin": "1004"}, id_="t")
    image = await before_image(handler, transfer)
    touching = command("coupon.share", {**data, "epin": "1004"}, id_="touching")
    old = SentCall(LONG_AGO.at, image, later=(touching,))
    settled = await handler.settle(transfer, indeterminate(transfer), old)
    assert settled is not None and settled.outcome is Outcome.FAILED


async def test_a_share_identical_to_an_earlier_one_is_not_taken_for_it(
    handler: CouponCommandHandler, upstream: Upstream, state: EpinSandbox
) -> None:
    data = {"email": "a@example.cy", "epin": "1003", "share_amount": "2"}
    first = await handler.handle(command("coupon.share", data, id_="first"), ACCOUNT)
    assert first.outcome is Outcome.SUCCEEDED
    # The same share again, a moment later: it never reaches the API, its answer is lost.
    upstream.fault(SHARE, "vanish")
    second = await handler.handle(command("coupon.share", data, id_="second"), ACCOUNT)
    assert second.outcome is Outcome.INDETERMINATE, second  # the first is not taken for it
    assert coupon(state, 1003).shares == 1


# --- bugs ----------------------------------------------------------------------------------------


async def test_lost_answer_after_a_429_is_reconciled(
    handler: CouponCommandHandler, upstream: Upstream, state: EpinSandbox
) -> None:
    upstream.fault(SHARE, "429", "lose")
    data = {"email": "anna@example.cy", "epin": "1003", "share_amount": "10"}
    result = await handler.handle(command("coupon.share", data), ACCOUNT)
    assert coupon(state, 1003).shares == 1  # it was applied
    assert result.outcome is Outcome.SUCCEEDED, result


async def test_create_after_a_lost_login_is_retried(
    handler: CouponCommandHandler, upstream: Upstream, state: EpinSandbox
) -> None:
    key = new_form_key(state)
    upstream.fault(LOGIN, "vanish")
    result = await handler.handle(command("coupon.create", create_data(key)), ACCOUNT)
    assert result.outcome is Outcome.SUCCEEDED, result
    form_key = state.form_key(key)
    assert form_key is not None and form_key.uses == 1


async def test_an_earlier_identical_create_is_not_taken_for_this_one(
    handler: CouponCommandHandler, upstream: Upstream, state: EpinSandbox
) -> None:
    first = command("coupon.create", create_data(new_form_key(state), number_of_pins="1"))
    assert (await handler.handle(first, ACCOUNT)).outcome is Outcome.SUCCEEDED
    upstream.fault(GENERATE_POST, "vanish")
    data = create_data(new_form_key(state), number_of_pins="1")
    second = await handler.handle(command("coupon.create", data, id_="cmd-2"), ACCOUNT)
    assert state.calls["create"] == 1  # the second one never reached the API
    assert second.outcome is not Outcome.SUCCEEDED, second


@pytest.mark.parametrize("coupon_id", ["999999", "1014"], ids=["unknown", "zero-balance"])
async def test_lost_refusal_of_a_transfer_is_not_a_success(
    handler: CouponCommandHandler, upstream: Upstream, state: EpinSandbox, coupon_id: str
) -> None:
    upstream.fault(TRANSFER, "lose")
    result = await handler.handle(
        command("coupon.transfer", {"user": NIC, "epin": coupon_id}), None
    )
    assert state.snapshot()["totals"]["transfers"] == 0  # the API refused it
    assert result.outcome is not Outcome.SUCCEEDED, result


async def test_create_with_a_non_numeric_count_and_a_lost_answer(
    handler: CouponCommandHandler, upstream: Upstream, state: EpinSandbox
) -> None:
    upstream.fault(GENERATE_POST, "lose")
    data = create_data(new_form_key(state), number_of_pins="two")
    result = await handler.handle(command("coupon.create", data), ACCOUNT)
    assert result.outcome in (Outcome.INDETERMINATE, Outcome.FAILED)
