"""httpx's transport for the upstream calls, on an asyncio-native network backend.

httpx (through httpcore) does the HTTP: connection pool, HTTP/1.1, TLS, timeouts, content
decoding. Below it, httpcore's only asyncio network backend goes through anyio, which costs per
socket operation a cancel scope with its own timer, an exception-mapping context manager, a
checkpoint on every send, and, for every idle pooled connection on every request, a `poll()`
syscall to see whether the server closed it (encode/httpcore#1035, encode/httpx#3215): about a
fifth of the service's CPU per command in `make bench` (1.46 → 0.93 ms of CPU per call without
it). httpcore does not ship an
asyncio backend (encode/httpcore#930 was declined), but it takes one through its documented
`network_backend` extension point, so this module provides one, built on the event loop's own
transports and protocols, after the design of encode/httpcore#930 and pydantic/httpx2#1170:

- a read returns buffered bytes at once, else waits on one future with an optional timer;
- a write hands the bytes to the transport and waits only when it pushes back;
- the protocol keeps reading while a connection is idle (bounded), so "is the server gone?"
  (`is_readable`) is answered from state the loop already has, without a syscall;
- errors become the same httpcore exceptions as with the anyio backend, so httpx maps them to
  the same `httpx.ConnectError`, `ReadTimeout`, ... that callers already tell apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterable
from typing import Any, cast

import httpcore
import httpx

# Stop reading from a socket whose bytes nobody takes; start again below the low mark.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024

SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)


class _StreamProtocol(asyncio.Protocol):
    """Buffers what the socket receives and wakes the one reader waiting for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not subclasses of asyncio's, hence no isinstance).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close our side too: HTTP/1.1 has no use for a half-open connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # the writer finds the connection gone

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- for the stream -----------------------------------------------------------------------

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_readable(self, timeout_s: float | None) -> None:
        """Until there are bytes, or the end of the stream; ReadTimeout after `timeout_s`."""
        waiter = self._waiter = self._loop.create_future()
        await _wait(self._loop, waiter, timeout_s, httpcore.ReadTimeout)

    def take(self, max_bytes: int) -> bytes:
        data = bytes(self.buffer[:max_bytes])
        del self.buffer[:max_bytes]
        if self._reading_paused and len(self.buffer) < _LOW_WATER and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def drain(self, timeout_s: float | None) -> None:
        if not self._writing_paused or self.transport is None or self.transport.is_closing():
            return
        waiter = self._drain_waiter = self._loop.create_future()
        await _wait(self._loop, waiter, timeout_s, httpcore.WriteTimeout)


