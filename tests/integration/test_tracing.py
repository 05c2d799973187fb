"""One complete trace per command, exported over OTLP as the SDK's variables say (issue 13).

The POS's own span (this test plays the POS, with a tracer of its own), the service's
`process`, each upstream attempt, and `send` arrive at a real OTLP receiver in one trace, over
gRPC and over HTTP/protobuf; the result's `traceparent` is of the same trace; the resource is
what OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES say; no span carries a secret.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tests.conftest import Stack
from tests.support.otlp import GrpcReceiver, HttpReceiver, ReceivedSpan
from tests.support.workload import service_env
from voucher_sandboxes.localstack import CommandProducer, ResultReader, start_service

pytestmark = pytest.mark.kafka

# Spans per kind, as OTLP numbers them.
SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5


def _pos_exporter(protocol: str, endpoint: str) -> SpanExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint, insecure=True)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    return Http(endpoint=f"{endpoint}/v1/traces")


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_one_complete_trace_per_command_over_otlp(
    protocol: str, stack: Any, tmp_path: Path
) -> None:
    s: Stack = await stack(partitions=1)
    tills = [s.terminal() for _ in range(4)]
    receiver = GrpcReceiver() if protocol == "grpc" else HttpReceiver()
    with receiver:
        env = service_env(
            s,
            OTEL_TRACES_EXPORTER="otlp",  # the test session's default is none
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
            OTEL_EXPORTER_OTLP_INSECURE="true",
            OTEL_METRICS_EXPORTER="none",
            OTEL_BSP_SCHEDULE_DELAY="100",
            OTEL_SERVICE_NAME="voucher-bridge-under-test",
            OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=test,service.namespace=pos",
            EVOUCHER_READ_TIMEOUT_S="5",
            # Half the calls fail: five in a row, as they come back, would open the circuit and
            # leave the next commands with no attempt to trace (CI saw it once). Not this test's
            # subject (test_upstream_down.py's), so the breaker is off.
            EVOUCHER_BREAKER_FAILURES="0",
        )
        # Half the bill totals fail with a 5xx first: retried, so a trace has two attempts.
        s.sandbox.faults(error_rate=0.5, routes=["bill_total_api"], seed=3)
        service = start_service(env, tmp_path / "service.log")
        pos = TracerProvider(resource=Resource.create({"service.name": "pos-till"}))
        pos.add_span_processor(SimpleSpanProcessor(_pos_exporter(protocol, receiver.endpoint)))
        tracer = pos.get_tracer("pos")
        sent: dict[str, str] = {}  # command id -> the trace its POS span began
        try:
            async with (
                CommandProducer(s.bootstrap, s.commands) as producer,
                ResultReader(s.bootstrap, s.results) as reader,
            ):
                for i, till in enumerate(tills * 2):
                    command_id = str(uuid.uuid4())
                    with tracer.start_as_current_span(
                        f"send {s.commands}", kind=SpanKind.PRODUCER
                    ) as span:
                        carrier: dict[str, str] = {}
                        TraceContextTextMapPropagator().inject(
                            carrier, context=set_span_in_context(span)
                        )
                        event = {
                            "specversion": "1.0",
                            "id": command_id,
                            "source": f"/stores/trace/pos/{till}",
                            "type": "pos.bill_total",
                            "subject": till,
                            "time": datetime.now(UTC).isoformat(),
                            "data": {"bill_total": f"{10 + i}.00"},
                        }
                        await producer.send_raw(
                            till.encode(),
                            json.dumps(event).encode(),
                            [
                                ("content-type", b"application/cloudevents+json"),
                                ("traceparent", carrier["traceparent"].encode()),
                            ],
                        )
                        sent[command_id] = format(span.get_span_context().trace_id, "032x")
                results = {r.data["command_id"]: r for r in await reader.wait_for(set(sent), 60)}
        finally:
            assert service.stop() == 0
        pos.shutdown()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(
            any(x.name.startswith("send ") and x.kind == PRODUCER and _is_service(x) for x in spans)
            for spans in (receiver.sink.of_trace(t) for t in sent.values())
        ):
            time.sleep(0.2)

    retried = 0
    for command_id, trace_id in sent.items():
        result = results[command_id]
        assert result.traceparent is not None and result.traceparent.split("-")[1] == trace_id
        spans = receiver.sink.of_trace(trace_id)
        by_id = {x.span_id: x for x in spans}
        [till_span] = [x for x in spans if x.resource.get("service.name") == "pos-till"]
        [process] = [x for x in spans if x.kind == CONSUMER and x.name == f"process {s.commands}"]
        attempts = [x for x in spans if x.kind == CLIENT and _is_service(x)]
        [send] = [x for x in spans if x.kind == PRODUCER and x.name == f"send {s.results}"]
        assert process.parent_span_id == till_span.span_id
        assert process.attributes["messaging.message.id"] == command_id
        assert len(attempts) == result.data["upstream"]["attempts"] >= 1, (
            result.data["outcome"],
            result.data.get("reason"),
            result.data.get("message"),
        )
        assert all(
            by_id[a.parent_span_id] is process or _under(a, process, by_id) for a in attempts
        )
        assert _under(send, process, by_id)
        # The result's traceparent names the send span: a reader's span hangs under it.
        assert result.traceparent.split("-")[2] == send.span_id
        assert process.resource["service.name"] == "voucher-bridge-under-test"
        assert process.resource["deployment.environment.name"] == "test"
        assert process.resource["service.namespace"] == "pos"
        retried += len(attempts) > 1
    assert retried >= 1, "no command was retried: the trace of a retry went untested"

    secrets = list(s.terminals.values())
    everything = b"".join(receiver.sink.raw)
    for secret in secrets:
        assert secret.encode() not in everything, "a span carries a terminal's token"


def _is_service(span: ReceivedSpan) -> bool:
    return span.resource.get("service.name") == "voucher-bridge-under-test"


def _under(span: ReceivedSpan, ancestor: ReceivedSpan, by_id: dict[str, ReceivedSpan]) -> bool:
    parent = by_id.get(span.parent_span_id)
    while parent is not None:
        if parent is ancestor:
            return True
        parent = by_id.get(parent.parent_span_id)
    return False
