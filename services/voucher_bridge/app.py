"""Wiring: settings → adapters → handlers → the FastStream app that consumes the commands."""

from __future__ import annotations

import copy
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import ConsumerRecord
from faststream import AckPolicy, FastStream
from faststream.asgi import AsgiFastStream, AsgiResponse, get, make_ping_asgi
from faststream.asgi.handlers import GetHandler
from faststream.asgi.response import JSONResponse
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.message import StreamMessage
from faststream.specification import AsyncAPI
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

from voucher_bridge import __version__
from voucher_bridge.evoucher.client import EvoucherClient
from voucher_bridge.evoucher.handler import PosCommandHandler
from voucher_bridge.kafka.connection import connection_args, faststream_security
from voucher_bridge.kafka.dispatcher import KeyOrderedDispatcher
from voucher_bridge.kafka.pipeline import CommandPipeline, Topics
from voucher_bridge.kafka.producer import RecordProducer
from voucher_bridge.once import Answered, ExactlyOnce, Timing
from voucher_bridge.settings import Settings
from voucher_bridge.store import StoreSessions, open_store
from voucher_bridge.telemetry import configure_tracing
from voucher_bridge.upstream import RetryPolicy
from voucher_contracts import CommandEnvelope, ResultEnvelope
from voucher_contracts.pos import POS_COMMAND_TYPES
from voucher_contracts.schema import command_schema

log = logging.getLogger(__name__)


async def _lenient_parser(
    record: ConsumerRecord[bytes | None, bytes | None],
    parse: Callable[[Any], Awaitable[StreamMessage[Any]]],
) -> StreamMessage[Any]:
    # FastStream decodes every header as UTF-8 and fails on anything else (faststream#2458),
    # which would skip the record unseen. Give it a copy with text-safe headers; the record
    # itself, bytes intact, stays the message's raw_message for the pipeline.
    safe = copy.copy(record)
    safe.headers = [(k, _text_safe(v)) for k, v in record.headers]
    message = await parse(safe)
    message.raw_message = record
    return message


def _text_safe(value: bytes | None) -> bytes:
    if value is None:
        return b""
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return b""
    return value


async def _raw_decoder(message: StreamMessage[Any], decode: Any) -> bytes:
    # The pipeline decodes CloudEvents itself (both bindings, exact decimals); FastStream's
    # decoder must never fail on a malformed record, or the record would go unseen.
    return bytes(message.body)


