"""OpenTelemetry configured as its SDK documents: propagators, protocol, disabled SDK."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from voucher_bridge import telemetry

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class OneHeader(TextMapPropagator):
    """A propagator of another kind than W3C (as B3's single header is): `x-trace: T/S`."""

    def extract(self, carrier, context=None, getter=None):  # type: ignore[no-untyped-def]
        value = carrier.get("x-trace")
        if not value:
            return context
        trace_id, span_id = (int(part, 16) for part in value.split("/"))
        span = NonRecordingSpan(SpanContext(trace_id, span_id, True, TraceFlags(1)))
        return trace.set_span_in_context(span, context)

    def inject(self, carrier, context=None, setter=None):  # type: ignore[no-untyped-def]
        ctx = trace.get_current_span(context).get_span_context()
        carrier["x-trace"] = f"{ctx.trace_id:032x}/{ctx.span_id:016x}"

    @property
    def fields(self) -> set[str]:
        return {"x-trace"}


@pytest.fixture
def configured(request: pytest.FixtureRequest) -> Iterator[None]:
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(request.param)
    try:
        yield
    finally:
        propagate.set_global_textmap(before)


@pytest.mark.parametrize("configured", [OneHeader()], indirect=True)
def test_the_configured_propagator_reads_and_writes_kafka_headers(configured: None) -> None:
    context = telemetry.context_from([("x-trace", f"{TRACE_ID:032x}/{SPAN_ID:016x}".encode())])
    assert context is not None
    assert trace.get_current_span(context).get_span_context().trace_id == TRACE_ID
    with TracerProvider().get_tracer("t").start_as_current_span("send", context=context):
        headers = dict(telemetry.trace_headers())
    # Its own header, and the W3C traceparent the contract promises on every result.
    assert headers[b"x-trace".decode()].decode().startswith(f"{TRACE_ID:032x}/")
    assert headers["traceparent"].decode().split("-")[1] == f"{TRACE_ID:032x}"


@pytest.mark.parametrize("configured", [W3CBaggagePropagator()], indirect=True)
def test_traceparent_is_read_even_when_the_propagators_leave_w3c_out(configured: None) -> None:
    context = telemetry.context_from([("traceparent", TRACEPARENT.encode())])
    assert context is not None
    assert trace.get_current_span(context).get_span_context().span_id == SPAN_ID
    # And the CloudEvents distributed-tracing attribute, when there is no header.
    fallback = telemetry.context_from([], fallback_traceparent=TRACEPARENT)
    assert fallback is not None


def test_no_trace_context_is_a_root() -> None:
    assert telemetry.context_from([("traceparent", b"garbage")]) is None
    assert telemetry.context_from([]) is None


@pytest.mark.parametrize(
    ("env", "signal", "expected"),
    [
        ({}, "TRACES", "http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "TRACES", "grpc"),
        (
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
            },
            "METRICS",
            "http/protobuf",
        ),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "TRACES", "http/protobuf"),
    ],
)
def test_the_otlp_protocol_is_the_sdk_variables(
    env: dict[str, str], signal: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("PROTOCOL", "TRACES_PROTOCOL", "METRICS_PROTOCOL"):
        monkeypatch.delenv(f"OTEL_EXPORTER_OTLP_{name}", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert telemetry._otlp_protocol(signal) == expected


def test_grpc_and_http_exporters_are_chosen_by_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    [grpc_exporter] = telemetry._exporters()
    assert type(grpc_exporter).__module__.endswith("proto.grpc.trace_exporter")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    [http_exporter] = telemetry._exporters()
    assert type(http_exporter).__module__.endswith("proto.http.trace_exporter")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert telemetry._exporters() == []


def test_a_disabled_sdk_makes_no_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert telemetry._sdk_disabled()
    span = TracerProvider().get_tracer("t").start_span("x")
    assert not span.get_span_context().is_valid
