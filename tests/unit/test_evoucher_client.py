"""evoucher.client over httpx.MockTransport: wire format, per-terminal cookies, transport errors."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import SecretStr

from voucher_bridge.evoucher.client import EvoucherClient, InMemorySessions, Route, encode_json
from voucher_bridge.upstream import Answer, CallNotSent, CallOutcomeUnknown

TOKEN_A = "tok-A-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
TOKEN_B = "tok-B-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
TOKENS = {"A": SecretStr(TOKEN_A), "B": SecretStr(TOKEN_B)}
BASE = "https://evoucher.cy"
SUCCESS = {"success": 1, "price": "50.00", "message": "The voucher is valid"}

Handler = Callable[[httpx.Request], httpx.Response]


def gzip_json(body: Any, status: int = 200, cookie: str | None = None) -> httpx.Response:
    """An answer as the upstream sends it: gzip-encoded JSON, no-store, a session cookie."""
    headers = {
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
        "Cache-Control": "no-cache, no-store, must-revalidate",
    }
    if cookie is not None:
        headers["Set-Cookie"] = f"OCSESSID={cookie}; path=/"
    raw = gzip.compress(json.dumps(body).encode())
    return httpx.Response(status, headers=headers, stream=httpx.ByteStream(raw))


class Recorder:
    """A MockTransport handler that records requests and answers from a script."""

    def __init__(self, *answers: httpx.Response | Exception | Handler) -> None:
        self.requests: list[httpx.Request] = []
        self._answers = list(answers)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self._answers.pop(0) if self._answers else gzip_json(SUCCESS)
        if isinstance(answer, Exception):
            raise answer
        if callable(answer) and not isinstance(answer, httpx.Response):
            return answer(request)
        return answer

    def cookie(self, index: int) -> str | None:
        value: str | None = self.requests[index].headers.get("cookie")
        return value


class CountingSessions(InMemorySessions):
    def __init__(self) -> None:
        super().__init__()
        self.saves: list[tuple[str, dict[str, str]]] = []
        self.loads: list[str] = []

    async def load(self, terminal: str) -> dict[str, str]:
        self.loads.append(terminal)
        return await super().load(terminal)

    async def save(self, terminal: str, cookies: dict[str, str]) -> None:
        self.saves.append((terminal, dict(cookies)))
        await super().save(terminal, cookies)


@pytest.fixture
def sessions() -> CountingSessions:
    return CountingSessions()


@pytest.fixture
async def make_client(
    sessions: CountingSessions,
) -> AsyncIterator[Callable[..., EvoucherClient]]:
    clients: list[EvoucherClient] = []

    def make(recorder: Recorder, base_url: str = BASE, **kw: Any) -> EvoucherClient:
        kw.setdefault("sessions", sessions)
        client = EvoucherClient(base_url, TOKENS, transport=httpx.MockTransport(recorder), **kw)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


# -- the request ---------------------------------------------------------------------------------


async def test_request_wire_format(make_client: Callable[..., EvoucherClient]) -> None:
    recorder = Recorder()
    client = make_client(recorder)
    answer = await client.call("A", Route.SCAN, {"voucher_code": "12345678"})
    assert answer.status == 200
    assert answer.body == SUCCESS
    assert answer.elapsed_ms >= 0

    [request] = recorder.requests
    assert request.method == "POST"
    assert request.url.scheme == "https"
    assert request.url.host == "evoucher.cy"
    assert request.url.path == "/index.php"
    assert dict(request.url.params) == {"route": "account/scan_voucher_api"}
    # The collection writes the slash as is; %2F decodes to the same $_GET['route'] in PHP.
    assert request.url.query in (
        b"route=account/scan_voucher_api",
        b"route=account%2Fscan_voucher_api",
    )
    assert request.headers["X-Token"] == TOKEN_A
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Accept"] == "application/json"
    assert "gzip" in request.headers["Accept-Encoding"]
    assert request.content == b'{"voucher_code":"12345678"}'
    assert request.headers["Content-Length"] == str(len(request.content))
    assert "cookie" not in request.headers


@pytest.mark.parametrize(
    ("route", "query"),
    [
        (Route.BILL_TOTAL, "account/bill_total_api"),
        (Route.SCAN, "account/scan_voucher_api"),
        (Route.REMOVE, "account/remove_voucher_api"),
        (Route.REDEEM, "account/redeem_voucher_api"),
        (Route.CANCEL, "account/cancel_payment_api"),
    ],
)
async def test_every_route(
    make_client: Callable[..., EvoucherClient], route: Route, query: str
) -> None:
    recorder = Recorder()
    await make_client(recorder).call("B", route, {})
    assert recorder.requests[0].url.params["route"] == query
    assert recorder.requests[0].headers["X-Token"] == TOKEN_B
    assert recorder.requests[0].content == b"{}"


async def test_bill_total_body_bytes_are_exact(
    make_client: Callable[..., EvoucherClient],
) -> None:
    recorder = Recorder()
    client = make_client(recorder)
    await client.call("A", Route.BILL_TOTAL, {"bill_total": Decimal("12.50"), "machine_name": "A"})
    await client.call("A", Route.BILL_TOTAL, {"bill_total": Decimal("0.10"), "machine_name": "A"})
    assert recorder.requests[0].content == b'{"bill_total":12.5,"machine_name":"A"}'
    assert recorder.requests[1].content == b'{"bill_total":0.1,"machine_name":"A"}'


@pytest.mark.parametrize(
    "base_url",
    ["https://evoucher.cy", "https://evoucher.cy/"],
)
async def test_base_url_with_or_without_slash(
    make_client: Callable[..., EvoucherClient], base_url: str
) -> None:
    recorder = Recorder()
    await make_client(recorder, base_url).call("A", Route.SCAN, {})
    assert recorder.requests[0].url.path == "/index.php"


async def test_base_url_with_a_path_prefix(make_client: Callable[..., EvoucherClient]) -> None:
    recorder = Recorder()
    await make_client(recorder, "http://127.0.0.1:8080/shop/").call("A", Route.SCAN, {})
    assert str(recorder.requests[0].url.copy_with(query=None)) == (
        "http://127.0.0.1:8080/shop/index.php"
    )


async def test_unknown_terminal_raises_key_error_without_a_request(
    make_client: Callable[..., EvoucherClient],
) -> None:
    recorder = Recorder()
    client = make_client(recorder)
    assert client.knows("A") and client.knows("B")
    assert not client.knows("C")
    with pytest.raises(KeyError):
        await client.call("C", Route.SCAN, {})
    assert recorder.requests == []


# -- encode_json -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("12.50"), "12.5"),
        (Decimal("0.10"), "0.1"),
        (Decimal("0.1"), "0.1"),
        (Decimal("50.00"), "50"),
        (Decimal("100"), "100"),
        (Decimal("1E+2"), "100"),
        (Decimal("0.00"), "0"),
        (Decimal("99999999.99"), "99999999.99"),
        (Decimal("0.01"), "0.01"),
        (Decimal("123456789012345678.12"), "123456789012345678.12"),
    ],
)
def test_encode_json_writes_decimals_as_exact_numbers(value: Decimal, text: str) -> None:
    assert encode_json({"n": value}) == f'{{"n":{text}}}'.encode()
    assert json.loads(encode_json({"n": value}), parse_float=Decimal) == {"n": value}


def test_encode_json_many_decimals_nested_and_plain_values() -> None:
    body = {
        "a": Decimal("1.5"),
        "b": [Decimal("2"), {"c": Decimal("0.25")}],
        "s": "x",
        "i": 3,
        "n": None,
        "t": True,
    }
    assert encode_json(body) == (b'{"a":1.5,"b":[2,{"c":0.25}],"s":"x","i":3,"n":null,"t":true}')
    many = {f"k{i}": Decimal(i) for i in range(12)}
    assert json.loads(encode_json(many)) == {f"k{i}": i for i in range(12)}


def test_encode_json_refuses_other_types() -> None:
    with pytest.raises(TypeError):
        encode_json({"x": object()})


# -- the answer ----------------------------------------------------------------------------------


async def test_gzip_encoded_json_answer_is_decoded(
    make_client: Callable[..., EvoucherClient],
) -> None:
    body = {"success": 0, "message": "Voucher with code 12345678 does not exist!"}
    answer = await make_client(Recorder(gzip_json(body))).call("A", Route.SCAN, {})
    assert answer == Answer(200, body, answer.elapsed_ms)


@pytest.mark.parametrize(
    ("response", "status"),
    [
        (httpx.Response(200, text="<html>maintenance</html>"), 200),
        (httpx.Response(502, text="Bad Gateway"), 502),
        (httpx.Response(200, json=[1, 2]), 200),
        (httpx.Response(200, json="text"), 200),
        (httpx.Response(200), 200),
    ],
)
async def test_answer_that_is_not_a_json_object_has_no_body(
    make_client: Callable[..., EvoucherClient], response: httpx.Response, status: int
) -> None:
    answer = await make_client(Recorder(response)).call("A", Route.SCAN, {})
    assert (answer.status, answer.body) == (status, None)


async def test_error_status_with_json_body_is_returned(
    make_client: Callable[..., EvoucherClient],
) -> None:
    answer = await make_client(Recorder(gzip_json({"message": "no"}, 401))).call(
        "A", Route.SCAN, {}
    )
    assert (answer.status, answer.body) == (401, {"message": "no"})


# -- cookies -------------------------------------------------------------------------------------


async def test_cookies_are_per_terminal(
    make_client: Callable[..., EvoucherClient], sessions: CountingSessions
) -> None:
    recorder = Recorder(
        gzip_json(SUCCESS, cookie="aaaaaaaaaaaaaaaaaaaaaaaaaa"),  # A's first call
        gzip_json(SUCCESS),  # B's first call, no cookie set
        gzip_json(SUCCESS, cookie="aaaaaaaaaaaaaaaaaaaaaaaaaa"),  # A again
        gzip_json(SUCCESS, cookie="bbbbbbbbbbbbbbbbbbbbbbbbbb"),  # B again
        gzip_json(SUCCESS),  # B a third time
        gzip_json(SUCCESS),  # A a third time
    )
    client = make_client(recorder)
    for terminal in ("A", "B", "A", "B", "B", "A"):
        await client.call(terminal, Route.SCAN, {"voucher_code": "1"})

    assert recorder.cookie(0) is None
    assert recorder.cookie(1) is None  # A's session is never sent for B
    assert recorder.cookie(2) == "OCSESSID=aaaaaaaaaaaaaaaaaaaaaaaaaa"
    assert recorder.cookie(3) is None
    assert recorder.cookie(4) == "OCSESSID=bbbbbbbbbbbbbbbbbbbbbbbbbb"
    assert recorder.cookie(5) == "OCSESSID=aaaaaaaaaaaaaaaaaaaaaaaaaa"
    for request in recorder.requests:
        token = request.headers["X-Token"]
        cookie = request.headers.get("cookie") or ""
        if token == TOKEN_B:
            assert "aaaa" not in cookie
        else:
            assert "bbbb" not in cookie
    # Saved only when something changed.
    assert sessions.saves == [
        ("A", {"OCSESSID": "aaaaaaaaaaaaaaaaaaaaaaaaaa"}),
        ("B", {"OCSESSID": "bbbbbbbbbbbbbbbbbbbbbbbbbb"}),
    ]


async def test_set_cookie_updates_the_store(
    make_client: Callable[..., EvoucherClient], sessions: CountingSessions
) -> None:
    recorder = Recorder(
        gzip_json(SUCCESS, cookie="first"),
        gzip_json(SUCCESS, cookie="second"),
        lambda request: httpx.Response(
            200,
            headers=[("Set-Cookie", "language=en-gb; path=/"), ("Set-Cookie", "empty=; path=/")],
            json=SUCCESS,
        ),
        gzip_json(SUCCESS),
    )
    client = make_client(recorder)
    for _ in range(4):
        await client.call("A", Route.SCAN, {})
    assert recorder.cookie(1) == "OCSESSID=first"
    assert recorder.cookie(2) == "OCSESSID=second"
    # Other cookies join the terminal's jar; an empty value does not overwrite anything.
    assert recorder.cookie(3) == "OCSESSID=second; language=en-gb"
    assert await sessions.load("A") == {"OCSESSID": "second", "language": "en-gb"}
    assert await sessions.load("B") == {}


async def test_cookies_survive_a_new_client_with_the_same_store(
    make_client: Callable[..., EvoucherClient],
) -> None:
    store = InMemorySessions()
    first = make_client(Recorder(gzip_json(SUCCESS, cookie="kept")), sessions=store)
    await first.call("A", Route.BILL_TOTAL, {})
    await first.aclose()
    recorder = Recorder()
    second = make_client(recorder, sessions=store)
    await second.call("A", Route.SCAN, {})
    assert recorder.cookie(0) == "OCSESSID=kept"


async def test_in_memory_sessions_hand_out_copies() -> None:
    store = InMemorySessions()
    cookies = {"OCSESSID": "x"}
    await store.save("A", cookies)
    cookies["OCSESSID"] = "changed"
    loaded = await store.load("A")
    assert loaded == {"OCSESSID": "x"}
    loaded["OCSESSID"] = "changed"
    assert await store.load("A") == {"OCSESSID": "x"}
    assert await store.load("unknown") == {}


# -- transport errors ----------------------------------------------------------------------------


def _raise(exc_type: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        # The message carries the token, as some libraries' messages do: it must not leak.
        raise exc_type(f"failed with X-Token {TOKEN_A}", request=request)

    return handler


@pytest.mark.parametrize(
    ("exc_type", "expected"),
    [
        (httpx.ConnectError, CallNotSent),
        (httpx.ConnectTimeout, CallNotSent),
        (httpx.PoolTimeout, CallNotSent),
        (httpx.ReadTimeout, CallOutcomeUnknown),
        (httpx.WriteTimeout, CallOutcomeUnknown),
        (httpx.RemoteProtocolError, CallOutcomeUnknown),
        (httpx.ReadError, CallOutcomeUnknown),
        (httpx.WriteError, CallOutcomeUnknown),
    ],
)
async def test_transport_errors_are_classified_without_leaking_the_token(
    make_client: Callable[..., EvoucherClient],
    sessions: CountingSessions,
    exc_type: type[httpx.TransportError],
    expected: type[Exception],
) -> None:
    await sessions.save("A", {"OCSESSID": "secret-session"})
    sessions.saves.clear()
    recorder = Recorder(_raise(exc_type))
    client = make_client(recorder)
    with pytest.raises(expected) as info:
        await client.call("A", Route.REDEEM, {"voucher_codes": "1"})
    exc = info.value
    assert "redeem_voucher_api" in str(exc)
    assert exc_type.__name__ in str(exc)
    for text in (str(exc), repr(exc), str(exc.args)):
        assert TOKEN_A not in text
        assert "secret-session" not in text
    assert exc.__cause__ is None
    assert exc.__suppress_context__
    assert sessions.saves == []
    assert len(recorder.requests) == 1


async def test_client_recovers_after_a_transport_error(
    make_client: Callable[..., EvoucherClient],
) -> None:
    recorder = Recorder(_raise(httpx.ConnectError), gzip_json(SUCCESS, cookie="s"))
    client = make_client(recorder)
    with pytest.raises(CallNotSent):
        await client.call("A", Route.SCAN, {})
    answer = await client.call("A", Route.SCAN, {})
    assert answer.body == SUCCESS


# -- tracing -------------------------------------------------------------------------------------


@pytest.fixture
def spans() -> InMemorySpanExporter:
    # One SDK provider per process (OpenTelemetry's rule): reuse it if another test set it.
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


async def test_call_is_a_client_span_under_the_current_one_and_propagates_it(
    make_client: Callable[..., EvoucherClient], spans: InMemorySpanExporter
) -> None:
    recorder = Recorder(gzip_json(SUCCESS), httpx.ConnectError("refused"))
    client = make_client(recorder)
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("process") as parent:
        await client.call("A", Route.SCAN, {"voucher_code": "12345678"})
        with pytest.raises(CallNotSent):
            await client.call("A", Route.SCAN, {"voucher_code": "12345678"})
    finished = [s for s in spans.get_finished_spans() if s.name == "POST"]
    assert len(finished) == 2
    ok, refused = finished
    parent_context = parent.get_span_context()
    for span in finished:
        assert span.kind is SpanKind.CLIENT
        assert span.parent is not None and span.parent.span_id == parent_context.span_id
        assert span.context.trace_id == parent_context.trace_id
        assert span.attributes is not None
        assert span.attributes["http.request.method"] == "POST"
        assert span.attributes["url.full"] == (
            "https://evoucher.cy/index.php?route=account%2Fscan_voucher_api"
        )
        assert span.attributes["server.address"] == "evoucher.cy"
        # The token is a header; nothing of it is in the span.
        assert TOKEN_A not in repr(dict(span.attributes))
    assert ok.attributes is not None and ok.attributes["http.response.status_code"] == 200
    assert refused.attributes is not None and refused.attributes["error.type"] == "ConnectError"
    # The upstream sees the client span as the parent (W3C traceparent).
    traceparent = recorder.requests[0].headers["traceparent"]
    _, trace_id, span_id, _ = traceparent.split("-")
    assert int(trace_id, 16) == parent_context.trace_id
    assert int(span_id, 16) == ok.context.span_id
