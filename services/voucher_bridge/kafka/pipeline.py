"""One record in, one result event (or one dead letter) out, inside one trace.

`process` ends every record so, whatever its bytes and whatever fails: a record that cannot be
read (or that decoding fails on) is a dead letter; a command is answered by the executor within
its bound, or, should the executor itself fail, `failed` (`indeterminate` where the command
moves money) under an unrecorded result id; a result too large for the broker is cut to fit
(`truncated: true`); one the broker refuses even so goes out compact, and failing that the
command goes to the dead-letter topic (`result_refused`); a dead letter the broker refuses goes
without the original value and headers (`x-dlq-omitted`). Only a broker that takes nothing at
all holds a record up, until it is back (`RecordProducer.send`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from voucher_bridge import metrics
from voucher_bridge.kafka.producer import RecordProducer, RecordRefused
from voucher_bridge.kafka.records import Record
from voucher_bridge.once import Answered, Origin
from voucher_bridge.telemetry import context_from, trace_headers
from voucher_contracts import (
    CommandEnvelope,
    ResultEnvelope,
    UnusableRecord,
    decode_command,
    result_type,
)
from voucher_contracts import deadletter as dlq
from voucher_contracts.binding import RESULT_CONTENT_TYPE, compact_result, fit_result

log = logging.getLogger(__name__)
tracer = trace.get_tracer("voucher_bridge")


class Executor(Protocol):
    """Turns a command into its answer, at most once upstream (see `once.ExactlyOnce`)."""

    async def execute(
        self, command: CommandEnvelope, record_key: bytes | None, origin: Origin | None = None
    ) -> Answered: ...

    def unrecorded(self, command: CommandEnvelope, why: str) -> Answered:
        """The answer to a command that could not be recorded (see `once.ExactlyOnce`)."""
        ...


@dataclass(frozen=True)
class Topics:
    commands: str
    results: str
    dead_letters: str


class CommandPipeline:
    def __init__(
        self,
        topics: Topics,
        command_types: Collection[str],
        executor: Executor,
        producer: RecordProducer,
        *,
        group_id: str,
        max_record_bytes: int,
        max_result_bytes: int = 1_000_000,
    ) -> None:
        self._topics = topics
        self._command_types = frozenset(command_types)
        self._executor = executor
        self._producer = producer
        self._group_id = group_id
        self._max_record_bytes = max_record_bytes
        self._max_result_bytes = max_result_bytes

    def command_of(self, record: Record) -> CommandEnvelope | None:
        """The command a record holds, if it holds one (for logs about the record)."""
        return self.decode(record)[0]

    def decode(self, record: Record) -> tuple[CommandEnvelope | None, UnusableRecord | None]:
        """The record's command, or why it is none (its dead-letter reason), as `process`
        would find now (an operator's dry run of a replay asks the same)."""
        try:
            command = decode_command(record.headers, record.value, max_bytes=self._max_record_bytes)
            if command.type not in self._command_types:
                raise UnusableRecord("unknown_type", f"{command.type!r} is not a command here")
        except UnusableRecord as exc:
            return None, exc
        except Exception as exc:  # a bug in decoding: the record still ends, as a dead letter
            log.exception(
                "decoding %s[%d]@%d failed", record.topic, record.partition, record.offset
            )
            return None, UnusableRecord("internal_error", f"decoding failed: {type(exc).__name__}")
        return command, None

    async def process(self, record: Record) -> None:
        began = time.monotonic()
        error_type = await self._process(record)
        attributes = {
            "messaging.system": "kafka",
            "messaging.operation.name": "process",
            "messaging.destination.name": record.topic,
        }
        if error_type is not None:
            attributes["error.type"] = error_type
        metrics.process_duration.record(time.monotonic() - began, attributes)

    async def _process(self, record: Record) -> str | None:
        """One record to its end; the dead-letter reason when it became one."""
        command, unusable = self.decode(record)
        parent = context_from(record.headers, command.traceparent if command else None)
        with tracer.start_as_current_span(
            f"process {record.topic}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.destination.name": record.topic,
                "messaging.destination.partition.id": str(record.partition),
                "messaging.kafka.offset": record.offset,
                "messaging.consumer.group.name": self._group_id,
            },
        ) as span:
            if unusable is not None or command is None:
                assert unusable is not None
                span.set_attribute("error.type", unusable.reason)
                span.set_status(Status(StatusCode.ERROR, unusable.reason))
                await self._dead_letter(record, unusable)
                return unusable.reason
            span.set_attribute("messaging.message.id", command.id)
            span.set_attribute("cloudevents.event_type", command.type)
            traced = span.get_span_context()
            if command.traceparent is None and traced.is_valid:
                # Kept with the command in the store, so that an operator finds its trace (a
                # command in binary mode has its trace in the record's headers only).
                command = command.model_copy(
                    update={
                        "traceparent": f"00-{traced.trace_id:032x}-{traced.span_id:016x}-"
                        f"{int(traced.trace_flags):02x}"
                    }
                )
            started = time.monotonic()
            try:
                origin = Origin(record.topic, record.partition, record.timestamp)
                answered = await self._executor.execute(command, record.key, origin)
            except Exception as exc:
                log.exception("executing %s %s failed", command.type, command.id)
                answered = self._executor.unrecorded(
                    command, f"processing failed ({type(exc).__name__})"
                )
            data = answered.data
            span.set_attribute("voucher_bridge.outcome", data.outcome.value)
            if data.reason:
                span.set_attribute("voucher_bridge.reason", data.reason)
            try:
                await self.publish_result(record.key, command, answered)
            except RecordRefused as exc:
                span.set_attribute("error.type", "result_refused")
                detail = f"its result ({data.outcome.value}) was refused by the broker: {exc}"
                await self._dead_letter(record, UnusableRecord("result_refused", detail))
                return "result_refused"
            labels = {"command_type": command.type, "outcome": data.outcome.value}
            metrics.commands.add(1, {**labels, "reason": data.reason or ""})
            metrics.recent_outcomes.add(data.outcome.value)
            metrics.command_duration.record(time.monotonic() - started, labels)
            if answered.replayed:
                metrics.replayed.add(1, {"command_type": command.type})
            log.info(
                "%s %s from %s on %s: %s%s",
                command.type,
                command.id,
                command.source,
                command.subject,
                data.outcome.value,
                f" ({data.reason})" if data.reason else "",
            )
            return None

    async def publish_result(
        self, key: bytes | None, command: CommandEnvelope, answered: Answered
    ) -> ResultEnvelope:
        """Publish the result, cut to fit (`truncated`), compact if the broker refuses it so;
        raises RecordRefused when the broker refuses even that."""
        envelope = ResultEnvelope(
            id=answered.result_id,
            type=result_type(command.type),
            subject=command.subject,
            time=datetime.now(UTC),
            causationid=command.id,
            data=answered.data,
        )
        with tracer.start_as_current_span(
            f"send {self._topics.results}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "send",
                "messaging.destination.name": self._topics.results,
                "messaging.message.id": envelope.id,
            },
        ):
            headers = [("content-type", RESULT_CONTENT_TYPE.encode()), *trace_headers()]
            key = key if key is not None else command.subject.encode()
            value, truncated = fit_result(envelope, self._max_result_bytes)
            if truncated:
                metrics.results_truncated.add(1, {"command_type": command.type})
            try:
                await self._producer.send(self._topics.results, key, value, headers)
            except RecordRefused as exc:
                log.error(
                    "%s %s: the broker refused its result (%s)", command.type, command.id, exc
                )
                metrics.records_refused.add(1, {"topic": self._topics.results, "sent": "compact"})
                await self._producer.send(
                    self._topics.results, key, compact_result(envelope), headers
                )
        return envelope

    async def _dead_letter(self, record: Record, reason: UnusableRecord) -> None:
        added = {
            dlq.REASON: reason.reason,
            dlq.DETAIL: reason.detail[:1000],
            dlq.FAILED_AT: datetime.now(UTC).isoformat(),
            dlq.ORIGINAL_TOPIC: record.topic,
            dlq.ORIGINAL_PARTITION: str(record.partition),
            dlq.ORIGINAL_OFFSET: str(record.offset),
            dlq.ORIGINAL_TIMESTAMP: str(record.timestamp),
            dlq.ORIGINAL_GROUP: self._group_id,
        }
        headers = [*record.headers, *((k, v.encode()) for k, v in added.items())]
        topic = self._topics.dead_letters
        try:
            await self._producer.send(topic, record.key, record.value, headers)
        except RecordRefused as exc:
            # Byte for byte is more than the broker takes: the dead letter still says where the
            # record is (topic, partition, offset) and why it was not a command.
            log.error("%s: the broker refused the dead letter (%s); sending it bare", topic, exc)
            size, count = len(record.value or b""), len(record.headers)
            omitted = f"the value ({size} bytes) and {count} headers: {exc}"[:1000]
            bare = [*headers[count:], (dlq.OMITTED, omitted.encode())]
            try:
                # An empty value, not none: a record needs a key or a value.
                await self._producer.send(topic, record.key, b"", bare)
            except RecordRefused:
                log.error(
                    "%s[%d]@%d: no dead letter could be sent (%s); given up",
                    record.topic,
                    record.partition,
                    record.offset,
                    reason.reason,
                )
                metrics.records_refused.add(1, {"topic": topic, "sent": "nothing"})
                metrics.records_abandoned.add(1, {"topic": record.topic})
                return
            metrics.records_refused.add(1, {"topic": topic, "sent": "without_value"})
        metrics.dead_letters.add(1, {"topic": record.topic, "reason": reason.reason})
        log.warning(
            "%s[%d]@%d is not a usable command (%s): sent to %s",
            record.topic,
            record.partition,
            record.offset,
            reason.reason,
            self._topics.dead_letters,
        )
