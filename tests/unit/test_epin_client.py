"""epin.client: wire format, per-account login and refresh, pagination, transport errors, secrets.

Most tests talk to the Epin sandbox in-process (httpx.ASGITransport); those that need exact
control of the answers (a `next` on another host, scripted 401s, transport errors) use
httpx.MockTransport.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette

from voucher_bridge.epin.client import Credentials, EpinClient, Unauthorized
from voucher_bridge.upstream import CallNotSent, CallOutcomeUnknown
from voucher_sandboxes import SEEDS
from voucher_sandboxes.epin import EpinSandbox, create_app, parse_body
from voucher_sandboxes.faults import FaultConfig

SEED_PATH = SEEDS / "epin-seed.json"
BASE = "http://epin.test/api/v1"
API_KEY = "sbx-epin-apikey-6d1f0c9a3b7e4a25"
MAIN, MAIN_PW = "backoffice-cy", "sbx-backoffice-Pa55"
CLOSED, CLOSED_PW = "shop-paphos-closed", "sbx-paphos-Pa55"
ACCOUNTS = {
    "cy": Credentials(MAIN, SecretStr(MAIN_PW)),
    "limassol": Credentials("shop-limassol", SecretStr("sbx-limassol-Pa55")),
    "wrong-password": Credentials(MAIN, SecretStr("not-the-Pa55word-4410")),
    "closed": Credentials(CLOSED, SecretStr(CLOSED_PW)),
}
ACTIVE = "user/get/active-epin/"
MAIN_ACTIVE = [1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013]

Step = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


# --- the sandbox, in-process -------------------------------------------------------------------


@pytest.fixture
def state() -> EpinSandbox:
    # Not named `sandbox`/`epin`: conftest's autouse fixture treats those as sandbox processes.
    return EpinSandbox.from_seed_file(SEED_PATH)


@pytest.fixture
def app(state: EpinSandbox) -> Starlette:
    return create_app(state, FaultConfig())


@pytest.fixture
async def make_client(app: Starlette) -> AsyncIterator[Callable[..., EpinClient]]:
    clients: list[EpinClient] = []

    def make(transport: httpx.AsyncBaseTransport | None = None, **kw: Any) -> EpinClient:
        client = EpinClient(
            kw.pop("base_url", BASE),
            kw.pop("api_key", SecretStr(API_KEY)),
            kw.pop("accounts", ACCOUNTS),
            transport=transport or httpx.ASGITransport(app=app),
            **kw,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def admin(app: Starlette, path: str, body: dict[str, Any] | None = None) -> Any:
    """The sandbox's admin API (`/_sandbox/...`), as the tests' side channel."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://epin.test") as c:
        r = await c.post("/_sandbox/" + path, json=body or {})
        r.raise_for_status()
        return r.json()


def ids(results: list[dict[str, Any]]) -> list[int]:
    return [int(r["id"]) for r in results]


# --- scripted answers (MockTransport) ----------------------------------------------------------


def jwt(exp: float, tag: str = "a") -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256'})}.{part({'exp': int(exp), 'tag': tag})}.c2lnbmF0dXJl"


def envelope(data: dict[str, Any], status: int = 200) -> httpx.Response:
    return httpx.Response(status, json={"status_code": status, "errors": {}, "data": data})


TOKEN_NOT_VALID = {
    "detail": "Given token not valid for any token type",
    "code": "token_not_valid",
    "messages": [
        {"token_class": "AccessToken", "token_type": "access", "message": "Token is invalid"}
    ],
}


