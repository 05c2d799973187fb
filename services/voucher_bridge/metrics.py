"""What the service counts, for SREs: commands by type and outcome, how long they took, dead
letters, answers replayed from the store, and what went wrong on the way to an answer.
OpenTelemetry instruments; exported as `telemetry.configure_metrics` sets up (Prometheus text
on `/metrics`, OTLP where configured)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

_meter = metrics.get_meter("voucher_bridge")

# Bucket bounds for durations in seconds (the SDK's default bounds are for milliseconds:
# every command would fall in its first bucket): from a fast answer to COMMAND_TIMEOUT_S.
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

commands = _meter.create_counter(
    "voucher_bridge.commands",
    unit="{command}",
    description="Commands answered, by command type, outcome and reason.",
)
command_duration = _meter.create_histogram(
    "voucher_bridge.command.duration",
    unit="s",
    explicit_bucket_boundaries_advisory=SECONDS,
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
    explicit_bucket_boundaries_advisory=SECONDS,
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
workers_lost = _meter.create_counter(
    "voucher_bridge.workers.lost",
    unit="{process}",
    description="Worker processes that died (or stopped answering) and were started again; "
    "their records went on through the store in the replacement.",
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

# -- progress (issue 13): what an SRE pages on ---------------------------------------------

consumed = _meter.create_counter(
    "messaging.client.consumed.messages",
    unit="{message}",
    description="Records taken from Kafka for processing (semantic conventions' name).",
)
process_duration = _meter.create_histogram(
    "messaging.process.duration",
    unit="s",
    explicit_bucket_boundaries_advisory=SECONDS,
    description="From the record's arrival in the service to its result or dead letter sent "
    "(semantic conventions' name), by topic and error type.",
)
commits = _meter.create_counter(
    "voucher_bridge.commits",
    unit="{commit}",
    description="Offset commits that the group took.",
)
commit_failures = _meter.create_counter(
    "voucher_bridge.commit.failures",
    unit="{commit}",
    description="Offset commits that failed (tried again; the offsets stay uncommitted).",
)
records_stuck = _meter.create_counter(
    "voucher_bridge.records.stuck",
    unit="{record}",
    description="Records that ran longer than STUCK_AFTER_S (each counted once, and logged).",
)


# -- calls out: upstream APIs and the store ---------------------------------------------------

http_client_duration = _meter.create_histogram(
    "http.client.request.duration",
    unit="s",
    explicit_bucket_boundaries_advisory=SECONDS,
    description="Each HTTP request to an upstream API, from sent to answer read (semantic "
    "conventions' name), by upstream, method, route (`url.template`), status and error type.",
)
upstream_retries = _meter.create_counter(
    "voucher_bridge.upstream.retries",
    unit="{attempt}",
    description="Upstream calls sent again (after no connection, a 429, or, for a call that "
    "moves no money, a timeout or a 5xx), by upstream and what the last attempt came to.",
)
store_duration = _meter.create_histogram(
    "db.client.operation.duration",
    unit="s",
    explicit_bucket_boundaries_advisory=SECONDS,
    description="Each attempt of an idempotency-store operation on a command's way (semantic "
    "conventions' name), by store (`db.system.name`), operation and error type.",
)


def http_request_done(
    upstream: str,
    method: str,
    route: str,
    seconds: float,
    *,
    status: int | None = None,
    error: str | None = None,
) -> None:
    """Record one HTTP request to an upstream: its answer's status, or the transport error
    that ended it (`error.type` as the semantic conventions have it: the exception's name,
    or the status for a 5xx)."""
    attributes: dict[str, str | int] = {
        "voucher_bridge.upstream": upstream,
        "http.request.method": method,
        "url.template": route,
    }
    if status is not None:
        attributes["http.response.status_code"] = status
        if status >= 500:
            attributes["error.type"] = str(status)
    if error is not None:
        attributes["error.type"] = error
    http_client_duration.record(seconds, attributes)
    failed = error is not None or (status is not None and status >= 500)
    recent_requests.setdefault(upstream, Recent()).add("error" if failed else "ok")


class Recent:
    """Counts per minute over the last `minutes`, by a label (the console's overview chart and
    upstream error rates): the exporters keep totals, not a window an operator can read."""

    def __init__(self, minutes: int = 15) -> None:
        self.minutes = minutes
        self._counts: dict[int, dict[str, int]] = {}

    def add(self, label: str, now: float | None = None) -> None:
        minute = int((time.time() if now is None else now) // 60)
        bucket = self._counts.setdefault(minute, {})
        bucket[label] = bucket.get(label, 0) + 1
        if len(self._counts) > self.minutes + 1:
            for old in sorted(self._counts)[: -self.minutes - 1]:
                del self._counts[old]

    def per_minute(
        self, now: float | None = None, also: Iterable[Mapping[int, Mapping[str, int]]] = ()
    ) -> list[tuple[int, dict[str, int]]]:
        """The last `minutes` minutes, oldest first: (minute start, epoch s; counts), with
        the counts of `also` (worker processes' snapshots) added in."""
        minute = int((time.time() if now is None else now) // 60)
        others = list(also)
        found = []
        for m in range(minute - self.minutes + 1, minute + 1):
            counts = dict(self._counts.get(m, {}))
            for other in others:
                for label, n in other.get(m, {}).items():
                    counts[label] = counts.get(label, 0) + n
            found.append((m * 60, counts))
        return found

    def snapshot(self) -> dict[int, dict[str, int]]:
        """The counts as they stand (a worker process sends them to its service)."""
        return {m: dict(counts) for m, counts in self._counts.items()}


# Outcomes of commands answered, and each upstream's requests by how they went ("ok",
# "error"), per minute: what the console's overview shows.
recent_outcomes = Recent()
recent_requests: dict[str, Recent] = {}


def start_at_zero() -> None:
    """Serve the counters alerts divide by from the start, at 0, not from their first event
    (a rate over a series that appears only with its first failure misses that failure)."""
    for counter in (dead_letters, commit_failures, records_stuck, commits, upstream_retries):
        counter.add(0)


@dataclass(frozen=True)
class Readings:
    """Where the gauges below read the running service's state. Each is read on the scrape's
    or the exporter's thread, so each returns a plain value or a snapshot, never a live
    structure of the service's loop."""

    in_flight: Callable[[], int] = lambda: 0  # commands being processed
    assigned: Callable[[], int] = lambda: 0  # partitions the group gave this instance
    progress: Callable[[], Sequence[Any]] = list  # the dispatcher's `PartitionProgress` items
    unsettled: Callable[[], Any] = lambda: None  # the last `UnsettledSummary` counted


_readings = Readings()


# The gauges read from the service's own process (its dispatcher and settling, `observe`):
# a worker process has none of it, and does not report them (telemetry.configure_worker_metrics).
SERVICE_GAUGES = (
    "voucher_bridge.consumer.lag",
    "voucher_bridge.records.oldest_unfinished.age",
    "voucher_bridge.records.oldest_unfinished.offset",
    "voucher_bridge.lanes.max_depth",
    "voucher_bridge.lanes.active",
    "voucher_bridge.in_flight",
    "voucher_bridge.partitions.assigned",
    "voucher_bridge.results.unsettled",
    "voucher_bridge.results.unsettled.oldest_age",
)


def observe(readings: Readings) -> None:
    """Read the service's state from `readings` from now on."""
    global _readings
    _readings = readings


def _per_partition(value: Callable[[Any], float | int | None]) -> Callable[..., Iterable[Any]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        for p in _readings.progress():
            if (v := value(p)) is not None:
                yield Observation(
                    v,
                    {
                        "messaging.destination.name": p.topic,
                        "messaging.destination.partition.id": str(p.partition),
                    },
                )

    return observe


_meter.create_observable_gauge(
    "voucher_bridge.consumer.lag",
    [_per_partition(lambda p: p.lag)],
    unit="{message}",
    description="Per partition: the broker's high watermark minus the committed offset.",
)
_meter.create_observable_gauge(
    "voucher_bridge.records.oldest_unfinished.age",
    [_per_partition(lambda p: p.oldest_unfinished_age_s or 0.0)],
    unit="s",
    description="Per partition: how long the lowest unfinished record (where the commits "
    "wait) has been in the service; 0 when nothing is unfinished.",
)
_meter.create_observable_gauge(
    "voucher_bridge.records.oldest_unfinished.offset",
    [_per_partition(lambda p: p.oldest_unfinished_offset)],
    unit="{offset}",
    description="Per partition: the offset of the lowest unfinished record.",
)
_meter.create_observable_gauge(
    "voucher_bridge.lanes.max_depth",
    [_per_partition(lambda p: max((lane.depth for lane in p.busiest), default=0))],
    unit="{record}",
    description="Per partition: the most records (and jobs) one key has waiting or running.",
)
_meter.create_observable_gauge(
    "voucher_bridge.lanes.active",
    [_per_partition(lambda p: p.lanes)],
    unit="{lane}",
    description="Per partition: keys with work waiting or running.",
)

_meter.create_observable_gauge(
    "voucher_bridge.in_flight",
    [lambda options: [Observation(_readings.in_flight())]],
    unit="{command}",
    description="Commands being processed now.",
)

_meter.create_observable_gauge(
    "voucher_bridge.partitions.assigned",
    [lambda options: [Observation(_readings.assigned())]],
    unit="{partition}",
    description="Partitions of the command topics the group gave this instance.",
)


def _unsettled_counts(options: CallbackOptions) -> Iterable[Observation]:
    if (summary := _readings.unsettled()) is not None:
        yield Observation(summary.settling, {"state": "settling"})
        yield Observation(summary.left_to_operator, {"state": "left_to_operator"})


def _unsettled_oldest(options: CallbackOptions) -> Iterable[Observation]:
    summary = _readings.unsettled()
    if summary is not None:
        created = summary.oldest_settling_created_at
        yield Observation(0.0 if created is None else max(0.0, time.time() - created))


_meter.create_observable_gauge(
    "voucher_bridge.results.unsettled",
    [_unsettled_counts],
    unit="{result}",
    description="Indeterminate results in the store (all instances'): `settling` (looked at "
    "again) or `left_to_operator` (the upstream can no longer tell; `voucher-bridge "
    "unsettled`).",
)
_meter.create_observable_gauge(
    "voucher_bridge.results.unsettled.oldest_age",
    [_unsettled_oldest],
    unit="s",
    description="How long ago the oldest result still being settled was first claimed.",
)

# -- an upstream that is down (breaker.py) ----------------------------------------------------


# Each upstream's breaker state (an IntEnum: 0 closed, 1 half-open, 2 open), read by the
# latest breaker made for it: one per process in service, and a test's earlier ones are not
# reported twice.
_breakers: dict[str, Callable[[], int]] = {}


def watch_breaker(upstream: str, state: Callable[[], int]) -> None:
    _breakers[upstream] = state


def _breaker_states(options: CallbackOptions) -> Iterable[Observation]:
    for upstream, state in list(_breakers.items()):
        yield Observation(state(), {"upstream": upstream})


breaker_state = _meter.create_observable_gauge(
    "voucher_bridge.upstream.breaker.state",
    [_breaker_states],
    unit="1",
    description="Each upstream's circuit breaker: 0 closed, 1 half-open, 2 open.",
)
breaker_transitions = _meter.create_counter(
    "voucher_bridge.upstream.breaker.transitions",
    unit="{transition}",
    description="Circuit breaker state changes, by upstream and the state it went to "
    "(`open`, `half_open`, `closed`).",
)
breaker_refused = _meter.create_counter(
    "voucher_bridge.upstream.breaker.refused",
    unit="{call}",
    description="Calls refused by an open circuit before anything was sent, by upstream.",
)
breaker_wait_duration = _meter.create_histogram(
    "voucher_bridge.upstream.breaker.wait.duration",
    unit="s",
    explicit_bucket_boundaries_advisory=SECONDS,
    description="How long a call waited for an open circuit to let it through (upstreams "
    "whose BREAKER_WHEN_OPEN is `wait`), by upstream.",
)
rate_limit_wait_duration = _meter.create_histogram(
    "voucher_bridge.upstream.rate_limit.wait.duration",
    unit="s",
    explicit_bucket_boundaries_advisory=SECONDS,
    description="How long a call waited for the upstream's rate limit (calls that waited).",
)
