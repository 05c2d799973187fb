"""The floor: a bare aiokafka loop with no guarantees (`python -m bench.bare`, settings from
the `BENCH_*` environment, see `bench.common.SystemConfig`).

consume → one httpx call → produce, as fast as Python does it here:

- `async for msg in consumer`, auto-commit every 5 s (offsets are committed whether or not
  the record was handled: a crash loses or repeats commands);
- each record is handled in its own task, at most `BENCH_MAX_CONNECTIONS` at once (the same
  bound as voucher-bridge's EVOUCHER_MAX_CONNECTIONS in the benchmark), with no ordering at all
  (two commands of one till can overtake each other);
- the call goes to httpx's transport directly (no AsyncClient on top), on the same asyncio
  network backend, as voucher-bridge's does;
- the result is handed to the producer (acks=1, no linger, as voucher-bridge's) and its delivery
  is never awaited;
- no idempotency store, no tracing, no validation beyond `json.loads`, no dead letters.

So it is the fastest correct-looking loop, not a correct one: what Python, aiokafka, httpx,
the broker and the sandbox cost on this machine with nothing else on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal

import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from bench.common import SystemConfig, Upstream, result_value

log = logging.getLogger("bench.bare")


async def run(config: SystemConfig) -> None:
    consumer = AIOKafkaConsumer(
        config.commands_topic,
        bootstrap_servers=config.bootstrap,
        group_id=config.group_id,
        enable_auto_commit=True,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=config.bootstrap, acks=1, linger_ms=0)
    upstream = Upstream(config, lean=True)
    slots = asyncio.Semaphore(config.max_connections)
    running: set[asyncio.Task[None]] = set()

    async def handle(record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            event = json.loads(record.value)
            status, payload = await upstream.call(event)
            await producer.send(
                config.results_topic, result_value(event, status, payload), key=record.key
            )
        except Exception:
            log.exception("record %s@%d lost", record.topic, record.offset)
        finally:
            slots.release()

    await producer.start()
    await consumer.start()
    try:
        async for record in consumer:
            await slots.acquire()
            task = asyncio.create_task(handle(record))
            running.add(task)
            task.add_done_callback(running.discard)
    finally:
        await consumer.stop()
        await producer.stop()
        await upstream.aclose()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    config = SystemConfig.from_env()

    async def until_stopped() -> None:
        task = asyncio.create_task(run(config))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    uvloop.run(until_stopped())  # as voucher-bridge runs


if __name__ == "__main__":
    main()