class Service:
    """The running parts of one voucher-bridge instance."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer = RecordProducer(**connection_args(settings))
        self.store = open_store(settings.idempotency_store_url)
        self.evoucher = EvoucherClient(
            settings.evoucher_base_url,
            settings.evoucher_terminals,
            StoreSessions(self.store),
            connect_timeout_s=settings.evoucher_connect_timeout_s,
            read_timeout_s=settings.evoucher_read_timeout_s,
            max_connections=settings.evoucher_max_connections,
        )
        HTTPXClientInstrumentor().instrument_client(self.evoucher._http)
        retry = RetryPolicy(
            attempts=settings.upstream_retry_attempts,
            base_delay_s=settings.upstream_retry_base_delay_s,
            max_delay_s=settings.upstream_retry_max_delay_s,
        )
        self.pos_once = ExactlyOnce(
            self.store,
            PosCommandHandler(self.evoucher, retry),
            Timing(
                heartbeat_interval_s=settings.instance_heartbeat_s,
                stale_after_s=settings.instance_stale_after_s,
                settle_interval_s=settings.settle_interval_s,
                settle_window_s=settings.settle_window_s,
                retention_s=settings.idempotency_retention_s,
            ),
        )
        self.pos_pipeline = CommandPipeline(
            Topics(settings.pos_commands_topic, settings.pos_results_topic, settings.pos_dlq_topic),
            POS_COMMAND_TYPES,
            self.pos_once,
            self.producer,
            group_id=settings.kafka_group_id,
            max_record_bytes=settings.max_record_bytes,
        )
        self.pos_dispatcher = KeyOrderedDispatcher(
            self.pos_pipeline.process,
            max_in_flight=settings.max_in_flight,
            commit_interval_s=settings.commit_interval_ms / 1000,
            drain_timeout_s=settings.drain_timeout_s,
        )
        self.broker = self._broker()

    def _broker(self) -> KafkaBroker:
        settings = self.settings
        broker = KafkaBroker(
            settings.kafka_bootstrap_servers,
            security=faststream_security(settings),
            client_id="voucher-bridge",
            # Topics are provisioned by their owners (or `voucher-bridge topics`), never
            # created here with one partition by accident.
            allow_auto_create_topics=False,
            graceful_timeout=settings.drain_timeout_s,
            # FastStream's per-message "Received/Processed" lines would say "processed" when a
            # record is only handed to the dispatcher; the pipeline logs the real outcome.
            log_level=logging.DEBUG,
        )
        subscriber = self._pos_subscriber = broker.subscriber(
            settings.pos_commands_topic,
            group_id=settings.kafka_group_id,
            # A command produced before the group's first start is still a command.
            auto_offset_reset="earliest",
            # Offsets are committed by the dispatcher, per partition, only up to the lowest
            # unfinished record; FastStream's ACK_FIRST default would lose commands.
            ack_policy=AckPolicy.MANUAL,
            listener=self.pos_dispatcher.listener,
            parser=_lenient_parser,
            decoder=_raw_decoder,
            max_poll_interval_ms=settings.max_poll_interval_ms,
            session_timeout_ms=settings.session_timeout_ms,
            title="pos.commands",
            description="POS payment commands (CloudEvents 1.0, structured or binary), "
            "keyed by terminal.",
        )
        dispatcher = self.pos_dispatcher

        @subscriber
        async def on_pos_command(body: bytes, message: KafkaMessage) -> None:
            record = message.raw_message
            assert not isinstance(record, tuple)  # not a batch subscriber
            await dispatcher.submit(record, message.consumer)

        # Declared for the AsyncAPI document; results are sent by RecordProducer (see there).
        broker.publisher(
            settings.pos_results_topic,
            title="pos.results",
            description="One result event per POS command, keyed like the command.",
            schema=ResultEnvelope,
        )
        return broker

    async def on_startup(self) -> None:
        await self.producer.start()
        await self.pos_once.start(self._publish_superseding)

    async def _publish_superseding(
        self, record_key: bytes | None, command: CommandEnvelope, answered: Answered
    ) -> None:
        await self.pos_pipeline.publish_result(record_key, command, answered)

    async def readiness(self) -> dict[str, Any]:
        """What an orchestrator needs to know before sending traffic here."""
        subscriber_running = bool(self._pos_subscriber.running)
        checks = {
            "broker": await self.broker.ping(timeout=5.0),
            "producer": self.producer.started,
            "consuming": subscriber_running,
        }
        return {
            "ready": all(checks.values()),
            **checks,
            "in_flight": self.pos_dispatcher.in_flight,
            "partitions": sorted(f"{tp.topic}[{tp.partition}]" for tp in self._assignment()),
        }

    async def on_shutdown(self) -> None:
        # Before the broker stops its consumer: finish in-flight work and commit it.
        await self.pos_dispatcher.close()

    async def after_shutdown(self) -> None:
        await self.pos_once.stop()
        await self.producer.stop()
        await self.evoucher.aclose()

    def _assignment(self) -> set[Any]:
        consumer = getattr(self._pos_subscriber, "consumer", None)
        return set(consumer.assignment()) if consumer is not None else set()

    def _ready_route(self) -> GetHandler:
        @get(include_in_schema=False)
        async def ready(scope: Any) -> AsgiResponse:
            report = await self.readiness()
            return JSONResponse(report, 200 if report["ready"] else 503)

        return ready

    def asyncapi_document(self) -> dict[str, Any]:
        """FastStream's AsyncAPI document, with the command payloads described as they are.

        The subscriber takes raw bytes (so that a malformed record still reaches the
        dead-letter path), so FastStream cannot see the command schema; it is filled in here.
        """
        document: dict[str, Any] = self.specification().to_specification().to_jsonable()
        components = document["components"]
        commands = f"{self.settings.pos_commands_topic}:SubscribeMessage"
        components["schemas"].pop(f"{self.settings.pos_commands_topic}:Message:Payload", None)
        components["schemas"]["PosCommand"] = command_schema("PosCommand", POS_COMMAND_TYPES)
        components["messages"][commands]["payload"] = {"$ref": "#/components/schemas/PosCommand"}
        for message in components["messages"].values():
            message.pop("correlationId", None)  # FastStream's header; not part of this contract
        return document

    def specification(self) -> AsyncAPI:
        return AsyncAPI(
            self.broker,
            title="voucher-bridge",
            version=__version__,
            description="POS and coupon commands in, one result event per command out.",
        )

    def app(self) -> FastStream:
        configure_tracing()
        return FastStream(
            self.broker,
            specification=self.specification(),
            on_startup=[self.on_startup],
            on_shutdown=[self.on_shutdown],
            after_shutdown=[self.after_shutdown],
        )

    def asgi_app(self) -> AsgiFastStream:
        configure_tracing()
        return AsgiFastStream(
            self.broker,
            specification=self.specification(),
            asgi_routes=[
                ("/health/live", make_ping_asgi(self.broker, timeout=5.0)),
                ("/health/ready", self._ready_route()),
            ],
            asyncapi_path=None,
            on_startup=[self.on_startup],
            on_shutdown=[self.on_shutdown],
            after_shutdown=[self.after_shutdown],
        )
