"""Wiring: settings → adapters → handlers → the FastStream app that consumes the commands."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import gc
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaError
from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.message import StreamMessage
from faststream.specification import AsyncAPI

from voucher_bridge import __version__, metrics
from voucher_bridge.console.access import Users
from voucher_bridge.console.deadletters import DeadLetterReader
from voucher_bridge.console.operations import Console, Limits
from voucher_bridge.console.web import ServiceLoop, console_app
from voucher_bridge.guards import (
    client_id_of,
    instance_of,
    members_of_other_stores,
    topics_kept_longer,
    unnamed_members,
)
from voucher_bridge.health import LivenessBounds, LoopWatch, Probes
from voucher_bridge.kafka.admin import group_client_ids, topic_retention_ms
from voucher_bridge.kafka.connection import (
    ProblemLog,
    connection_problem,
    faststream_security,
)
from voucher_bridge.kafka.dispatcher import KeyOrderedDispatcher, PartitionProgress
from voucher_bridge.kafka.records import Record
from voucher_bridge.runtime import CommandRuntime
from voucher_bridge.serving import StopWatchdog
from voucher_bridge.settings import Settings
from voucher_bridge.telemetry import configure_metrics, configure_tracing
from voucher_bridge.workers import WorkerPool, worker_count
from voucher_contracts import asyncapi

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


async def _asked_again(
    members: Callable[[], Awaitable[tuple[list[str], list[str]]]],
    retention: Callable[[], Awaitable[dict[str, int]]],
    within_s: float = 30.0,
) -> tuple[tuple[list[str], list[str]], dict[str, int]]:
    """Both answers, asking again on retriable errors for up to `within_s`."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        try:
            return await members(), await retention()
        except KafkaError as exc:
            if not exc.retriable or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


def _text_safe(value: bytes | None) -> bytes:
    if value is None:
        return b""
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return b""
    return value


async def _message_itself(message: StreamMessage[Any], decode: Any) -> StreamMessage[Any]:
    # The pipeline decodes CloudEvents itself (both bindings, exact decimals); FastStream's
    # decoder must never fail on a malformed record, or the record would go unseen. The handler
    # gets the message itself: it needs the record and its consumer, and nothing is injected
    # (`apply_types=False`, see `_broker`).
    return message


class _PatientBroker(KafkaBroker):
    """FastStream's broker, started once `before_start` says so. FastStream answers HTTP (and
    so /health/ready) only after the startup hooks have returned, and starts the broker after
    them: a cluster that does not take this client yet is waited for here, the service
    running and saying why, rather than ending at start."""

    before_start: Callable[[], Awaitable[bool]] | None = None

    async def start(self) -> None:
        if self.before_start is None or await self.before_start():
            await super().start()


def _progress_json(p: PartitionProgress) -> dict[str, Any]:
    return {
        "topic": p.topic,
        "partition": p.partition,
        "lag": p.lag,
        "committed": p.committed,
        "in_flight": p.in_flight,
        "oldest_unfinished_offset": p.oldest_unfinished_offset,
        "oldest_unfinished_age_s": _rounded(p.oldest_unfinished_age_s),
        "lanes": p.lanes,
        "busiest": [
            {
                "key": lane.key.decode("utf-8", "replace") if lane.key is not None else None,
                "depth": lane.depth,
                "running_offset": lane.running_offset,
                "running_s": _rounded(lane.running_s),
            }
            for lane in p.busiest
        ],
    }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


