"""How a send ends: taken, refused for good (`RecordRefused`), or tried again until taken, with
the producer made anew when it is broken. aiokafka's producer is played by a script."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka import errors

from voucher_bridge.kafka import producer as module
from voucher_bridge.kafka.producer import RecordProducer, RecordRefused


class ScriptedAiokafka:
    """Fails each send with the next error of `script`, then takes it."""

    made: list[ScriptedAiokafka] = []

    def __init__(self, script: Iterator[Exception | None], **_: Any) -> None:
        self.script = script
        self.sent = 0
        self.stopped = False
        ScriptedAiokafka.made.append(self)

    async def start(self) -> None: ...

    async def stop(self) -> None:
        self.stopped = True

    async def send_and_wait(self, topic: str, **_: Any) -> None:
        error = next(self.script, None)
        if error is not None:
            raise error
        self.sent += 1


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Any:
    def make(*script: Exception | None) -> RecordProducer:
        errors_left = iter(script)
        ScriptedAiokafka.made.clear()
        monkeypatch.setattr(
            module, "AIOKafkaProducer", lambda **kw: ScriptedAiokafka(errors_left, **kw)
        )
        return RecordProducer(retry_base_s=0.001, retry_max_s=0.002)

    return make


@pytest.mark.parametrize(
    "error",
    [
        errors.MessageSizeTooLargeError(),
        errors.RecordTooLargeError(),
        errors.UnknownError(),  # INVALID_RECORD and other codes aiokafka has no class for
        errors.InvalidTopicError(),
        errors.PolicyViolationError(),
    ],
)
async def test_a_refusal_for_good_is_not_sent_again(scripted: Any, error: Exception) -> None:
    producer = scripted(error)
    await producer.start()
    with pytest.raises(RecordRefused):
        await producer.send("t", b"k", b"v", [])
    assert ScriptedAiokafka.made[0].sent == 0


async def test_a_broker_away_is_waited_out(scripted: Any) -> None:
    producer = scripted(
        errors.KafkaConnectionError(),
        errors.NotLeaderForPartitionError(),
        errors.RequestTimedOutError(),
        errors.KafkaTimeoutError(),
        errors.TopicAuthorizationFailedError(),
        None,
    )
    await producer.start()
    await producer.send("t", b"k", b"v", [])
    assert len(ScriptedAiokafka.made) == 1 and ScriptedAiokafka.made[0].sent == 1


@pytest.mark.parametrize(
    "script",
    [
        [errors.OutOfOrderSequenceNumber()],
        [errors.KafkaError("Unexpected error during batch delivery")] * 3,
    ],
    ids=["broken idempotence", "a dead sender"],
)
async def test_a_broken_producer_is_made_anew(scripted: Any, script: list[Exception]) -> None:
    producer = scripted(*script, None)
    await producer.start()
    await producer.send("t", b"k", b"v", [])
    first, second = ScriptedAiokafka.made
    assert first.stopped and second.sent == 1
