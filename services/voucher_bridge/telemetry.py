"""OpenTelemetry set-up from the standard `OTEL_*` variables, and trace-context helpers.

The SDK alone does not pick exporters from `OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER`
(the distro does), so this does it for the ones that matter here: `otlp` (HTTP/protobuf,
`OTEL_EXPORTER_OTLP_*`), `console` and `none`. With neither variable nor an OTLP endpoint set,
spans are made and propagated but not exported, so a laptop run does not spam connection
errors. Metrics are also always readable as Prometheus text (`/metrics`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry

SERVICE_NAME = "voucher-bridge"
_propagator = TraceContextTextMapPropagator()


def configure_tracing() -> TracerProvider:
    """Install the SDK's tracer provider once per process (OpenTelemetry allows only one)."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    os.environ.setdefault("OTEL_SERVICE_NAME", SERVICE_NAME)
    provider = TracerProvider(resource=Resource.create())
    for exporter in _exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def configure_metrics() -> CollectorRegistry:
    """Install the SDK's meter provider once per process; returns the Prometheus registry
    that `/metrics` serves."""
    global _registry
    if _registry is not None:
        return _registry
    os.environ.setdefault("OTEL_SERVICE_NAME", SERVICE_NAME)
    _registry = CollectorRegistry()
    readers: list[MetricReader] = [PrometheusMetricReader(registry=_registry)]
    for name in _exporter_names("OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        elif name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    metrics.set_meter_provider(MeterProvider(resource=Resource.create(), metric_readers=readers))
    return _registry


_registry: CollectorRegistry | None = None


def _exporter_names(variable: str, endpoint_variable: str) -> list[str]:
    names = os.environ.get(variable)
    if names is None:
        has_endpoint = any(
            os.environ.get(v) for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint_variable)
        )
        names = "otlp" if has_endpoint else "none"
    return [n.strip() for n in names.split(",")]


def _exporters() -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in _exporter_names("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
    return exporters


def context_from(
    headers: Sequence[tuple[str, bytes]], fallback_traceparent: str | None = None
) -> Context | None:
    """The W3C trace context of a record: its `traceparent` header, else the CloudEvents
    distributed-tracing attribute; None when it has neither (the span becomes a root)."""
    carrier: dict[str, str] = {}
    for key, value in headers:
        name = key.lower()
        if name in ("traceparent", "tracestate"):
            try:
                carrier[name] = value.decode("ascii")
            except (UnicodeDecodeError, AttributeError):
                continue
    if "traceparent" not in carrier and fallback_traceparent:
        carrier["traceparent"] = fallback_traceparent
    if "traceparent" not in carrier:
        return None
    context = _propagator.extract(carrier)
    span_context = trace.get_current_span(context).get_span_context()
    return context if span_context.is_valid else None


def trace_headers() -> list[tuple[str, bytes]]:
    """`traceparent` (and `tracestate`) of the current span, as Kafka headers."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return [(k, v.encode()) for k, v in carrier.items()]