class Service:
    """The running parts of one voucher-bridge instance."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Armed by `voucher-bridge run` (the process's own stop), not where a Service is
        # embedded, e.g. in a test's process.
        self.stop_watchdog: StopWatchdog | None = None
        self.runtime = CommandRuntime(settings)
        # With more than one worker, the commands run in worker processes (workers/pool.py);
        # started with the Kafka parts.
        self.worker_count = worker_count(settings.workers)
        self.workers: WorkerPool | None = None
        # Its parts, by the names the rest of the service (and its tests) know them by.
        self._connection = self.runtime.connection
        self.producer = self.runtime.producer
        self.store = self.runtime.store
        self.sessions = self.runtime.sessions
        self.evoucher = self.runtime.evoucher
        self.epin = self.runtime.epin
        self.bills = self.runtime.bills
        self.once = self.runtime.once
        self.lanes = self.runtime.lanes
        self._by_topic = self.runtime.by_topic
        # Why the cluster does not take this client, while it does not (readiness says it).
        self._kafka_problems = ProblemLog()
        self._kafka_parts_started = False  # producer, store instance, start-up guard
        self._stopping = False
        # One consumer for both command topics: one group member, one rebalance. Its
        # dispatcher keeps records apart per partition and key, so a till and an account
        # never wait for each other.
        self.dispatcher = KeyOrderedDispatcher(
            self._process,
            max_in_flight=settings.max_in_flight,
            commit_interval_s=settings.commit_interval_ms / 1000,
            drain_timeout_s=settings.drain_timeout_s,
            stuck_after_s=settings.stuck_after_s,
            describe=self._describe,
            on_rebalance=self._on_rebalance,
            find_consumer=lambda: getattr(self.subscriber, "consumer", None),
        )
        self._group_watch: asyncio.Task[None] | None = None
        self._console: Console | None = None
        # Ticks on the service's loop, so that the probes (on a thread of their own) can tell
        # a blocked loop (health.py).
        self.loop_watch = LoopWatch()
        self._loop_watching: asyncio.Task[None] | None = None
        self.broker = self._broker()

    def _on_rebalance(self) -> None:
        self.runtime.forget()
        if self.workers is not None:
            self.workers.forget()
        # A member may have joined with a store of its own (two started at once, each with
        # the default SQLite file, both passed the start-up check): look again.
        if self._group_watch is None or self._group_watch.done():
            self._group_watch = asyncio.create_task(self._watch_group())

    async def _watch_group(self) -> None:
        """Take nothing new while the group has a member of another store; look again every
        few seconds until it has gone (it refuses to start, or an operator stops it)."""
        await asyncio.sleep(1.0)
        while True:
            try:
                others, _ = await self._members()
            except Exception as exc:
                log.warning("could not look at the group's members: %s", exc)
                others = []
            if not others:
                self.dispatcher.unfence()
                return
            metrics.members_of_other_stores.add(1)
            self.dispatcher.fence(
                f"members of group {self.settings.kafka_group_id!r} do not share this "
                f"instance's store ({', '.join(others)}): set the same IDEMPOTENCY_STORE_URL"
            )
            await asyncio.sleep(5.0)

    async def _members(self) -> tuple[list[str], list[str]]:
        """The group's members of other stores, and those whose client id names no instance."""
        client_ids = await group_client_ids(self.settings, self.settings.kafka_group_id)
        instances = {i for c in client_ids if (i := instance_of(c)) is not None}
        known = await self.store.known_instances(instances)
        return members_of_other_stores(client_ids, known), unnamed_members(client_ids)

    async def _process(self, record: Record) -> None:
        if self.workers is not None:
            await self.workers.process(record)
        else:
            await self.runtime.process(record)

    def _broker(self) -> KafkaBroker:
        settings = self.settings
        broker = _PatientBroker(
            settings.kafka_bootstrap_servers,
            security=faststream_security(settings),
            # Names this instance, so that the group's members can be matched to the
            # instances that heartbeat in the store (guards.members_of_other_stores).
            client_id=client_id_of(self.once.instance),
            # Topics are provisioned by their owners (or `voucher-bridge topics`), never
            # created here with one partition by accident.
            allow_auto_create_topics=False,
            graceful_timeout=settings.drain_timeout_s,
            # FastStream's per-message "Received/Processed" lines would say "processed" when a
            # record is only handed to the dispatcher; the pipeline logs the real outcome.
            log_level=logging.DEBUG,
            # No dependency injection in the one handler: FastDepends would resolve the
            # message annotation in a worker thread for every record (a thread hop and a task
            # group per command, ~7 % of the CPU in `make bench`).
            apply_types=False,
        )
        broker.before_start = self._until_kafka_takes_us
        self.subscriber = broker.subscriber(
            *(lane.topics.commands for lane in self.lanes),
            group_id=settings.kafka_group_id,
            # A command produced before the group's first start is still a command.
            auto_offset_reset="earliest",
            # Offsets are committed by the dispatcher, per partition, only up to the lowest
            # unfinished record; FastStream's ACK_FIRST default would lose commands.
            ack_policy=AckPolicy.MANUAL,
            listener=self.dispatcher.listener,
            parser=_lenient_parser,
            decoder=_message_itself,
            max_poll_interval_ms=settings.max_poll_interval_ms,
            session_timeout_ms=settings.session_timeout_ms,
            # One fetch per broker at a time: a quiet topic's long poll must not hold back a
            # busy one for the default 500 ms.
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
            description="Commands (CloudEvents 1.0, structured or binary mode): POS payment "
            "commands keyed by terminal, prepaid-coupon commands keyed by account.",
        )
        dispatcher = self.dispatcher

        @self.subscriber
        async def on_command(message: KafkaMessage) -> None:
            record = message.raw_message
            assert not isinstance(record, tuple)  # not a batch subscriber
            await dispatcher.submit(record, message.consumer)

        for lane in self.lanes:
            # Declared for the AsyncAPI document's frame only (its channels' bindings and
            # servers); results and dead letters go out through RecordProducer, and their
            # messages are the contract's (voucher_contracts.asyncapi).
            for topic in (lane.topics.results, lane.topics.dead_letters):
                broker.publisher(topic, title=topic)
        return broker

    async def on_startup(self) -> None:
        self._loop_watching = asyncio.create_task(self.loop_watch.run(), name="loop-watch")
        dispatcher, once = self.dispatcher, self.once
        metrics.observe(
            metrics.Readings(
                in_flight=lambda: dispatcher.in_flight,
                assigned=lambda: dispatcher.assigned_count,
                progress=lambda: dispatcher.snapshot,
                unsettled=lambda: once.unsettled,
            )
        )
        metrics.start_at_zero()
        # Where the cluster takes this client, everything starts here, as a refused start
        # ends the process. Where it does not (a wrong password, an untrusted certificate),
        # the start goes on in the broker's (_until_kafka_takes_us): this hook must return for
        # /health/ready to be served.
        if await self._kafka_takes_us():
            await self._start_kafka_parts()

    async def _kafka_takes_us(self) -> bool:
        problem = await connection_problem(self.settings, self._connection)
        self._kafka_problems.report(problem, self.settings.kafka_bootstrap_servers)
        return problem is None

    async def _until_kafka_takes_us(self) -> bool:
        """Before the broker starts: wait until the cluster takes this client (asking again
        with backoff, the cause logged once), then start what needs it. False: stopped first."""
        delay = 1.0
        while not self._kafka_parts_started:
            if self._stopping:
                return False
            if await self._kafka_takes_us():
                try:
                    await self._start_kafka_parts()
                except KafkaError as exc:  # taken by one server, not yet by the whole cluster
                    log.warning("could not start the producer yet (%s); trying again", exc)
            if not self._kafka_parts_started:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        return not self._stopping

    async def _start_kafka_parts(self) -> None:
        """The producer, this instance in the store and the start-up guard, before consuming.
        A refused start stops what it started: no shutdown hooks run after a failed start."""
        await self.runtime.start(self._schedule_job, self.dispatcher.owned_partitions)
        self._kafka_parts_started = True
        try:
            await self._guard_forgetting()
            if self.worker_count > 1:
                workers = WorkerPool(
                    self.settings,
                    self.worker_count,
                    in_process=self._process_here,
                    retire=self.store.retire,
                    retire_timeout_s=self.settings.store_timeout_s,
                    # As the service's own loop is judged (the liveness probe).
                    silent_after_s=self.settings.liveness_loop_blocked_s,
                )
                await workers.start()
                self.workers = workers
        except BaseException:
            await self._stop_kafka_parts()
            raise

    def _schedule_job(
        self, topic: str, partition: int, key: bytes | None, job: Callable[[], Awaitable[None]]
    ) -> bool:
        """A settling job into its key's lane. It runs in this process, with this process's
        clients and store (`_here`)."""

        return self.dispatcher.submit_job(topic, partition, key, lambda: self._here(job()))

    async def _process_here(self, record: Record) -> None:
        """A record that its worker died under, again and again, run in this process."""
        await self._here(self.runtime.process(record))

    async def _here(self, work: Awaitable[None]) -> None:
        """Run `work` (a settling job, or a record no worker could end) in this process.
        With workers, a key's sessions and bills move on in two processes: this one forgets
        what it cached of tills before (a worker has moved them on since), and the workers
        after, before the key's next record reaches its worker (the lane holds that record
        until this is done, and both go down the worker's one socket in that order)."""
        workers = self.workers
        if workers is not None:
            self.runtime.forget()
        try:
            await work
        finally:
            if workers is not None:
                workers.forget()

    async def _stop_kafka_parts(self) -> None:
        # Each at most once: a start refused after the broker's start began is followed by
        # the shutdown hooks too; a cluster that never took this client started nothing.
        if self._kafka_parts_started:
            self._kafka_parts_started = False
            if self.workers is not None:
                await self.workers.stop()
            await self.runtime.stop()
        else:
            await self.producer.stop()

    async def _guard_forgetting(self) -> None:
        """Refuse to start where the store cannot remember for the whole group (see guards).

        The cluster may not answer at once (a fresh broker has no group coordinator yet): asked
        again for a while, then the start goes on without the check, saying so."""
        settings = self.settings
        try:
            (others, unnamed), retention = await _asked_again(
                self._members,
                lambda: topic_retention_ms(settings, [lane.topics.commands for lane in self.lanes]),
            )
        except KafkaError as exc:
            log.warning("could not check the group's members and topics' retention: %s", exc)
            return
        if unnamed:
            log.warning(
                "members of group %r do not say which instance they are (%s: an earlier "
                "release?): make sure they share this instance's IDEMPOTENCY_STORE_URL",
                settings.kafka_group_id,
                ", ".join(unnamed),
            )
        if others:
            raise RuntimeError(
                f"consumer group {settings.kafka_group_id!r} has members that do not share this "
                f"instance's idempotency store ({', '.join(others)}): a command one of them "
                "sent would be sent again by the other after a rebalance. Point every instance "
                "at the same IDEMPOTENCY_STORE_URL (PostgreSQL, or one SQLite file on one host)."
            )
        longer = topics_kept_longer(retention, settings.idempotency_retention_s)
        if longer:
            message = (
                f"{', '.join(longer)} keep records longer than the idempotency store keeps "
                f"commands (IDEMPOTENCY_RETENTION_S={settings.idempotency_retention_s:g}): "
                "a replay of older ones is refused by age (command_expired), never sent"
            )
            if settings.retention_check == "refuse":
                raise RuntimeError(message + "; RETENTION_CHECK=refuse")
            log.warning(message)

    async def after_startup(self) -> None:
        # Everything made so far (modules, pydantic schemas, clients) lives as long as the
        # process. Frozen, the collector no longer walks it on every full collection, which
        # otherwise stops the event loop for ~50 ms a few times a minute under load (seen as
        # the p99 in `make bench`).
        gc.collect()
        gc.freeze()

    async def readiness(self) -> dict[str, Any]:
        """What an orchestrator needs to know before counting on this instance: each part,
        and why one is false. Asked by the health server, on the service's loop."""
        settings = self.settings
        results = [lane.topics.results for lane in self.lanes]
        broker, cannot_send = await asyncio.gather(
            self.broker.ping(timeout=2.0), self.producer.cannot_send(results)
        )
        # The store takes this instance's heartbeat every INSTANCE_HEARTBEAT_S.
        store_silent_s = self.once.store_answered_s
        store_ok = store_silent_s < 3 * settings.instance_heartbeat_s + settings.store_timeout_s
        checks = {
            "broker": broker,
            "producer": cannot_send is None,
            "store": store_ok,
            "assigned": self.dispatcher.rebalanced and self.dispatcher.assigned_count > 0,
            "consuming": bool(self.subscriber.running),
        }
        if self.worker_count > 1:
            checks["workers"] = self.workers is not None and self.workers.ready()
        draining = self.dispatcher.closing or self._stopping
        report: dict[str, Any] = {
            "ready": all(checks.values()) and not draining,
            **checks,
            "draining": draining,
            "in_flight": self.dispatcher.in_flight,
            "partitions": sorted(f"{tp.topic}[{tp.partition}]" for tp in self._assignment()),
            "progress": [_progress_json(p) for p in self.dispatcher.progress()],
        }
        why = {}
        if cannot_send is not None:
            why["producer"] = cannot_send
        if not store_ok:
            why["store"] = f"no heartbeat taken for {store_silent_s:.0f} s"
        if not checks["assigned"]:
            why["assigned"] = (
                "no partitions (the group has more members than partitions, or has not "
                "rebalanced yet)"
                if self.dispatcher.rebalanced
                else "the group has not given this instance its partitions yet"
            )
        if why:
            report["why"] = why
        if self._kafka_parts_started:
            # Running, and the cluster answers or not: why not (a password or a certificate
            # changed since the start), or that it does again. Logged once per cause.
            problem = None
            if not checks["broker"]:
                problem = await connection_problem(self.settings, self._connection)
            self._kafka_problems.report(problem, self.settings.kafka_bootstrap_servers)
        problem = self._kafka_problems.current
        if problem is not None and not checks["broker"]:
            report.update(reason=problem.reason, check=list(problem.check), detail=problem.detail)
        return report

    async def on_shutdown(self) -> None:
        self._stopping = True  # a start still waiting for the cluster gives up
        # The whole stop is bounded (serving.py); the drain takes at most DRAIN_TIMEOUT_S.
        if self.stop_watchdog is not None:
            self.stop_watchdog.start()
        # Before the broker stops its consumers: finish in-flight work and commit it.
        await self.dispatcher.close()

    async def after_shutdown(self) -> None:
        if self._console is not None:
            await self._console.close()
        await self._stop_kafka_parts()
        await self.runtime.aclose_clients()
        if self.stop_watchdog is not None:
            self.stop_watchdog.cancel()

    def _assignment(self) -> set[Any]:
        consumer = getattr(self.subscriber, "consumer", None)
        return set(consumer.assignment()) if consumer is not None else set()

    def console(self) -> Console:
        """The operator console's looks and actions over this instance's own parts: the same
        store, producer and pipelines as the commands (console/operations.py)."""
        if self._console is None:
            self._console = Console(
                store=self.store,
                once=self.once,
                lanes=self.lanes,
                producer=self.producer,
                reader=DeadLetterReader(self._connection),
                publish=self.runtime.publish_superseding,
                limits=console_limits(self.settings),
                live=self._console_live,
                instance=self.once.instance,
            )
        return self._console

    async def _console_live(self) -> dict[str, Any]:
        """What only a running instance knows, for the console's overview."""
        upstreams = []
        workers = self.workers
        if workers is not None:
            # Their counts as of now: a command answered a moment ago is on the overview.
            await workers.ask_for_metrics()
        for name, client in (("evoucher", self.evoucher), ("epin", self.epin)):
            breaker = client.guard.breaker
            state = breaker.state.name.lower() if breaker is not None else "off"
            if workers is not None:
                # The workers make the calls: the worst of their circuits (and this
                # process's, which settling uses) is the upstream's.
                states = [state, *workers.breaker_states(name)]
                state = min(states, key=_BREAKER_ORDER.index)
            recent = metrics.recent_requests.get(name) or metrics.Recent()
            also = workers.recent("requests", name) if workers is not None else []
            minutes = recent.per_minute(also=also)[-5:]
            ok = sum(m[1].get("ok", 0) for m in minutes)
            errors = sum(m[1].get("error", 0) for m in minutes)
            upstreams.append(
                {
                    "name": name,
                    "breaker": state,
                    "requests": ok + errors,
                    "error_rate": errors / (ok + errors) if ok + errors else 0.0,
                }
            )
        per_minute = metrics.recent_outcomes.per_minute(
            also=workers.recent("outcomes") if workers is not None else []
        )
        outcomes = [
            {"at": f"{datetime.fromtimestamp(at, UTC):%H:%M}", "counts": counts}
            for at, counts in per_minute
        ]
        totals: dict[str, int] = {}
        for _, counts in per_minute:
            for outcome, n in counts.items():
                totals[outcome] = totals.get(outcome, 0) + n
        return {
            "in_flight": self.dispatcher.in_flight,
            "partitions": [
                {
                    **dataclasses.asdict(p),
                    "busiest": [
                        {
                            "key": _key_text(lane.key),
                            "depth": lane.depth,
                            "running_s": lane.running_s,
                            "running_offset": lane.running_offset,
                        }
                        for lane in p.busiest
                    ],
                }
                for p in self.dispatcher.progress()
            ],
            "upstreams": upstreams,
            "outcomes": outcomes,
            "outcomes_peak": max((sum(counts.values()) for _, counts in per_minute), default=0),
            "outcome_totals": totals,
        }

    def probes(self) -> Probes:
        """What the health server (health.py) asks, and the registry `/metrics` serves."""
        settings = self.settings
        return Probes(
            watch=self.loop_watch,
            bounds=LivenessBounds(settings.liveness_loop_blocked_s, settings.liveness_poll_idle_s),
            readiness=self.readiness,
            poll_idle_s=self._poll_idle_s,
            registry=configure_metrics(),
            # Below the probes' timeout (the chart's is 6 s).
            readiness_timeout_s=5.0,
            console=console_app(
                self.console() if settings.console_users else None,
                Users(settings.console_users),
                ServiceLoop(lambda: self.loop_watch.loop),
            ),
        )

    def _poll_idle_s(self) -> float | None:
        """How long the consumer loop has not asked Kafka for records; None while it does not
        run (starting, waiting for the cluster, draining): there is nothing to judge then."""
        consumer = getattr(self.subscriber, "consumer", None)
        if consumer is None or not self.subscriber.running or self.dispatcher.closing:
            return None
        # aiokafka's own measure (what it leaves the group by after max_poll_interval_ms).
        subscription = getattr(consumer, "_subscription", None)
        idle = getattr(subscription, "fetcher_idle_time", None)
        return float(idle) if idle is not None else None

    def _describe(self, record: Record) -> str:
        """A record's command, for the stuck-record log line (decoded again: it is rare)."""
        lane = self._by_topic.get(record.topic)
        command = lane.pipeline.command_of(record) if lane is not None else None
        return f"{command.type} {command.id} of {command.subject}" if command else "not a command"

    def asyncapi_document(self) -> dict[str, Any]:
        """The AsyncAPI document: FastStream's of this app as the frame (info, servers, the
        channels' bindings), the contract's channels, messages and schemas in it. The
        subscriber takes the raw record (so that a malformed one still reaches the dead-letter
        path), so FastStream cannot see what the commands are."""
        frame: dict[str, Any] = self.specification().to_specification().to_jsonable()
        domains = [
            asyncapi.Domain(
                lane.name,
                lane.topics.commands,
                lane.topics.results,
                lane.topics.dead_letters,
                lane.command_types,
            )
            for lane in self.lanes
        ]
        return asyncapi.asyncapi_document(frame, domains, group_id=self.settings.kafka_group_id)

    def specification(self) -> AsyncAPI:
        return AsyncAPI(
            self.broker,
            title="voucher-bridge",
            version=__version__,
            description=asyncapi.DESCRIPTION,
        )

    def app(self) -> FastStream:
        configure_tracing()
        configure_metrics()
        return FastStream(
            self.broker,
            specification=self.specification(),
            on_startup=[self.on_startup],
            after_startup=[self.after_startup],
            on_shutdown=[self.on_shutdown],
            after_shutdown=[self.after_shutdown],
        )


# Circuit states, the worst first.
_BREAKER_ORDER = ["open", "half_open", "closed", "off"]


def console_limits(settings: Settings) -> Limits:
    return Limits(
        replay_max=settings.console_replay_max,
        replays_per_minute=settings.console_replays_per_minute,
        dlq_scan=settings.console_dlq_scan,
        show_pins=settings.coupon_result_pins == "shown",
        trace_url=settings.console_trace_url,
    )


def _key_text(key: bytes | None) -> str:
    if key is None:
        return "(no key)"
    try:
        return key.decode()
    except UnicodeDecodeError:
        return key.hex()
