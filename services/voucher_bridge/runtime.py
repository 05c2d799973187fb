"""The command side of an instance: what turns a record into its result.

The store, the upstream clients, the handlers, the exactly-once executor, the producer and one
pipeline per domain, built from the settings. The service runs it in its own process (one
worker) or each worker process runs one of its own (`voucher_bridge.workers`); both build it
here, so a worker is the same code path as the in-process service, not a copy of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from pydantic import BaseModel

from voucher_bridge.breaker import guard_from_settings
from voucher_bridge.epin.client import Credentials, EpinClient
from voucher_bridge.epin.handler import CouponCommandHandler
from voucher_bridge.evoucher.client import EvoucherClient
from voucher_bridge.evoucher.handler import PosCommandHandler
from voucher_bridge.kafka.connection import connection_args
from voucher_bridge.kafka.pipeline import CommandPipeline, Topics
from voucher_bridge.kafka.producer import RecordProducer
from voucher_bridge.kafka.records import Record
from voucher_bridge.once import (
    Answered,
    ExactlyOnce,
    OwnedPartitions,
    RoutedHandler,
    ScheduleJob,
    Timing,
)
from voucher_bridge.settings import Settings
from voucher_bridge.store import StoreBills, StoreSessions, open_store
from voucher_bridge.upstream import RetryPolicy
from voucher_contracts import CommandEnvelope
from voucher_contracts.coupon import COUPON_COMMAND_TYPES
from voucher_contracts.pos import POS_COMMAND_TYPES


@dataclass
class Lane:
    """One domain's way through the service: its topics, command types and moving parts."""

    name: str  # "pos" or "coupon"
    topics: Topics
    command_types: Mapping[str, type[BaseModel]]
    pipeline: CommandPipeline


def upstream_wait_s(settings: Settings) -> float:
    """The longest a command may wait for an upstream's open circuit (breaker.py)."""
    waits = [
        settings.evoucher_breaker_max_wait_s
        if settings.evoucher_breaker_when_open == "wait" and settings.evoucher_breaker_failures
        else 0.0,
        settings.epin_breaker_max_wait_s
        if settings.epin_breaker_when_open == "wait" and settings.epin_breaker_failures
        else 0.0,
    ]
    return max(waits)


class CommandRuntime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # One TLS context for the producer and the connection check, so the check sees what
        # the producer will (FastStream's clients get their own, from the same files).
        self.connection: dict[str, Any] = connection_args(settings)
        self.producer = RecordProducer(**self.connection)
        self.store = open_store(
            settings.idempotency_store_url.get_secret_value(), settings.store_timeout_s
        )
        self.sessions = StoreSessions(self.store)
        self.evoucher = EvoucherClient(
            settings.evoucher_base_url,
            settings.evoucher_terminals,
            self.sessions,
            connect_timeout_s=settings.evoucher_connect_timeout_s,
            read_timeout_s=settings.evoucher_read_timeout_s,
            max_connections=settings.evoucher_max_connections,
            guard=guard_from_settings(settings, "evoucher"),
        )
        self.epin = EpinClient(
            settings.epin_base_url or "http://epin.invalid/",
            settings.epin_api_key if settings.epin_base_url else None,
            {
                name: Credentials(account.username, account.password)
                for name, account in settings.epin_accounts.items()
            },
            refresh_path=settings.epin_refresh_path,
            connect_timeout_s=settings.epin_connect_timeout_s,
            read_timeout_s=settings.epin_read_timeout_s,
            max_connections=settings.epin_max_connections,
            max_pages=settings.epin_max_pages,
            guard=guard_from_settings(settings, "epin"),
        )
        # The eVOUCHER client makes its own client spans (evoucher.client, the hot path).
        HTTPXClientInstrumentor().instrument_client(self.epin._http)
        retry = RetryPolicy(
            attempts=settings.upstream_retry_attempts,
            base_delay_s=settings.upstream_retry_base_delay_s,
            max_delay_s=settings.upstream_retry_max_delay_s,
        )
        self.bills = StoreBills(self.store)
        pos_handler = PosCommandHandler(
            self.evoucher,
            retry,
            apply_grace_s=settings.evoucher_apply_grace_s,
            settle_window_s=settings.settle_window_s,
            bills=self.bills,
            terminal_stores=settings.terminal_stores,
        )
        coupon_handler = CouponCommandHandler(
            self.epin,
            retry,
            apply_grace_s=settings.epin_apply_grace_s,
            settle_window_s=settings.epin_settle_window_s,
            show_pins=settings.coupon_result_pins == "shown",
        )
        self.once = ExactlyOnce(
            self.store,
            RoutedHandler(
                {
                    **dict.fromkeys(POS_COMMAND_TYPES, pos_handler),
                    **dict.fromkeys(COUPON_COMMAND_TYPES, coupon_handler),
                }
            ),
            Timing(
                heartbeat_interval_s=settings.instance_heartbeat_s,
                stale_after_s=settings.instance_stale_after_s,
                settle_interval_s=settings.settle_interval_s,
                retention_s=settings.idempotency_retention_s,
                purge_interval_s=settings.idempotency_purge_interval_s,
                command_timeout_s=settings.command_timeout_s,
                store_timeout_s=settings.store_timeout_s,
                upstream_wait_s=upstream_wait_s(settings),
            ),
        )
        self.lanes = [
            self._lane(
                "pos",
                Topics(
                    settings.pos_commands_topic, settings.pos_results_topic, settings.pos_dlq_topic
                ),
                POS_COMMAND_TYPES,
            ),
            self._lane(
                "coupon",
                Topics(
                    settings.coupon_commands_topic,
                    settings.coupon_results_topic,
                    settings.coupon_dlq_topic,
                ),
                COUPON_COMMAND_TYPES,
            ),
        ]
        self.by_topic = {lane.topics.commands: lane for lane in self.lanes}

    def _lane(
        self, name: str, topics: Topics, command_types: Mapping[str, type[BaseModel]]
    ) -> Lane:
        pipeline = CommandPipeline(
            topics,
            command_types,
            self.once,
            self.producer,
            group_id=self.settings.kafka_group_id,
            max_record_bytes=self.settings.max_record_bytes,
            max_result_bytes=self.settings.max_result_bytes,
        )
        return Lane(name, topics, command_types, pipeline)

    async def start(
        self,
        schedule: ScheduleJob | None = None,
        owned: OwnedPartitions | None = None,
        *,
        background: bool = True,
    ) -> None:
        """The producer, then this instance in the store (see `ExactlyOnce.start`).
        `background=False` (a worker process): only the heartbeat; settling, purging and
        counting are the service's."""
        await self.producer.start()
        try:
            await self.once.start(self.publish_superseding, schedule, owned, background=background)
        except BaseException:
            await self.producer.stop()
            raise

    async def stop(self) -> None:
        await self.once.stop()
        await self.producer.stop()

    async def aclose_clients(self) -> None:
        await self.evoucher.aclose()
        await self.epin.aclose()

    def forget(self) -> None:
        """After a rebalance: another instance may have had a till's partition (and renewed
        its session, moved its bill on)."""
        self.sessions.forget()
        self.bills.forget()

    async def process(self, record: Record) -> None:
        await self.by_topic[record.topic].pipeline.process(record)

    async def publish_superseding(
        self, record_key: bytes | None, command: CommandEnvelope, answered: Answered
    ) -> None:
        lane = next(lane for lane in self.lanes if command.type in lane.command_types)
        await lane.pipeline.publish_result(record_key, command, answered)
