"""Fault injection shared by the sandboxes: latency, errors, timeouts, and answers that get lost.

A call is faulted in this order: the added latency, then one draw that picks at most one of
error (HTTP 503, nothing applied), timeout (a long sleep then HTTP 504, nothing applied),
drop-after-apply (the change is applied, then the connection is closed with no answer at all)
and apply-late (the call is held with no answer for `apply_delay_s`, so that a client with a
shorter read timeout gives up, and only then applied and its connection closed). The last two
are the cases an exactly-once client must survive: it cannot tell them from a timeout, and after
apply-late the change lands after the client has given up (a resend may even arrive first).

A client that goes away does not stop the apply, so nothing needs shielding: uvicorn (h11 and
httptools alike) only marks the request cycle disconnected and discards what the app sends
afterwards; it never cancels the app's task (only its shutdown does, after
`timeout_graceful_shutdown`: a call still held then is not applied), and Starlette's plain routes
do not watch for `http.disconnect`. The sandboxes read the request body before `inject`: once
the client is gone, `receive` only answers `http.disconnect`.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    import uvicorn

# Where `SandboxStarlette` keeps the server's own `send`, before any middleware wraps it.
RAW_SEND_KEY = "voucher_sandboxes.raw_send"


class FaultConfig(BaseModel):
    """What to inject, and into which routes. Rates are fractions of calls (0..1)."""

    model_config = ConfigDict(extra="forbid")

    latency_ms: float = Field(default=0.0, ge=0)
    # Each call waits latency_ms plus a uniform draw in [0, latency_jitter_ms].
    latency_jitter_ms: float = Field(default=0.0, ge=0)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    timeout_rate: float = Field(default=0.0, ge=0, le=1)
    timeout_sleep_s: float = Field(default=30.0, ge=0)
    drop_after_apply_rate: float = Field(default=0.0, ge=0, le=1)
    apply_late_rate: float = Field(default=0.0, ge=0, le=1)
    # How long an apply-late call is held, unanswered, before it is applied.
    apply_delay_s: float = Field(default=5.0, ge=0)
    # Route names (e.g. "scan_voucher_api") the faults apply to; None means every route.
    routes: list[str] | None = None
    # Seed of the random draws, for reproducible runs; None seeds from the OS.
    seed: int | None = None

    @model_validator(mode="after")
    def _rates_fit(self) -> FaultConfig:
        # One draw picks the fault, so the four rates share the unit interval.
        total = self.error_rate + self.timeout_rate + self.drop_after_apply_rate
        if total + self.apply_late_rate > 1.0 + 1e-9:
            raise ValueError(
                "error_rate + timeout_rate + drop_after_apply_rate + apply_late_rate must be <= 1"
            )
        return self


class FaultKind(StrEnum):
    NONE = "none"
    ERROR = "error"
    TIMEOUT = "timeout"
    DROP_AFTER_APPLY = "drop_after_apply"
    APPLY_LATE = "apply_late"


class ConnectionDropped(Exception):
    """Raised when the connection cannot be closed directly (a server other than uvicorn)."""


class FaultInjector:
    """Draws the faults of each call from a `FaultConfig`; counts what it injected."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        self._config = FaultConfig()
        self._rng = random.Random()
        self._routes: frozenset[str] | None = None
        self._idle = True
        self.injected: dict[str, int] = {
            kind.value: 0 for kind in FaultKind if kind.value != "none"
        }
        self.configure(config or FaultConfig())

    @property
    def config(self) -> FaultConfig:
        return self._config

    def configure(self, config: FaultConfig, reseed: bool = True) -> None:
        """Replace the config; with `reseed`, a seed in it restarts the random sequence."""
        self._config = config
        if reseed and config.seed is not None:
            self._rng = random.Random(config.seed)
        self._routes = frozenset(config.routes) if config.routes is not None else None
        # Fast path for the common (benchmark) case: nothing configured, no draws at all.
        self._idle = (
            config.latency_ms == 0
            and config.latency_jitter_ms == 0
            and config.error_rate == 0
            and config.timeout_rate == 0
            and config.drop_after_apply_rate == 0
            and config.apply_late_rate == 0
        )

    def update(self, changes: Mapping[str, Any]) -> FaultConfig:
        """Merge `changes` into the current config (validated as a whole) and apply it.

        The random sequence restarts only when `changes` names a seed, so turning a rate up or
        down mid-run does not replay the draws from the beginning.
        """
        merged = {**self._config.model_dump(), **changes}
        config = FaultConfig.model_validate(merged)
        self.configure(config, reseed="seed" in changes)
        return config

    def applies_to(self, route: str) -> bool:
        return not self._idle and (self._routes is None or route in self._routes)

    def latency_s(self, route: str) -> float:
        if not self.applies_to(route):
            return 0.0
        config = self._config
        jitter = self._rng.uniform(0.0, config.latency_jitter_ms) if config.latency_jitter_ms else 0
        return (config.latency_ms + jitter) / 1000.0

    def draw(self, route: str) -> FaultKind:
        """Pick the fault of one call (no sleeping)."""
        if not self.applies_to(route):
            return FaultKind.NONE
        config = self._config
        if not (
            config.error_rate
            or config.timeout_rate
            or config.drop_after_apply_rate
            or config.apply_late_rate
        ):
            return FaultKind.NONE
        # Consecutive slices of [0, 1), apply-late last: a seeded run without it draws as before.
        x = self._rng.random()
        edge = config.error_rate
        if x < edge:
            kind = FaultKind.ERROR
        elif x < (edge := edge + config.timeout_rate):
            kind = FaultKind.TIMEOUT
        elif x < (edge := edge + config.drop_after_apply_rate):
            kind = FaultKind.DROP_AFTER_APPLY
        elif x < edge + config.apply_late_rate:
            kind = FaultKind.APPLY_LATE
        else:
            return FaultKind.NONE
        self.injected[kind.value] += 1
        return kind

    async def inject(self, route: str) -> FaultKind:
        """Sleep the call's latency, draw its fault, and for a timeout or apply-late sleep that too.

        The caller answers `error_response(503)` for ERROR and `error_response(504)` for TIMEOUT
        without applying anything, and applies then calls `drop_connection` for DROP_AFTER_APPLY
        and APPLY_LATE (the latter returns after `apply_delay_s`, the client perhaps gone).
        """
        if self._idle:
            return FaultKind.NONE
        delay = self.latency_s(route)
        if delay > 0:
            await asyncio.sleep(delay)
        kind = self.draw(route)
        if kind is FaultKind.TIMEOUT:
            await asyncio.sleep(self._config.timeout_sleep_s)
        elif kind is FaultKind.APPLY_LATE:
            await asyncio.sleep(self._config.apply_delay_s)
        return kind

    def snapshot(self) -> dict[str, Any]:
        return {"config": self._config.model_dump(mode="json"), "injected": dict(self.injected)}


