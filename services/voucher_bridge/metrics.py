"""What the service counts, for SREs: commands by type and outcome, how long they took, dead
letters, answers replayed from the store, and what went wrong on the way to an answer.
OpenTelemetry instruments; exported as `telemetry.configure_metrics` sets up (Prometheus text
on `/metrics`, OTLP where configured)."""

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

# -- every record ends (what went wrong on the way, and how it was put right) -----------------

busy_waits = _meter.create_counter(
    "voucher_bridge.claims.busy_waits",
    unit="{command}",
    description="Commands that waited for another live instance running the same command.",
)
busy_wait_duration = _meter.create_histogram(
    "voucher_bridge.claims.busy_wait.duration",
    unit="s",
    description="How long a command waited for another live instance running it.",
)
claims_taken_over = _meter.create_counter(
    "voucher_bridge.claims.taken_over",
    unit="{command}",
    description="Claims of a live instance taken over after waiting past the bound.",
)
claims_released = _meter.create_counter(
    "voucher_bridge.claims.released",
    unit="{command}",
    description="Claims given up for the next owner: `cancelled` (a drain timed out) or "
    "`stranded` (nothing in this instance ran them any more).",
)
commands_timed_out = _meter.create_counter(
    "voucher_bridge.commands.timed_out",
    unit="{command}",
    description="Commands cancelled at COMMAND_TIMEOUT_S and answered as they stood.",
)
unrecorded = _meter.create_counter(
    "voucher_bridge.commands.unrecorded",
    unit="{command}",
    description="Commands answered `failed` because the store could not be reached in time.",
)
store_errors = _meter.create_counter(
    "voucher_bridge.store.errors",
    unit="{operation}",
    description="Store operations that failed or timed out (each was tried again).",
)
publish_retries = _meter.create_counter(
    "voucher_bridge.publish.retries",
    unit="{attempt}",
    description="Sends the broker did not take (leader moves, timeouts, a broker down), tried "
    "again with backoff, by topic and error.",
)
results_truncated = _meter.create_counter(
    "voucher_bridge.results.truncated",
    unit="{result}",
    description="Results cut to fit the largest record the broker takes (`truncated: true`).",
)
records_refused = _meter.create_counter(
    "voucher_bridge.records.refused",
    unit="{record}",
    description="Results or dead letters the broker refused for good, by topic and what was "
    "sent instead (`compact`, `dead_letter`, `without_value`, `nothing`).",
)
records_abandoned = _meter.create_counter(
    "voucher_bridge.records.abandoned",
    unit="{record}",
    description="Records given up after every way to answer them failed (a bug: page on it).",
)
lanes_restarted = _meter.create_counter(
    "voucher_bridge.lanes.restarted",
    unit="{lane}",
    description="Lanes (one key's records) cancelled outside a drain and started again.",
)
unsettled = _meter.create_counter(
    "voucher_bridge.results.unsettled",
    unit="{result}",
    description="Indeterminate results the upstream could no longer tell about, left to an "
    "operator (reason `unsettled`).",
)
members_of_other_stores = _meter.create_counter(
    "voucher_bridge.group.members_of_other_stores",
    unit="{check}",
    description="Looks at the consumer group that found a member of another store (no new "
    "records are taken meanwhile).",
)
