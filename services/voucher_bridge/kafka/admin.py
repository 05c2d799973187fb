"""What the service asks of the Kafka cluster itself: creating its topics where they are missing
(for the local broker, demo and tests), and, at start, the topics' retention and the consumer
group's members (see `guards`)."""

from __future__ import annotations

import contextlib

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
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


async def topic_retention_ms(settings: Settings, topics: list[str]) -> dict[str, int]:
    """Each topic's `retention.ms` (-1: kept for ever)."""
    admin = AIOKafkaAdminClient(**connection_args(settings))
    await admin.start()
    try:
        resources = [
            ConfigResource(ConfigResourceType.TOPIC, t, {"retention.ms": None}) for t in topics
        ]
        found: dict[str, int] = {}
        for response in await admin.describe_configs(resources):
            for resource in response.resources:
                name, entries = resource[3], resource[4]
                for entry in entries:
                    if entry[0] == "retention.ms" and entry[1] is not None:
                        found[name] = int(entry[1])
        return found
    finally:
        await admin.close()


async def group_client_ids(settings: Settings, group: str) -> list[str]:
    """The client ids of the consumer group's members now."""
    admin = AIOKafkaAdminClient(**connection_args(settings))
    await admin.start()
    try:
        ids: list[str] = []
        for response in await admin.describe_consumer_groups([group]):
            for description in response.groups:
                ids.extend(member[1] for member in description[5])
        return ids
    finally:
        await admin.close()
