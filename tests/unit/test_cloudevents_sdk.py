"""The CloudEvents SDK (`cloudevents` on PyPI), as another team would use it: it reads every
result the service writes (structured mode, key, value and headers as the pipeline hands them to
the producer), and the service's decoder reads every command it writes, in both Kafka bindings,
with extensions and the trace context. Both of the SDK's APIs: `cloudevents.core` (2.x) and
`cloudevents.v1` (the 1.x API, which teams on older releases call `cloudevents.kafka`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from cloudevents.core.bindings import kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from cloudevents.v1 import kafka as kafka_v1
from cloudevents.v1.http import CloudEvent as CloudEventV1
from opentelemetry.sdk.trace import TracerProvider

from tests.support.contract import matching_messages, service_accepts
from tests.unit.test_pipeline import FakeRecord
from voucher_bridge.kafka import pipeline as pipeline_module
from voucher_bridge.kafka.pipeline import CommandPipeline, Topics
from voucher_bridge.once import Answered, Origin
from voucher_contracts import (
    CommandEnvelope,
    Outcome,
    ResultData,
    decode_command,
    examples,
    result_id,
)
from voucher_contracts.coupon import COUPON_COMMAND_TYPES
from voucher_contracts.envelope import RESULT_SOURCE, STRUCTURED_CONTENT_TYPE, result_type
from voucher_contracts.pos import POS_COMMAND_TYPES

COMMAND_TYPES = {**POS_COMMAND_TYPES, **COUPON_COMMAND_TYPES}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACESTATE = "congo=t61rcWkgMzE"


class _Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []

    async def send(self, topic: str, key: bytes | None, value: bytes | None, headers: Any) -> None:
        self.sent.append((topic, key, value, list(headers)))


class _Answer:
    """An executor that answers every command with one result, as a handler decided it."""

    money_moving = frozenset[str]()

    def __init__(self, data: ResultData) -> None:
        self._data = data

    async def execute(
        self, command: CommandEnvelope, record_key: bytes | None, origin: Origin | None = None
    ) -> Answered:
        revision = 1 if self._data.supersedes else 0
        return Answered(self._data, result_id(command.source, command.id, revision))

    def unrecorded(self, command: CommandEnvelope, why: str) -> Answered:
        raise AssertionError(why)


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> None:
    # As the service runs (telemetry.configure_tracing): results carry a traceparent.
    monkeypatch.setattr(pipeline_module, "tracer", TracerProvider().get_tracer("test"))


def _results(command_type: str) -> list[ResultData]:
    """What a result of this type can look like: succeeded, refused for its fields, and an
    indeterminate one superseded, cut to fit."""
    command = examples.command_event(command_type)
    common = {
        "command_id": command["id"],
        "command_source": command["source"],
        "command_type": command_type,
    }
    return [
        ResultData(outcome=Outcome.SUCCEEDED, **common, **examples.RESULT_FIELDS[command_type]),
        ResultData(
            outcome=Outcome.REJECTED,
            reason="validation_error",
            message="the command's data is not valid",
            errors={"data": ["Field required"]},
            **common,
        ),
        ResultData(
            outcome=Outcome.INDETERMINATE,
            reason="unsettled",
            supersedes=result_id(command["source"], command["id"]),
            truncated=True,
            **common,
        ),
    ]


async def _published(command_type: str, data: ResultData) -> tuple[bytes, bytes, dict[str, bytes]]:
    """The result record the pipeline hands the producer, for the example command arriving
    with a traceparent: key, value, headers."""
    domain = examples.domain_of(command_type)
    producer = _Producer()
    lane = CommandPipeline(
        Topics(f"{domain}.commands", f"{domain}.results", f"{domain}.commands.dlq"),
        COMMAND_TYPES,
        _Answer(data),
        cast(Any, producer),
        group_id="voucher-bridge",
        max_record_bytes=1_048_576,
    )
    event = examples.command_event(command_type)
    record = FakeRecord(
        json.dumps(event).encode(),
        key=event["subject"].encode(),
        headers=(
            ("content-type", STRUCTURED_CONTENT_TYPE.encode()),
            ("traceparent", TRACEPARENT.encode()),
        ),
        topic=f"{domain}.commands",
    )
    await lane.process(record)
    ((topic, key, value, headers),) = producer.sent
    assert topic == f"{domain}.results" and key is not None and value is not None
    return key, value, dict(headers)


@pytest.mark.parametrize("command_type", sorted(COMMAND_TYPES))
async def test_the_sdk_reads_every_result_the_service_writes(
    command_type: str, traced: None
) -> None:
    for data in _results(command_type):
        key, value, headers = await _published(command_type, data)
        written = json.loads(value)
        assert headers["content-type"] == STRUCTURED_CONTENT_TYPE.encode()
        message = kafka.KafkaMessage(headers=headers, key=key, value=value)
        for event in (
            kafka.from_structured(message, JSONFormat(), CloudEvent),
            kafka.from_kafka(message, JSONFormat()),  # tells the binding itself: structured
        ):
            assert event.get_specversion() == "1.0"
            assert event.get_id() == written["id"]
            assert event.get_source() == RESULT_SOURCE
            assert event.get_type() == result_type(command_type)
            assert event.get_subject() == examples.SUBJECTS[examples.domain_of(command_type)]
            assert event.get_datacontenttype() == "application/json"
            assert event.get_time() == datetime.fromisoformat(written["time"])
            assert event.get_extension("causationid") == written["data"]["command_id"]
            assert event.get_extension("partitionkey") == key.decode()  # the SDK's name
            assert event.get_data() == written["data"]
        legacy = kafka_v1.from_structured(kafka_v1.KafkaMessage(headers, key, value))
        assert legacy["id"] == written["id"] and legacy["type"] == result_type(command_type)
        assert legacy["causationid"] == written["data"]["command_id"]
        assert legacy.get_data() == written["data"]
        # The W3C header continues the command's trace.
        assert headers["traceparent"].decode().split("-")[1] == TRACEPARENT.split("-")[1]


def _sdk_event(command_type: str) -> CloudEvent:
    example = examples.command_event(command_type)
    attributes = {
        "id": example["id"],
        "source": example["source"],
        "type": command_type,
        "subject": example["subject"],
        "time": datetime(2026, 12, 1, 9, 30, 0, 250_000, tzinfo=UTC),
        "datacontenttype": "application/json",
        "traceparent": TRACEPARENT,
        "tracestate": TRACESTATE,
        "storeid": "limassol-3",
        "attempt": 3,
        "replay": False,
    }
    return CloudEvent(attributes, examples.COMMAND_DATA[command_type])


def _check(
    command: CommandEnvelope,
    command_type: str,
    key: bytes,
    headers: list[tuple[str, bytes]],
    value: bytes | None,
    extensions: dict[str, Any],
) -> None:
    example = examples.command_event(command_type)
    assert (command.id, command.source, command.type, command.subject) == (
        example["id"],
        example["source"],
        command_type,
        example["subject"],
    )
    assert command.time == datetime(2026, 12, 1, 9, 30, 0, 250_000, tzinfo=UTC)
    assert command.data == examples.COMMAND_DATA[command_type]
    assert command.traceparent == TRACEPARENT
    assert command.tracestate == TRACESTATE
    assert command.extensions == extensions
    # ... and the service takes it, as the contract's schemas do.
    assert service_accepts(headers, value, key.decode(), COMMAND_TYPES)
    fits = matching_messages(f"{examples.domain_of(command_type)}.commands", key, headers, value)
    assert len(fits) == 1 and fits[0].startswith(command_type), fits


@pytest.mark.parametrize("command_type", sorted(COMMAND_TYPES))
def test_the_decoder_reads_what_the_sdk_writes_in_structured_mode(command_type: str) -> None:
    message = kafka.to_structured(_sdk_event(command_type), JSONFormat(), lambda e: e.get_subject())
    headers = list(message.headers.items())
    key = cast(str, message.key).encode()
    command = decode_command(headers, message.value)
    # Structured mode keeps each extension's JSON type.
    extensions = {"storeid": "limassol-3", "attempt": 3, "replay": False}
    _check(command, command_type, key, headers, message.value, extensions)


@pytest.mark.parametrize("command_type", sorted(COMMAND_TYPES))
def test_the_decoder_reads_what_the_sdk_writes_in_binary_mode(command_type: str) -> None:
    message = kafka.to_binary(_sdk_event(command_type), JSONFormat(), lambda e: e.get_subject())
    assert "ce_id" in message.headers and "content-type" in message.headers
    headers = list(message.headers.items())
    key = cast(str, message.key).encode()
    command = decode_command(headers, message.value or None)
    # A header is text: binary mode carries every extension as a String (the SDK writes a
    # Boolean as Python spells it).
    extensions = {"storeid": "limassol-3", "attempt": "3", "replay": "False"}
    _check(command, command_type, key, headers, message.value or None, extensions)


def _legacy_event(command_type: str) -> CloudEventV1:
    example = examples.command_event(command_type)
    attributes = {
        "id": example["id"],
        "source": example["source"],
        "type": command_type,
        "subject": example["subject"],
        "time": "2026-12-01T09:30:00.250Z",
        "datacontenttype": "application/json",
        "traceparent": TRACEPARENT,
        "tracestate": TRACESTATE,
        "storeid": "limassol-3",
    }
    return CloudEventV1(attributes, examples.COMMAND_DATA[command_type])


@pytest.mark.parametrize("binary", [False, True], ids=["structured", "binary"])
@pytest.mark.parametrize("command_type", sorted(COMMAND_TYPES))
def test_the_decoder_reads_what_the_1x_sdk_writes(command_type: str, binary: bool) -> None:
    event = _legacy_event(command_type)
    convert = kafka_v1.to_binary if binary else kafka_v1.to_structured
    message = convert(event, key_mapper=lambda e: e["subject"])
    headers = list(message.headers.items())
    key = cast(str, message.key).encode()
    value = message.value if isinstance(message.value, bytes) else message.value.encode()
    # The 1.x SDK's structured mode names the data's type, not the event's, in content-type;
    # with no ce_ headers the record is still read as structured.
    command = decode_command(headers, value)
    _check(command, command_type, key, headers, value, {"storeid": "limassol-3"})
