"""A real Kafka broker for integration tests, and small topic helpers.

``ensure_kafka()`` picks the broker in this order:

1. ``$KAFKA_BOOTSTRAP_SERVERS``, when set (a broker someone else runs, e.g. a CI service);
2. a testcontainers ``KafkaContainer`` in KRaft mode, when a Docker daemon answers;
3. the project's own Apache Kafka from Maven Central jars: ``deploy/kafka/kafka.sh up``
   (reuses a broker already running on 127.0.0.1:$KAFKA_PORT; it is left running afterwards,
   stop it with ``deploy/kafka/kafka.sh down``).
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

PROJECT_ROOT = Path(__file__).resolve().parents[2]
KAFKA_SH = PROJECT_ROOT / "deploy" / "kafka" / "kafka.sh"

# Module-level references: the container must stay alive for the whole test session.
_container: Any | None = None
_bootstrap: str | None = None


def _docker_available() -> bool:
    """True when a Docker daemon answers; a docker CLI alone is not enough."""
    try:
        docker = importlib.import_module("docker")
        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _start_container() -> str:
    global _container
    try:  # testcontainers >= 4.15 moved it; the old path still works with a DeprecationWarning
        module = importlib.import_module("testcontainers.community.kafka")
    except ImportError:
        module = importlib.import_module("testcontainers.kafka")
    container = module.KafkaContainer().with_kraft()
    container.start()
    _container = container
    atexit.register(container.stop)
    return str(container.get_bootstrap_server())


def _start_local_broker() -> str:
    subprocess.run(["bash", str(KAFKA_SH), "up"], check=True, timeout=900)
    return f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}"


def ensure_kafka() -> str:
    """Return the bootstrap address of a running Kafka broker, starting one if needed."""
    global _bootstrap
    if _bootstrap is None:
        env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
        if env:
            _bootstrap = env
        elif _docker_available():
            _bootstrap = _start_container()
        else:
            _bootstrap = _start_local_broker()
    return _bootstrap


def unique_topic(prefix: str) -> str:
    """A topic name that no other test (or earlier run against the same broker) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def create_topic(
    bootstrap: str,
    name: str,
    partitions: int = 1,
    *,
    replication_factor: int = 1,
    configs: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Create a topic (an existing one is fine) and wait until all its partitions have a leader."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [
                NewTopic(
                    name=name,
                    num_partitions=partitions,
                    replication_factor=replication_factor,
                    topic_configs=configs or {},
                )
            ]
        )
        # aiokafka returns per-topic error codes instead of raising.
        for topic_error in response.topic_errors:
            topic, code = topic_error[0], topic_error[1]
            if code and code != TopicAlreadyExistsError.errno:
                message = topic_error[2] if len(topic_error) > 2 else None
                raise for_code(code)(f"creating topic {topic!r}: {message}")
        async with asyncio.timeout(timeout_s):
            while True:
                if await _topic_ready(admin, name):
                    break
                await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def _topic_ready(admin: AIOKafkaAdminClient, name: str) -> bool:
    for topic in await admin.describe_topics([name]):
        if topic["topic"] != name:
            continue
        parts = topic["partitions"]
        return (
            topic["error_code"] == 0
            and bool(parts)
            and all(p["error_code"] == 0 and p["leader"] >= 0 for p in parts)
        )
    return False
