"""What the service counts, for SREs: commands by type and outcome, how long they took, dead
letters, answers replayed from the store. OpenTelemetry instruments; exported as
`telemetry.configure_metrics` sets up (Prometheus text on `/metrics`, OTLP where configured)."""

from __future__ import annotations

from opentelemetry import metrics

_meter = metrics.get_meter("voucher_bridge")

commands = _meter.create_counter(
    "voucher_bridge.commands",
    unit="{command}",
    description="Commands answered, by command type, outcome and reason.",
)
command_duration = _meter.create_histogram(
    "voucher_bridge.command.duration",
    unit="s",
    description="From the record's arrival in the service to its result sent, by type and outcome.",
)
replayed = _meter.create_counter(
    "voucher_bridge.commands.replayed",
    unit="{command}",
    description="Commands seen again and answered from the store, with no upstream call.",
)
dead_letters = _meter.create_counter(
    "voucher_bridge.dead_letters",
    unit="{record}",
    description="Records that were not a usable command, by topic and reason.",
)
superseded = _meter.create_counter(
    "voucher_bridge.results.superseding",
    unit="{result}",
    description="Indeterminate results settled later by a superseding result.",
)
