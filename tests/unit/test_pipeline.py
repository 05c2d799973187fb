"""The record pipeline alone: every record ends in one result or one dead letter, whatever the
executor does and whatever the broker refuses (a scripted producer plays the broker)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from voucher_bridge.kafka.pipeline import CommandPipeline, Topics
from voucher_bridge.kafka.producer import RecordRefused
from voucher_bridge.once import Answered
from voucher_contracts import CommandEnvelope, Outcome, ResultData, result_id
from voucher_contracts import deadletter as dlq
from voucher_contracts.envelope import unrecorded_result_id

TOPICS = Topics("pos.commands", "pos.results", "pos.commands.dlq")
CT = ("content-type", b"application/cloudevents+json")


@dataclass(frozen=True)
class FakeRecord:
    value: bytes | None
    key: bytes | None = b"till-1"
    headers: Sequence[tuple[str, bytes]] = (CT,)
    topic: str = "pos.commands"
    partition: int = 0
    offset: int = 7
    timestamp: int = 1_700_000_000_000


@dataclass
class ScriptedProducer:
    """Takes what fits under `limit` bytes (value plus headers) on each topic; refuses the rest."""

    limit: dict[str, int] = field(default_factory=dict)
    sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = field(
        default_factory=list
    )

    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Sequence[Any]
    ) -> None:
        size = len(value or b"") + sum(len(k) + len(v) for k, v in headers)
        if size > self.limit.get(topic, 10**9):
            raise RecordRefused(f"MessageSizeTooLargeError: {size} bytes")
        self.sent.append((topic, key, value, list(headers)))


@dataclass
class ScriptedExecutor:
    money_moving: frozenset[str] = frozenset({"pos.redeem"})
    extra: dict[str, Any] = field(default_factory=dict)
    fail: Exception | None = None

    async def execute(
        self, command: CommandEnvelope, record_key: bytes | None, origin: Any = None
    ) -> Answered:
        if self.fail is not None:
            raise self.fail
        data = ResultData(
            command_id=command.id,
            command_source=command.source,
            command_type=command.type,
            outcome=Outcome.SUCCEEDED,
            **self.extra,
        )
        return Answered(data, result_id(command.source, command.id))

    def unrecorded(self, command: CommandEnvelope, why: str) -> Answered:
        moves_money = command.type in self.money_moving
        data = ResultData(
            command_id=command.id,
            command_source=command.source,
            command_type=command.type,
            outcome=Outcome.INDETERMINATE if moves_money else Outcome.FAILED,
            reason="internal_error",
            message=why,
        )
        return Answered(data, unrecorded_result_id(command.source, command.id))


def command(type_: str = "pos.scan", **data: Any) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": "c1",
            "source": "/s",
            "type": type_,
            "subject": "till-1",
            "data": data or {"voucher_code": "A1"},
        }
    ).encode()


def pipeline(executor: ScriptedExecutor, producer: ScriptedProducer) -> CommandPipeline:
    return CommandPipeline(
        TOPICS,
        ["pos.scan", "pos.redeem"],
        executor,
        producer,  # type: ignore[arg-type]
        group_id="vb",
        max_record_bytes=1_048_576,
        max_result_bytes=4_000,
    )


def headers_of(sent: list[tuple[str, bytes]]) -> dict[str, str]:
    return {k: v.decode() for k, v in sent}


async def test_a_result_is_published_once() -> None:
    producer = ScriptedProducer()
    await pipeline(ScriptedExecutor(), producer).process(FakeRecord(command()))
    [(topic, key, value, _)] = producer.sent
    assert (topic, key) == ("pos.results", b"till-1")
    assert value is not None and json.loads(value)["data"]["outcome"] == "succeeded"


@pytest.mark.parametrize(
    "value",
    [
        b"\xff\xfe",
        b'{"specversion":"1.0","id":"1","source":"/s","type":"pos.scan","subject":"till-1",'
        b'"data":{"voucher_code":"A1","x":"\\ud800"}}',
        b'{"specversion":"1.0","id":"1","source":"/a\\u0000x","type":"pos.scan","subject":"t"}',
    ],
)
async def test_a_record_that_is_not_a_command_is_one_dead_letter(value: bytes) -> None:
    producer = ScriptedProducer()
    await pipeline(ScriptedExecutor(), producer).process(FakeRecord(value))
    [(topic, key, sent_value, _)] = producer.sent
    assert (topic, key, sent_value) == ("pos.commands.dlq", b"till-1", value)


async def test_a_bug_in_decoding_is_a_dead_letter(monkeypatch: pytest.MonkeyPatch) -> None:
    from voucher_bridge.kafka import pipeline as module

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("a bug")

    monkeypatch.setattr(module, "decode_command", broken)
    producer = ScriptedProducer()
    await pipeline(ScriptedExecutor(), producer).process(FakeRecord(command()))
    [(topic, _, _, headers)] = producer.sent
    assert topic == "pos.commands.dlq"
    assert headers_of(headers)[dlq.REASON] == "internal_error"


@pytest.mark.parametrize(
    ("type_", "outcome"), [("pos.scan", "failed"), ("pos.redeem", "indeterminate")]
)
async def test_an_executor_that_raises_still_answers(type_: str, outcome: str) -> None:
    producer = ScriptedProducer()
    executor = ScriptedExecutor(fail=RuntimeError("a bug"))
    data = {"voucher_codes": ["A1"]} if type_ == "pos.redeem" else {}
    await pipeline(executor, producer).process(FakeRecord(command(type_, **data)))
    [(topic, _, value, _)] = producer.sent
    assert topic == "pos.results" and value is not None
    result = json.loads(value)
    assert (result["data"]["outcome"], result["data"]["reason"]) == (outcome, "internal_error")
    assert result["data"]["message"] == "processing failed (RuntimeError)"
    assert result["id"] == unrecorded_result_id("/s", "c1")


async def test_a_result_too_large_is_cut_to_fit() -> None:
    producer = ScriptedProducer()
    executor = ScriptedExecutor(extra={"entries": [{"n": n, "pad": "x" * 50} for n in range(500)]})
    await pipeline(executor, producer).process(FakeRecord(command()))
    [(_, _, value, _)] = producer.sent
    assert value is not None and len(value) <= 4_000
    data = json.loads(value)["data"]
    assert data["truncated"] is True and data["outcome"] == "succeeded"
    assert [e["n"] for e in data["entries"]] == list(range(len(data["entries"])))
    assert 0 < len(data["entries"]) < 500


async def test_a_result_the_broker_refuses_goes_compact() -> None:
    producer = ScriptedProducer(limit={"pos.results": 1_000})
    executor = ScriptedExecutor(extra={"amount": "50.00", "note": "x" * 2_000})
    await pipeline(executor, producer).process(FakeRecord(command()))
    [(topic, _, value, _)] = producer.sent
    assert topic == "pos.results" and value is not None
    data = json.loads(value)["data"]
    assert data["truncated"] is True and data["outcome"] == "succeeded"
    assert "note" not in data and "amount" not in data


async def test_a_command_whose_result_the_broker_refuses_for_good_is_a_dead_letter() -> None:
    producer = ScriptedProducer(limit={"pos.results": 10})
    await pipeline(ScriptedExecutor(), producer).process(FakeRecord(command()))
    [(topic, _, value, headers)] = producer.sent
    assert topic == "pos.commands.dlq" and value == command()
    assert headers_of(headers)[dlq.REASON] == "result_refused"


async def test_a_dead_letter_the_broker_refuses_goes_without_the_value() -> None:
    big = b"x" * 5_000
    producer = ScriptedProducer(limit={"pos.commands.dlq": 4_000})
    original = [CT, ("x-big", b"y" * 1_000)]
    await pipeline(ScriptedExecutor(), producer).process(FakeRecord(big, headers=original))
    [(topic, key, value, headers)] = producer.sent
    assert (topic, key, value) == ("pos.commands.dlq", b"till-1", b"")
    named = headers_of(headers)
    assert "x-big" not in named and named[dlq.REASON] == "not_json"
    assert named[dlq.ORIGINAL_OFFSET] == "7"
    assert named[dlq.OMITTED].startswith("the value (5000 bytes) and 2 headers")


async def test_a_bare_dead_letter_of_an_unkeyed_record_still_has_a_value() -> None:
    # aiokafka takes no record with neither key nor value.
    producer = ScriptedProducer(limit={"pos.commands.dlq": 4_000})
    await pipeline(ScriptedExecutor(), producer).process(FakeRecord(b"x" * 5_000, key=None))
    [(_, key, value, _)] = producer.sent
    assert (key, value) == (None, b"")


async def test_when_nothing_can_be_sent_the_record_still_ends() -> None:
    producer = ScriptedProducer(limit={"pos.commands.dlq": 0})
    await pipeline(ScriptedExecutor(), producer).process(FakeRecord(b"not json"))
    assert producer.sent == []  # given up, logged and counted; the partition moves on
