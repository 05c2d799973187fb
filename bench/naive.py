"""The naive subscriber: FastStream as its tutorial reads (`python -m bench.naive`, settings from
the `BENCH_*` environment, see `bench.common.SystemConfig`).

One handler, one record at a time: parse the CloudEvent, make the eVOUCHER call with one
shared httpx client, `await broker.publish(...)` the result (same key), return; with
`AckPolicy.ACK` FastStream then commits the consumer's position, after every record. Safe
enough (at least once, in order), but every record waits for the previous one's call, publish
and commit, whatever its partition or terminal.
"""

from __future__ import annotations

import json
import logging

import uvloop
from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage

from bench.common import SystemConfig, Upstream, result_value


def build(config: SystemConfig) -> FastStream:
    # log_level=DEBUG: FastStream's per-message "Received"/"Processed" lines are not written
    # (the root logger is at WARNING), as voucher-bridge runs with LOG_LEVEL=WARNING.
    broker = KafkaBroker(config.bootstrap, log_level=logging.DEBUG)
    upstream = Upstream(config)

    @broker.subscriber(
        config.commands_topic,
        group_id=config.group_id,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.ACK,
    )
    async def on_command(body: bytes, message: KafkaMessage) -> None:
        event = json.loads(body)
        status, payload = await upstream.call(event)
        record = message.raw_message
        key = record.key if not isinstance(record, tuple) else None
        await broker.publish(
            result_value(event, status, payload), topic=config.results_topic, key=key
        )

    async def close() -> None:
        await upstream.aclose()

    return FastStream(broker, after_shutdown=[close])


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    uvloop.run(build(SystemConfig.from_env()).run())  # as voucher-bridge runs


if __name__ == "__main__":
    main()
