"""OpenTelemetry set-up from the standard `OTEL_*` variables, and trace-context helpers.

What the SDK reads by itself is left to it: `OTEL_SDK_DISABLED` (no-op tracers and meters),
`OTEL_TRACES_SAMPLER`/`_ARG` (the tracer provider's default sampler), `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES` (`Resource.create`), `OTEL_PROPAGATORS` (the global propagator, used
for Kafka headers and upstream calls alike), the `OTEL_EXPORTER_OTLP_*` endpoint, header,
timeout and certificate variables (the exporters), and `OTEL_BSP_*` / `OTEL_METRIC_EXPORT_*`.

What only the distro (opentelemetry-instrument) would do is done here, for the cases that
matter: the exporters named by `OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER` (`otlp`,
`console`, `none`), and for `otlp` the protocol of `OTEL_EXPORTER_OTLP_PROTOCOL` (or its
per-signal variable): `http/protobuf` (the default) or `grpc`. With neither an exporter nor an
OTLP endpoint named, spans are made and propagated but not exported, so a laptop run does not
spam connection errors. Metrics are also always readable as Prometheus text (`/metrics`).

Results always carry the W3C `traceparent` header (design.md), whatever OTEL_PROPAGATORS says:
the configured propagators add theirs beside it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.view import DropAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry

from voucher_bridge.metrics import SERVICE_GAUGES

SERVICE_NAME = "voucher-bridge"
_w3c = TraceContextTextMapPropagator()
log = logging.getLogger(__name__)


def configure_tracing() -> TracerProvider:
    """Install the SDK's tracer provider once per process (OpenTelemetry allows only one)."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    os.environ.setdefault("OTEL_SERVICE_NAME", SERVICE_NAME)
    provider = TracerProvider(resource=Resource.create())
    if not _sdk_disabled():
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
    readers: list[MetricReader] = [_ServiceMetricReader(registry=_registry)]
    metrics.set_meter_provider(
        MeterProvider(resource=Resource.create(), metric_readers=readers + _exporting_readers())
    )
    return _registry


def _exporting_readers() -> list[MetricReader]:
    readers: list[MetricReader] = []
    names = _exporter_names("OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    for name in [] if _sdk_disabled() else names:
        if name == "otlp" and _otlp_protocol("METRICS") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcMetricExporter,
            )

            readers.append(PeriodicExportingMetricReader(GrpcMetricExporter()))
        elif name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        elif name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    return readers


# What a worker process forwards of its metrics: per instrumentation scope, its name, version
# and metrics (a Resource or a scope holds a lock, and does not pickle; the service's own stand
# in for them).
ForwardedMetrics = list[tuple[str, str | None, list[Metric]]]

# Where the service finds its worker processes' metrics (set by workers.WorkerPool), by
# worker (its index as text), each cumulative since that process started: asked for afresh
# at each scrape (waiting a moment for the workers' answers), on the scrape's thread.
worker_metrics: Callable[[], Mapping[str, ForwardedMetrics]] | None = None
WORKER_ATTRIBUTE = "voucher_bridge.worker"


class _ServiceMetricReader(PrometheusMetricReader):
    """The Prometheus reader, serving the worker processes' metrics beside the service's own.

    Hand-made because neither the SDK nor its Prometheus exporter merges metrics from other
    processes. With workers, every series gets a `voucher_bridge_worker` label (the worker's
    index, or `service` for the service process's own), so none is served twice; `sum
    without (voucher_bridge_worker)` gives the instance's figure.
    """

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        forwarded = worker_metrics() if worker_metrics is not None else {}
        if metrics_data is None or not forwarded:
            super()._receive_metrics(metrics_data, timeout_millis, **kwargs)
            return
        resource = metrics_data.resource_metrics[0].resource
        own: ForwardedMetrics = [
            (scoped.scope.name, scoped.scope.version, list(scoped.metrics))
            for resource_metrics in metrics_data.resource_metrics
            for scoped in resource_metrics.scope_metrics
        ]
        # One metric per scope and name, with every process's points: the exporter makes a
        # family's labels from the first metric of a name it meets, so a second one with other
        # attributes would have its values put under the wrong labels.
        merged: dict[tuple[str, str | None], dict[str, Metric]] = {}
        for worker, batch in [("service", own), *sorted(forwarded.items())]:
            for name, version, found in batch:
                by_name = merged.setdefault((name, version), {})
                for metric in found:
                    labelled = _labelled(metric, worker)
                    earlier = by_name.get(metric.name)
                    by_name[metric.name] = (
                        labelled if earlier is None else _joined(earlier, labelled)
                    )
        scopes = [
            ScopeMetrics(InstrumentationScope(name, version), list(by_name.values()), "")
            for (name, version), by_name in merged.items()
        ]
        super()._receive_metrics(
            MetricsData([ResourceMetrics(resource, scopes, "")]), timeout_millis, **kwargs
        )


