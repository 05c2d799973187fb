"""The eVOUCHER POS API over HTTP, exactly as its Postman collection sends it.

Every call is a POST of a JSON body to `index.php?route=account/<route>` with the terminal's
`X-Token`. The upstream keeps a bill per POS machine between calls and sets an `OCSESSID`
session cookie on every answer; whether it keys the bill on the token or on that session is not
documented (shared/upstream/NOTES.md), so each terminal has its own cookie jar, kept in a
`TerminalSessions` store so that it survives restarts and partition moves.

This module only transports: what an answer means is decided in `evoucher.decisions`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from decimal import Decimal
from enum import StrEnum
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Protocol

import httpx
from pydantic import SecretStr

from voucher_bridge.upstream import Answer, CallNotSent, CallOutcomeUnknown


class Route(StrEnum):
    BILL_TOTAL = "bill_total_api"
    SCAN = "scan_voucher_api"
    REMOVE = "remove_voucher_api"
    REDEEM = "redeem_voucher_api"
    CANCEL = "cancel_payment_api"


class TerminalSessions(Protocol):
    """Where each terminal's upstream session cookies live between calls."""

    async def load(self, terminal: str) -> dict[str, str]: ...
    async def save(self, terminal: str, cookies: dict[str, str]) -> None: ...


class InMemorySessions:
    def __init__(self) -> None:
        self._cookies: dict[str, dict[str, str]] = {}

    async def load(self, terminal: str) -> dict[str, str]:
        return dict(self._cookies.get(terminal, {}))

    async def save(self, terminal: str, cookies: dict[str, str]) -> None:
        self._cookies[terminal] = dict(cookies)


class EvoucherClient:
    def __init__(
        self,
        base_url: str,
        tokens: Mapping[str, SecretStr],
        sessions: TerminalSessions,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 15.0,
        max_connections: int = 10,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._tokens = dict(tokens)
        self._sessions = sessions
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s, pool=None),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            # The client-wide jar would mix terminals' sessions: refuse every cookie there and
            # keep one jar per terminal instead.
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
            headers={"Accept": "application/json"},
            transport=transport,
        )
        # Waiting here rather than in httpx's pool: the pool's queue costs CPU per waiting
        # request and connection (encode/httpcore#1035), which a semaphore does not.
        self._slots = asyncio.Semaphore(max_connections)

    def knows(self, terminal: str) -> bool:
        return terminal in self._tokens

    async def call(self, terminal: str, route: Route, body: dict[str, Any]) -> Answer:
        """POST `body` to `route` as `terminal`.

        Raises CallNotSent when no connection could be made, CallOutcomeUnknown when the
        request may have been received but no answer was read. KeyError for an unknown
        terminal (callers check `knows` first).
        """
        token = self._tokens[terminal].get_secret_value()
        cookies = await self._sessions.load(terminal)
        headers = {"X-Token": token, "Content-Type": "application/json"}
        if cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        started = time.monotonic()
        try:
            async with self._slots:
                response = await self._http.post(
                    "index.php",
                    params={"route": f"account/{route}"},
                    content=encode_json(body),
                    headers=headers,
                )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise CallNotSent(f"{route}: {type(exc).__name__}") from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            # Read/write timeouts, dropped connections, an answer that cannot be read: the
            # upstream may have acted.
            raise CallOutcomeUnknown(f"{route}: {type(exc).__name__}") from None
        elapsed_ms = int((time.monotonic() - started) * 1000)
        fresh = {name: value for name, value in response.cookies.items() if value}
        if fresh and any(cookies.get(k) != v for k, v in fresh.items()):
            await self._sessions.save(terminal, {**cookies, **fresh})
        return Answer(response.status_code, _json_object(response), elapsed_ms)

    async def aclose(self) -> None:
        await self._http.aclose()


def encode_json(body: dict[str, Any]) -> bytes:
    """JSON with Decimals written as exact JSON numbers (`"bill_total": 12.5`), never via float."""
    numbers: dict[str, str] = {}

    def placeholder(value: object) -> str:
        if isinstance(value, Decimal):
            marker = f"\x00decimal{len(numbers)}\x00"
            numbers[marker] = format(value.normalize(), "f")
            return marker
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    text = json.dumps(body, default=placeholder, separators=(",", ":"))
    for marker, number in numbers.items():
        text = text.replace(json.dumps(marker), number)
    return text.encode()


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = json.loads(response.content, parse_float=Decimal)  # a price is never a float
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None