class Script:
    """A MockTransport handler: scripted answers per path (relative to /api/v1/), and by default
    a login and a refresh that issue numbered opaque tokens and an empty success elsewhere."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.steps: dict[str, list[Step]] = {}
        self.issued = 0

    def on(self, path: str, *steps: Step) -> Script:
        self.steps.setdefault(path, []).extend(steps)
        return self

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        path = request.url.path.removeprefix("/api/v1/")
        queue = self.steps.get(path)
        if queue:
            step = queue.pop(0)
            if isinstance(step, Exception):
                raise step
            return step if isinstance(step, httpx.Response) else step(request)
        if path == "user/login/":
            self.issued += 1
            return httpx.Response(
                200, json={"refresh": f"refresh-{self.issued}", "access": f"access-{self.issued}"}
            )
        if path == "user/token/refresh/":
            self.issued += 1
            return httpx.Response(200, json={"access": f"access-{self.issued}"})
        return envelope({"results": [], "count": 0, "previous": None, "next": None})

    def to(self, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path == "/api/v1/" + path]

    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.path.removeprefix('/api/v1/')}" for r in self.requests]


def form(request: httpx.Request) -> dict[str, str]:
    content_type = request.headers["content-type"]
    assert content_type.startswith("multipart/form-data; boundary=")
    return parse_body(content_type, request.content)


def bearer(request: httpx.Request) -> str | None:
    value = request.headers.get("authorization")
    return value.removeprefix("Bearer ") if value else None


# --- wire format -------------------------------------------------------------------------------


async def test_wire_format(make_client: Callable[..., EpinClient]) -> None:
    script = Script()
    client = make_client(httpx.MockTransport(script))

    listed = await client.call("cy", "GET", ACTIVE, params={"wallet": "wallet1", "code": "PIN"})
    sent = await client.call(
        "cy", "POST", "user/share/epin/", form={"email": "a@b.cy", "epin": "7", "share_amount": "1"}
    )
    deleted = await client.call("cy", "DELETE", "user/delete/epin/", params={"epin": "7"})
    assert [a.status for a in (listed, sent, deleted)] == [200, 200, 200]
    assert script.paths() == [
        "POST user/login/",
        "GET user/get/active-epin/",
        "POST user/share/epin/",
        "DELETE user/delete/epin/",
    ]
    login, get, post, delete = script.requests

    # Login: apikey, no bearer, the credentials as multipart form fields.
    assert login.url == "http://epin.test/api/v1/user/login/"
    assert login.headers["apikey"] == API_KEY
    assert "authorization" not in login.headers
    assert form(login) == {"username": MAIN, "password": MAIN_PW}

    for request in (get, post, delete):
        assert request.headers["apikey"] == API_KEY
        assert request.headers["authorization"] == "Bearer access-1"
        assert request.headers["accept"] == "application/json"
    assert get.url.host == "epin.test"
    assert dict(get.url.params) == {"wallet": "wallet1", "code": "PIN"}
    assert get.content == b""
    assert form(post) == {"email": "a@b.cy", "epin": "7", "share_amount": "1"}
    assert post.url.query == b""
    assert delete.method == "DELETE"
    assert dict(delete.url.params) == {"epin": "7"}
    assert delete.content == b""


async def test_answer_body_is_json_with_exact_decimals(
    make_client: Callable[..., EpinClient],
) -> None:
    raw = b'{"status_code": 200, "errors": {}, "data": {"balance": 89.10, "rate": 1}}'
    script = Script().on(
        "user/epin/history/",
        httpx.Response(200, content=raw, headers={"content-type": "application/json"}),
        httpx.Response(502, text="<html>bad gateway</html>"),
        httpx.Response(200, json=["not", "an", "object"]),
    )
    client = make_client(httpx.MockTransport(script))
    first = await client.call("cy", "GET", "user/epin/history/")
    assert first.status == 200 and first.body is not None
    assert first.body["data"]["balance"] == Decimal("89.10")
    assert isinstance(first.body["data"]["balance"], Decimal)
    assert first.elapsed_ms >= 0
    second = await client.call("cy", "GET", "user/epin/history/")
    assert (second.status, second.body) == (502, None)
    third = await client.call("cy", "GET", "user/epin/history/")
    assert (third.status, third.body) == (200, None)


async def test_non_json_error_answer(make_client: Callable[..., EpinClient]) -> None:
    script = Script().on("user/epin/history/", httpx.Response(503, text="<html>503</html>"))
    client = make_client(httpx.MockTransport(script))
    got = await client.call("cy", "GET", "user/epin/history/")
    assert (got.status, got.body) == (503, None)


async def test_sandbox_accepts_what_the_client_sends(
    make_client: Callable[..., EpinClient], state: EpinSandbox
) -> None:
    client = make_client()
    got = await client.call("cy", "GET", ACTIVE, params={"wallet": "wallet2"})
    assert got.status == 200 and got.body is not None
    assert ids(got.body["data"]["results"]) == [1012, 1013]
    moved = await client.call(
        "cy", "POST", "user/transfer/epin/", form={"user": "shop-nicosia", "epin": "1001"}
    )
    assert moved.status == 200, moved.body
    coupon = state.coupon(1001)
    assert coupon is not None and coupon.owner == "shop-nicosia" and coupon.transfers == 1
    status = await client.call("cy", "DELETE", "user/delete/epin/", params={"epin": "1015"})
    assert status.body is not None and status.body["data"]["refund_status"] == "refunded"
    assert state.failures == dict.fromkeys(state.failures, 0)


async def test_knows(make_client: Callable[..., EpinClient]) -> None:
    client = make_client()
    assert client.knows("cy") and client.knows("closed")
    assert not client.knows("nobody")
    assert not client.knows(MAIN)  # the account name is the key, not the username
    assert not make_client(api_key=None).knows("cy")


# --- tokens ------------------------------------------------------------------------------------


async def test_one_login_for_many_concurrent_calls(
    make_client: Callable[..., EpinClient], state: EpinSandbox
) -> None:
    client = make_client()
    answers = await asyncio.gather(*(client.call("cy", "GET", ACTIVE) for _ in range(20)))
    assert [a.status for a in answers] == [200] * 20
    assert client.logins == 1 and client.refreshes == 0
    assert state.logins == 1
    assert state.calls["active"] == 20


async def test_one_login_per_account(
    make_client: Callable[..., EpinClient], state: EpinSandbox
) -> None:
    client = make_client()
    calls = [client.call(a, "GET", ACTIVE) for a in ("cy", "limassol") * 5]
    answers = await asyncio.gather(*calls)
    assert all(a.status == 200 for a in answers)
    assert client.logins == 2 and state.logins == 2
    # Each account sees its own coupons: the tokens are not mixed up.
    assert answers[0].body is not None and answers[1].body is not None
    assert ids(answers[0].body["data"]["results"])[0] == 1001
    assert ids(answers[1].body["data"]["results"]) == [2001, 2002]


async def test_expiry_mid_run_refreshes_once(
    make_client: Callable[..., EpinClient], app: Starlette, state: EpinSandbox
) -> None:
    client = make_client()
    assert (await client.call("cy", "GET", ACTIVE)).status == 200
    assert (await admin(app, "expire-tokens"))["expired"] == 1
    answers = await asyncio.gather(*(client.call("cy", "GET", ACTIVE) for _ in range(10)))
    assert [a.status for a in answers] == [200] * 10
    assert (client.logins, client.refreshes) == (1, 1)
    assert (state.logins, state.refreshes, state.refresh_failures) == (1, 1, 0)
    # Those sent with the expired token were refused once and sent once more.
    refused = state.failures["active"]
    assert 1 <= refused <= 10
    assert state.calls["active"] == 1 + 10 + refused


async def test_refresh_refused_logs_in_again(
    make_client: Callable[..., EpinClient], app: Starlette, state: EpinSandbox
) -> None:
    client = make_client()
    assert (await client.call("cy", "GET", ACTIVE)).status == 200
    await admin(app, "expire-tokens", {"refresh": True})
    got = await client.call(
        "cy", "POST", "user/transfer/epin/", form={"user": "shop-nicosia", "epin": "1002"}
    )
    assert got.status == 200, got.body
    assert (client.logins, client.refreshes) == (2, 1)
    assert (state.logins, state.refreshes, state.refresh_failures) == (2, 0, 1)
    coupon = state.coupon(1002)
    assert coupon is not None and coupon.transfers == 1


async def test_token_not_valid_renews_once_and_resends_once(
    make_client: Callable[..., EpinClient],
) -> None:
    script = Script().on(
        "user/transfer/epin/",
        httpx.Response(401, json=TOKEN_NOT_VALID),
        httpx.Response(401, json=TOKEN_NOT_VALID),
        httpx.Response(401, json=TOKEN_NOT_VALID),
    )
    client = make_client(httpx.MockTransport(script))
    got = await client.call("cy", "POST", "user/transfer/epin/", form={"user": "u", "epin": "1"})
    assert got.status == 401 and got.body == TOKEN_NOT_VALID
    assert script.paths() == [
        "POST user/login/",
        "POST user/transfer/epin/",
        "POST user/token/refresh/",
        "POST user/transfer/epin/",
    ]
    refresh = script.to("user/token/refresh/")[0]
    assert refresh.headers["apikey"] == API_KEY and "authorization" not in refresh.headers
    assert form(refresh) == {"refresh": "refresh-1"}
    assert [bearer(r) for r in script.to("user/transfer/epin/")] == ["access-1", "access-2"]
    assert [form(r) for r in script.to("user/transfer/epin/")] == [{"user": "u", "epin": "1"}] * 2


async def test_only_a_disabled_facility_is_not_renewed(
    make_client: Callable[..., EpinClient],
) -> None:
    disabled = {
        "status_code": 401,
        "message": "Request Failed",
        "errors": {"detail": "Coupon facility is disabled, Please contact your administrator."},
        "data": {},
    }
    script = Script().on("user/generate/epin/", httpx.Response(401, json=disabled))
    client = make_client(httpx.MockTransport(script))
    assert (await client.call("cy", "GET", "user/generate/epin/")).body == disabled
    assert client.refreshes == 0 and client.logins == 1 and client.renewals == 0
    assert len(script.to("user/generate/epin/")) == 1


@pytest.mark.parametrize(
    "refused",
    [
        {"status_code": 401, "errors": {"detail": "Given token not valid for any token type"}},
        {"detail": "User is inactive", "code": "user_inactive"},
        {},
        None,
    ],
    ids=["the API's envelope", "another SimpleJWT code", "an empty object", "not JSON"],
)
async def test_any_other_401_is_a_refused_token_renewed_once(
    make_client: Callable[..., EpinClient], refused: dict[str, Any] | None
) -> None:
    # The vendor does not document the body of a refused token: any 401 but the disabled
    # facility is renewed once (refresh), sent once more, and a second 401 is returned.
    answer = httpx.Response(401, json=refused) if refused is not None else httpx.Response(401)
    script = Script().on("user/transfer/epin/", answer, answer)
    client = make_client(httpx.MockTransport(script))
    got = await client.call("cy", "POST", "user/transfer/epin/", form={"user": "u", "epin": "1"})
    assert got.status == 401 and client.renewals == 1
    assert script.paths() == [
        "POST user/login/",
        "POST user/transfer/epin/",
        "POST user/token/refresh/",
        "POST user/transfer/epin/",
    ]


async def test_refresh_refused_by_mock_logs_in_and_resends(
    make_client: Callable[..., EpinClient],
) -> None:
    refused = {"detail": "Token is invalid or expired", "code": "token_not_valid"}
    script = (
        Script()
        .on("user/get/active-epin/", httpx.Response(401, json=TOKEN_NOT_VALID))
        .on("user/token/refresh/", httpx.Response(401, json=refused))
    )
    client = make_client(httpx.MockTransport(script))
    got = await client.call("cy", "GET", ACTIVE)
    assert got.status == 200
    assert script.paths() == [
        "POST user/login/",
        "GET user/get/active-epin/",
        "POST user/token/refresh/",
        "POST user/login/",
        "GET user/get/active-epin/",
    ]
    assert [bearer(r) for r in script.to(ACTIVE)] == ["access-1", "access-2"]
    # The refused refresh token is dropped: the next expiry refreshes with the new one.
    script.on(ACTIVE, httpx.Response(401, json=TOKEN_NOT_VALID))
    assert (await client.call("cy", "GET", ACTIVE)).status == 200
    assert form(script.to("user/token/refresh/")[-1]) == {"refresh": "refresh-2"}


async def test_rotating_refresh_token_is_kept(make_client: Callable[..., EpinClient]) -> None:
    script = (
        Script()
        .on(ACTIVE, httpx.Response(401, json=TOKEN_NOT_VALID))
        .on("user/token/refresh/", httpx.Response(200, json={"access": "a2", "refresh": "r2"}))
    )
    client = make_client(httpx.MockTransport(script))
    assert (await client.call("cy", "GET", ACTIVE)).status == 200
    script.on(ACTIVE, httpx.Response(401, json=TOKEN_NOT_VALID))
    assert (await client.call("cy", "GET", ACTIVE)).status == 200
    assert [form(r)["refresh"] for r in script.to("user/token/refresh/")] == ["refresh-1", "r2"]


async def test_proactive_renewal_from_the_jwt_exp(make_client: Callable[..., EpinClient]) -> None:
    soon, later = jwt(time.time() + 2, "soon"), jwt(time.time() + 600, "later")
    script = (
        Script()
        .on("user/login/", httpx.Response(200, json={"refresh": "r1", "access": soon}))
        .on("user/token/refresh/", httpx.Response(200, json={"access": later}))
    )
    client = make_client(httpx.MockTransport(script))
    assert (await client.call("cy", "GET", ACTIVE)).status == 200
    # About to expire: renewed before the call, not after a 401.
    assert (await client.call("cy", "GET", ACTIVE)).status == 200
    assert (await client.call("cy", "GET", ACTIVE)).status == 200
    assert script.paths() == [
        "POST user/login/",
        "GET user/get/active-epin/",
        "POST user/token/refresh/",
        "GET user/get/active-epin/",
        "GET user/get/active-epin/",
    ]
    assert [bearer(r) for r in script.to(ACTIVE)] == [soon, later, later]


async def test_opaque_or_odd_tokens_have_no_expiry(make_client: Callable[..., EpinClient]) -> None:
    odd = "x.!!!not-base64!!!.y"
    script = Script().on("user/login/", httpx.Response(200, json={"refresh": "r", "access": odd}))
    client = make_client(httpx.MockTransport(script))
    for _ in range(3):
        assert (await client.call("cy", "GET", ACTIVE)).status == 200
    assert (client.logins, client.refreshes) == (1, 0)
    assert [bearer(r) for r in script.to(ACTIVE)] == [odd] * 3


async def test_refresh_path_is_configurable(make_client: Callable[..., EpinClient]) -> None:
    state = EpinSandbox.from_seed_file(SEED_PATH)
    app = create_app(state, FaultConfig(), prefix="/epin/v2/", refresh_path="auth/jwt/refresh/")
    client = make_client(
        httpx.ASGITransport(app=app),
        base_url="http://epin.test/epin/v2/",
        refresh_path="/auth/jwt/refresh/",
    )
    assert (await client.call("cy", "GET", ACTIVE)).status == 200
    state.expire_tokens()
    assert (await client.call("cy", "GET", ACTIVE)).status == 200
    assert (state.logins, state.refreshes) == (1, 1)


async def test_login_refused(make_client: Callable[..., EpinClient], state: EpinSandbox) -> None:
    client = make_client()
    with pytest.raises(Unauthorized) as wrong:
        await client.call("wrong-password", "GET", ACTIVE)
    assert wrong.value.message == "Authentication failed" == str(wrong.value)
    with pytest.raises(Unauthorized) as closed:
        await client.call("closed", "GET", ACTIVE)
    assert closed.value.message == "Inactive Account"
    bad_key = make_client(api_key=SecretStr("not-the-api-key-0000"))
    with pytest.raises(Unauthorized) as key:
        await bad_key.call("cy", "GET", ACTIVE)
    assert key.value.message == "Invalid API key."
    assert state.calls["active"] == 0
    for exc in (wrong.value, closed.value, key.value):
        text = "".join(traceback.format_exception(exc))
        for secret in ("not-the-Pa55word-4410", CLOSED_PW, API_KEY, "not-the-api-key-0000"):
            assert secret not in text


async def test_login_refused_again_on_the_next_call(
    make_client: Callable[..., EpinClient], state: EpinSandbox
) -> None:
    client = make_client()
    for _ in range(2):
        with pytest.raises(Unauthorized):
            await client.call("wrong-password", "GET", ACTIVE)
    assert state.login_failures == 2
    # The other accounts are not affected.
    assert (await client.call("cy", "GET", ACTIVE)).status == 200


async def test_login_answers_that_are_not_tokens(make_client: Callable[..., EpinClient]) -> None:
    script = (
        Script()
        .on("user/login/", httpx.Response(503, text="<html>503</html>"))
        .on("user/login/", httpx.Response(200, text="<html>maintenance</html>"))
        .on("user/login/", httpx.Response(401, json={"detail": "Authentication failed"}))
    )
    client = make_client(httpx.MockTransport(script))
    with pytest.raises(CallNotSent):
        await client.call("cy", "GET", ACTIVE)
    with pytest.raises(Unauthorized, match="login refused"):
        await client.call("cy", "GET", ACTIVE)
    with pytest.raises(Unauthorized, match=r"^Authentication failed$"):
        await client.call("cy", "GET", ACTIVE)
    assert script.to(ACTIVE) == []
    # Then it works: nothing stale was kept.
    assert (await client.call("cy", "GET", ACTIVE)).status == 200


@pytest.mark.parametrize("error", [httpx.ReadTimeout("slow"), httpx.ReadError("reset")])
async def test_login_lost_means_the_call_was_not_sent(
    make_client: Callable[..., EpinClient], error: Exception
) -> None:
    script = Script().on("user/login/", error)
    client = make_client(httpx.MockTransport(script))
    with pytest.raises(CallNotSent):
        await client.call("cy", "POST", "user/transfer/epin/", form={"user": "u", "epin": "1"})
    assert script.to("user/transfer/epin/") == []


async def test_login_rate_limited_is_not_unauthorized(
    make_client: Callable[..., EpinClient],
) -> None:
    script = Script().on("user/login/", httpx.Response(429, json={"detail": "Throttled."}))
    client = make_client(httpx.MockTransport(script))
    with pytest.raises(CallNotSent):
        await client.call("cy", "GET", ACTIVE)


# --- transport errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (httpx.ConnectError("refused"), CallNotSent),
        (httpx.ConnectTimeout("connect timeout"), CallNotSent),
        (httpx.PoolTimeout("pool"), CallNotSent),
        (httpx.ReadTimeout("read timeout"), CallOutcomeUnknown),
        (httpx.ReadError("reset"), CallOutcomeUnknown),
        (httpx.WriteTimeout("write timeout"), CallOutcomeUnknown),
        (httpx.WriteError("broken pipe"), CallOutcomeUnknown),
        (httpx.RemoteProtocolError("Server disconnected"), CallOutcomeUnknown),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else v.__name__,
)
async def test_transport_errors_are_classified(
    make_client: Callable[..., EpinClient], error: Exception, kind: type[Exception]
) -> None:
    script = Script().on("user/share/epin/", error)
    client = make_client(httpx.MockTransport(script))
    with pytest.raises(kind) as raised:
        await client.call(
            "cy",
            "POST",
            "user/share/epin/",
            form={"email": "a@b.cy", "epin": "1", "share_amount": "1"},
        )
    text = "".join(traceback.format_exception(raised.value))
    assert "user/share/epin/" in str(raised.value)
    for secret in (API_KEY, MAIN_PW, "access-1", "refresh-1"):
        assert secret not in text
    # Not resent by the client: what to do with it is the handler's call.
    assert len(script.to("user/share/epin/")) == 1


async def test_refresh_transport_error_is_raised(make_client: Callable[..., EpinClient]) -> None:
    script = (
        Script()
        .on(ACTIVE, httpx.Response(401, json=TOKEN_NOT_VALID))
        .on("user/token/refresh/", httpx.ConnectError("refused"))
    )
    client = make_client(httpx.MockTransport(script))
    with pytest.raises(CallNotSent):
        await client.call("cy", "GET", ACTIVE)
    # The refresh token was kept: the next call refreshes instead of logging in.
    script.on(ACTIVE, httpx.Response(401, json=TOKEN_NOT_VALID))
    assert (await client.call("cy", "GET", ACTIVE)).status == 200
    assert client.logins == 1


# --- pagination --------------------------------------------------------------------------------


async def test_all_pages_to_the_end(
    make_client: Callable[..., EpinClient], state: EpinSandbox
) -> None:
    state.settings.page_size = 3
    client = make_client()
    last, results = await client.call_all_pages("cy", ACTIVE)
    assert last.status == 200 and last.body is not None
    assert last.body["data"]["next"] is None
    assert ids(results) == MAIN_ACTIVE
    assert state.calls["active"] == 5  # ceil(13 / 3)
    _, only = await client.call_all_pages("cy", ACTIVE, {"wallet": "wallet2"})
    assert ids(only) == [1012, 1013]


async def test_the_query_is_kept_on_every_page(
    make_client: Callable[..., EpinClient], state: EpinSandbox
) -> None:
    state.settings.page_size = 2
    client = make_client()
    _, results = await client.call_all_pages("cy", ACTIVE, {"wallet": "wallet1"})
    assert ids(results) == [c for c in MAIN_ACTIVE if c not in (1012, 1013)]
    assert {r["wallet_type"] for r in results} == {"wallet1"}


async def test_pages_are_bounded_by_max_pages(
    make_client: Callable[..., EpinClient], state: EpinSandbox
) -> None:
    state.settings.page_size = 3
    with pytest.raises(CallOutcomeUnknown, match="more than 4 pages"):
        await make_client(max_pages=4).call_all_pages("cy", ACTIVE)
    assert state.calls["active"] == 4
    _, results = await make_client(max_pages=5).call_all_pages("cy", ACTIVE)
    assert len(results) == 13


async def test_a_page_that_fails_ends_the_list(make_client: Callable[..., EpinClient]) -> None:
    first = {"results": [{"id": 1}, {"id": 2}], "count": 9, "previous": None}
    invalid = {"status_code": 404, "errors": {"detail": "Invalid page."}, "data": {}}
    script = Script().on(
        ACTIVE,
        envelope({**first, "next": "http://epin.test/api/v1/user/get/active-epin/?page=2"}),
        httpx.Response(404, json=invalid),
    )
    client = make_client(httpx.MockTransport(script))
    last, results = await client.call_all_pages("cy", ACTIVE)
    assert (last.status, last.body) == (404, invalid)
    assert ids(results) == [1, 2]


async def test_renewal_in_the_middle_of_the_pages(
    make_client: Callable[..., EpinClient], state: EpinSandbox
) -> None:
    state.settings.page_size = 5
    client = make_client()
    original = state.active_coupons
    pages = 0

    def expire_after_first_page(*args: Any, **kwargs: Any) -> Any:
        nonlocal pages
        pages += 1
        if pages == 1:
            state.expire_tokens()
        return original(*args, **kwargs)

    state.active_coupons = expire_after_first_page  # type: ignore[method-assign]
    _, results = await client.call_all_pages("cy", ACTIVE)
    assert ids(results) == MAIN_ACTIVE
    assert (client.logins, client.refreshes) == (1, 1)


@pytest.mark.parametrize(
    ("following", "expected"),
    [
        (
            "https://evil.example/api/v1/user/get/active-epin/?page=2&wallet=wallet1",
            "http://epin.test/api/v1/user/get/active-epin/?page=2&wallet=wallet1",
        ),
        (
            "http://epin.test:8443/api/v1/user/get/active-epin/?page=2",
            "http://epin.test/api/v1/user/get/active-epin/?page=2",
        ),
        (
            "//evil.example/api/v1/user/get/active-epin/?page=2",
            "http://epin.test/api/v1/user/get/active-epin/?page=2",
        ),
        (
            "/api/v1/user/get/active-epin/?page=2",
            "http://epin.test/api/v1/user/get/active-epin/?page=2",
        ),
        (
            # Not under our base path (a proxy rewriting paths): the query, of the page read.
            "https://evil.example/steal/?page=2",
            "http://epin.test/api/v1/user/get/active-epin/?page=2",
        ),
    ],
)
async def test_next_is_followed_on_our_own_base_only(
    make_client: Callable[..., EpinClient], following: str, expected: str
) -> None:
    script = Script().on(
        ACTIVE,
        envelope({"results": [{"id": 1}], "count": 2, "previous": None, "next": following}),
    )
    script.steps["steal/"] = [envelope({"results": [], "next": None})]
    client = make_client(httpx.MockTransport(script))
    await client.call_all_pages("cy", ACTIVE, {"wallet": "wallet1"})
    first, second = [r for r in script.requests if r.method == "GET"]
    assert str(first.url) == "http://epin.test/api/v1/user/get/active-epin/?wallet=wallet1"
    assert str(second.url) == expected
    assert {r.url.host for r in script.requests} == {"epin.test"}
    assert {r.url.port for r in script.requests} == {None}
    assert bearer(second) == "access-1"


async def test_next_from_an_upstream_behind_a_path_prefix(
    make_client: Callable[..., EpinClient],
) -> None:
    script = Script()
    pages: list[dict[str, Any]] = [
        {
            "results": [{"id": 1}],
            "next": "https://api.internal/api/v1/user/get/active-epin/?page=2",
        },
        {"results": [{"id": 2}], "next": None},
    ]

    def route(request: httpx.Request) -> httpx.Response:
        script.requests.append(request)
        if request.url.path == "/epin/api/v1/user/login/":
            return httpx.Response(200, json={"refresh": "r", "access": "a"})
        if request.url.path == "/epin/api/v1/user/get/active-epin/":
            return envelope(pages[1] if request.url.params.get("page") == "2" else pages[0])
        return httpx.Response(404, json={"detail": "Not found."})

    client = make_client(httpx.MockTransport(route), base_url="http://gw.test/epin/api/v1/")
    last, results = await client.call_all_pages("cy", ACTIVE)
    assert last.status == 200
    assert ids(results) == [1, 2]


# --- secrets -----------------------------------------------------------------------------------


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    yield caplog


async def test_secrets_never_in_logs_or_errors(
    make_client: Callable[..., EpinClient],
    app: Starlette,
    state: EpinSandbox,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    client = make_client()
    issued: list[str] = []
    original_issue = state._issue

    def remember(*args: Any) -> str:
        token = original_issue(*args)
        issued.append(token)
        return token

    state._issue = remember  # type: ignore[method-assign, assignment]
    errors: list[BaseException] = []
    await asyncio.gather(*(client.call("cy", "GET", ACTIVE) for _ in range(3)))
    await admin(app, "expire-tokens")
    await client.call("cy", "GET", ACTIVE)
    await admin(app, "expire-tokens", {"refresh": True})
    await client.call_all_pages("cy", ACTIVE)
    for account in ("wrong-password", "closed"):
        try:
            await client.call(account, "GET", ACTIVE)
        except Unauthorized as exc:
            errors.append(exc)
    broken = make_client(
        httpx.MockTransport(
            Script()
            .on(ACTIVE, httpx.ReadError("reset"))
            .on("user/epin/history/", httpx.ConnectError("x"))
        )
    )
    for path in (ACTIVE, "user/epin/history/"):
        try:
            await broken.call("cy", "GET", path)
        except (CallNotSent, CallOutcomeUnknown) as exc:
            errors.append(exc)
    assert len(errors) == 4
    assert len(issued) >= 4  # two logins (access + refresh each), one refresh

    secrets = [API_KEY, MAIN_PW, CLOSED_PW, "not-the-Pa55word-4410", "access-1", "refresh-1"]
    secrets += issued
    texts = [r.getMessage() for r in all_logs.records]
    texts += [repr(r.args) for r in all_logs.records]
    texts += ["".join(traceback.format_exception(e)) for e in errors]
    texts += [repr(client), repr(ACCOUNTS)]
    assert any("user/login/" in t for t in texts)  # the HTTP calls were logged
    for secret in secrets:
        for text in texts:
            assert secret not in text