def _labelled(metric: Metric, worker: str) -> Metric:
    data: Any = metric.data
    points = [
        dataclasses.replace(
            point, attributes={**(point.attributes or {}), WORKER_ATTRIBUTE: worker}
        )
        for point in data.data_points
    ]
    return dataclasses.replace(metric, data=dataclasses.replace(data, data_points=points))


def _joined(first: Metric, second: Metric) -> Metric:
    data: Any = first.data
    points = [*data.data_points, *second.data.data_points]
    return dataclasses.replace(first, data=dataclasses.replace(data, data_points=points))


class _ForwardingExporter(MetricExporter):
    """A worker's metrics to its service (which serves them, `_ServiceMetricReader`)."""

    def __init__(self, forward: Callable[[ForwardedMetrics], None]) -> None:
        super().__init__()
        self._forward = forward

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self._forward(
            [
                (scoped.scope.name, scoped.scope.version, list(scoped.metrics))
                for resource_metrics in metrics_data.resource_metrics
                for scoped in resource_metrics.scope_metrics
            ]
        )
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None


def configure_worker_metrics(
    forward: Callable[[ForwardedMetrics], None], interval_s: float = 2.0
) -> tuple[MeterProvider, MetricReader]:
    """A worker process's meter provider: its metrics go to the service every `interval_s`,
    and whenever the returned reader's `collect()` is called (the service's scrape asks);
    and to the OTLP or console exporters named, as the service's do."""
    os.environ.setdefault("OTEL_SERVICE_NAME", SERVICE_NAME)
    provider, forwarding = worker_meter_provider(forward, interval_s)
    metrics.set_meter_provider(provider)
    return provider, forwarding


def worker_meter_provider(
    forward: Callable[[ForwardedMetrics], None], interval_s: float = 2.0
) -> tuple[MeterProvider, MetricReader]:
    """`configure_worker_metrics`'s provider, not installed."""
    forwarding = PeriodicExportingMetricReader(
        _ForwardingExporter(forward), export_interval_millis=interval_s * 1000
    )
    # What only the service's process knows (lag, in flight, ...) is not reported as a
    # worker's zeros beside it.
    provider = MeterProvider(
        resource=Resource.create(),
        metric_readers=[forwarding, *_exporting_readers()],
        views=[View(instrument_name=n, aggregation=DropAggregation()) for n in SERVICE_GAUGES],
    )
    return provider, forwarding


_registry: CollectorRegistry | None = None


def _exporter_names(variable: str, endpoint_variable: str) -> list[str]:
    names = os.environ.get(variable)
    if names is None:
        has_endpoint = any(
            os.environ.get(v) for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint_variable)
        )
        names = "otlp" if has_endpoint else "none"
    return [n.strip() for n in names.split(",")]


def _sdk_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def _otlp_protocol(signal: str) -> str:
    """`grpc` or `http/protobuf`, as OTEL_EXPORTER_OTLP_<signal>_PROTOCOL or else
    OTEL_EXPORTER_OTLP_PROTOCOL says (the specification's default: http/protobuf)."""
    protocol = (
        os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol not in ("grpc", "http/protobuf"):
        # The Python SDK has no http/json exporter; a collector's OTLP/HTTP receiver takes
        # protobuf on the same endpoint, so that is what is sent.
        log.warning("OTLP protocol %r is not supported here: using http/protobuf", protocol)
        return "http/protobuf"
    return protocol


def _exporters() -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in _exporter_names("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        if name == "otlp" and _otlp_protocol("TRACES") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )

            exporters.append(GrpcSpanExporter())
        elif name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
    return exporters


def context_from(
    headers: Sequence[tuple[str, bytes]], fallback_traceparent: str | None = None
) -> Context | None:
    """The trace context of a record, as the configured propagators read its headers (W3C
    `traceparent` by default; B3 or others per OTEL_PROPAGATORS), else its `traceparent`,
    else the CloudEvents distributed-tracing attribute; None when it has none of them (the
    span becomes a root)."""
    carrier: dict[str, str] = {}
    fields = propagate.get_global_textmap().fields | {"traceparent", "tracestate"}
    for key, value in headers:
        name = key.lower()
        if name in fields:
            try:
                carrier[name] = value.decode("ascii")
            except (UnicodeDecodeError, AttributeError):
                continue
    if carrier:
        context = propagate.extract(carrier)
        if trace.get_current_span(context).get_span_context().is_valid:
            return context
    # The contract's own header (design.md), even where OTEL_PROPAGATORS leaves W3C out.
    traceparent = carrier.get("traceparent") or fallback_traceparent
    if not traceparent:
        return None
    context = _w3c.extract({**carrier, "traceparent": traceparent})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def trace_headers() -> list[tuple[str, bytes]]:
    """The current span's context as Kafka headers: what the configured propagators write,
    and always the W3C `traceparent` (and `tracestate`) the contract promises."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if "traceparent" not in carrier:
        _w3c.inject(carrier)
    return [(k, v.encode()) for k, v in carrier.items()]
