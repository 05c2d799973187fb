"""The Epin sandbox against the vendor's documentation and the project's wire decisions."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from starlette.applications import Starlette

from tests.support.clock import FakeClock
from tests.support.servers import serving_port
from voucher_sandboxes import SEEDS
from voucher_sandboxes.epin import (
    MSG_AMOUNT_RANGE,
    MSG_BLANK,
    MSG_COUPON_NOT_FOUND,
    MSG_EXCEEDS_MAX_ACTIVE,
    MSG_FACILITY_DISABLED,
    MSG_FIELD_BLANK,
    MSG_FORM_RUNNING,
    MSG_INSUFFICIENT,
    MSG_INTEGERS_ONLY,
    MSG_INVALID_AMOUNT,
    MSG_INVALID_COUPON,
    MSG_INVALID_EMAIL,
    MSG_INVALID_PIN_COUNT,
    MSG_MAX_7_CHARS,
    MSG_NOT_TRANSFERABLE,
    MSG_NUMERIC_ONLY,
    MSG_REQUIRED,
    MSG_SELF_TRANSFER,
    MSG_TOKEN_MISMATCH,
    MSG_TRUE_FALSE,
    MSG_USER_MAX_COUPONS,
    MSG_USER_NOT_FOUND,
    MSG_WALLET_INSUFFICIENT,
    ROUTE_NAMES,
    VALIDATION_MESSAGES,
    BodyError,
    EpinSandbox,
    EpinSeed,
    UserSeed,
    WalletSeed,
    build_epin_server,
    create_app,
    load_seed,
    parse_body,
    token_checksum,
)
from voucher_sandboxes.faults import ConnectionDropped, FaultConfig

if TYPE_CHECKING:
    pass

SEED_PATH = SEEDS / "epin-seed.json"

API_KEY = "sbx-epin-apikey-6d1f0c9a3b7e4a25"
MAIN, MAIN_PW, MAIN_TOKEN = "backoffice-cy", "sbx-backoffice-Pa55", "MT-BCY-482917"
LIM, LIM_PW = "shop-limassol", "sbx-limassol-Pa55"
NIC, NIC_PW = "shop-nicosia", "sbx-nicosia-Pa55"
CLOSED, CLOSED_PW = "shop-paphos-closed", "sbx-paphos-Pa55"
BASE = "https://epin.example"
API = "/api/v1/"
ACTIVE = API + "user/get/active-epin/"
TRANSFER = API + "user/transfer/epin/"
SHARE = API + "user/share/epin/"
DELETE = API + "user/delete/epin/"
GENERATE = API + "user/generate/epin/"
HISTORY = API + "user/epin/history/"
MAIN_ACTIVE = [1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013]

# A refused access token: the API's envelope by default, SimpleJWT's body with the setting.
TOKEN_REFUSED = {
    "status_code": 401,
    "errors": {"detail": "Given token not valid for any token type"},
}
TOKEN_NOT_VALID = {
    "detail": "Given token not valid for any token type",
    "code": "token_not_valid",
    "messages": [
        {
            "token_class": "AccessToken",
            "token_type": "access",
            "message": "Token is invalid or expired",
        }
    ],
}
FACILITY_DISABLED = {
    "status_code": 401,
    "message": "Request Failed",
    "errors": {"detail": MSG_FACILITY_DISABLED},
    "data": {},
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def epin(clock: FakeClock) -> EpinSandbox:
    return EpinSandbox.from_seed_file(SEED_PATH, clock=clock)


@pytest.fixture
def app(epin: EpinSandbox) -> Starlette:
    return create_app(epin, FaultConfig())


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as c:
        yield c


def multipart(fields: Mapping[str, str]) -> dict[str, tuple[None, str]]:
    """Form fields sent as multipart/form-data (as the vendor's samples send them)."""
    return {name: (None, value) for name, value in fields.items()}


def auth(access: str | None, apikey: str | None = API_KEY) -> dict[str, str]:
    headers = {}
    if apikey is not None:
        headers["apikey"] = apikey
    if access is not None:
        headers["Authorization"] = f"Bearer {access}"
    return headers


async def login_r(client: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    fields = {"username": username, "password": password}
    return await client.post(API + "user/login/", files=multipart(fields), headers=auth(None))


async def login(
    client: httpx.AsyncClient, username: str = MAIN, password: str = MAIN_PW
) -> dict[str, str]:
    r = await login_r(client, username, password)
    assert r.status_code == 200, r.text
    tokens: dict[str, str] = r.json()
    return tokens


@pytest.fixture
async def access(client: httpx.AsyncClient) -> str:
    return (await login(client))["access"]


async def post(
    client: httpx.AsyncClient, path: str, fields: Mapping[str, str], access: str
) -> httpx.Response:
    return await client.post(path, files=multipart(fields), headers=auth(access))


async def get(client: httpx.AsyncClient, path: str, access: str, **params: str) -> httpx.Response:
    return await client.get(path, params=params, headers=auth(access))


async def delete(client: httpx.AsyncClient, access: str, **params: str) -> httpx.Response:
    return await client.delete(DELETE, params=params, headers=auth(access))


def data(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status_code"] == 200 and body["errors"] == {}
    result: dict[str, Any] = body["data"]
    return result


def invalid(errors: dict[str, list[str]]) -> dict[str, Any]:
    return {"status_code": 400, "message": "Validation Error", "errors": errors, "data": {}}


async def active_ids(client: httpx.AsyncClient, access: str, **params: str) -> list[int]:
    r = await get(client, ACTIVE, access, page_size="100", **params)
    return [c["id"] for c in data(r)["results"]]


async def form_key(client: httpx.AsyncClient, access: str) -> str:
    key: str = data(await get(client, GENERATE, access))["form_key"]
    return key


def create_fields(key: str, **changes: str | None) -> dict[str, str]:
    fields: dict[str, str | None] = {
        "wallet_type": "wallet1",
        "epin_amount": "20",
        "number_of_pins": "1",
        "transferable": "True",
        "reusable": "False",
        "token_field": MAIN_TOKEN,
        "token_checksum_field": token_checksum(MAIN_TOKEN),
        "form_key": key,
        **changes,
    }
    return {k: v for k, v in fields.items() if v is not None}


# --- api key, login, tokens --------------------------------------------------------------------


async def test_api_key_required_everywhere(client: httpx.AsyncClient, access: str) -> None:
    expected = {"status_code": 403, "errors": {"detail": "Invalid API key."}, "data": {}}
    fields = {"username": MAIN, "password": MAIN_PW}
    r = await client.post(API + "user/login/", files=multipart(fields))
    assert (r.status_code, r.json()) == (403, expected)
    r = await client.post(API + "user/login/", files=multipart(fields), headers={"apikey": "wrong"})
    assert (r.status_code, r.json()) == (403, expected)
    for path in (ACTIVE, GENERATE, HISTORY):
        r = await client.get(path, headers=auth(access, apikey=None))
        assert (r.status_code, r.json()) == (403, expected)
    r = await client.delete(DELETE, params={"epin": "1001"}, headers=auth(access, "nope"))
    assert (r.status_code, r.json()) == (403, expected)


async def test_login_form_urlencoded_and_json(client: httpx.AsyncClient, epin: EpinSandbox) -> None:
    tokens = await login(client)
    assert set(tokens) == {"refresh", "access"}
    _header, payload, _signature = tokens["access"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["token_type"] == "access"
    assert claims["exp"] - claims["iat"] in (300, 301)
    fields = {"username": LIM, "password": LIM_PW}
    r = await client.post(API + "user/login/", data=fields, headers=auth(None))
    assert r.status_code == 200 and set(r.json()) == {"refresh", "access"}
    r = await client.post(API + "user/login/", json=fields, headers=auth(None))
    assert r.status_code == 200
    assert epin.logins == 3


async def test_login_failures(client: httpx.AsyncClient, epin: EpinSandbox) -> None:
    failed = {"status_code": 401, "errors": {"detail": "Authentication failed"}, "data": {}}
    inactive = {"status_code": 401, "errors": {"detail": "Inactive Account"}, "data": {}}
    for username, password in ((MAIN, "wrong"), ("nobody", MAIN_PW), (CLOSED, "wrong")):
        r = await login_r(client, username, password)
        assert (r.status_code, r.json()) == (401, failed)
    r = await login_r(client, CLOSED, CLOSED_PW)
    assert (r.status_code, r.json()) == (401, inactive)
    r = await client.post(
        API + "user/login/", files=multipart({"username": " "}), headers=auth(None)
    )
    assert r.status_code == 400
    assert r.json() == invalid({"username": [MSG_BLANK], "password": [MSG_REQUIRED]})
    assert epin.login_failures == 4 and epin.logins == 0
    assert epin.calls["login"] == 5 and epin.failures["login"] == 5


@pytest.mark.parametrize(
    ("shape", "expected"), [(None, TOKEN_REFUSED), ("simplejwt", TOKEN_NOT_VALID)]
)
async def test_bearer_missing_invalid_or_wrong_type(
    client: httpx.AsyncClient, shape: str | None, expected: dict[str, Any]
) -> None:
    if shape is not None:
        r = await client.post("/_sandbox/settings", json={"refused_token_shape": shape})
        assert r.json()["refused_token_shape"] == shape
    tokens = await login(client)
    for headers in (
        {"apikey": API_KEY},
        {"apikey": API_KEY, "Authorization": "Bearer"},
        {"apikey": API_KEY, "Authorization": "Bearer not-a-token"},
        {"apikey": API_KEY, "Authorization": f"Token {tokens['access']}"},
        {"apikey": API_KEY, "Authorization": f"Bearer {tokens['refresh']}"},
    ):
        r = await client.get(ACTIVE, headers=headers)
        assert (r.status_code, r.json()) == (401, expected)


async def test_access_expiry_and_refresh(
    client: httpx.AsyncClient, clock: FakeClock, epin: EpinSandbox
) -> None:
    tokens = await login(client)
    clock.advance(299)
    assert (await get(client, ACTIVE, tokens["access"])).status_code == 200
    clock.advance(1)
    r = await get(client, ACTIVE, tokens["access"])
    assert (r.status_code, r.json()) == (401, TOKEN_REFUSED)

    refresh_path = API + "user/token/refresh/"
    r = await client.post(
        refresh_path, files=multipart({"refresh": tokens["refresh"]}), headers=auth(None)
    )
    assert r.status_code == 200 and set(r.json()) == {"access"}
    new_access = r.json()["access"]
    assert (await get(client, ACTIVE, new_access)).status_code == 200

    bad = {"detail": "Token is invalid or expired", "code": "token_not_valid"}
    for value in ("garbage", tokens["access"]):
        r = await client.post(refresh_path, data={"refresh": value}, headers=auth(None))
        assert (r.status_code, r.json()) == (401, bad)
    r = await client.post(refresh_path, data={}, headers=auth(None))
    assert (r.status_code, r.json()) == (400, {"refresh": [MSG_REQUIRED]})
    clock.advance(86_400)
    r = await client.post(refresh_path, json={"refresh": tokens["refresh"]}, headers=auth(None))
    assert (r.status_code, r.json()) == (401, bad)
    assert epin.refreshes == 1 and epin.refresh_failures == 3


async def test_ttl_settings_and_expire_tokens(client: httpx.AsyncClient, clock: FakeClock) -> None:
    r = await client.post("/_sandbox/settings", json={"access_ttl_s": 5})
    assert r.json()["access_ttl_s"] == 5
    tokens = await login(client)
    clock.advance(5)
    assert (await get(client, ACTIVE, tokens["access"])).status_code == 401

    tokens = await login(client)
    r = await client.post("/_sandbox/expire-tokens")
    assert r.json() == {"expired": 1}
    assert (await get(client, ACTIVE, tokens["access"])).status_code == 401
    refresh_path = API + "user/token/refresh/"
    r = await client.post(refresh_path, data={"refresh": tokens["refresh"]}, headers=auth(None))
    assert r.status_code == 200
    await client.post("/_sandbox/expire-tokens", json={"refresh": True})
    r = await client.post(refresh_path, data={"refresh": tokens["refresh"]}, headers=auth(None))
    assert r.status_code == 401


async def test_user_deactivated_after_login(client: httpx.AsyncClient) -> None:
    tokens = await login(client, LIM, LIM_PW)
    seed = load_seed(SEED_PATH).users[1].model_copy(update={"active": False})
    r = await client.post("/_sandbox/users", json=[seed.model_dump(mode="json")])
    assert r.json() == {"added": 1}
    r = await get(client, ACTIVE, tokens["access"])
    assert (r.status_code, r.json()) == (
        401,
        {"detail": "User is inactive", "code": "user_inactive"},
    )
    r = await client.post(
        API + "user/token/refresh/", data={"refresh": tokens["refresh"]}, headers=auth(None)
    )
    assert r.status_code == 401 and r.json()["code"] == "no_active_account"


async def test_refused_token_shape_setting(
    client: httpx.AsyncClient, clock: FakeClock, epin: EpinSandbox
) -> None:
    assert (await client.get("/_sandbox/settings")).json()["refused_token_shape"] == "envelope"
    r = await client.post("/_sandbox/settings", json={"refused_token_shape": "drf"})
    assert r.status_code == 422
    tokens = await login(client)
    clock.advance(300)
    await client.post("/_sandbox/settings", json={"refused_token_shape": "simplejwt"})
    r = await get(client, ACTIVE, tokens["access"])
    assert (r.status_code, r.json()) == (401, TOKEN_NOT_VALID)
    # The refresh endpoint's own refusal is SimpleJWT's whatever the setting.
    bad = {"detail": "Token is invalid or expired", "code": "token_not_valid"}
    for shape in ("envelope", "simplejwt"):
        await client.post("/_sandbox/settings", json={"refused_token_shape": shape})
        r = await client.post(
            API + "user/token/refresh/", data={"refresh": "x"}, headers=auth(None)
        )
        assert (r.status_code, r.json()) == (401, bad)
    await client.post("/_sandbox/settings", json={"refused_token_shape": "simplejwt"})
    await client.post("/_sandbox/reset")
    assert epin.settings.refused_token_shape == "envelope"


async def test_revoke_tokens_before_their_expiry(
    client: httpx.AsyncClient, clock: FakeClock, epin: EpinSandbox
) -> None:
    first, second = await login(client), await login(client)
    lim = await login(client, LIM, LIM_PW)
    refresh_path = API + "user/token/refresh/"

    r = await client.post("/_sandbox/revoke", json={"username": MAIN, "kind": "access"})
    assert r.json() == {"revoked": 2}
    for tokens in (first, second):
        r = await get(client, ACTIVE, tokens["access"])
        assert (r.status_code, r.json()) == (401, TOKEN_REFUSED)
    assert (await get(client, ACTIVE, lim["access"])).status_code == 200  # another user's
    # The refresh tokens still work, and what is issued after the revocation is valid.
    r = await client.post(refresh_path, data={"refresh": first["refresh"]}, headers=auth(None))
    assert (await get(client, ACTIVE, r.json()["access"])).status_code == 200
    state = (await client.get("/_sandbox/state", params={"coupons": "0"})).json()
    assert state["totals"]["live_access_tokens"] == 2  # lim's and the refreshed one

    r = await client.post("/_sandbox/revoke", json={"username": MAIN, "kind": "refresh"})
    assert r.json() == {"revoked": 2}
    blacklisted = {"detail": "Token is blacklisted", "code": "token_not_valid"}
    r = await client.post(refresh_path, data={"refresh": second["refresh"]}, headers=auth(None))
    assert (r.status_code, r.json()) == (401, blacklisted)
    assert epin.refresh_failures == 1

    # "all" is the default; tokens revoked or expired already are not counted again.
    third = await login(client)
    clock.advance(300)  # every access token expires; third's refresh does not
    r = await client.post("/_sandbox/revoke", json={"username": MAIN})
    assert r.json() == {"revoked": 1}  # third's refresh
    r = await client.post(refresh_path, data={"refresh": third["refresh"]}, headers=auth(None))
    assert (r.status_code, r.json()) == (401, blacklisted)
    assert (await client.post("/_sandbox/revoke", json={"username": MAIN})).json() == {"revoked": 0}
    assert (await login(client))["access"]  # a new login is not affected

    r = await client.post("/_sandbox/revoke", json={"username": "nobody"})
    assert (r.status_code, r.json()) == (404, {"error": "unknown user: nobody"})
    r = await client.post("/_sandbox/revoke", json={"username": MAIN, "kind": "id"})
    assert r.status_code == 422
    r = await client.post("/_sandbox/revoke", json={})
    assert r.status_code == 422
    r = await client.post("/_sandbox/revoke", content=b"[]")
    assert r.status_code == 400


async def test_revoked_access_token_in_simplejwt_shape(client: httpx.AsyncClient) -> None:
    await client.post("/_sandbox/settings", json={"refused_token_shape": "simplejwt"})
    tokens = await login(client)
    await client.post("/_sandbox/revoke", json={"username": MAIN, "kind": "all"})
    r = await post(client, TRANSFER, {"user": NIC, "epin": "1001"}, tokens["access"])
    assert (r.status_code, r.json()) == (401, TOKEN_NOT_VALID)
    assert 1001 in await active_ids(client, (await login(client))["access"])  # not applied


# --- active coupons and pagination -------------------------------------------------------------


async def test_active_coupons_shape_and_pagination(client: httpx.AsyncClient, access: str) -> None:
    page1 = data(await get(client, ACTIVE, access))
    assert page1["count"] == 13
    assert [c["id"] for c in page1["results"]] == MAIN_ACTIVE[:10]
    assert page1["previous"] is None
    assert page1["next"] == f"{BASE}{ACTIVE}?page=2"
    assert page1["results"][0] == {
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
    r = await client.get(page1["next"], headers=auth(access))
    page2 = data(r)
    assert [c["id"] for c in page2["results"]] == MAIN_ACTIVE[10:]
    assert page2["next"] is None
    assert page2["previous"] == f"{BASE}{ACTIVE}"
    r = await get(client, ACTIVE, access, page="3")
    assert (r.status_code, r.json()) == (
        404,
        {"status_code": 404, "errors": {"detail": "Invalid page."}, "data": {}},
    )
    assert (await get(client, ACTIVE, access, page="x")).status_code == 404

    small = data(await get(client, ACTIVE, access, page_size="5", wallet="wallet1", page="2"))
    assert small["count"] == 11
    assert [c["id"] for c in small["results"]] == MAIN_ACTIVE[5:10]
    assert small["next"] == f"{BASE}{ACTIVE}?page_size=5&wallet=wallet1&page=3"
    assert small["previous"] == f"{BASE}{ACTIVE}?page_size=5&wallet=wallet1"
    last = data(await get(client, ACTIVE, access, page_size="5", page="last"))
    assert [c["id"] for c in last["results"]] == MAIN_ACTIVE[10:]

    assert await active_ids(client, access, wallet="wallet2") == [1012, 1013]
    assert await active_ids(client, access, code="BCY6H2Q8R5VX") == [1011]
    assert await active_ids(client, access, code="NOPE") == []
    await client.post("/_sandbox/settings", json={"page_size": 4})
    assert len(data(await get(client, ACTIVE, access))["results"]) == 4
    empty = data(await get(client, ACTIVE, (await login(client, NIC, NIC_PW))["access"]))
    assert empty == {"results": [], "count": 0, "previous": None, "next": None}


# --- transfer ----------------------------------------------------------------------------------


async def test_transfer_moves_the_coupon_once(
    client: httpx.AsyncClient, access: str, epin: EpinSandbox
) -> None:
    r = await post(client, TRANSFER, {"user": NIC, "epin": "1001"}, access)
    assert data(r) == {"epin": 1001, "user": NIC}
    assert 1001 not in await active_ids(client, access)
    nic = (await login(client, NIC, NIC_PW))["access"]
    assert await active_ids(client, nic) == [1001]
    # A resend of the same transfer (e.g. after a lost answer) finds the coupon gone.
    r = await post(client, TRANSFER, {"user": NIC, "epin": "1001"}, access)
    assert r.json() == invalid({"epin": [MSG_COUPON_NOT_FOUND]})
    coupon = epin.coupon(1001)
    assert coupon is not None and coupon.owner == NIC and coupon.transfers == 1
    # The receiver can pass it on, and see its refund status.
    assert data(await post(client, TRANSFER, {"user": LIM, "epin": "1001"}, nic))["user"] == LIM
    state = (await client.get("/_sandbox/state", params={"coupons": "1001"})).json()
    assert state["coupons"][0]["transfers"] == 2 and state["coupons"][0]["owner"] == LIM
    assert state["counters"]["calls"]["transfer"] == 3
    assert state["counters"]["failures"]["transfer"] == 1


# --- share -------------------------------------------------------------------------------------


async def test_share_moves_part_of_the_balance(
    client: httpx.AsyncClient, access: str, epin: EpinSandbox
) -> None:
    fields = {"email": "friend@example.com", "epin": "1001", "share_amount": "25.5"}
    assert data(await post(client, SHARE, fields, access)) == {
        "epin": 1001,
        "share_amount": "25.50",
        "balance": "24.50",
        "email": "friend@example.com",
    }
    state = (await client.get("/_sandbox/state")).json()
    [share] = state["shares"]
    assert share["epin"] == 1001 and share["amount"] == "25.50"
    assert share["email"] == "friend@example.com" and share["username"] == MAIN
    shared = next(c for c in state["coupons"] if c["id"] == share["coupon"])
    assert shared["owner"] is None and shared["email"] == "friend@example.com"
    assert shared["balance"] == "25.50" and shared["source"] == 1001
    # Sharing is not idempotent: the same request again shares again.
    fields["share_amount"] = "24.50"
    assert data(await post(client, SHARE, fields, access))["balance"] == "0.00"
    assert 1001 not in await active_ids(client, access)
    fields["share_amount"] = "0.01"
    r = await post(client, SHARE, fields, access)
    assert r.json() == invalid({"share_amount": [MSG_INSUFFICIENT]})
    coupon = epin.coupon(1001)
    assert coupon is not None and coupon.shares == 2 and coupon.balance == Decimal("0.00")


# --- delete and refund status ------------------------------------------------------------------


async def test_delete_refunds_and_reports_status(
    client: httpx.AsyncClient, access: str, epin: EpinSandbox
) -> None:
    assert data(await delete(client, access, epin="1002")) == {
        "epin": 1002,
        "refund_status": "not_refunded",
    }
    assert data(await delete(client, access, epin="1002", status="1")) == {
        "epin": 1002,
        "refund_status": "refunded",
        "refunded_amount": "50.00",
    }
    wallets = data(await get(client, GENERATE, access))["wallets"]
    assert wallets[0]["balance"] == "5050.00"
    assert data(await delete(client, access, epin="1002")) == {
        "epin": 1002,
        "refund_status": "refunded",
    }
    r = await delete(client, access, epin="1002", status="1")
    assert r.json() == invalid({"epin": [MSG_COUPON_NOT_FOUND]})
    assert data(await delete(client, access, epin="1015"))["refund_status"] == "refunded"
    assert 1002 not in await active_ids(client, access)
    coupon = epin.coupon(1002)
    assert coupon is not None and coupon.deletes == 1 and coupon.deleted
    r = await delete(client, access, epin="1003", status="yes")
    assert r.json() == invalid({"status": ['"yes" is not a valid choice.']})


# --- wallet list and create --------------------------------------------------------------------


async def test_wallet_list_issues_fresh_form_keys(client: httpx.AsyncClient, access: str) -> None:
    first = data(await get(client, GENERATE, access))
    second = data(await get(client, GENERATE, access))
    assert first["form_key"] != second["form_key"]
    assert first["token_checksum"] == hashlib.sha256(MAIN_TOKEN.encode()).hexdigest()[:16]
    assert first["wallets"] == [
        {
            "wallet_type": "wallet1",
            "name": "E-Wallet",
            "balance": "5000.00",
            "min_amount": "5.00",
            "max_amount": "1000.00",
        },
        {
            "wallet_type": "wallet2",
            "name": "Bonus Wallet",
            "balance": "100.00",
            "min_amount": "5.00",
            "max_amount": "1000.00",
        },
    ]


async def test_create_coupons(client: httpx.AsyncClient, access: str, epin: EpinSandbox) -> None:
    key = await form_key(client, access)
    fields = create_fields(key, epin_amount="20", number_of_pins="3", reusable="True")
    fields["transferable"] = "False"
    result = data(await post(client, GENERATE, fields, access))
    assert result["wallet_balance"] == "4940.00"
    assert len(result["coupons"]) == 3
    ids = [c["id"] for c in result["coupons"]]
    assert ids == [2003, 2004, 2005]  # the next free id
    for c in result["coupons"]:
        assert c["charge"] == c["balance"] == "20.00"
        assert c["reusable"] is True and c["transferable"] is False
        assert c["wallet_type"] == "wallet1" and len(c["pin"]) == 12
    assert await active_ids(client, access) == MAIN_ACTIVE + ids
    # The same form posted again: the key is used.
    r = await post(client, GENERATE, fields, access)
    assert r.json() == invalid({"form_key": [MSG_FORM_RUNNING]})
    state = (await client.get("/_sandbox/state", params={"coupons": "0"})).json()
    [used] = [k for k in state["form_keys"] if k["key"] == key]
    assert used == {"key": key, "username": MAIN, "uses": 2, "burnt": True}
    assert state["totals"]["form_key_reuses"] == 1
    assert state["counters"]["calls"]["create"] == 2


async def test_create_json_body_and_per_wallet_limits(
    client: httpx.AsyncClient, access: str
) -> None:
    key = await form_key(client, access)
    body: dict[str, Any] = {**create_fields(key, wallet_type="wallet2", epin_amount="25")}
    body.update(number_of_pins=2, transferable=True, reusable=False)  # JSON types
    r = await client.post(GENERATE, json=body, headers=auth(access))
    assert data(r)["wallet_balance"] == "50.00"
    user = load_seed(SEED_PATH).users[0].model_copy(deep=True)
    user.wallets[1].max_amount = Decimal("7.5")
    user.wallets.append(WalletSeed(wallet_type="wallet3", balance=Decimal(500), epin_enabled=False))
    await client.post("/_sandbox/users", json={"users": [user.model_dump(mode="json")]})
    access = (await login(client))["access"]
    wallets = data(await get(client, GENERATE, access))["wallets"]
    assert [w["wallet_type"] for w in wallets] == ["wallet1", "wallet2"]
    assert wallets[1]["max_amount"] == "7.50"
    r = await post(
        client,
        GENERATE,
        create_fields(await form_key(client, access), wallet_type="wallet2"),
        access,
    )
    assert r.json() == invalid({"epin_amount": ["Please enter an amount between 5 and 7.50."]})
    fields = create_fields(await form_key(client, access), wallet_type="wallet3")
    r = await post(client, GENERATE, fields, access)
    assert r.json() == invalid({"wallet_type": [MSG_WALLET_INSUFFICIENT]})


async def test_form_key_is_burnt_by_a_failed_create(client: httpx.AsyncClient, access: str) -> None:
    key = await form_key(client, access)
    r = await post(client, GENERATE, create_fields(key, epin_amount="4"), access)
    assert r.json() == invalid({"epin_amount": ["Please enter an amount between 5 and 1000."]})
    r = await post(client, GENERATE, create_fields(key), access)
    assert r.json() == invalid({"form_key": [MSG_FORM_RUNNING]})
    # Another user's key is not this user's either; an older unused key still is.
    older = await form_key(client, access)
    lim = (await login(client, LIM, LIM_PW))["access"]
    r = await post(client, GENERATE, create_fields(older), lim)
    assert r.json() == invalid({"form_key": [MSG_FORM_RUNNING]})
    await form_key(client, access)
    assert data(await post(client, GENERATE, create_fields(older), access))["coupons"]


# --- facility switch ---------------------------------------------------------------------------


async def test_facility_disabled_per_user_and_globally(
    client: httpx.AsyncClient, access: str
) -> None:
    key = await form_key(client, access)
    r = await client.post("/_sandbox/settings", json={"facility": {MAIN: False}})
    assert r.status_code == 200
    calls = [
        get(client, GENERATE, access),
        post(client, GENERATE, create_fields(key), access),
        get(client, ACTIVE, access),
        post(client, TRANSFER, {"user": NIC, "epin": "1001"}, access),
        post(client, SHARE, {"email": "a@b.cy", "epin": "1001", "share_amount": "1"}, access),
        delete(client, access, epin="1001", status="1"),
        get(client, HISTORY, access),
    ]
    for call in calls:
        r = await call
        assert (r.status_code, r.json()) == (401, FACILITY_DISABLED)
    lim = (await login(client, LIM, LIM_PW))["access"]  # login still works
    assert (await get(client, GENERATE, lim)).status_code == 200
    await client.post("/_sandbox/settings", json={"facility": {MAIN: True}})
    await client.post("/_sandbox/settings", json={"facility_enabled": False})
    r = await get(client, GENERATE, lim)
    assert (r.status_code, r.json()) == (401, FACILITY_DISABLED)
    await client.post("/_sandbox/settings", json={"facility_enabled": True})
    # Nothing was applied while disabled, and the form key was not burnt.
    assert data(await post(client, GENERATE, create_fields(key), access))["coupons"]
    assert 1001 in await active_ids(client, access)


# --- every documented validation message -------------------------------------------------------


@dataclass
class Case:
    route: str  # "transfer" | "share" | "delete" | "create"
    fields: dict[str, str | None]
    errors: dict[str, list[str]]
    settings: dict[str, Any] = field(default_factory=dict)


RANGE = MSG_AMOUNT_RANGE.format(min="5", max="1000")
SHARE_OK = {"email": "friend@example.com", "epin": "1001", "share_amount": "10"}
CASES = {
    # transfer
    "transfer-user-unknown": Case(
        "transfer", {"user": "nobody", "epin": "1001"}, {"user": [MSG_USER_NOT_FOUND]}
    ),
    "transfer-user-inactive": Case(
        "transfer", {"user": CLOSED, "epin": "1001"}, {"user": [MSG_USER_NOT_FOUND]}
    ),
    "transfer-user-blank": Case(
        "transfer", {"user": " ", "epin": "1001"}, {"user": [MSG_FIELD_BLANK]}
    ),
    "transfer-user-missing": Case("transfer", {"epin": "1001"}, {"user": [MSG_FIELD_BLANK]}),
    "transfer-self": Case(
        "transfer", {"user": MAIN, "epin": "1001"}, {"user": [MSG_SELF_TRANSFER]}
    ),
    "transfer-user-full": Case(
        "transfer",
        {"user": LIM, "epin": "1001"},
        {"user": [MSG_USER_MAX_COUPONS]},
        {"max_active_coupons": 2},
    ),
    "transfer-other-users": Case(
        "transfer", {"user": NIC, "epin": "2001"}, {"epin": [MSG_COUPON_NOT_FOUND]}
    ),
    "transfer-deleted": Case(
        "transfer", {"user": NIC, "epin": "1015"}, {"epin": [MSG_COUPON_NOT_FOUND]}
    ),
    "transfer-no-such": Case(
        "transfer", {"user": NIC, "epin": "99999999999999999999"}, {"epin": [MSG_COUPON_NOT_FOUND]}
    ),
    "transfer-not-transferable": Case(
        "transfer", {"user": NIC, "epin": "1009"}, {"epin": [MSG_NOT_TRANSFERABLE]}
    ),
    "transfer-non-numeric": Case(
        "transfer", {"user": NIC, "epin": "10a"}, {"epin": [MSG_INVALID_COUPON]}
    ),
    "transfer-zero-balance": Case(
        "transfer", {"user": NIC, "epin": "1014"}, {"epin": [MSG_INVALID_COUPON]}
    ),
    "transfer-both": Case(
        "transfer",
        {"user": "nobody", "epin": ""},
        {"user": [MSG_USER_NOT_FOUND], "epin": [MSG_INVALID_COUPON]},
    ),
    # share
    "share-email-missing": Case("share", {**SHARE_OK, "email": None}, {"email": [MSG_REQUIRED]}),
    "share-email-blank": Case("share", {**SHARE_OK, "email": ""}, {"email": [MSG_BLANK]}),
    "share-email-invalid": Case(
        "share", {**SHARE_OK, "email": "friend@"}, {"email": [MSG_INVALID_EMAIL]}
    ),
    "share-epin-missing": Case("share", {**SHARE_OK, "epin": None}, {"epin": [MSG_REQUIRED]}),
    "share-epin-blank": Case("share", {**SHARE_OK, "epin": " "}, {"epin": [MSG_BLANK]}),
    "share-epin-non-numeric": Case(
        "share", {**SHARE_OK, "epin": "1e3"}, {"epin": [MSG_NUMERIC_ONLY]}
    ),
    "share-epin-not-found": Case(
        "share", {**SHARE_OK, "epin": "2001"}, {"epin": [MSG_COUPON_NOT_FOUND]}
    ),
    "share-epin-not-transferable": Case(
        "share", {**SHARE_OK, "epin": "1010"}, {"epin": [MSG_NOT_TRANSFERABLE]}
    ),
    "share-amount-missing": Case(
        "share", {**SHARE_OK, "share_amount": None}, {"share_amount": [MSG_REQUIRED]}
    ),
    "share-amount-blank": Case(
        "share", {**SHARE_OK, "share_amount": ""}, {"share_amount": [MSG_BLANK]}
    ),
    "share-amount-text": Case(
        "share", {**SHARE_OK, "share_amount": "ten"}, {"share_amount": [MSG_NUMERIC_ONLY]}
    ),
    "share-amount-3-decimals": Case(
        "share", {**SHARE_OK, "share_amount": "1.005"}, {"share_amount": [MSG_NUMERIC_ONLY]}
    ),
    "share-amount-negative": Case(
        "share", {**SHARE_OK, "share_amount": "-1"}, {"share_amount": [MSG_NUMERIC_ONLY]}
    ),
    "share-amount-zero": Case(
        "share", {**SHARE_OK, "share_amount": "0.00"}, {"share_amount": [MSG_INVALID_AMOUNT]}
    ),
    "share-amount-over": Case(
        "share", {**SHARE_OK, "share_amount": "50.01"}, {"share_amount": [MSG_INSUFFICIENT]}
    ),
    "share-all-missing": Case(
        "share",
        {},
        {"email": [MSG_REQUIRED], "epin": [MSG_REQUIRED], "share_amount": [MSG_REQUIRED]},
    ),
    # delete (query parameters)
    "delete-missing": Case("delete", {"status": "1"}, {"epin": [MSG_REQUIRED]}),
    "delete-blank": Case("delete", {"epin": "", "status": "1"}, {"epin": [MSG_BLANK]}),
    "delete-non-numeric": Case(
        "delete", {"epin": "x1", "status": "1"}, {"epin": [MSG_NUMERIC_ONLY]}
    ),
    "delete-other-users": Case(
        "delete", {"epin": "2001", "status": "1"}, {"epin": [MSG_COUPON_NOT_FOUND]}
    ),
    "delete-deleted": Case(
        "delete", {"epin": "1015", "status": "1"}, {"epin": [MSG_COUPON_NOT_FOUND]}
    ),
    "status-other-users": Case("delete", {"epin": "2001"}, {"epin": [MSG_COUPON_NOT_FOUND]}),
    # create
    "create-wallet-missing": Case("create", {"wallet_type": None}, {"wallet_type": [MSG_REQUIRED]}),
    "create-wallet-blank": Case("create", {"wallet_type": ""}, {"wallet_type": [MSG_BLANK]}),
    "create-wallet-unknown": Case(
        "create", {"wallet_type": "wallet9"}, {"wallet_type": [MSG_WALLET_INSUFFICIENT]}
    ),
    "create-wallet-balance": Case(
        "create",
        {"wallet_type": "wallet2", "epin_amount": "60", "number_of_pins": "2"},
        {"wallet_type": [MSG_WALLET_INSUFFICIENT]},
    ),
    "create-amount-missing": Case("create", {"epin_amount": None}, {"epin_amount": [MSG_REQUIRED]}),
    "create-amount-blank": Case("create", {"epin_amount": " "}, {"epin_amount": [MSG_BLANK]}),
    "create-amount-text": Case(
        "create", {"epin_amount": "abc"}, {"epin_amount": [MSG_INVALID_AMOUNT]}
    ),
    "create-amount-negative": Case(
        "create", {"epin_amount": "-10"}, {"epin_amount": [MSG_INVALID_AMOUNT]}
    ),
    "create-amount-decimal": Case(
        "create", {"epin_amount": "10.50"}, {"epin_amount": [MSG_INTEGERS_ONLY]}
    ),
    "create-amount-long": Case(
        "create", {"epin_amount": "00000010"}, {"epin_amount": [MSG_MAX_7_CHARS]}
    ),
    "create-amount-low": Case("create", {"epin_amount": "4"}, {"epin_amount": [RANGE]}),
    "create-amount-high": Case("create", {"epin_amount": "1001"}, {"epin_amount": [RANGE]}),
    "create-pins-missing": Case(
        "create", {"number_of_pins": None}, {"number_of_pins": [MSG_REQUIRED]}
    ),
    "create-pins-blank": Case("create", {"number_of_pins": ""}, {"number_of_pins": [MSG_BLANK]}),
    "create-pins-text": Case(
        "create", {"number_of_pins": "two"}, {"number_of_pins": [MSG_NUMERIC_ONLY]}
    ),
    "create-pins-zero": Case(
        "create", {"number_of_pins": "0"}, {"number_of_pins": [MSG_INVALID_PIN_COUNT]}
    ),
    "create-pins-too-many": Case(
        "create", {"number_of_pins": "38"}, {"number_of_pins": [MSG_EXCEEDS_MAX_ACTIVE]}
    ),
    "create-transferable-missing": Case(
        "create", {"transferable": None}, {"transferable": [MSG_REQUIRED]}
    ),
    "create-transferable-blank": Case(
        "create", {"transferable": ""}, {"transferable": [MSG_BLANK]}
    ),
    "create-transferable-other": Case(
        "create", {"transferable": "yes"}, {"transferable": [MSG_TRUE_FALSE]}
    ),
    "create-reusable-missing": Case("create", {"reusable": None}, {"reusable": [MSG_REQUIRED]}),
    "create-reusable-blank": Case("create", {"reusable": ""}, {"reusable": [MSG_BLANK]}),
    "create-reusable-lowercase": Case(
        "create", {"reusable": "true"}, {"reusable": [MSG_TRUE_FALSE]}
    ),
    "create-checksum-missing": Case(
        "create", {"token_checksum_field": None}, {"token_checksum_field": [MSG_REQUIRED]}
    ),
    "create-checksum-blank": Case(
        "create", {"token_checksum_field": ""}, {"token_checksum_field": [MSG_BLANK]}
    ),
    "create-checksum-wrong": Case(
        "create", {"token_checksum_field": "0" * 16}, {"token_field": [MSG_TOKEN_MISMATCH]}
    ),
    "create-token-missing": Case("create", {"token_field": None}, {"token_field": [MSG_REQUIRED]}),
    "create-token-blank": Case("create", {"token_field": ""}, {"token_field": [MSG_BLANK]}),
    "create-token-wrong": Case(
        "create",
        {"token_field": "MT-LIM-305184", "token_checksum_field": token_checksum("MT-LIM-305184")},
        {"token_field": [MSG_TOKEN_MISMATCH]},
    ),
    "create-form-key-missing": Case("create", {"form_key": None}, {"form_key": [MSG_FORM_RUNNING]}),
    "create-form-key-unknown": Case(
        "create", {"form_key": "f" * 32}, {"form_key": [MSG_FORM_RUNNING]}
    ),
    "create-many": Case(
        "create",
        {"epin_amount": "1.5", "number_of_pins": "-1", "reusable": "0"},
        {
            "epin_amount": [MSG_INTEGERS_ONLY],
            "number_of_pins": [MSG_NUMERIC_ONLY],
            "reusable": [MSG_TRUE_FALSE],
        },
    ),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_validation_messages(
    name: str, client: httpx.AsyncClient, access: str, epin: EpinSandbox
) -> None:
    case = CASES[name]
    if case.settings:
        assert (await client.post("/_sandbox/settings", json=case.settings)).status_code == 200
    before = epin.snapshot()
    if case.route == "delete":
        params = {k: v for k, v in case.fields.items() if v is not None}
        r = await delete(client, access, **params)
    elif case.route == "create":
        key = await form_key(client, access)
        before = epin.snapshot()
        r = await post(client, GENERATE, create_fields(key, **case.fields), access)
    else:
        fields = {k: v for k, v in case.fields.items() if v is not None}
        r = await post(client, TRANSFER if case.route == "transfer" else SHARE, fields, access)
    assert (r.status_code, r.json()) == (400, invalid(case.errors))
    after = epin.snapshot()
    # A rejected call changes nothing but the counters (and burns a create's form key).
    assert after["coupons"] == before["coupons"] and after["users"] == before["users"]
    assert after["counters"]["failures"][case.route] == 1


def test_cases_cover_every_documented_message() -> None:
    seen = {m for case in CASES.values() for messages in case.errors.values() for m in messages}
    documented = {m if m != MSG_AMOUNT_RANGE else RANGE for m in VALIDATION_MESSAGES}
    assert documented <= seen, documented - seen
    assert len(VALIDATION_MESSAGES) == 22


# --- history -----------------------------------------------------------------------------------


async def test_history_newest_first_with_filter_and_pages(
    client: httpx.AsyncClient, access: str, clock: FakeClock
) -> None:
    assert data(await get(client, HISTORY, access))["count"] == 0
    key = await form_key(client, access)
    created = data(await post(client, GENERATE, create_fields(key, wallet_type="wallet2"), access))
    new_id = created["coupons"][0]["id"]
    clock.advance(1)
    await post(client, TRANSFER, {"user": NIC, "epin": "1001"}, access)
    clock.advance(1)
    await post(
        client, SHARE, {"email": "x@example.org", "epin": "1012", "share_amount": "5"}, access
    )
    clock.advance(1)
    await delete(client, access, epin="1003", status="1")
    history = data(await get(client, HISTORY, access))
    assert history["count"] == 4
    assert [(h["action"], h["epin"]) for h in history["results"]] == [
        ("delete", 1003),
        ("share", 1012),
        ("transfer", 1001),
        ("create", new_id),
    ]
    assert history["results"][0] == {
        "id": 4,
        "epin": 1003,
        "action": "delete",
        "amount": "100.00",
        "wallet_type": "wallet1",
        "counterparty": None,
        "date": "2025-04-13T17:28:54+00:00",
    }
    assert history["results"][1]["counterparty"] == "x@example.org"
    assert history["results"][2]["counterparty"] == NIC
    wallet2 = data(await get(client, HISTORY, access, wallet="wallet2"))
    assert [h["action"] for h in wallet2["results"]] == ["share", "create"]
    page = data(await get(client, HISTORY, access, page_size="3"))
    assert page["next"] == f"{BASE}{HISTORY}?page_size=3&page=2"
    nic = (await login(client, NIC, NIC_PW))["access"]
    assert data(await get(client, HISTORY, nic))["count"] == 0  # the caller's own actions


async def test_value_is_conserved(client: httpx.AsyncClient, access: str) -> None:
    before = (await client.get("/_sandbox/state")).json()["totals"]["value"]
    key = await form_key(client, access)
    await post(client, GENERATE, create_fields(key, number_of_pins="5", epin_amount="33"), access)
    await post(client, SHARE, {"email": "a@b.cy", "epin": "1003", "share_amount": "0.99"}, access)
    await post(client, TRANSFER, {"user": LIM, "epin": "1004"}, access)
    await delete(client, access, epin="1011", status="1")
    lim = (await login(client, LIM, LIM_PW))["access"]
    await delete(client, lim, epin="1004", status="1")  # refunded into shop-limassol's wallet
    state = (await client.get("/_sandbox/state")).json()
    assert state["totals"]["value"] == before
    lim_user = next(u for u in state["users"] if u["username"] == LIM)
    assert lim_user["wallets"][0]["balance"] == "350.00"


# --- HTTP details ------------------------------------------------------------------------------


async def test_unknown_paths_methods_and_bodies(client: httpx.AsyncClient, access: str) -> None:
    r = await client.get(API + "user/nothing/", headers=auth(access))
    assert (r.status_code, r.json()) == (404, {"detail": "Not found."})
    r = await client.get(ACTIVE.rstrip("/"), headers=auth(access))
    assert r.status_code == 404
    r = await client.put(TRANSFER, headers=auth(access))
    assert (r.status_code, r.json()) == (405, {"detail": 'Method "PUT" not allowed.'})
    assert r.headers["allow"] == "POST"
    malformed = {"status_code": 400, "errors": {"detail": "Malformed request body."}, "data": {}}
    r = await client.post(
        TRANSFER, content=b"{not json", headers={**auth(access), "content-type": "application/json"}
    )
    assert (r.status_code, r.json()) == (400, malformed)
    r = await client.post(
        TRANSFER, content=b"[1]", headers={**auth(access), "content-type": "application/json"}
    )
    assert r.status_code == 400
    # Authentication comes first.
    r = await client.post(
        TRANSFER,
        content=b"{not json",
        headers={"apikey": API_KEY, "content-type": "application/json"},
    )
    assert r.status_code == 401


def test_parse_body() -> None:
    ct = "multipart/form-data; boundary=XyZ"
    raw = (
        b'--XyZ\r\nContent-Disposition: form-data; name="user"\r\n\r\nshop-nicosia\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="epin"\r\n\r\n\r\n--XyZ--\r\n'
    )
    assert parse_body(ct, raw) == {"user": "shop-nicosia", "epin": ""}
    for bad in (raw[:-9], b"--XyZ\r\nno headers\r\n--XyZ--\r\n"):
        with pytest.raises(BodyError):
            parse_body(ct, bad)
    with pytest.raises(BodyError):
        parse_body("multipart/form-data", raw)
    assert parse_body("application/x-www-form-urlencoded", b"a=1&b=&a=2") == {"a": "2", "b": ""}
    assert parse_body("application/json", b'{"n": 12.50, "t": true, "z": null}') == {
        "n": "12.50",
        "t": "True",
        "z": "",
    }
    assert parse_body("", b'{"a": 1}') == {"a": "1"}
    assert parse_body("", b"a=1") == {"a": "1"}
    assert parse_body("text/plain", b"") == {}
    with pytest.raises(BodyError):
        parse_body("text/plain", b"a=1")


async def test_prefix_and_refresh_path_are_configurable(epin: EpinSandbox) -> None:
    app = create_app(epin, prefix="epin/api/v2", refresh_path="/auth/jwt/refresh")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        r = await c.post(
            "/epin/api/v2/user/login/",
            data={"username": MAIN, "password": MAIN_PW},
            headers=auth(None),
        )
        tokens = r.json()
        r = await c.post(
            "/epin/api/v2/auth/jwt/refresh/",
            data={"refresh": tokens["refresh"]},
            headers=auth(None),
        )
        assert r.status_code == 200
        r = await c.get(
            "/epin/api/v2/user/get/active-epin/",
            params={"page_size": "1"},
            headers=auth(tokens["access"]),
        )
        assert data(r)["next"] == f"{BASE}/epin/api/v2/user/get/active-epin/?page_size=1&page=2"
        assert (await c.get(ACTIVE, headers=auth(tokens["access"]))).status_code == 404


# --- faults ------------------------------------------------------------------------------------


async def test_each_route_name_is_faultable(client: httpx.AsyncClient, access: str) -> None:
    calls: dict[str, Callable[[], Awaitable[httpx.Response]]] = {
        "login": lambda: login_r(client, MAIN, MAIN_PW),
        "refresh": lambda: client.post(
            API + "user/token/refresh/", data={"refresh": "x"}, headers=auth(None)
        ),
        "active": lambda: get(client, ACTIVE, access),
        "transfer": lambda: post(client, TRANSFER, {"user": NIC, "epin": "1001"}, access),
        "share": lambda: post(client, SHARE, SHARE_OK, access),
        "delete": lambda: delete(client, access, epin="1001", status="1"),
        "wallets": lambda: get(client, GENERATE, access),
        "create": lambda: post(client, GENERATE, create_fields("k"), access),
        "history": lambda: get(client, HISTORY, access),
    }
    assert set(calls) == set(ROUTE_NAMES)
    for name, call in calls.items():
        await client.post("/_sandbox/faults", json={"error_rate": 1.0, "routes": [name]})
        r = await call()
        assert r.status_code == 503, name
        assert "503 Service Temporarily Unavailable" in r.text
        await client.post("/_sandbox/faults", json={"error_rate": 0.0, "routes": None})
        assert (await call()).status_code != 503, name
    state = (await client.get("/_sandbox/state", params={"coupons": "1001"})).json()
    assert state["faults"]["injected"]["error"] == len(ROUTE_NAMES)
    assert state["coupons"][0]["transfers"] == 1  # only the unfaulted transfer applied


async def test_timeout_is_not_applied(
    client: httpx.AsyncClient, access: str, epin: EpinSandbox
) -> None:
    await client.post("/_sandbox/faults", json={"timeout_rate": 1.0, "timeout_sleep_s": 0.05})
    r = await post(client, TRANSFER, {"user": NIC, "epin": "1001"}, access)
    assert r.status_code == 504
    coupon = epin.coupon(1001)
    assert coupon is not None and coupon.owner == MAIN and coupon.transfers == 0


async def test_drop_after_apply_in_process(
    client: httpx.AsyncClient, access: str, epin: EpinSandbox
) -> None:
    await client.post(
        "/_sandbox/faults", json={"drop_after_apply_rate": 1.0, "routes": ["transfer"]}
    )
    with pytest.raises(ConnectionDropped):
        await post(client, TRANSFER, {"user": NIC, "epin": "1001"}, access)
    coupon = epin.coupon(1001)
    assert coupon is not None and coupon.owner == NIC and coupon.transfers == 1  # applied


async def test_apply_late_in_process(
    client: httpx.AsyncClient, access: str, epin: EpinSandbox
) -> None:
    await client.post(
        "/_sandbox/faults",
        json={"apply_late_rate": 1.0, "apply_delay_s": 0.2, "routes": ["transfer"]},
    )
    start = time.perf_counter()
    with pytest.raises(ConnectionDropped):
        await post(client, TRANSFER, {"user": NIC, "epin": "1001"}, access)
    assert time.perf_counter() - start >= 0.2
    coupon = epin.coupon(1001)
    assert coupon is not None and coupon.owner == NIC and coupon.transfers == 1  # applied
    assert epin.call_log(MAIN)[-1]["route"] == TRANSFER  # logged, as it was applied
    state = (await client.get("/_sandbox/state", params={"coupons": "0"})).json()
    assert state["faults"]["injected"]["apply_late"] == 1


# --- admin -------------------------------------------------------------------------------------


async def test_admin_users_settings_state_and_reset(
    client: httpx.AsyncClient, epin: EpinSandbox
) -> None:
    assert (await client.get("/_sandbox/health")).json() == {"status": "ok"}
    new_user = {
        "username": "shop-larnaca",
        "password": "pw",
        "mail_token": "MT-LAR",
        "wallets": [{"wallet_type": "wallet1", "balance": "10"}],
        "coupons": [{"balance": "7.5", "transferable": False}],
    }
    assert (await client.post("/_sandbox/users", json=[new_user])).json() == {"added": 1}
    larnaca = (await login(client, "shop-larnaca", "pw"))["access"]
    [coupon] = data(await get(client, ACTIVE, larnaca))["results"]
    assert coupon["id"] == 2003 and coupon["balance"] == "7.50" and coupon["transferable"] is False
    bad = await client.post("/_sandbox/users", json=[{"username": "x"}])
    assert bad.status_code == 422

    r = await client.post("/_sandbox/settings", json={"page_size": 0})
    assert r.status_code == 422
    r = await client.post("/_sandbox/settings", json={"facility": {"nobody": False}})
    assert r.status_code == 422
    assert r.json() == {"error": "unknown user: nobody"}
    r = await client.post("/_sandbox/settings", json={"max_active_coupons": 20, "min_amount": "1"})
    assert r.json()["max_active_coupons"] == 20 and r.json()["min_amount"] == "1.00"

    state = (await client.get("/_sandbox/state", params={"coupons": "0"})).json()
    assert state["coupons"] == []
    assert state["totals"]["users"] == 5 and state["totals"]["coupons"] == 18
    assert state["counters"]["logins"] == 1
    assert state["totals"]["live_access_tokens"] == 1
    main = next(u for u in state["users"] if u["username"] == MAIN)
    assert main["active_coupons"] == 13 and main["token_checksum"] == token_checksum(MAIN_TOKEN)

    r = await client.post("/_sandbox/reset")
    assert r.json()["totals"]["users"] == 4
    assert epin.user("shop-larnaca") is None
    assert epin.settings.max_active_coupons == 50
    assert (await client.get("/_sandbox/settings")).json()["max_active_coupons"] == 50
    assert (await get(client, ACTIVE, larnaca)).status_code == 401  # tokens forgotten
    assert epin.calls["login"] == 0


async def test_call_log_per_user(
    client: httpx.AsyncClient, clock: FakeClock, epin: EpinSandbox
) -> None:
    tokens = await login(client)
    clock.advance(1)
    await get(client, ACTIVE, tokens["access"], wallet="wallet2")
    lim = (await login(client, LIM, LIM_PW))["access"]
    await post(client, TRANSFER, {"user": NIC, "epin": "1001"}, tokens["access"])
    await delete(client, tokens["access"], epin="1002")
    await client.post("/_sandbox/revoke", json={"username": MAIN, "kind": "access"})
    r = await post(client, SHARE, SHARE_OK, tokens["access"])  # refused: the token is revoked
    assert r.status_code == 401
    await client.post(
        API + "user/token/refresh/", data={"refresh": tokens["refresh"]}, headers=auth(None)
    )
    # Not logged: no user named, or a 503 (nothing applied).
    await login_r(client, "nobody", "x")
    await client.get(ACTIVE, headers=auth("not-a-token"))
    await client.post("/_sandbox/faults", json={"error_rate": 1.0})
    assert (await get(client, ACTIVE, lim)).status_code == 503
    await client.post("/_sandbox/faults", json={"error_rate": 0})

    r = await client.get("/_sandbox/calls", params={"user": MAIN})
    calls = r.json()["calls"]
    assert [(c["method"], c["route"], c["status"]) for c in calls] == [
        ("POST", API + "user/login/", 200),
        ("GET", ACTIVE, 200),
        ("POST", TRANSFER, 200),
        ("DELETE", DELETE, 200),
        ("POST", SHARE, 401),
        ("POST", API + "user/token/refresh/", 200),
    ]
    assert calls[0]["form"] == {"username": MAIN, "password": "***"}  # never the password
    assert calls[0]["at"] == calls[1]["at"] - 1 == clock() - 1
    assert calls[1]["query"] == {"wallet": "wallet2"} and calls[1]["form"] == {}
    assert calls[2]["form"] == {"user": NIC, "epin": "1001"} and calls[2]["query"] == {}
    assert calls[3]["query"] == {"epin": "1002"}
    assert calls[4]["form"] == SHARE_OK
    assert calls[5]["form"] == {"refresh": tokens["refresh"]}
    seqs = [c["seq"] for c in calls]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # Each user has their own log; the transfer's receiver did not call.
    lim_calls = epin.call_log(LIM)
    assert [c["route"] for c in lim_calls] == [API + "user/login/"]
    assert seqs[1] < lim_calls[0]["seq"] < seqs[2]  # one sequence over all users
    assert (await client.get("/_sandbox/calls", params={"user": NIC})).json() == {"calls": []}

    r = await client.get("/_sandbox/calls", params={"user": "nobody"})
    assert r.status_code == 404
    assert (await client.get("/_sandbox/calls")).status_code == 400
    await client.post("/_sandbox/reset")
    assert (await client.get("/_sandbox/calls", params={"user": MAIN})).json() == {"calls": []}
    await login(client)
    assert epin.call_log(MAIN)[0]["seq"] > seqs[-1]  # a seq is never handed out again


def test_call_log_is_bounded_per_user() -> None:
    seed = EpinSeed(api_key="k", users=[UserSeed(username="a", password="p", mail_token="t")])
    epin = EpinSandbox(seed, max_logged_calls=2)
    for _ in range(3):
        epin.dispatch("login", apikey="k", fields={"username": "a", "password": "p"})
    logged = epin.call_log("a")
    assert [c["seq"] for c in logged] == [2, 3]
    assert logged[0]["route"] == "login" and logged[0]["method"] == ""  # no HTTP: the route name


def test_state_machine_without_http(clock: FakeClock) -> None:
    seed = EpinSeed(
        api_key="k",
        users=[
            UserSeed(
                username="a",
                password="p",
                mail_token="t",
                wallets=[WalletSeed(wallet_type="wallet1", balance=Decimal("100"))],
            ),
            UserSeed(username="b", password="p", mail_token="u"),
        ],
    )
    epin = EpinSandbox(seed, clock=clock, access_ttl_s=10)
    status, body = epin.dispatch("login", apikey="k", fields={"username": "a", "password": "p"})
    assert status == 200
    bearer = f"Bearer {body['access']}"
    status, body = epin.dispatch("wallets", apikey="k", authorization=bearer)
    key = body["data"]["form_key"]
    fields = {
        "wallet_type": "wallet1",
        "epin_amount": "30",
        "number_of_pins": "3",
        "transferable": "True",
        "reusable": "False",
        "token_field": "t",
        "token_checksum_field": token_checksum("t").upper(),
        "form_key": key,
    }
    status, body = epin.dispatch("create", apikey="k", authorization=bearer, fields=fields)
    assert status == 200 and body["data"]["wallet_balance"] == "10.00"
    coupon_id = str(body["data"]["coupons"][0]["id"])
    status, body = epin.dispatch(
        "transfer", apikey="k", authorization=bearer, fields={"user": "b", "epin": coupon_id}
    )
    assert status == 200
    clock.advance(10)
    status, body = epin.dispatch("history", apikey="k", authorization=bearer)
    assert (status, body) == (401, TOKEN_REFUSED)
    assert epin.calls["create"] == 1 and epin.failures["history"] == 1


def test_seed_file() -> None:
    seed = json.loads(SEED_PATH.read_text())
    assert seed["api_key"] == API_KEY
    epin = EpinSandbox.from_seed_file(SEED_PATH)
    users = {u["username"]: u for u in epin.snapshot()["users"]}
    assert set(users) == {MAIN, LIM, NIC, CLOSED}
    assert users[CLOSED]["active"] is False
    assert [w["balance"] for w in users[MAIN]["wallets"]] == ["5000.00", "100.00"]
    coupons = epin.snapshot()["coupons"]
    assert len({c["pin"] for c in coupons}) == len(coupons)
    assert epin.settings.max_active_coupons == 50
    assert (epin.settings.min_amount, epin.settings.max_amount) == (Decimal(5), Decimal(1000))


# --- real socket -------------------------------------------------------------------------------


async def test_drop_after_apply_over_a_real_socket(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    faults = FaultConfig(drop_after_apply_rate=1.0, routes=["share"])
    server = build_epin_server("127.0.0.1", 0, SEED_PATH, faults)
    task = asyncio.create_task(server.serve())
    try:
        port = await serving_port(server)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            access = (await login(client))["access"]
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                await post(client, SHARE, SHARE_OK, access)
            # Applied although the client never got an answer.
            state = (await client.get("/_sandbox/state", params={"coupons": "1001"})).json()
            assert state["coupons"][0]["balance"] == "40.00"
            assert state["coupons"][0]["shares"] == 1
            assert state["faults"]["injected"]["drop_after_apply"] == 1
            # A blind resend shares again: the double effect an exactly-once client must avoid.
            await client.post("/_sandbox/faults", json={"drop_after_apply_rate": 0})
            assert data(await post(client, SHARE, SHARE_OK, access))["balance"] == "30.00"
            state = (await client.get("/_sandbox/state", params={"coupons": "1001"})).json()
            assert state["coupons"][0]["shares"] == 2
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text


async def test_apply_late_over_a_real_socket(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    delay = 1.0
    faults = FaultConfig(apply_late_rate=1.0, apply_delay_s=delay, routes=["transfer"])
    server = build_epin_server("127.0.0.1", 0, SEED_PATH, faults)
    task = asyncio.create_task(server.serve())
    try:
        base = f"http://127.0.0.1:{await serving_port(server)}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            access = (await login(client))["access"]
            connections = len(server.server_state.connections)
            start = time.monotonic()
            # A client whose read timeout is shorter than the delay gives up first.
            timeout = httpx.Timeout(5, read=0.2)
            async with httpx.AsyncClient(base_url=base, timeout=timeout) as impatient:
                with pytest.raises(httpx.ReadTimeout):
                    await post(impatient, TRANSFER, {"user": NIC, "epin": "1001"}, access)
            # uvicorn has seen that client go away, and the transfer is not applied yet.
            while len(server.server_state.connections) > connections:
                assert time.monotonic() - start < delay
                await asyncio.sleep(0.01)
            state = (await client.get("/_sandbox/state", params={"coupons": "1001"})).json()
            assert state["coupons"][0]["owner"] == MAIN
            # After the delay the held call is applied all the same: the coupon moved.
            while state["coupons"][0]["owner"] == MAIN and time.monotonic() - start < 5:
                await asyncio.sleep(0.02)
                state = (await client.get("/_sandbox/state", params={"coupons": "1001"})).json()
            assert time.monotonic() - start >= delay
            assert state["coupons"][0]["owner"] == NIC
            assert state["coupons"][0]["transfers"] == 1
            assert state["faults"]["injected"]["apply_late"] == 1
            calls = (await client.get("/_sandbox/calls", params={"user": MAIN})).json()["calls"]
            assert [(c["route"], c["status"]) for c in calls] == [
                (API + "user/login/", 200),
                (TRANSFER, 200),
            ]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text
