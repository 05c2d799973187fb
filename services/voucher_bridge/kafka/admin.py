"""Creating the service's topics where they are missing (for the local broker, demo and tests)."""

from __future__ import annotations

import contextlib

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from voucher_bridge.kafka.connection import connection_args
from voucher_bridge.settings import Settings


async def ensure_topics(settings: Settings, partitions: int = 6) -> list[str]:
    """Create the commands, results and dead-letter topics that do not exist yet."""
    names = [
        settings.pos_commands_topic,
        settings.pos_results_topic,
        settings.pos_dlq_topic,
        settings.coupon_commands_topic,
        settings.coupon_results_topic,
        settings.coupon_dlq_topic,
    ]
    admin = AIOKafkaAdminClient(**connection_args(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            topics = [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in missing]
            with contextlib.suppress(TopicAlreadyExistsError):  # created meanwhile elsewhere
                await admin.create_topics(topics)
        return missing
    finally:
        await admin.close()
