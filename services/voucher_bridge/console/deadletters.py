"""The dead-letter topics, read back from Kafka for operators.

aiokafka has no "read the last N records" call: a consumer with no group (nothing committed,
no rebalance) is assigned the topic's partitions and seeks to N before each end, then reads up
to the ends as they were when asked.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition


@dataclass(frozen=True)
class DeadLetterRecord:
    topic: str
    partition: int
    offset: int
    timestamp: int  # ms since the epoch
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


class DeadLetterReader:
    def __init__(self, connection: dict[str, Any], timeout_s: float = 10.0) -> None:
        self._connection = connection
        self._timeout_s = timeout_s
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()  # one reading at a time: they share the assignment

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **self._connection)
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

    async def newest(self, topic: str, per_partition: int) -> list[DeadLetterRecord]:
        """Up to `per_partition` of each partition's newest records, newest first."""
        async with self._lock, asyncio.timeout(self._timeout_s):
            consumer = await self._started()
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                await consumer._client.force_metadata_update()  # a topic made since
                partitions = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            if not tps:
                return []
            consumer.assign(tps)
            starts = await consumer.beginning_offsets(tps)
            ends = await consumer.end_offsets(tps)
            wanted = {}
            for tp in tps:
                first = max(starts[tp], ends[tp] - per_partition)
                if first < ends[tp]:
                    consumer.seek(tp, first)
                    wanted[tp] = ends[tp]
            found = await self._read_until(consumer, wanted)
        found.sort(key=lambda r: (r.timestamp, r.offset), reverse=True)
        return found

    async def one(self, topic: str, partition: int, offset: int) -> DeadLetterRecord | None:
        async with self._lock, asyncio.timeout(self._timeout_s):
            consumer = await self._started()
            tp = TopicPartition(topic, partition)
            if partition not in (consumer.partitions_for_topic(topic) or set()):
                await consumer._client.force_metadata_update()
                if partition not in (consumer.partitions_for_topic(topic) or set()):
                    return None
            consumer.assign([tp])
            start = (await consumer.beginning_offsets([tp]))[tp]
            end = (await consumer.end_offsets([tp]))[tp]
            if not start <= offset < end:
                return None
            consumer.seek(tp, offset)
            found = await self._read_until(consumer, {tp: offset + 1})
        return next((r for r in found if r.offset == offset), None)

    async def _read_until(
        self, consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]
    ) -> list[DeadLetterRecord]:
        found: list[DeadLetterRecord] = []
        left = dict(ends)
        while left:
            batches = await consumer.getmany(*left, timeout_ms=500)
            for tp, records in batches.items():
                for r in records:
                    if r.offset < ends[tp]:
                        found.append(
                            DeadLetterRecord(
                                r.topic,
                                r.partition,
                                r.offset,
                                r.timestamp,
                                r.key,
                                r.value,
                                tuple((k, v or b"") for k, v in r.headers),
                            )
                        )
            for tp in list(left):
                # Compacted away or aborted records leave gaps: done at the end, not at a count.
                if await consumer.position(tp) >= ends[tp]:
                    del left[tp]
        return found
