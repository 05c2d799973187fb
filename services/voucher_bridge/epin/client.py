"""The Epixel Epin (prepaid coupons) API over HTTP, as its documentation and samples send it.

Every call carries `apikey` and `Authorization: Bearer <access token>`. Access tokens come from
logging in with the account's username and password and expire; they are renewed with the
refresh token, and when that fails too, by logging in again (shared/upstream/NOTES.md). All of
that lives here, per account: concurrent commands of one account share one login and one
refresh. Bodies are form data (multipart), as the vendor's samples send them.

This module only transports; what an answer means is decided in `epin.decisions`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr

from voucher_bridge import metrics
from voucher_bridge.breaker import UpstreamGuard
from voucher_bridge.epin.decisions import facility_disabled
from voucher_bridge.upstream import Answer, CallNotSent, CallOutcomeUnknown, json_object

# This upstream's name in metrics and settings (as breaker.py has it).
UPSTREAM = "epin"


class Unauthorized(Exception):
    """The account's credentials (or the API key) were refused."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Credentials:
    username: str
    password: SecretStr


@dataclass
class _Tokens:
    access: str | None = None
    refresh: str | None = None
    access_expires: float | None = None  # from the JWT's `exp`, when it is a JWT
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class EpinClient:
    def __init__(
        self,
        base_url: str,
        api_key: SecretStr | None,
        accounts: Mapping[str, Credentials],
        *,
        refresh_path: str = "user/token/refresh/",
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 15.0,
        max_connections: int = 10,
        max_pages: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
        guard: UpstreamGuard | None = None,
    ) -> None:
        self._base = base_url.rstrip("/") + "/"
        # The circuit breaker and rate limit every request passes, logins and refreshes
        # included (none: both off).
        self._guard = guard or UpstreamGuard()
        self._api_key = api_key
        self._accounts = dict(accounts)
        self._refresh_path = refresh_path.lstrip("/")
        self._max_pages = max_pages
        self._tokens: dict[str, _Tokens] = {}
        self._http = httpx.AsyncClient(
            base_url=self._base,
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s, pool=None),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            headers={"Accept": "application/json"},
            transport=transport,
        )
        # Waiting here rather than in httpx's pool: the pool's queue costs CPU per waiting
        # request and connection (encode/httpcore#1035), which a semaphore does not.
        self._slots = asyncio.Semaphore(max_connections)
        self.logins = 0  # how many times an account logged in (for tests and metrics)
        self.refreshes = 0
        self.renewals = 0  # calls sent again with a fresh token after a 401

    @property
    def guard(self) -> UpstreamGuard:
        """The breaker and rate limit in front of this upstream (to read, not to call around)."""
        return self._guard

    def knows(self, account: str) -> bool:
        return account in self._accounts and self._api_key is not None

    async def ready(self) -> None:
        """Return once the API's circuit would let a call through (waiting, when it waits);
        raises UpstreamOpen when it would not (see breaker.py). Passed before a recovery
        point is written."""
        await self._guard.ready()

    async def call(
        self,
        account: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        form: Mapping[str, str] | None = None,
    ) -> Answer:
        """One call as `account`, renewing its access token once if the API refuses it.

        Any 401 but "Coupon facility is disabled" is taken for a refused token: the vendor does
        not document that body (SimpleJWT says `token_not_valid`, the API's own envelope only
        `errors.detail`), and a token can be refused before its `exp` (revoked, a rotated key,
        clock skew). The request was refused before anything happened, so it is sent once more
        with a fresh token; a second 401 is the caller's to decide (`unauthorized`).

        Raises Unauthorized when the credentials are refused, UpstreamOpen / CallNotSent /
        CallOutcomeUnknown like the eVOUCHER client.
        """
        tokens = self._tokens.setdefault(account, _Tokens())
        access = await self._token(account, tokens)
        answer = await self._send(method, path, access, params=params, form=form)
        if answer.status == 401 and not facility_disabled(answer.body):
            self.renewals += 1
            access = await self._token(account, tokens, stale=access)
            answer = await self._send(method, path, access, params=params, form=form)
        return answer

    async def _token(self, account: str, tokens: _Tokens, stale: str | None = None) -> str:
        try:
            return await self._access(account, tokens, stale)
        except CallOutcomeUnknown as exc:
            # A lost login or refresh answer: the command's own request has not gone out.
            raise CallNotSent(f"token: {exc}") from None

    async def call_all_pages(
        self, account: str, path: str, params: Mapping[str, str] | None = None
    ) -> tuple[Answer, list[dict[str, Any]]]:
        """GET a paginated list and follow `next` to the end (at most `max_pages` pages).

        Returns the last answer and every result; a page that is not a success ends it early
        (the caller decides from that answer).
        """
        results: list[dict[str, Any]] = []
        query: Mapping[str, str] | None = params
        target = path
        for _ in range(self._max_pages):
            answer = await self.call(account, "GET", target, params=query)
            data = answer.body.get("data") if answer.status == 200 and answer.body else None
            if not isinstance(data, dict):
                return answer, results
            page = data.get("results")
            if isinstance(page, list):
                results.extend(r for r in page if isinstance(r, dict))
            following = data.get("next")
            if not following:
                return answer, results
            target, query = self._relative(str(following), target), None
        raise CallOutcomeUnknown(f"{path}: more than {self._max_pages} pages")

    def _relative(self, url: str, current: str) -> str:
        """`next`, relative to our own base: the bearer token never goes to another host.
        Behind a proxy that rewrites paths, `next` may not start with our base path: then its
        query is asked of the page just read."""
        parts = urlsplit(url)
        base = urlsplit(self._base)
        query = f"?{parts.query}" if parts.query else ""
        if parts.path.startswith(base.path):
            return parts.path[len(base.path) :].lstrip("/") + query
        return current.split("?", 1)[0] + query

    async def _send(
        self,
        method: str,
        path: str,
        access: str,
        *,
        params: Mapping[str, str] | None = None,
        form: Mapping[str, str] | None = None,
    ) -> Answer:
        assert self._api_key is not None
        headers = {"apikey": self._api_key.get_secret_value(), "Authorization": f"Bearer {access}"}
        # multipart/form-data with plain fields, as the vendor's samples (FormData) send it.
        files = {k: (None, v) for k, v in form.items()} if form is not None else None
        return await self._request(method, path, headers, params=params, files=files)

    async def _request(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        *,
        params: Mapping[str, str] | None = None,
        files: dict[str, tuple[None, str]] | None = None,
    ) -> Answer:
        """The one way out to the API: every request passes the breaker and the rate limit."""

        async def request() -> Answer:
            started = time.monotonic()
            # The path without a page's query (`next`): one route per endpoint.
            route = path.split("?", 1)[0]
            try:
                async with self._slots:
                    response = await self._http.request(
                        method, path, params=params, files=files, headers=headers
                    )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                _measure(method, route, started, error=type(exc).__qualname__)
                raise CallNotSent(f"{path}: {type(exc).__name__}") from None
            except (httpx.TransportError, httpx.DecodingError) as exc:
                _measure(method, route, started, error=type(exc).__qualname__)
                raise CallOutcomeUnknown(f"{path}: {type(exc).__name__}") from None
            _measure(method, route, started, status=response.status_code)
            elapsed_ms = int((time.monotonic() - started) * 1000)
            return Answer(response.status_code, json_object(response.content), elapsed_ms)

        return await self._guard.send(request, _status)

    # -- tokens -------------------------------------------------------------------------------

    async def _access(self, account: str, tokens: _Tokens, stale: str | None = None) -> str:
        """A valid access token for `account`; renews it when it is `stale` or expiring."""
        async with tokens.lock:  # one login or refresh per account at a time
            fresh = tokens.access is not None and tokens.access != stale
            expiring = tokens.access_expires is not None and tokens.access_expires < time.time() + 5
            if fresh and not expiring:
                assert tokens.access is not None
                return tokens.access
            if tokens.refresh is not None and await self._refresh(tokens):
                assert tokens.access is not None
                return tokens.access
            await self._login(account, tokens)
            assert tokens.access is not None
            return tokens.access

    async def _refresh(self, tokens: _Tokens) -> bool:
        assert self._api_key is not None
        self.refreshes += 1
        answer = await self._request(
            "POST",
            self._refresh_path,
            {"apikey": self._api_key.get_secret_value()},
            files={"refresh": (None, tokens.refresh or "")},
        )
        access = answer.body.get("access") if answer.status == 200 and answer.body else None
        if not isinstance(access, str) or not access:
            tokens.refresh = None  # log in again
            return False
        tokens.access, tokens.access_expires = access, _expiry(access)
        refresh = answer.body.get("refresh") if answer.body else None
        if isinstance(refresh, str) and refresh:  # a rotating refresh token
            tokens.refresh = refresh
        return True

    async def _login(self, account: str, tokens: _Tokens) -> None:
        assert self._api_key is not None
        credentials = self._accounts[account]
        self.logins += 1
        answer = await self._request(
            "POST",
            "user/login/",
            {"apikey": self._api_key.get_secret_value()},
            files={
                "username": (None, credentials.username),
                "password": (None, credentials.password.get_secret_value()),
            },
        )
        body = answer.body or {}
        access, refresh = body.get("access"), body.get("refresh")
        if answer.status != 200 or not isinstance(access, str) or not access:
            if answer.status >= 500 or answer.status == 429:  # busy, not a refusal
                raise CallNotSent(f"login: HTTP {answer.status}")
            raise Unauthorized(_detail(body) or f"login refused (HTTP {answer.status})")
        tokens.access, tokens.access_expires = access, _expiry(access)
        tokens.refresh = refresh if isinstance(refresh, str) and refresh else None

    async def aclose(self) -> None:
        await self._http.aclose()


def _measure(
    method: str, route: str, started: float, *, status: int | None = None, error: str | None = None
) -> None:
    metrics.http_request_done(
        UPSTREAM, method, route, time.monotonic() - started, status=status, error=error
    )


def _status(answer: Answer) -> int:
    return answer.status


def _expiry(token: str) -> float | None:
    """The `exp` of a JWT access token, to renew it before it runs out; None if opaque."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    return float(exp) if isinstance(exp, int | float) else None


def _detail(body: dict[str, Any]) -> str | None:
    errors = body.get("errors")
    if isinstance(errors, dict) and isinstance(errors.get("detail"), str):
        return str(errors["detail"])
    detail = body.get("detail")
    return detail if isinstance(detail, str) else None