_STATUS_TEXT = {503: "Service Temporarily Unavailable", 504: "Gateway Time-out"}


def error_response(status: int) -> Response:
    """An nginx-style HTML error page: what a proxy in front of the shop answers, not the API."""
    text = f"{status} {_STATUS_TEXT.get(status, 'Error')}"
    body = f"<html>\r\n<head><title>{text}</title></head>\r\n<body>\r\n<center><h1>{text}</h1>"
    body += "</center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    return Response(body, status_code=status, media_type="text/html")


class SandboxStarlette(Starlette):
    """A Starlette app that remembers the server's own `send` so a route can drop the connection.

    Starlette's outermost middleware wraps `send` in a closure, so the route cannot reach the
    connection through it; the raw one is stored in the scope before that happens.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[RAW_SEND_KEY] = send
        await super().__call__(scope, receive, send)


async def drop_connection(scope: Scope) -> None:
    """Close the client's connection with no answer at all.

    uvicorn passes its per-request cycle's bound `send`; the cycle holds the connection's
    transport. Closing it sends a FIN with no bytes of response, so an HTTP client sees
    "server disconnected without sending a response" (httpx: RemoteProtocolError), never a 500.
    After the close, uvicorn marks the cycle disconnected and discards whatever the app still
    sends, and logs nothing. Without such a transport (another server, or httpx's in-process
    ASGITransport) this raises `ConnectionDropped` instead.
    """
    send = scope.get(RAW_SEND_KEY)
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    # Duck-typed: uvloop's transports (uvicorn's default loop when uvloop is installed) are
    # not asyncio.BaseTransport subclasses.
    close = getattr(transport, "close", None)
    if not callable(close):
        raise ConnectionDropped("dropped the connection after applying the call")
    close()
    # Let the event loop run connection_lost, which marks uvicorn's cycle as disconnected, so
    # the response the route still returns is discarded instead of written or logged.
    await asyncio.sleep(0)


# --- the admin API's pieces both sandboxes share ------------------------------------------------


class SettingRefused(Exception):
    """A settings change that validated but cannot be applied (its message is the answer)."""


def settings_route(
    current: Callable[[], dict[str, Any]], apply: Callable[[dict[str, Any]], object]
) -> Callable[[Request], Awaitable[Response]]:
    """`GET|POST` of a settings object (the fault config, a sandbox's settings): GET answers
    `current()`; POST first hands the request's JSON object to `apply`, answering 400 when the
    body is not an object and 422 when `apply` raises ValidationError or SettingRefused."""

    async def endpoint(request: Request) -> Response:
        if request.method == "POST":
            changes = await json_object(request)
            if changes is None:
                return JSONResponse({"error": "expected a JSON object"}, status_code=400)
            try:
                apply(changes)
            except ValidationError as exc:
                return JSONResponse({"error": validation_errors(exc)}, status_code=422)
            except SettingRefused as exc:
                return JSONResponse({"error": str(exc)}, status_code=422)
        return JSONResponse(current())

    return endpoint


def faults_route(injector: FaultInjector) -> Callable[[Request], Awaitable[Response]]:
    """`GET|POST /_sandbox/faults`: the fault config; POST merges the fields it is given."""
    return settings_route(injector.snapshot, injector.update)


async def add_items(
    request: Request,
    key: str,
    adapter: TypeAdapter[list[Any]],
    add: Callable[[Iterable[Any]], int],
) -> Response:
    """`POST /_sandbox/<key>`: a list of seed items (or `{"<key>": [...]}`), validated, added."""
    try:
        data = json.loads(await request.body())
    except ValueError:
        return JSONResponse({"error": "invalid JSON"}, status_code=400)
    if isinstance(data, dict):
        data = data.get(key)
    try:
        items = adapter.validate_python(data)
    except ValidationError as exc:
        return JSONResponse({"error": validation_errors(exc)}, status_code=422)
    return JSONResponse({"added": add(items)})


async def json_object(request: Request) -> dict[str, Any] | None:
    """The request's JSON object (an empty body is `{}`); None when it is not one."""
    return parse_json_object(await request.body())


def parse_json_object(raw: bytes) -> dict[str, Any] | None:
    """A JSON object from raw bytes (an empty body is `{}`); None when it is not one."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:  # also UnicodeDecodeError
        return None
    return body if isinstance(body, dict) else None


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]


def sandbox_server(app: ASGIApp, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server for a sandbox app, not started (tests run `serve()` in their own loop).

    With port 0 the OS picks a free port: read it from `server.servers[0].sockets` once
    `server.started` is true.
    """
    import uvicorn  # here, so that the sandboxes' state machines import without the server

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        server_header=False,
        # Calls sleeping in an injected timeout (or apply-late) must not hold the shutdown for
        # timeout_sleep_s; an apply-late call still held then is cancelled, not applied.
        timeout_graceful_shutdown=2,
    )
    return uvicorn.Server(config)
