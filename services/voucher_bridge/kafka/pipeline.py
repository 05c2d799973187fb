"""One record in, one result event (or one dead letter) out, inside one trace."""

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
from voucher_bridge.kafka.producer import RecordProducer
from voucher_bridge.kafka.records import Record
from voucher_bridge.once import Answered
from voucher_bridge.telemetry import context_from, trace_headers
from voucher_contracts import (
    CommandEnvelope,
    ResultEnvelope,
    UnusableRecord,
    decode_command,
    encode_result,
    result_type,
)
from voucher_contracts import deadletter as dlq
from voucher_contracts.binding import RESULT_CONTENT_TYPE

log = logging.getLogger(__name__)
tracer = trace.get_tracer("voucher_bridge")


class Executor(Protocol):
    """Turns a command into its answer, at most once upstream (see `once.ExactlyOnce`)."""

    async def execute(self, command: CommandEnvelope, record_key: bytes | None) -> Answered: ...


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
    ) -> None:
        self._topics = topics
        self._command_types = frozenset(command_types)
        self._executor = executor
        self._producer = producer
        self._group_id = group_id
        self._max_record_bytes = max_record_bytes

    async def process(self, record: Record) -> None:
        command: CommandEnvelope | None = None
        unusable: UnusableRecord | None = None
        try:
            command = decode_command(record.headers, record.value, max_bytes=self._max_record_bytes)
            if command.type not in self._command_types:
                raise UnusableRecord("unknown_type", f"{command.type!r} is not a command here")
        except UnusableRecord as exc:
            unusable = exc
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
                return
            span.set_attribute("messaging.message.id", command.id)
            span.set_attribute("cloudevents.event_type", command.type)
            started = time.monotonic()
            answered = await self._executor.execute(command, record.key)
            data = answered.data
            span.set_attribute("voucher_bridge.outcome", data.outcome.value)
            if data.reason:
                span.set_attribute("voucher_bridge.reason", data.reason)
            await self.publish_result(record.key, command, answered)
            labels = {"command_type": command.type, "outcome": data.outcome.value}
            metrics.commands.add(1, {**labels, "reason": data.reason or ""})
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

    async def publish_result(
        self, key: bytes | None, command: CommandEnvelope, answered: Answered
    ) -> ResultEnvelope:
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
            await self._producer.send(self._topics.results, key, encode_result(envelope), headers)
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
        await self._producer.send(self._topics.dead_letters, record.key, record.value, headers)
        metrics.dead_letters.add(1, {"topic": record.topic, "reason": reason.reason})
        log.warning(
            "%s[%d]@%d is not a usable command (%s): sent to %s",
            record.topic,
            record.partition,
            record.offset,
            reason.reason,
            self._topics.dead_letters,
        )
