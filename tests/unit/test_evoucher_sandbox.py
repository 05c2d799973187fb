"""The eVOUCHER sandbox against the Postman collection's recordings; its faults and admin API."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette

from tests.support.clock import FakeClock
from tests.support.servers import serving_port
from voucher_sandboxes import SEEDS
from voucher_sandboxes.evoucher import (
    EvoucherSandbox,
    EvoucherSeed,
    GenerateSpec,
    TerminalSeed,
    VoucherSeed,
    create_app,
    generated_machine_name,
    generated_store,
    generated_token,
    generated_voucher_code,
)
from voucher_sandboxes.faults import (
    ConnectionDropped,
    FaultConfig,
    FaultInjector,
    FaultKind,
)
from voucher_sandboxes.server import build_evoucher_server

if TYPE_CHECKING:
    pass

SEED_PATH = SEEDS / "evoucher-seed.json"

TILL1 = "sbx-lim3-till1-4f9c2a7e1b8d4c3a"  # limassol-3-till-1
TILL2 = "sbx-lim3-till2-9e1d7b3c5a2f4e8b"  # limassol-3-till-2, same store
NICOSIA = "sbx-nic1-till1-2b6e8f0a4c9d1e7f"  # nicosia-1-till-1, another store
MACHINES = {TILL1: "limassol-3-till-1", TILL2: "limassol-3-till-2", NICOSIA: "nicosia-1-till-1"}

V50 = "12345678"  # 50.00 at limassol-3 (the collection's code)
V20 = "12345679"  # 20.00 at limassol-3
V10 = "10100001"  # 10.00
V100 = "11000001"  # 100.00
REDEEMED = "20000001"
EXPIRED = "20000002"  # expired on 2024-11-30
OTHER_STORE = "30000001"  # nicosia-1

COOKIE_RE = re.compile(r"^OCSESSID=[0-9a-f]{26}; path=/$")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def evoucher(clock: FakeClock) -> EvoucherSandbox:
    return EvoucherSandbox.from_seed_file(SEED_PATH, clock=clock)


@pytest.fixture
def app(evoucher: EvoucherSandbox) -> Starlette:
    return create_app(evoucher, FaultConfig())


def make_client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://evoucher.cy")


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(app) as c:
        yield c


async def call(
    client: httpx.AsyncClient, route: str, body: dict[str, Any] | None, token: str | None = TILL1
) -> httpx.Response:
    headers = {"X-Token": token} if token is not None else {}
    return await client.post(
        "/index.php", params={"route": f"account/{route}"}, json=body, headers=headers
    )


async def bill(client: httpx.AsyncClient, total: Any, token: str = TILL1) -> dict[str, Any]:
    body = {"bill_total": total, "machine_name": MACHINES[token]}
    r = await call(client, "bill_total_api", body, token)
    assert r.status_code == 200
    result: dict[str, Any] = r.json()
    return result


async def scan(client: httpx.AsyncClient, code: str, token: str = TILL1) -> dict[str, Any]:
    r = await call(client, "scan_voucher_api", {"voucher_code": code}, token)
    assert r.status_code == 200
    result: dict[str, Any] = r.json()
    return result


async def redeem(client: httpx.AsyncClient, codes: str, token: str = TILL1) -> dict[str, Any]:
    r = await call(client, "redeem_voucher_api", {"voucher_codes": codes}, token)
    assert r.status_code == 200
    result: dict[str, Any] = r.json()
    return result


def fail(message: str) -> dict[str, Any]:
    return {"success": 0, "message": message}


# --- recorded responses, verbatim --------------------------------------------------------------


async def test_bill_total_recorded_body_and_headers(client: httpx.AsyncClient) -> None:
    r = await call(client, "bill_total_api", {"bill_total": 50, "machine_name": MACHINES[TILL1]})
    assert r.status_code == 200
    # Byte for byte the recorded body (pretty-printed with 4 spaces).
    assert r.text == (
        '{\n    "success": 1,\n    "bill_total": 50,\n'
        '    "message": "Bill total has been updated successfully"\n}'
    )
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-cache, no-store, must-revalidate"
    assert r.headers["pragma"] == "no-cache"
    assert r.headers["expires"] == "0"
    assert r.headers["content-encoding"] == "gzip"
    assert r.headers["vary"] == "Accept-Encoding"
    assert COOKIE_RE.match(r.headers["set-cookie"])
    assert "content-length" not in r.headers  # chunked, as recorded


async def test_identity_encoding_when_gzip_not_accepted(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/index.php?route=account/bill_total_api",
        content=b'{"bill_total": 50, "machine_name": "limassol-3-till-1"}',
        headers={"X-Token": TILL1, "Accept-Encoding": "identity"},
    )
    assert "content-encoding" not in r.headers
    assert r.json()["success"] == 1


async def test_scan_success_recorded(client: httpx.AsyncClient) -> None:
    await bill(client, 50)
    r = await call(client, "scan_voucher_api", {"voucher_code": V50})
    assert r.text == (
        '{\n    "success": 1,\n    "price": "50.00",\n    "message": "The voucher is valid"\n}'
    )


async def test_scan_failures_recorded(client: httpx.AsyncClient) -> None:
    await bill(client, 50)
    assert await scan(client, "99999999") == fail("Voucher with code 99999999 does not exist!")
    assert await scan(client, REDEEMED) == fail(
        f"Voucher with code {REDEEMED} has already been redeemed!"
    )
    assert await scan(client, EXPIRED) == fail(
        f"Voucher with code {EXPIRED} expired on 30-11-2024."
    )
    assert await scan(client, OTHER_STORE) == fail(
        f"Voucher with code {OTHER_STORE} cannot be redeemed at your store!"
    )
    assert (await scan(client, V50))["price"] == "50.00"
    assert await scan(client, V20) == fail(
        "Remaining bill total is 0, cannot redeem more vouchers."
    )


async def test_scan_without_bill_has_nothing_due(client: httpx.AsyncClient) -> None:
    assert await scan(client, V50) == fail(
        "Remaining bill total is 0, cannot redeem more vouchers."
    )


async def test_remove_recorded(client: httpx.AsyncClient, evoucher: EvoucherSandbox) -> None:
    await bill(client, 50)
    await scan(client, V20)
    r = await call(client, "remove_voucher_api", {"voucher_code": V20})
    assert r.text == '{\n    "success": 1,\n    "message": "Voucher has been deleted."\n}'
    b = evoucher.bill(MACHINES[TILL1], r.cookies["OCSESSID"])
    assert b is not None and b.remaining == Decimal("50.00") and not b.holds
    voucher = evoucher.voucher(V20)
    assert voucher is not None and voucher.lock is None
    r = await call(client, "remove_voucher_api", {"voucher_code": "99999999"})
    assert r.json() == fail("Voucher with code 99999999 does not exist!")


async def test_redeem_single_and_multiple_recorded(client: httpx.AsyncClient) -> None:
    await bill(client, 100)
    await scan(client, V50)
    r = await call(client, "redeem_voucher_api", {"voucher_codes": V50})
    assert r.text == (
        '{\n    "success": 1,\n'
        '    "message": "Voucher with code 12345678 have been successfully redeemed.!"\n}'
    )
    await bill(client, 100)
    await scan(client, V20)
    await scan(client, V10)
    assert await redeem(client, f"{V20};{V10}") == {
        "success": 1,
        "message": f"Vouchers with codes {V20},{V10} have been successfully redeemed.!",
    }


async def test_cancel_recorded_with_codes_and_empty(client: httpx.AsyncClient) -> None:
    expected = '{\n    "success": 1,\n    "message": "Payment has been canceled."\n}'
    await bill(client, 50)
    await scan(client, V20)
    r = await call(client, "cancel_payment_api", {"voucher_codes": V20})
    assert r.text == expected
    r = await call(client, "cancel_payment_api", {})
    assert r.text == expected
    # "leave body empty if no eVOUCHERs were scanned"
    r = await client.post(
        "/index.php?route=account/cancel_payment_api", content=b"", headers={"X-Token": TILL1}
    )
    assert r.text == expected


# --- session cookie ----------------------------------------------------------------------------


async def test_session_cookie_reused_when_known(client: httpx.AsyncClient) -> None:
    first = await call(client, "cancel_payment_api", {})
    sid = first.cookies["OCSESSID"]
    second = await call(client, "cancel_payment_api", {})  # the client sends its cookie back
    assert second.headers["set-cookie"] == f"OCSESSID={sid}; path=/"
    client.cookies.clear()
    client.cookies.set("OCSESSID", "0" * 26, domain="evoucher.cy")  # never issued: replaced
    third = await call(client, "cancel_payment_api", {})
    assert COOKIE_RE.match(third.headers["set-cookie"])
    assert third.cookies["OCSESSID"] not in (sid, "0" * 26)


async def test_strict_session_loses_bill_without_cookie(client: httpx.AsyncClient) -> None:
    await bill(client, 50)
    client.cookies.clear()  # e.g. the POS client restarted without its cookie jar
    assert await scan(client, V50) == fail(
        "Remaining bill total is 0, cannot redeem more vouchers."
    )


async def test_non_strict_session_keeps_bill_per_machine(client: httpx.AsyncClient) -> None:
    r = await client.post("/_sandbox/settings", json={"strict_session": False})
    assert r.json()["strict_session"] is False
    await bill(client, 50)
    client.cookies.clear()
    assert (await scan(client, V50))["price"] == "50.00"


async def test_settings_refuse_what_is_not_a_valid_object(client: httpx.AsyncClient) -> None:
    before = (await client.get("/_sandbox/settings")).json()
    assert before == {"strict_session": True, "lock_ttl_s": before["lock_ttl_s"]}
    r = await client.post("/_sandbox/settings", content=b"[1]")
    assert r.status_code == 400
    for bad in ({"lock_ttl_s": 0}, {"nonsense": 1}):
        r = await client.post("/_sandbox/settings", json=bad)
        assert r.status_code == 422 and r.json()["error"]
    assert (await client.get("/_sandbox/settings")).json() == before
    r = await client.post("/_sandbox/settings", json={"lock_ttl_s": 7})
    assert r.json() == {**before, "lock_ttl_s": 7}


async def test_lock_belongs_to_machine_across_sessions(client: httpx.AsyncClient) -> None:
    await bill(client, 50)
    await scan(client, V50)
    client.cookies.clear()
    # The bill is gone with the session, but the voucher is still locked to this machine: the
    # other till cannot take it, and this machine can still redeem it.
    assert await scan(client, V50, TILL2) == fail(
        f"Voucher with code {V50} cannot be redeemed at your store!"
    )
    assert (await redeem(client, V50))["success"] == 1


# --- amounts and locks -------------------------------------------------------------------------


async def test_partial_price_when_voucher_worth_more(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox
) -> None:
    await bill(client, 30)
    assert await scan(client, V100) == {
        "success": 1,
        "price": "30.00",
        "message": "The voucher is valid",
    }
    assert await scan(client, V10) == fail(
        "Remaining bill total is 0, cannot redeem more vouchers."
    )
    assert (await redeem(client, V100))["success"] == 1
    voucher = evoucher.voucher(V100)
    assert voucher is not None and voucher.redeemed  # redeemed whole (sandbox choice)


async def test_decimal_bill_total(client: httpx.AsyncClient) -> None:
    assert (await bill(client, 12.3))["bill_total"] == 12.3  # echoed as sent
    assert (await scan(client, V50))["price"] == "12.30"


async def test_rescan_same_voucher_counts_once(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox
) -> None:
    await bill(client, 70)
    assert (await scan(client, V50))["price"] == "50.00"
    assert (await scan(client, V50))["price"] == "50.00"
    assert (await scan(client, V50))["price"] == "50.00"
    assert (await scan(client, V100))["price"] == "20.00"
    b = evoucher.bill(MACHINES[TILL1], client.cookies["OCSESSID"])
    assert b is not None and b.remaining == Decimal("0.00")
    assert b.holds == {V50: Decimal("50.00"), V100: Decimal("20.00")}


async def test_lock_blocks_other_machine_until_ttl(
    app: Starlette, client: httpx.AsyncClient, evoucher: EvoucherSandbox, clock: FakeClock
) -> None:
    await bill(client, 50)
    sid1 = client.cookies["OCSESSID"]
    await scan(client, V50)
    async with make_client(app) as other:  # the other till has its own cookie jar
        await bill(other, 50, TILL2)
        assert await scan(other, V50, TILL2) == fail(
            f"Voucher with code {V50} cannot be redeemed at your store!"
        )
        assert await redeem(other, V50, TILL2) == fail(
            f"Voucher with code {V50} cannot be redeemed at your store!"
        )
        clock.advance(299)
        assert (await scan(other, V50, TILL2))["success"] == 0
        clock.advance(2)  # past the 5 minutes: unlocked by itself
        assert (await scan(other, V50, TILL2))["price"] == "50.00"
    b = evoucher.bill(MACHINES[TILL1], sid1)
    assert b is not None and b.remaining == Decimal("50.00") and not b.holds
    # Till 1's lock expired and till 2 holds the voucher now.
    assert await redeem(client, V50) == fail(
        f"Voucher with code {V50} cannot be redeemed at your store!"
    )


async def test_lock_expiry_restores_due_and_redeem_needs_a_live_lock(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox, clock: FakeClock
) -> None:
    await bill(client, 50)
    await scan(client, V20)
    clock.advance(300)
    assert await redeem(client, V20) == fail(f"Voucher with code {V20} does not exist!")
    b = evoucher.bill(MACHINES[TILL1], client.cookies["OCSESSID"])
    assert b is not None and b.remaining == Decimal("50.00")
    assert evoucher.snapshot([V20])["vouchers"][0]["locked_by"] is None


async def test_lock_ttl_configurable(client: httpx.AsyncClient, clock: FakeClock) -> None:
    await client.post("/_sandbox/settings", json={"lock_ttl_s": 10})
    await bill(client, 50)
    await scan(client, V20)
    await bill(client, 50, TILL2)
    clock.advance(10)
    assert (await scan(client, V20, TILL2))["price"] == "20.00"


async def test_bill_total_releases_earlier_locks(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox
) -> None:
    await bill(client, 50)
    await scan(client, V50)
    await bill(client, 20)
    voucher = evoucher.voucher(V50)
    assert voucher is not None and voucher.lock is None
    assert (await scan(client, V50))["price"] == "20.00"


async def test_bill_total_machine_name_must_match_token(client: httpx.AsyncClient) -> None:
    r = await call(
        client, "bill_total_api", {"bill_total": 50, "machine_name": "limassol-3-till-2"}
    )
    body = r.json()
    assert r.status_code == 200 and body["success"] == 0
    assert "limassol-3-till-2" in body["message"] and "limassol-3-till-1" in body["message"]


async def test_expiry_day_is_still_valid(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox, clock: FakeClock
) -> None:
    today = datetime.fromtimestamp(clock(), tz=UTC).date()
    evoucher.add_vouchers([VoucherSeed(code="55555555", value=Decimal(10), expires=today)])
    await bill(client, 50)
    assert (await scan(client, "55555555"))["price"] == "10.00"
    await call(client, "remove_voucher_api", {"voucher_code": "55555555"})
    clock.advance(86_400)
    assert await scan(client, "55555555") == fail(
        f"Voucher with code 55555555 expired on {today:%d-%m-%Y}."
    )


async def test_voucher_without_store_is_valid_everywhere(client: httpx.AsyncClient) -> None:
    await bill(client, 50, NICOSIA)
    assert (await scan(client, "40000001", NICOSIA))["price"] == "20.00"
    assert (await scan(client, OTHER_STORE, NICOSIA))["price"] == "30.00"


# --- redeem ------------------------------------------------------------------------------------


async def test_redeem_all_or_nothing(client: httpx.AsyncClient, evoucher: EvoucherSandbox) -> None:
    await bill(client, 100)
    await scan(client, V50)
    await scan(client, V20)
    # V10 was never scanned: nothing is redeemed.
    assert await redeem(client, f"{V50};{V10};{V20}") == fail(
        f"Voucher with code {V10} does not exist!"
    )
    assert await redeem(client, f"{V50};{EXPIRED}") == fail(
        f"Voucher with code {EXPIRED} expired on 30-11-2024."
    )
    for code in (V50, V20):
        voucher = evoucher.voucher(code)
        assert voucher is not None
        assert not voucher.redeemed and voucher.redeem_count == 0
        assert voucher.lock is not None and voucher.lock.machine == MACHINES[TILL1]
    assert (await redeem(client, f"{V50};{V20}"))["success"] == 1


async def test_redeem_counter_detects_no_double_redemption(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox
) -> None:
    await bill(client, 50)
    await scan(client, V50)
    assert (await redeem(client, V50))["success"] == 1
    # A retry of the same redeem (e.g. after a lost answer) must not redeem twice.
    assert await redeem(client, V50) == fail(f"Voucher with code {V50} has already been redeemed!")
    assert await scan(client, V50) == fail(f"Voucher with code {V50} has already been redeemed!")
    voucher = evoucher.voucher(V50)
    assert voucher is not None and voucher.redeem_count == 1
    state = (await client.get("/_sandbox/state", params={"codes": V50})).json()
    assert state["vouchers"] == [
        {
            "code": V50,
            "value": "50.00",
            "store": "limassol-3",
            "expires": "2099-12-31",
            "redeemed": True,
            "redeem_count": 1,
            "paid": "50.00",
            "redeemed_by": "limassol-3-till-1",
            "locked_by": None,
            "lock_expires_in_s": None,
        }
    ]
    assert state["totals"]["redemptions"] == 1
    assert state["totals"]["double_redemptions"] == 0


async def test_redeem_duplicate_code_once(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox
) -> None:
    await bill(client, 50)
    await scan(client, V20)
    assert await redeem(client, f"{V20};{V20};") == {
        "success": 1,
        "message": f"Voucher with code {V20} have been successfully redeemed.!",
    }
    voucher = evoucher.voucher(V20)
    assert voucher is not None and voucher.redeem_count == 1


async def test_redeem_keeps_paid_amount_off_the_bill(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox
) -> None:
    await bill(client, 100)
    await scan(client, V20)
    await redeem(client, V20)
    b = evoucher.bill(MACHINES[TILL1], client.cookies["OCSESSID"])
    assert b is not None and b.remaining == Decimal("80.00") and not b.holds


# --- cancel ------------------------------------------------------------------------------------


async def test_cancel_empty_releases_all_and_clears_bill(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox
) -> None:
    await bill(client, 100)
    await scan(client, V50)
    await scan(client, V20)
    await call(client, "cancel_payment_api", {})
    for code in (V50, V20):
        voucher = evoucher.voucher(code)
        assert voucher is not None and voucher.lock is None
    assert evoucher.bill(MACHINES[TILL1], client.cookies["OCSESSID"]) is None
    assert await scan(client, V50) == fail(
        "Remaining bill total is 0, cannot redeem more vouchers."
    )


async def test_cancel_with_codes_releases_only_those(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox
) -> None:
    await bill(client, 100)
    await scan(client, V50)
    await scan(client, V20)
    r = await call(client, "cancel_payment_api", {"voucher_codes": f"{V50};99999999"})
    assert r.json()["success"] == 1
    v50, v20 = evoucher.voucher(V50), evoucher.voucher(V20)
    assert v50 is not None and v50.lock is None
    # Not listed: stays locked to the machine until its TTL, though the bill is gone.
    assert v20 is not None and v20.lock is not None
    assert evoucher.bill(MACHINES[TILL1], client.cookies["OCSESSID"]) is None


async def test_cancel_does_not_release_other_machines_locks(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox
) -> None:
    await bill(client, 50, TILL2)
    await scan(client, V50, TILL2)
    await call(client, "cancel_payment_api", {"voucher_codes": V50}, TILL1)
    await call(client, "remove_voucher_api", {"voucher_code": V50}, TILL1)
    voucher = evoucher.voucher(V50)
    assert voucher is not None and voucher.lock is not None
    assert voucher.lock.machine == MACHINES[TILL2]


# --- HTTP errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "not-a-token"])
async def test_invalid_token(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox, token: str | None
) -> None:
    r = await call(client, "bill_total_api", {"bill_total": 50, "machine_name": "x"}, token)
    assert r.status_code == 401
    assert r.json() == {"success": 0, "message": "Invalid token!"}
    assert COOKIE_RE.match(r.headers["set-cookie"])
    assert evoucher.calls["bill_total_api"] == 0


async def test_unknown_route_wrong_method_bad_json(client: httpx.AsyncClient) -> None:
    r = await call(client, "login_api", {})
    assert r.status_code == 404 and r.json()["success"] == 0
    r = await client.post("/index.php", headers={"X-Token": TILL1}, json={})
    assert r.status_code == 404
    r = await client.get("/index.php?route=account/scan_voucher_api", headers={"X-Token": TILL1})
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = await client.post(
        "/index.php?route=account/scan_voucher_api",
        content=b'{"voucher_code": "12345678" //comment\n}',
        headers={"X-Token": TILL1},
    )
    assert r.status_code == 400
    assert r.json() == {"success": 0, "message": "Invalid JSON body!"}


# --- faults ------------------------------------------------------------------------------------


async def test_error_rate_gives_503_and_changes_nothing(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox
) -> None:
    await bill(client, 50)
    r = await client.post("/_sandbox/faults", json={"error_rate": 1.0})
    assert r.json()["config"]["error_rate"] == 1.0
    before = evoucher.snapshot()
    r = await call(client, "scan_voucher_api", {"voucher_code": V50})
    assert r.status_code == 503
    assert "set-cookie" not in r.headers
    assert evoucher.snapshot() == before
    state = (await client.get("/_sandbox/state", params={"vouchers": "0"})).json()
    assert state["faults"]["injected"]["error"] == 1
    await client.post("/_sandbox/faults", json={"error_rate": 0})
    assert (await scan(client, V50))["price"] == "50.00"


async def test_faults_only_on_configured_routes(client: httpx.AsyncClient) -> None:
    await client.post("/_sandbox/faults", json={"error_rate": 1.0, "routes": ["scan_voucher_api"]})
    assert (await bill(client, 50))["success"] == 1
    r = await call(client, "scan_voucher_api", {"voucher_code": V50})
    assert r.status_code == 503


async def test_latency(client: httpx.AsyncClient) -> None:
    await client.post("/_sandbox/faults", json={"latency_ms": 150, "latency_jitter_ms": 20})
    start = time.perf_counter()
    assert (await bill(client, 50))["success"] == 1
    assert time.perf_counter() - start >= 0.15
    await client.post("/_sandbox/faults", json={"latency_ms": 0, "latency_jitter_ms": 0})
    start = time.perf_counter()
    await bill(client, 50)
    assert time.perf_counter() - start < 0.1


async def test_timeout_sleeps_then_504_without_applying(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox
) -> None:
    await client.post("/_sandbox/faults", json={"timeout_rate": 1.0, "timeout_sleep_s": 0.2})
    start = time.perf_counter()
    r = await call(client, "bill_total_api", {"bill_total": 50, "machine_name": MACHINES[TILL1]})
    assert r.status_code == 504
    assert time.perf_counter() - start >= 0.2
    assert evoucher.snapshot()["bills"] == []


async def test_drop_after_apply_in_process(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox
) -> None:
    # Without uvicorn's transport the drop surfaces as an exception from the app.
    await client.post("/_sandbox/faults", json={"drop_after_apply_rate": 1.0})
    with pytest.raises(ConnectionDropped):
        await call(client, "bill_total_api", {"bill_total": 50, "machine_name": MACHINES[TILL1]})
    assert evoucher.snapshot()["bills"][0]["total"] == "50.00"  # applied


async def test_fault_config_validation(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/_sandbox/faults", json={"error_rate": 0.6, "drop_after_apply_rate": 0.6}
    )
    assert r.status_code == 422
    r = await client.post("/_sandbox/faults", json={"error_rate": 2})
    assert r.status_code == 422
    r = await client.post("/_sandbox/faults", json={"no_such_field": 1})
    assert r.status_code == 422
    for bad in (
        {"apply_late_rate": 1.5},
        {"apply_late_rate": -0.1},
        {"apply_delay_s": -1},
        {"apply_late_rate": 0.5, "timeout_rate": 0.3, "error_rate": 0.3},
    ):
        r = await client.post("/_sandbox/faults", json=bad)
        assert r.status_code == 422, bad
    assert (await client.get("/_sandbox/faults")).json()["config"] == FaultConfig().model_dump()
    r = await client.post("/_sandbox/faults", json={"apply_late_rate": 0.4, "apply_delay_s": 0})
    assert r.json()["config"]["apply_late_rate"] == 0.4
    assert r.json()["config"]["apply_delay_s"] == 0


def test_fault_config_rates_share_the_unit_interval() -> None:
    assert FaultConfig().apply_delay_s == 5.0 and FaultConfig().apply_late_rate == 0
    FaultConfig(error_rate=0.1, timeout_rate=0.2, drop_after_apply_rate=0.3, apply_late_rate=0.4)
    with pytest.raises(ValidationError, match="apply_late_rate must be <= 1"):
        FaultConfig(drop_after_apply_rate=0.5, apply_late_rate=0.6)
    with pytest.raises(ValidationError):
        FaultConfig(apply_late_rate=1.01)


def test_fault_draws_are_seedable_and_proportional() -> None:
    config = FaultConfig(
        error_rate=0.2, timeout_rate=0.1, drop_after_apply_rate=0.3, apply_late_rate=0.25, seed=7
    )
    a, b = FaultInjector(config), FaultInjector(config)
    draws = [a.draw("scan_voucher_api") for _ in range(10_000)]
    assert draws == [b.draw("scan_voucher_api") for _ in range(10_000)]
    share = {kind: draws.count(kind) / len(draws) for kind in FaultKind}
    assert abs(share[FaultKind.ERROR] - 0.2) < 0.02
    assert abs(share[FaultKind.TIMEOUT] - 0.1) < 0.02
    assert abs(share[FaultKind.DROP_AFTER_APPLY] - 0.3) < 0.02
    assert abs(share[FaultKind.APPLY_LATE] - 0.25) < 0.02
    assert a.injected["error"] == draws.count(FaultKind.ERROR)
    assert a.injected["apply_late"] == draws.count(FaultKind.APPLY_LATE)
    assert FaultInjector().draw("scan_voucher_api") is FaultKind.NONE
    # Apply-late takes the slice after the others: the same seed without it draws the same
    # faults, and apply-late only where the draw found none.
    without = FaultInjector(config.model_copy(update={"apply_late_rate": 0.0}))
    for kind, other in zip(draws, (without.draw("scan_voucher_api") for _ in draws), strict=True):
        assert other is (FaultKind.NONE if kind is FaultKind.APPLY_LATE else kind)


def test_apply_late_alone_and_routes() -> None:
    injector = FaultInjector(FaultConfig(apply_delay_s=1.0))
    assert injector.draw("redeem_voucher_api") is FaultKind.NONE  # a delay alone is no fault
    injector.update({"apply_late_rate": 1.0, "routes": ["redeem_voucher_api"]})
    assert injector.draw("redeem_voucher_api") is FaultKind.APPLY_LATE
    assert injector.draw("scan_voucher_api") is FaultKind.NONE
    assert injector.snapshot()["injected"] == {
        "error": 0,
        "timeout": 0,
        "drop_after_apply": 0,
        "apply_late": 1,
    }


async def test_apply_late_holds_then_applies_in_process(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox
) -> None:
    await bill(client, 50)
    await scan(client, V50)
    faults = {"apply_late_rate": 1.0, "apply_delay_s": 0.2, "routes": ["redeem_voucher_api"]}
    await client.post("/_sandbox/faults", json=faults)
    start = time.perf_counter()
    with pytest.raises(ConnectionDropped):  # no uvicorn transport to close in-process
        await call(client, "redeem_voucher_api", {"voucher_codes": V50})
    assert time.perf_counter() - start >= 0.2
    voucher = evoucher.voucher(V50)
    assert voucher is not None and voucher.redeemed and voucher.redeem_count == 1
    assert evoucher.call_log(MACHINES[TILL1])[-1]["route"] == "redeem_voucher_api"


# --- admin -------------------------------------------------------------------------------------


async def test_call_log_per_terminal(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox, clock: FakeClock
) -> None:
    await bill(client, 70)
    clock.advance(2)
    await bill(client, 20, TILL2)
    await scan(client, V50)
    await scan(client, "99999999")  # a failure is a call too
    await call(client, "cancel_payment_api", None)  # empty body: {}
    # Not logged: a refused token, an unknown route, a body that is not an object, a 503.
    await call(client, "scan_voucher_api", {"voucher_code": V20}, "not-a-token")
    await call(client, "login_api", {})
    await client.post(
        "/index.php?route=account/scan_voucher_api", content=b"[1]", headers={"X-Token": TILL1}
    )
    await client.post("/_sandbox/faults", json={"error_rate": 1.0})
    assert (await call(client, "scan_voucher_api", {"voucher_code": V20})).status_code == 503
    # Logged: a call whose answer is lost was applied.
    await client.post("/_sandbox/faults", json={"error_rate": 0, "drop_after_apply_rate": 1.0})
    with pytest.raises(ConnectionDropped):
        await call(client, "scan_voucher_api", {"voucher_code": V10})
    await client.post("/_sandbox/faults", json={"drop_after_apply_rate": 0})

    r = await client.get("/_sandbox/calls", params={"terminal": MACHINES[TILL1]})
    calls = r.json()["calls"]
    assert [(c["route"], c["body"]) for c in calls] == [
        ("bill_total_api", {"bill_total": 70, "machine_name": MACHINES[TILL1]}),
        ("scan_voucher_api", {"voucher_code": V50}),
        ("scan_voucher_api", {"voucher_code": "99999999"}),
        ("cancel_payment_api", {}),
        ("scan_voucher_api", {"voucher_code": V10}),
    ]
    assert [c["at"] for c in calls] == [clock() - 2] + [clock()] * 4
    till2 = evoucher.call_log(MACHINES[TILL2])
    assert [c["route"] for c in till2] == ["bill_total_api"]
    seqs = [c["seq"] for c in calls]
    assert seqs == sorted(seqs) and seqs[0] < till2[0]["seq"] < seqs[1]  # one global sequence

    r = await client.get("/_sandbox/calls", params={"terminal": MACHINES[NICOSIA]})
    assert r.json() == {"calls": []}  # a known terminal that did not call
    r = await client.get("/_sandbox/calls", params={"terminal": "no-such-till"})
    assert r.status_code == 404
    assert (await client.get("/_sandbox/calls")).status_code == 400
    await client.post("/_sandbox/reset")
    r = await client.get("/_sandbox/calls", params={"terminal": MACHINES[TILL1]})
    assert r.json() == {"calls": []}
    await bill(client, 5)
    assert evoucher.call_log(MACHINES[TILL1])[0]["seq"] > seqs[-1]  # never handed out again


def test_call_log_is_bounded_per_terminal() -> None:
    seed = EvoucherSeed(terminals=[TerminalSeed(token="t", machine_name="m", store="s")])
    evoucher = EvoucherSandbox(seed, max_logged_calls=2)
    terminal = evoucher.terminal("t")
    assert terminal is not None
    for code in ("a", "b", "c"):
        evoucher.handle("scan_voucher_api", terminal, {"voucher_code": code})
    assert [c["body"]["voucher_code"] for c in evoucher.call_log("m")] == ["b", "c"]


async def test_admin_add_terminal_and_vouchers_then_reset(
    client: httpx.AsyncClient, evoucher: EvoucherSandbox
) -> None:
    assert (await client.get("/_sandbox/health")).json() == {"status": "ok"}
    r = await client.post(
        "/_sandbox/terminals",
        json=[{"token": "test-tok", "machine_name": "paphos-1-till-1", "store": "paphos-1"}],
    )
    assert r.json() == {"added": 1}
    r = await client.post(
        "/_sandbox/vouchers",
        json={"vouchers": [{"code": "77777777", "value": "25.50", "store": "paphos-1"}]},
    )
    assert r.json() == {"added": 1}
    body = {"bill_total": 40, "machine_name": "paphos-1-till-1"}
    assert (await call(client, "bill_total_api", body, "test-tok")).json()["success"] == 1
    r = await call(client, "scan_voucher_api", {"voucher_code": "77777777"}, "test-tok")
    assert r.json()["price"] == "25.50"
    state = (await client.get("/_sandbox/state", params={"codes": "77777777"})).json()
    assert state["vouchers"][0]["locked_by"] == "paphos-1-till-1"
    assert state["bills"][0]["remaining"] == "14.50"
    assert state["totals"]["calls"]["scan_voucher_api"] == 1
    bad = await client.post("/_sandbox/vouchers", json=[{"code": "1", "value": -1}])
    assert bad.status_code == 422

    r = await client.post("/_sandbox/reset")
    assert r.json()["totals"]["locked"] == 0
    assert evoucher.terminal("test-tok") is None
    assert evoucher.voucher("77777777") is None
    assert evoucher.voucher(V50) is not None


async def test_sessions_are_bounded() -> None:
    evoucher = EvoucherSandbox(max_sessions=3)
    sids = [evoucher.session_id(None) for _ in range(4)]
    assert len(set(sids)) == 4
    assert evoucher.session_id(sids[0]) != sids[0]  # forgotten: the oldest went first
    assert evoucher.session_id(sids[3]) == sids[3]


def test_generated_terminals_and_vouchers(clock: FakeClock) -> None:
    seed = EvoucherSeed(
        generate=GenerateSpec(terminals=5, vouchers_per_terminal=6, terminals_per_store=2)
    )
    evoucher = EvoucherSandbox(seed, clock=clock)
    assert generated_token(3) == "gen-token-000003"
    terminal = evoucher.terminal("gen-token-000003")
    assert terminal is not None
    assert terminal.machine_name == generated_machine_name(3) == "gen-till-000003"
    assert terminal.store == generated_store(3, 2) == "gen-store-000001"
    code = generated_voucher_code(3, 3)
    assert code == "90000030003"
    voucher = evoucher.voucher(code)
    assert voucher is not None and voucher.value == Decimal("100.00")
    assert voucher.store == "gen-store-000001"
    assert evoucher.snapshot(with_vouchers=False)["totals"]["vouchers"] == 30

    evoucher.bill_total(terminal, {"bill_total": 500, "machine_name": "gen-till-000003"})
    assert evoucher.scan_voucher(terminal, {"voucher_code": code})["price"] == "100.00"
    # Terminal 2 shares store 1 with terminal 3; terminal 4 is store 2.
    assert evoucher.scan_voucher(terminal, {"voucher_code": generated_voucher_code(2, 0)})[
        "success"
    ]
    assert evoucher.scan_voucher(terminal, {"voucher_code": generated_voucher_code(4, 0)}) == fail(
        f"Voucher with code {generated_voucher_code(4, 0)} cannot be redeemed at your store!"
    )


def test_bench_seed_loads() -> None:
    evoucher = EvoucherSandbox.from_seed_file(SEED_PATH.with_name("evoucher-seed-bench.json"))
    totals = evoucher.snapshot(with_vouchers=False)["totals"]
    assert totals["terminals"] == 1000 and totals["vouchers"] == 50_000


def test_state_machine_without_http(clock: FakeClock) -> None:
    evoucher = EvoucherSandbox(
        EvoucherSeed(
            terminals=[TerminalSeed(token="t", machine_name="m", store="s")],
            vouchers=[
                VoucherSeed(code="c", value=Decimal("5"), store="s", expires=date(2030, 1, 1))
            ],
        ),
        clock=clock,
    )
    terminal = evoucher.terminal("t")
    assert terminal is not None
    assert evoucher.handle("bill_total_api", terminal, {"bill_total": "7.5", "machine_name": "m"})[
        "success"
    ]
    assert evoucher.handle("scan_voucher_api", terminal, {"voucher_code": "c"})["price"] == "5.00"
    assert evoucher.handle("redeem_voucher_api", terminal, {"voucher_codes": "c"})["success"] == 1
    assert evoucher.calls["redeem_voucher_api"] == 1
    assert evoucher.redemptions == 1
    clock.advance(timedelta(days=3650).total_seconds())
    assert evoucher.handle("scan_voucher_api", terminal, {"voucher_code": "c"}) == fail(
        "Voucher with code c has already been redeemed!"
    )


# --- real socket -------------------------------------------------------------------------------


async def test_drop_after_apply_over_a_real_socket(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    faults = FaultConfig(drop_after_apply_rate=1.0, routes=["redeem_voucher_api"])
    server = build_evoucher_server("127.0.0.1", 0, SEED_PATH, faults)
    task = asyncio.create_task(server.serve())
    try:
        port = await serving_port(server)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            await bill(client, 50)
            r = await call(client, "scan_voucher_api", {"voucher_code": V50})
            assert r.json()["price"] == "50.00"
            assert r.headers["content-encoding"] == "gzip"
            assert r.headers["transfer-encoding"] == "chunked"

            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                await call(client, "redeem_voucher_api", {"voucher_codes": V50})

            # Applied although the client never got an answer.
            state = (await client.get("/_sandbox/state", params={"codes": V50})).json()
            assert state["vouchers"][0]["redeemed"] is True
            assert state["vouchers"][0]["redeem_count"] == 1
            assert state["faults"]["injected"]["drop_after_apply"] == 1

            # The client's retry is told it is redeemed already; nothing is counted twice.
            await client.post("/_sandbox/faults", json={"drop_after_apply_rate": 0})
            assert await redeem(client, V50) == fail(
                f"Voucher with code {V50} has already been redeemed!"
            )
            state = (await client.get("/_sandbox/state", params={"codes": V50})).json()
            assert state["vouchers"][0]["redeem_count"] == 1

            # An injected timeout: the client gives up first, and nothing was applied.
            timeout = {"timeout_rate": 1.0, "timeout_sleep_s": 0.5, "routes": ["scan_voucher_api"]}
            await client.post("/_sandbox/faults", json=timeout)
            await bill(client, 50)
            with pytest.raises(httpx.ReadTimeout):
                await client.post(
                    "/index.php?route=account/scan_voucher_api",
                    json={"voucher_code": V20},
                    headers={"X-Token": TILL1},
                    timeout=0.1,
                )
            state = (await client.get("/_sandbox/state", params={"codes": V20})).json()
            assert state["vouchers"][0]["locked_by"] is None
            await asyncio.sleep(0.5)  # let the sleeping call finish before the shutdown
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)
    # uvicorn neither answered 500 nor logged an application error.
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text


def test_seed_file_is_valid_json() -> None:
    seed = json.loads(SEED_PATH.read_text())
    codes = [v["code"] for v in seed["vouchers"]]
    assert len(codes) == len(set(codes))
    assert {t["machine_name"] for t in seed["terminals"]} >= set(MACHINES.values())


async def test_apply_late_over_a_real_socket(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    delay = 1.0
    faults = FaultConfig(apply_late_rate=1.0, apply_delay_s=delay, routes=["redeem_voucher_api"])
    server = build_evoucher_server("127.0.0.1", 0, SEED_PATH, faults)
    task = asyncio.create_task(server.serve())
    try:
        base = f"http://127.0.0.1:{await serving_port(server)}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            await bill(client, 50)
            assert (await scan(client, V50))["price"] == "50.00"
            connections = len(server.server_state.connections)
            start = time.monotonic()
            # A client whose read timeout is shorter than the delay gives up first. (The lock
            # belongs to the machine, so this client needs no session cookie to redeem.)
            timeout = httpx.Timeout(5, read=0.2)
            async with httpx.AsyncClient(base_url=base, timeout=timeout) as impatient:
                with pytest.raises(httpx.ReadTimeout):
                    await call(impatient, "redeem_voucher_api", {"voucher_codes": V50})
            # uvicorn has seen that client go away, and the redeem is not applied yet.
            while len(server.server_state.connections) > connections:
                assert time.monotonic() - start < delay
                await asyncio.sleep(0.01)
            state = (await client.get("/_sandbox/state", params={"codes": V50})).json()
            assert state["vouchers"][0]["redeemed"] is False
            # After the delay the held call is applied all the same: the voucher is redeemed.
            while not state["vouchers"][0]["redeemed"] and time.monotonic() - start < 5:
                await asyncio.sleep(0.02)
                state = (await client.get("/_sandbox/state", params={"codes": V50})).json()
            assert time.monotonic() - start >= delay
            assert state["vouchers"][0]["redeemed"] is True
            assert state["vouchers"][0]["redeem_count"] == 1
            assert state["faults"]["injected"]["apply_late"] == 1
            r = await client.get("/_sandbox/calls", params={"terminal": MACHINES[TILL1]})
            assert [c["route"] for c in r.json()["calls"]] == [
                "bill_total_api",
                "scan_voucher_api",
                "redeem_voucher_api",
            ]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text