async def _wait(
    loop: asyncio.AbstractEventLoop,
    waiter: asyncio.Future[None],
    timeout_s: float | None,
    timeout_error: type[Exception],
) -> None:
    # One future and one timer handle: `asyncio.wait_for` would add a task per read.
    if timeout_s is None:
        await waiter
        return
    timer = loop.call_later(timeout_s, _expire, waiter)
    try:
        await waiter
    except TimeoutError:
        raise timeout_error(f"no progress within {timeout_s} s") from None
    finally:
        timer.cancel()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, protocol: _StreamProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        protocol = self._protocol
        if not protocol.buffer and not protocol.eof:
            await protocol.wait_readable(timeout)
        if protocol.buffer:
            return protocol.take(max_bytes)
        if protocol.error is not None:
            raise httpcore.ReadError(_describe(protocol.error))
        return b""  # the peer closed the connection; h11 tells what that means here

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        protocol = self._protocol
        if self._transport.is_closing() or protocol.error is not None:
            raise httpcore.WriteError(
                _describe(protocol.error) if protocol.error else "connection closed"
            )
        try:
            self._transport.write(buffer)
        except (OSError, RuntimeError) as exc:
            raise httpcore.WriteError(_describe(exc)) from None
        await protocol.drain(timeout)
        if protocol.error is not None:
            raise httpcore.WriteError(_describe(protocol.error))

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(
                    self._transport,
                    self._protocol,
                    ssl_context,
                    server_hostname=server_hostname,
                )
        except TimeoutError:
            self._transport.close()
            raise httpcore.ConnectTimeout("TLS handshake timed out") from None
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            self._transport.close()
            raise httpcore.ConnectError(_describe(exc)) from None
        if transport is None:
            raise httpcore.ConnectError("connection closed during the TLS handshake")
        self._protocol.transport = transport
        return AsyncioStream(transport, self._protocol)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # Bytes or an end of stream on an idle connection: the server has closed it (or is
            # talking out of turn); either way it must not carry another request.
            return bool(self._protocol.buffer) or self._protocol.eof
        if info == "ssl_object":
            return self._transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info == "socket":
            return self._transport.get_extra_info("socket")
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """TCP only: the transport below is never given a Unix socket (`uds`), so the base class's
    `connect_unix_socket` (NotImplementedError) stands."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                # asyncio sets TCP_NODELAY on TCP transports itself.
                transport, protocol = await loop.create_connection(
                    lambda: _StreamProtocol(loop),
                    host,
                    port,
                    local_addr=(local_address, 0) if local_address else None,
                )
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(_describe(exc)) from None
        _apply(transport, socket_options)
        return AsyncioStream(transport, protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _apply(transport: asyncio.Transport, options: Iterable[SocketOption] | None) -> None:
    sock = transport.get_extra_info("socket")
    for option in options or ():
        with contextlib.suppress(AttributeError):
            sock.setsockopt(*option)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _LinearConnectionPool(httpcore.AsyncConnectionPool):
    """httpcore's pool with its request assignment in linear time.

    httpcore 1.0.9 rebuilds a list of every connection for every idle connection, and both
    lists of candidates for every queued request, each time a request starts or ends: O(N²)
    in the pool's size per request (encode/httpcore#1035), a quarter of a call's CPU with ten
    connections. Same decisions, made in one pass; re-check against httpcore on upgrade
    (`tests/unit/test_http_transport.py` pins the version it was checked against).
    """

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        closing: list[httpcore.AsyncConnectionInterface] = []
        connections = self._connections
        for connection in list(connections):
            if connection.is_closed():
                connections.remove(connection)
            elif connection.has_expired() or (
                # httpcore compares the number of all connections (not of idle ones) here.
                connection.is_idle() and len(connections) > self._max_keepalive_connections
            ):
                connections.remove(connection)
                closing.append(connection)

        for pool_request in [r for r in self._requests if r.is_queued()]:
            origin = pool_request.request.url.origin
            available = next(
                (c for c in connections if c.can_handle_request(origin) and c.is_available()),
                None,
            )
            if available is not None:
                pool_request.assign_to_connection(available)
            elif len(connections) < self._max_connections:
                connection = self.create_connection(origin)
                connections.append(connection)
                pool_request.assign_to_connection(connection)
            else:
                idle = next((c for c in connections if c.is_idle()), None)
                if idle is not None:
                    connections.remove(idle)
                    closing.append(idle)
                    connection = self.create_connection(origin)
                    connections.append(connection)
                    pool_request.assign_to_connection(connection)
        return closing


class AsyncioHTTPTransport(httpx.AsyncHTTPTransport):
    """`httpx.AsyncHTTPTransport` (TLS verified as httpx does, no proxy) whose httpcore pool runs
    on `AsyncioBackend`. httpx's transport has no parameter for a network backend, so this
    builds the pool itself, configured as httpx would, plus the backend (and the linear request
    assignment above); the rest of the transport (request and error mapping) is httpx's."""

    def __init__(
        self, limits: httpx.Limits | None = None, verify: ssl.SSLContext | bool = True
    ) -> None:
        # Not super().__init__(): all it does is build the pool (and an SSL context, loading
        # the CA bundle) that would be replaced here at once.
        limits = limits or httpx.Limits()
        self._pool = _LinearConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=AsyncioBackend(),
        )
