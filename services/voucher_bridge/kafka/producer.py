"""Publishing result events and dead letters.

A plain aiokafka producer rather than FastStream's `broker.publish`: FastStream encodes header
values as text and adds its own `content-type` and `correlation_id` headers, but a dead letter
must carry the original record byte for byte (headers included) and a result exactly the
headers of the contract.

A send ends one of two ways: the broker has the record (acks=all), or the broker refused this
record for good (`RecordRefused`: too large, malformed), which sending it again cannot change.
Anything else (a leader moving, a request timing out, the broker restarting or down) is sent
again with backoff until the broker takes it, and counted: the record waits for the broker,
as every other record does, rather than being dropped. aiokafka retries inside a request's
timeout only; what it gives up on, this goes on with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka import errors as kafka_errors

from voucher_bridge import metrics

log = logging.getLogger(__name__)

Headers = Sequence[tuple[str, bytes]]

# What the broker (or aiokafka, before sending) says of the record itself, or of where it
# goes, that no retry changes. `UnknownError` is how aiokafka reports codes it has no class
# for, INVALID_RECORD (87) among them.
_REFUSED_FOR_GOOD: tuple[type[Exception], ...] = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.CorruptRecordException,
    kafka_errors.InvalidTimestampError,
    kafka_errors.UnsupportedForMessageFormatError,
    kafka_errors.InvalidTopicError,
    kafka_errors.PolicyViolationError,
    kafka_errors.UnknownError,
)
# Not the record's fault but the deployment's: retried (records wait, none is dropped), and
# logged as errors for someone to act on.
_MISCONFIGURED: tuple[type[Exception], ...] = (
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.TransactionalIdAuthorizationFailed,
)
# What aiokafka does not call retriable but is the broker being away, or the deployment.
_WAITED_OUT = (kafka_errors.KafkaTimeoutError, *_MISCONFIGURED)
# This many failures in a row that are not retriable by aiokafka's own reckoning (its sender
# died, say, and fails every send with a bare KafkaError): the producer is made anew.
_RENEW_AFTER = 3
# Errors after which the producer itself is made anew: its idempotence state is off from the
# broker's (sequence numbers after a broker lost its producer state, say).
_PRODUCER_BROKEN: tuple[type[Exception], ...] = (
    kafka_errors.OutOfOrderSequenceNumber,
    kafka_errors.UnknownProducerId,
    kafka_errors.InvalidProducerEpoch,
    kafka_errors.ProducerFenced,
    kafka_errors.ProducerClosed,
    kafka_errors.IllegalStateError,
)


class RecordRefused(Exception):
    """The broker refused this record for good; sending it again cannot change that."""


class RecordProducer:
    def __init__(
        self, *, retry_base_s: float = 0.2, retry_max_s: float = 10.0, **connection: Any
    ) -> None:
        self._connection = connection
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s
        self._producer: AIOKafkaProducer | None = None
        self._renewing = asyncio.Lock()
        self._can_send: tuple[float, str | None] | None = None  # (when, why not) as last seen

    async def start(self) -> None:
        self._producer = await self._started_producer()

    async def _started_producer(self) -> AIOKafkaProducer:
        # Idempotent (hence acks=all): a retried send never writes a result twice. No linger:
        # a till waits for its result, and records still batch while a request is in flight
        # (aiokafka sends one at a time per broker), so under load nothing is lost by it.
        producer = AIOKafkaProducer(
            enable_idempotence=True, linger_ms=0, request_timeout_ms=30_000, **self._connection
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def cannot_send(self, topics: Sequence[str], cache_s: float = 5.0) -> str | None:
        """Why a record sent to `topics` now would not reach the broker, or None when it would:
        each partition has a leader and the producer a connection to it (made if need be).
        Cached for `cache_s`, since readiness is asked often and a check may take a while."""
        now = time.monotonic()
        if self._can_send is not None and now - self._can_send[0] < cache_s:
            return self._can_send[1]
        why = await self._why_not(topics)
        self._can_send = (time.monotonic(), why)
        return why

    async def _why_not(self, topics: Sequence[str]) -> str | None:
        producer = self._producer
        if producer is None:
            return "not started"
        try:
            async with asyncio.timeout(3.0):
                for topic in topics:
                    for partition in sorted(await producer.partitions_for(topic)):
                        tp = TopicPartition(topic, partition)
                        leader = producer.client.cluster.leader_for_partition(tp)
                        if leader is None or leader < 0:
                            return f"{topic}[{partition}] has no leader"
                        if not await producer.client.ready(leader):
                            return f"no connection to the leader of {topic}[{partition}]"
        except TimeoutError:
            return "the cluster did not answer within 3 s"
        except kafka_errors.KafkaError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    async def stop(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers
    ) -> None:
        """Send and wait until the broker has the record (acks=all); see the module's note."""
        delay = self._retry_base_s
        not_retriable = 0
        while True:
            producer = self._producer
            if producer is None:
                raise RuntimeError("producer not started")
            try:
                await producer.send_and_wait(topic, value=value, key=key, headers=list(headers))
                return
            except _REFUSED_FOR_GOOD as exc:
                raise RecordRefused(f"{type(exc).__name__}: {exc}") from exc
            except kafka_errors.KafkaError as exc:
                metrics.publish_retries.add(1, {"topic": topic, "error": type(exc).__name__})
                level = logging.ERROR if isinstance(exc, _MISCONFIGURED) else logging.WARNING
                log.log(
                    level,
                    "sending to %s failed (%s: %s); trying again in %.1f s",
                    topic,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                retriable = getattr(exc, "retriable", False) or isinstance(exc, _WAITED_OUT)
                not_retriable = 0 if retriable else not_retriable + 1
                if isinstance(exc, _PRODUCER_BROKEN) or not_retriable >= _RENEW_AFTER:
                    not_retriable = 0
                    await self._renew(producer)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max_s)

    async def _renew(self, broken: AIOKafkaProducer) -> None:
        async with self._renewing:
            if id(self._producer) != id(broken):
                return  # another send renewed it already
            log.warning("making the producer anew")
            try:
                self._producer = await self._started_producer()
            except Exception:
                log.exception("a new producer did not start; trying again later")
                return
            try:
                await broken.stop()
            except Exception:
                log.exception("stopping the broken producer failed")
