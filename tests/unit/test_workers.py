"""The worker processes' parts that need no process: how many, what each gets of the
instance's connection bounds, the wire format, and how their metrics are served."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Iterator

import pytest
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest

from voucher_bridge import telemetry
from voucher_bridge.settings import Settings
from voucher_bridge.workers import pool, wire
from voucher_bridge.workers.worker import share_of


def test_workers_given_are_taken_as_given() -> None:
    assert pool.worker_count(3) == 3


def test_unset_is_one_per_core_at_most_four(monkeypatch: pytest.MonkeyPatch) -> None:
    for cores, expected in [(1, 1), (2, 2), (3, 3), (4, 4), (16, 4)]:
        monkeypatch.setattr(pool, "available_cores", lambda cores=cores: cores)
        assert pool.worker_count(None) == expected


def test_the_upstream_connection_bounds_are_shared_out() -> None:
    settings = Settings(evoucher_max_connections=10, epin_max_connections=3)
    two = share_of(settings, 2)
    assert (two.evoucher_max_connections, two.epin_max_connections) == (5, 1)
    four = share_of(settings, 4)
    assert (four.evoucher_max_connections, four.epin_max_connections) == (2, 1)


def test_settings_with_secrets_cross_the_wire_whole() -> None:
    settings = Settings(evoucher_terminals={"till-1": "token-1"})
    record = wire.WireRecord("t", 0, 5, 1, b"k", b"v", [("h", b"\xff")])

    async def round_trip() -> tuple[object, ...] | None:
        reader = asyncio.StreamReader()
        reader.feed_data(wire.frame(("run", 7, record)) + wire.frame(("settings", settings)))
        reader.feed_eof()
        first = await wire.read_message(reader)
        second = await wire.read_message(reader)
        assert await wire.read_message(reader) is None  # the other end has gone
        assert second is not None and second[1] == settings
        return first

    assert asyncio.run(round_trip()) == ("run", 7, record)
    # A secret is still a secret on the other side (and in any repr of the message).
    assert "token-1" not in repr(pickle.loads(pickle.dumps(settings)))


@pytest.fixture
def forwarded() -> Iterator[dict[str, telemetry.ForwardedMetrics]]:
    found: dict[str, telemetry.ForwardedMetrics] = {}
    telemetry.worker_metrics = lambda: found
    yield found
    telemetry.worker_metrics = None


def test_workers_metrics_are_served_beside_the_services_each_by_worker(
    forwarded: dict[str, telemetry.ForwardedMetrics],
) -> None:
    # What a worker would forward: its own provider's metrics.
    worker_reader = InMemoryMetricReader()
    worker_meter = MeterProvider(metric_readers=[worker_reader]).get_meter("voucher_bridge")
    worker_meter.create_counter("voucher_bridge.commands").add(
        3, {"outcome": "succeeded", "command_type": "pos.redeem"}
    )
    data = worker_reader.get_metrics_data()
    forwarded["0"] = [
        (scoped.scope.name, scoped.scope.version, list(scoped.metrics))
        for resource_metrics in data.resource_metrics
        for scoped in resource_metrics.scope_metrics
    ]
    pickle.dumps(forwarded["0"])  # it crosses the socket

    registry = CollectorRegistry()
    service_meter = MeterProvider(
        metric_readers=[telemetry._ServiceMetricReader(registry=registry)]
    ).get_meter("voucher_bridge")
    service_meter.create_counter("voucher_bridge.commands").add(1, {"outcome": "failed"})
    text = generate_latest(registry).decode()
    lines = [line for line in text.splitlines() if line.startswith("voucher_bridge_commands_total")]
    assert len(lines) == 2, text
    # Each value under its own labels, though the two processes' attributes differ.
    [worker] = [x for x in lines if 'voucher_bridge_worker="0"' in x]
    assert 'command_type="pos.redeem"' in worker and 'outcome="succeeded"' in worker, worker
    assert worker.endswith(" 3.0")
    [service] = [x for x in lines if 'voucher_bridge_worker="service"' in x]
    assert 'outcome="failed"' in service and 'command_type=""' in service, service
    assert service.endswith(" 1.0")


def test_without_workers_the_metrics_are_as_they_were(
    forwarded: dict[str, telemetry.ForwardedMetrics],
) -> None:
    registry = CollectorRegistry()
    meter = MeterProvider(
        metric_readers=[telemetry._ServiceMetricReader(registry=registry)]
    ).get_meter("voucher_bridge")
    meter.create_counter("voucher_bridge.commands").add(1, {"outcome": "failed"})
    text = generate_latest(registry).decode()
    assert "voucher_bridge_worker" not in text
    assert "voucher_bridge_commands_total" in text


def test_a_worker_does_not_report_what_only_the_service_process_knows() -> None:
    batches: list[telemetry.ForwardedMetrics] = []
    provider, forwarding = telemetry.worker_meter_provider(batches.append, interval_s=3600)
    meter = provider.get_meter("voucher_bridge")
    meter.create_observable_gauge("voucher_bridge.in_flight", [lambda options: [Observation(0)]])
    meter.create_counter("voucher_bridge.commands").add(1, {"outcome": "succeeded"})
    forwarding.collect()
    provider.shutdown()
    names = {m.name for batch in batches for _, _, found in batch for m in found}
    assert "voucher_bridge.commands" in names
    assert "voucher_bridge.in_flight" not in names
