"""Publishing result events and dead letters.

A plain aiokafka producer rather than FastStream's `broker.publish`: FastStream encodes header
values as text and adds its own `content-type` and `correlation_id` headers, but a dead letter
must carry the original record byte for byte (headers included) and a result exactly the
headers of the contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer

Headers = Sequence[tuple[str, bytes]]


class RecordProducer:
    def __init__(self, **connection: Any) -> None:
        self._connection = connection
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        # Idempotent (hence acks=all): a retried send never writes a result twice. No linger:
        # a till waits for its result, and records still batch while a request is in flight
        # (aiokafka sends one at a time per broker), so under load nothing is lost by it.
        self._producer = AIOKafkaProducer(
            enable_idempotence=True, linger_ms=0, request_timeout_ms=30_000, **self._connection
        )
        await self._producer.start()

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers
    ) -> None:
        """Send and wait until the broker has the record (acks=all)."""
        if self._producer is None:
            raise RuntimeError("producer not started")
        await self._producer.send_and_wait(topic, value=value, key=key, headers=list(headers))
