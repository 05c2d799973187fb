"""The eVOUCHER POS API over HTTP, exactly as its Postman collection sends it.

Every call is a POST of a JSON body to `index.php?route=account/<route>` with the terminal's
`X-Token`. The upstream keeps a bill per POS machine between calls and sets an `OCSESSID`
session cookie on every answer; whether it keys the bill on the token or on that session is not
documented (shared/upstream/NOTES.md), so each terminal has its own cookies, kept in a
`TerminalSessions` store so that it survives restarts and partition moves.

This is the hot path (one call per POS command), so it goes to httpx's transport (connection
pool, HTTP/1.1, timeouts, content decoding) without `AsyncClient` on top: the client's cookie
jar, URL merging, auth and redirect steps and the OpenTelemetry httpx instrumentation's wrapper
cost about a fifth of the service's CPU per command in `make bench`, and none of them is
needed for one fixed URL per route with cookies kept per terminal. The client span that the
instrumentation would make is made here, with the same name and attributes. The transport
runs on an asyncio-native network backend (`http_transport`), for the same reason.

This module only transports: what an answer means is decided in `evoucher.decisions`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from decimal import Decimal
from enum import StrEnum
from http.cookies import CookieError, SimpleCookie
from typing import Any, Protocol

import httpx
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from pydantic import SecretStr

from voucher_bridge import __version__, metrics
from voucher_bridge.breaker import UpstreamGuard
from voucher_bridge.http_transport import AsyncioHTTPTransport
from voucher_bridge.upstream import Answer, CallNotSent, CallOutcomeUnknown, json_object

# This upstream's name in metrics and settings (as breaker.py has it).
UPSTREAM = "evoucher"


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


# What httpx's AsyncClient would add, and the JSON body's type; the Host header comes from the URL.
_HEADERS = {
    "Accept": "application/json",
    "Accept-Encoding": "gzip, deflate",
    "Connection": "keep-alive",
    "User-Agent": f"voucher-bridge/{__version__}",
    "Content-Type": "application/json",
}


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
        guard: UpstreamGuard | None = None,
    ) -> None:
        self._tokens = dict(tokens)
        # The circuit breaker and rate limit every call passes (none: both off).
        self._guard = guard or UpstreamGuard()
        self._sessions = sessions
        self._transport = transport or AsyncioHTTPTransport(
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            )
        )
        # Built once: every call to a route has the same URL, span attributes and timeouts.
        self._timeout = httpx.Timeout(
            read_timeout_s, connect=connect_timeout_s, pool=None
        ).as_dict()
        base = httpx.URL(base_url.rstrip("/") + "/")
        self._urls = {
            route: base.join("index.php").copy_merge_params({"route": f"account/{route}"})
            for route in Route
        }
        self._span_attributes = {route: _span_attributes(url) for route, url in self._urls.items()}
        # Waiting here rather than in httpx's pool: the pool's queue costs CPU per waiting
        # request and connection (encode/httpcore#1035), which a semaphore does not.
        self._slots = asyncio.Semaphore(max_connections)

    @property
    def guard(self) -> UpstreamGuard:
        """The breaker and rate limit in front of this upstream (to read, not to call around)."""
        return self._guard

    def knows(self, terminal: str) -> bool:
        return terminal in self._tokens

    async def ready(self) -> None:
        """Return once the upstream's circuit would let a call through; raises UpstreamOpen
        when it would not (see breaker.py). Passed before a recovery point is written."""
        await self._guard.ready()

    async def call(self, terminal: str, route: Route, body: dict[str, Any]) -> Answer:
        """POST `body` to `route` as `terminal`.

        Raises UpstreamOpen (a CallNotSent) when the circuit is open, CallNotSent when no
        connection could be made, CallOutcomeUnknown when the request may have been received
        but no answer was read. KeyError for an unknown terminal (callers check `knows` first).
        """
        token = self._tokens[terminal].get_secret_value()
        # Every request passes the breaker and the rate limit here, before anything else is
        # done for it.
        return await self._guard.send(lambda: self._send(terminal, token, route, body), _status)

    async def _send(self, terminal: str, token: str, route: Route, body: dict[str, Any]) -> Answer:
        cookies = await self._sessions.load(terminal)
        headers = {**_HEADERS, "X-Token": token}
        if cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        url = self._urls[route]
        started = time.monotonic()
        with _tracer.start_as_current_span(
            "POST", kind=SpanKind.CLIENT, attributes=self._span_attributes[route]
        ) as span:
            propagate.inject(headers)
            request = httpx.Request(
                "POST",
                url,
                headers=headers,
                content=encode_json(body),
                extensions={"timeout": self._timeout},
            )
            try:
                async with self._slots:
                    response = await self._transport.handle_async_request(request)
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                self._measure(route, started, error=type(exc).__qualname__)
                span.set_attribute("error.type", type(exc).__qualname__)
                raise CallNotSent(f"{route}: {type(exc).__name__}") from None
            except (httpx.TransportError, httpx.DecodingError) as exc:
                # Read/write timeouts, dropped connections, an answer that cannot be read: the
                # upstream may have acted.
                self._measure(route, started, error=type(exc).__qualname__)
                span.set_attribute("error.type", type(exc).__qualname__)
                raise CallOutcomeUnknown(f"{route}: {type(exc).__name__}") from None
            self._measure(route, started, status=response.status_code)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_attribute("error.type", str(response.status_code))
                span.set_status(Status(StatusCode.ERROR))
        elapsed_ms = int((time.monotonic() - started) * 1000)
        fresh = session_cookies(response)
        if fresh and any(cookies.get(k) != v for k, v in fresh.items()):
            await self._sessions.save(terminal, {**cookies, **fresh})
        return Answer(response.status_code, json_object(response.content), elapsed_ms)

    @staticmethod
    def _measure(
        route: Route, started: float, *, status: int | None = None, error: str | None = None
    ) -> None:
        metrics.http_request_done(
            UPSTREAM,
            "POST",
            f"index.php?route=account/{route}",
            time.monotonic() - started,
            status=status,
            error=error,
        )

    async def aclose(self) -> None:
        await self._transport.aclose()


_tracer = trace.get_tracer("voucher_bridge.evoucher")


def _status(answer: Answer) -> int:
    return answer.status


def _span_attributes(url: httpx.URL) -> dict[str, str | int]:
    """The HTTP client span's attributes, as opentelemetry-instrumentation-httpx sets them
    (semantic conventions for HTTP clients), without its per-request wrapper cost."""
    attributes: dict[str, str | int] = {
        "http.request.method": "POST",
        "url.full": str(url),
        "server.address": url.host,
        "network.protocol.version": "1.1",
    }
    if url.port is not None:
        attributes["server.port"] = url.port
    return attributes


def session_cookies(response: httpx.Response) -> dict[str, str]:
    """The cookies an answer sets (`Set-Cookie`), by name; empty values (deletions) left out.

    The stdlib's cookie jar, which httpx uses, costs more per answer than the whole rest of the
    call's bookkeeping, and its domain and path rules do not matter for one upstream host.
    """
    fresh: dict[str, str] = {}
    for header in response.headers.get_list("set-cookie"):
        parsed: SimpleCookie = SimpleCookie()
        try:
            parsed.load(header)
        except CookieError:
            continue
        for name, morsel in parsed.items():
            if morsel.value:
                fresh[name] = morsel.value
    return fresh


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
