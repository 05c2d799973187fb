"""Key-ordered concurrent processing of Kafka records, with commits that never skip work.

Neither FastStream nor aiokafka processes different keys of one partition concurrently while
keeping each key's order, and FastStream's `ack()` commits the consumer's whole position (see
shared/research/faststream-aiokafka.md §1.2-1.4). This module does both, in the manner of the
Confluent Parallel Consumer's KEY mode:

- records of one key (within a partition) run strictly one after another, in offset order;
- records of different keys run concurrently, up to `max_in_flight` records in all, shared
  out among the partitions held: a partition holding its share is paused until half of it
  is done (back-pressure), the others fetch on, so that records waiting in one partition (a
  coupon topic while Epin is down, a slow till's backlog) never stop another from being read;
- an offset is committed only when it and every earlier offset of its partition are finished;
- on revocation, the partition's running records (and any queued below the highest of them)
  finish, bounded in time; its finished offsets are committed, and what was queued above them
  is left for the next owner;
- on shutdown, the same for every partition;
- a job (settling an earlier command of the key) runs in the key's lane like a record, between
  its records, only on the instance the group gave the partition to.

A record is finished only when `process` returns; `process` is expected to handle every
failure of its own (dead letter, `failed` result). If it raises anyway (a bug), the record is
tried again a few times with backoff, then given up, logged and counted
(`voucher_bridge.records.abandoned`), so that one record never stops its partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from voucher_bridge import metrics
from voucher_bridge.kafka.offsets import PartitionOffsets
from voucher_bridge.kafka.records import Record

log = logging.getLogger(__name__)

_ATTEMPTS = 5

Process = Callable[[Record], Awaitable[None]]


@dataclass(frozen=True, eq=False)
class Job:
    """Work for a key's lane that is not a record (settling an earlier command of the key):
    it runs between the key's records, in the order it was added, and has no offset."""

    run: Callable[[], Awaitable[None]]
    topic: str
    partition: int


@dataclass(eq=False)
class _Lane:
    """The records (and jobs) of one key in one partition, run in order by one task."""

    items: deque[Record | Job] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    # When the item at the head began to run (monotonic), and whether it was reported stuck.
    started_at: float | None = None
    reported_stuck: bool = False

    def records(self) -> int:
        return sum(1 for item in self.items if not isinstance(item, Job))


@dataclass(frozen=True)
class LaneProgress:
    key: bytes | None
    depth: int  # records and jobs waiting or running
    running_s: float | None  # how long the item at its head has run
    running_offset: int | None  # that item's offset (None: a job)


@dataclass(frozen=True)
class PartitionProgress:
    """Where one partition stands, for readiness, metrics and operators."""

    topic: str
    partition: int
    in_flight: int
    lag: int | None  # the broker's high watermark minus where the commits stand
    committed: int | None
    oldest_unfinished_offset: int | None
    oldest_unfinished_age_s: float | None
    lanes: int
    busiest: tuple[LaneProgress, ...]  # the deepest lanes first


@dataclass(eq=False)
class _Partition:
    tp: TopicPartition
    offsets: PartitionOffsets = field(default_factory=PartitionOffsets)
    lanes: dict[bytes | None, _Lane] = field(default_factory=dict)
    revoked: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    paused: bool = False  # by back-pressure (fencing pauses apart from it)


class KeyOrderedDispatcher:
    def __init__(
        self,
        process: Process,
        *,
        max_in_flight: int = 1000,
        commit_interval_s: float = 0.2,
        drain_timeout_s: float = 30.0,
        commit_timeout_s: float = 10.0,
        stuck_after_s: float = 60.0,
        describe: Callable[[Record], str] | None = None,
        on_rebalance: Callable[[], None] | None = None,
        find_consumer: Callable[[], AIOKafkaConsumer | None] | None = None,
    ) -> None:
        self._process = process
        self._max_in_flight = max_in_flight
        self._commit_interval_s = commit_interval_s
        self._drain_timeout_s = drain_timeout_s
        self._commit_timeout_s = commit_timeout_s
        self._stuck_after_s = stuck_after_s
        # What a stuck record is (its command id), for the log line; only asked when stuck.
        self._describe = describe
        self._watcher: asyncio.Task[None] | None = None
        # The consumer before any record came from it (the one `submit` gets wins): the
        # watcher measures the lag of partitions nothing was read from yet through it.
        self._find_consumer = find_consumer
        # Per partition held but not read from yet: where this instance will read from (the
        # committed offset) and the lag from there, as the watcher last measured them.
        self._unread: dict[TopicPartition, tuple[int, int | None]] = {}
        # The last `progress()`, renewed by the watcher: what metric callbacks (which run on
        # other threads, the scrape's or the exporter's) read, never the live structures.
        self.snapshot: list[PartitionProgress] = []
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._assigned: set[TopicPartition] = set()  # by the group, as of the last rebalance
        # Read by other threads (metrics, probes): plain values, not the set.
        self.assigned_count = 0
        self.rebalanced = False  # the group has given this instance its share at least once
        # While fenced, nothing new is taken (see `fence`); per partition, the first offset
        # turned away, to read again from there once the fence is lifted.
        self._fence: str | None = None
        self._turned_away: dict[TopicPartition, int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._in_flight = 0
        # Each partition's share of max_in_flight, among the partitions assigned; None: to be
        # worked out again (after a rebalance).
        self._share: int | None = None
        self._closing = False
        self._commit_wanted = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._committer: asyncio.Task[None] | None = None
        self.on_rebalance = on_rebalance
        self.listener = _DrainOnRevoke(self)

    # -- intake, called by the consume loop in fetch order ------------------------------------

    async def submit(self, record: Record, consumer: AIOKafkaConsumer) -> None:
        """Accept a record for processing. Never waits: when its partition holds its share of
        `max_in_flight` it pauses fetching from it instead, so the consume loop keeps polling
        (a blocked handler would breach `max_poll_interval_ms` and lose the group membership)."""
        if self._closing:
            return  # not accepted, so not committed: the next consumer reads it again
        self._consumer = consumer
        if self._fence is not None:
            tp = TopicPartition(record.topic, record.partition)
            if tp not in self._turned_away:
                self._turned_away[tp] = record.offset
                consumer.pause(tp)
            return
        self._start_background()
        tp = TopicPartition(record.topic, record.partition)
        partition = self._partitions.get(tp)
        if partition is None:
            if tp not in consumer.assignment():
                return  # fetched before a revocation; no longer ours
            partition = self._partitions[tp] = _Partition(tp)
        if partition.revoked or not partition.offsets.accept(record.offset):
            return
        metrics.consumed.add(
            1,
            {
                "messaging.system": "kafka",
                "messaging.destination.name": record.topic,
                "messaging.destination.partition.id": str(record.partition),
            },
        )
        self._in_flight += 1
        if partition.offsets.in_flight >= self._share_of(consumer) and not partition.paused:
            partition.paused = True
            consumer.pause(tp)
        self._enqueue(partition, record.key, record)

    def _share_of(self, consumer: AIOKafkaConsumer) -> int:
        """What one partition may hold: an equal share of max_in_flight among the partitions
        assigned (a fixed share, not what the others leave unused, so that a partition that
        fills up never takes the room of one that is idle now; the total stays within
        max_in_flight), and at least one record."""
        if self._share is None:
            self._share = max(1, self._max_in_flight // max(1, len(consumer.assignment())))
        return self._share

    def _start_background(self) -> None:
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_loop(), name="offset-committer")
            self._watcher = asyncio.create_task(self._watch(), name="progress-watcher")

    def submit_job(
        self, topic: str, partition: int, key: bytes | None, job: Callable[[], Awaitable[None]]
    ) -> bool:
        """Run `job` in the lane of `key`, after what the lane holds now; False when the group
        has not given this instance that partition (the job is for its owner)."""
        tp = TopicPartition(topic, partition)
        if self._closing or tp not in self._assigned:
            return False
        owned = self._partitions.get(tp)
        if owned is None:
            owned = self._partitions[tp] = _Partition(tp)
        if owned.revoked:
            return False
        self._enqueue(owned, key, Job(job, topic, partition))
        return True

    def _enqueue(self, partition: _Partition, key: bytes | None, item: Record | Job) -> None:
        partition.idle.clear()
        lane = partition.lanes.get(key)
        if lane is not None:
            lane.items.append(item)
            return
        lane = partition.lanes[key] = _Lane(deque([item]))
        lane.task = asyncio.create_task(self._run_lane(partition, key, lane))

    def fence(self, reason: str) -> None:
        """Take nothing new until `unfence`: fetching pauses, and a record fetched meanwhile
        is turned away and read again afterwards (what runs already finishes)."""
        if self._fence is None:
            log.critical("taking no new records: %s", reason)
        self._fence = reason
        if self._consumer is not None:
            self._consumer.pause(*self._consumer.assignment())

    def unfence(self) -> None:
        if self._fence is None:
            return
        self._fence = None
        log.warning("taking records again")
        consumer = self._consumer
        if consumer is None:
            return
        for tp, offset in self._turned_away.items():
            if tp in consumer.assignment():
                consumer.seek(tp, offset)
        self._turned_away.clear()
        consumer.resume(
            *(
                tp
                for tp in consumer.assignment()
                if not ((p := self._partitions.get(tp)) is not None and p.paused)
            )
        )

    @property
    def fenced(self) -> str | None:
        return self._fence

    def owned_partitions(self) -> set[tuple[str, int]]:
        """The partitions the group gave this instance (as topic, partition)."""
        return {
            (tp.topic, tp.partition)
            for tp in self._assigned
            if not (p := self._partitions.get(tp)) or not p.revoked
        }

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def closing(self) -> bool:
        return self._closing

    def progress(self, busiest: int = 5) -> list[PartitionProgress]:
        """Each partition held now: lag, the oldest unfinished record, the busiest lanes."""
        now = time.monotonic()
        consumer = self._consumer
        found = []
        for tp, partition in sorted(self._partitions.items()):
            if partition.revoked:
                continue
            oldest = partition.offsets.oldest_unfinished()
            highwater = consumer.highwater(tp) if consumer is not None else None
            start = partition.offsets.start
            lanes = sorted(
                (
                    LaneProgress(
                        key,
                        len(lane.items),
                        None if lane.started_at is None else now - lane.started_at,
                        None if isinstance(head := lane.items[0], Job) else head.offset,
                    )
                    for key, lane in partition.lanes.items()
                    if lane.items
                ),
                key=lambda lane: (-lane.depth, -(lane.running_s or 0.0)),
            )
            if start is None:  # nothing read from it yet: as the watcher measured it
                committed, lag = self._unread.get(tp, (None, None))
            else:
                committed = partition.offsets.committed
                lag = None if highwater is None else max(0, highwater - start)
            found.append(
                PartitionProgress(
                    tp.topic,
                    tp.partition,
                    partition.offsets.in_flight,
                    lag,
                    committed,
                    oldest[0] if oldest else None,
                    now - oldest[1] if oldest else None,
                    len(partition.lanes),
                    tuple(lanes[:busiest]),
                )
            )
        seen = {TopicPartition(p.topic, p.partition) for p in found}
        for tp in sorted(self._assigned - seen):
            committed, lag = self._unread.get(tp, (None, None))
            found.append(
                PartitionProgress(tp.topic, tp.partition, 0, lag, committed, None, None, 0, ())
            )
        found.sort(key=lambda p: (p.topic, p.partition))
        return found

    async def _measure_unread(self) -> None:
        """The lag of partitions held but not read from yet (no record of theirs came since
        the assignment: an idle partition, or one paused since): the broker's high watermark
        (its last fetch answer's, or asked for) minus the position this instance reads from,
        which is the committed offset while nothing was read."""
        consumer = self._consumer or (self._find_consumer() if self._find_consumer else None)
        if consumer is None:
            return
        held = {
            tp
            for tp, p in self._partitions.items()
            if not p.revoked and p.offsets.start is not None
        }
        unread = sorted(tp for tp in self._assigned - held if tp in consumer.assignment())
        measured: dict[TopicPartition, tuple[int, int | None]] = {}
        try:
            async with asyncio.timeout(2.0):
                unknown = []
                for tp in unread:
                    position = await consumer.position(tp)
                    highwater = consumer.highwater(tp)
                    measured[tp] = (
                        position,
                        None if highwater is None else max(0, highwater - position),
                    )
                    if highwater is None:
                        unknown.append(tp)
                if unknown:
                    for tp, end in (await consumer.end_offsets(unknown)).items():
                        measured[tp] = (measured[tp][0], max(0, end - measured[tp][0]))
        except (TimeoutError, KafkaError) as exc:
            # A partition revoked meanwhile (IllegalStateError), a broker away: measured next
            # time; what was measured before it stands.
            log.debug("lag of partitions not read from: %s", exc)
        self._unread = measured

    async def _watch(self) -> None:
        """Renew `snapshot`, and say, once per record, when one runs longer than
        `stuck_after_s`: a command is bounded (COMMAND_TIMEOUT_S), but an SRE wants to know
        long before, and which."""
        interval = max(0.5, min(2.0, self._stuck_after_s / 4))
        while True:
            await asyncio.sleep(interval)
            await self._measure_unread()
            self.snapshot = self.progress()
            now = time.monotonic()
            for tp, partition in list(self._partitions.items()):
                for lane in partition.lanes.values():
                    if lane.reported_stuck or lane.started_at is None or not lane.items:
                        continue
                    head = lane.items[0]
                    if isinstance(head, Job) or now - lane.started_at < self._stuck_after_s:
                        continue
                    lane.reported_stuck = True
                    metrics.records_stuck.add(1, {"topic": tp.topic})
                    log.warning(
                        "%s[%d]@%d (%s) has run for %.0f s (STUCK_AFTER_S=%g)",
                        tp.topic,
                        tp.partition,
                        head.offset,
                        self._describe(head) if self._describe else "key " + repr(head.key),
                        now - lane.started_at,
                        self._stuck_after_s,
                    )

    # -- processing ---------------------------------------------------------------------------

    async def _run_lane(self, partition: _Partition, key: bytes | None, lane: _Lane) -> None:
        try:
            while lane.items:
                item = lane.items[0]
                lane.started_at, lane.reported_stuck = time.monotonic(), False
                if isinstance(item, Job):
                    await self._run_job(item)
                    lane.items.popleft()
                    continue
                await self._process_until_done(item)
                lane.items.popleft()
                partition.offsets.finish(item.offset)
                self._release(partition, 1)
                self._commit_wanted.set()
        except asyncio.CancelledError:
            if partition.revoked or self._closing or not lane.items:
                raise
            # Cancelled from outside a drain (nothing here does that): its records would be
            # left unanswered and its partition's commits stuck behind them, so it runs on.
            log.error(
                "the lane of %r on %s[%d] was cancelled outside a drain; starting it again",
                key,
                lane.items[0].topic,
                lane.items[0].partition,
            )
            metrics.lanes_restarted.add(1, {"topic": lane.items[0].topic})
            lane.task = asyncio.create_task(self._run_lane(partition, key, lane))
            return
        finally:
            if lane.task is asyncio.current_task():  # not handed on to a restarted task
                self._end_lane(partition, key, lane)

    def _end_lane(self, partition: _Partition, key: bytes | None, lane: _Lane) -> None:
        # Reached with records left only when cancelled by a drain that timed out: give back
        # their room; their offsets stay uncommitted for the next owner.
        if lane.items:
            self._release(partition, lane.records())
            lane.items.clear()
        if partition.lanes.get(key) is lane:
            del partition.lanes[key]
        if not partition.lanes:
            partition.idle.set()

    async def _run_job(self, job: Job) -> None:
        try:
            await job.run()
        except Exception:
            # A job's own failure is its own (settling is tried again later): never the lane's.
            log.exception("a job in %s[%d] failed", job.topic, job.partition)

    async def _process_until_done(self, record: Record) -> None:
        # `process` ends every record itself (a result or a dead letter; see pipeline.py) and
        # waits out a broker that takes nothing. What still raises is a bug: tried a few
        # times, then given up loudly, so that one record never holds up its partition.
        delay = 0.5
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                await self._process(record)
                return
            except Exception:
                log.exception(
                    "processing %s[%d]@%d failed (attempt %d of %d)",
                    record.topic,
                    record.partition,
                    record.offset,
                    attempt,
                    _ATTEMPTS,
                )
                if attempt < _ATTEMPTS:
                    await asyncio.sleep(delay)
                    delay *= 2
        log.error(
            "%s[%d]@%d given up after %d attempts: no result and no dead letter",
            record.topic,
            record.partition,
            record.offset,
            _ATTEMPTS,
        )
        metrics.records_abandoned.add(1, {"topic": record.topic})

    def _release(self, partition: _Partition, count: int) -> None:
        self._in_flight -= count
        # Resume below a low-water mark, not at the share, so fetching does not flap.
        consumer = self._consumer
        if (
            partition.paused
            and not (self._closing or partition.revoked)
            and consumer is not None
            and partition.offsets.in_flight <= self._share_of(consumer) // 2
        ):
            partition.paused = False
            if self._fence is None and partition.tp in consumer.assignment():
                consumer.resume(partition.tp)

    # -- commits ------------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            await self.commit(tp for tp, p in self._partitions.items() if not p.revoked)
            # Batch the commits of records finishing close together into one request.
            await asyncio.sleep(self._commit_interval_s)

    async def commit(self, tps: Iterable[TopicPartition]) -> None:
        """Commit the finished prefix of each partition in `tps` that has something new.

        Commits are serialised: were two to run at once (the committer and a drain), the
        older position could reach the group after the newer one and move it back.
        """
        consumer = self._consumer
        if consumer is None:
            return
        wanted = list(tps)
        async with self._commit_lock:
            offsets: dict[TopicPartition, int] = {}
            for tp in wanted:
                partition = self._partitions.get(tp)
                position = partition.offsets.committable() if partition else None
                if position is not None:
                    offsets[tp] = position
            if not offsets:
                return
            try:
                await asyncio.wait_for(consumer.commit(offsets), self._commit_timeout_s)
            except (KafkaError, TimeoutError) as exc:
                # The offsets stay uncommitted and are tried again; if the group moved the
                # partition, its next owner re-reads them (the store answers them again).
                log.warning("offset commit failed (%s): %s", type(exc).__name__, offsets)
                metrics.commit_failures.add(1, {"error.type": type(exc).__name__})
                self._commit_wanted.set()  # try again after the interval
                return
            metrics.commits.add(1)
            for tp, position in offsets.items():
                partition = self._partitions.get(tp)
                if partition is not None:
                    partition.offsets.committed = position

    # -- revocation and shutdown --------------------------------------------------------------

    async def drain(self, tps: list[TopicPartition]) -> None:
        """Let the running records of `tps` finish, commit them, and forget those partitions."""
        partitions = [(tp, p) for tp in tps if (p := self._partitions.get(tp)) is not None]
        for _, partition in partitions:
            partition.revoked = True
            self._drop_queued_above_running(partition)
        waits = [p.idle.wait() for _, p in partitions if p.lanes]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), self._drain_timeout_s)
            except TimeoutError:
                stuck = [lane.task for _, p in partitions for lane in p.lanes.values()]
                log.error("drain timed out; abandoning %d running records", len(stuck))
                for task in stuck:
                    if task is not None:
                        task.cancel()
                await asyncio.gather(*(t for t in stuck if t), return_exceptions=True)
        await self.commit(tp for tp, _ in partitions)
        for tp, _ in partitions:
            self._partitions.pop(tp, None)

    def _drop_queued_above_running(self, partition: _Partition) -> None:
        """Leave for the next owner what has not started, but only above the highest record
        running or finished: every record below that must finish too, or a finished record
        would sit above an unfinished one, answered but uncommittable, and be answered again."""
        if not partition.lanes:
            return
        running = [
            lane.items[0].offset
            for lane in partition.lanes.values()
            if not isinstance(lane.items[0], Job)
        ]
        finished = partition.offsets.highest_finished_ahead()
        keep_up_to = max([*running, *([finished] if finished is not None else [])], default=-1)
        for lane in partition.lanes.values():
            dropped = 0
            # Jobs not started are left too: the next owner's settling queues them again.
            while len(lane.items) > 1 and (
                isinstance(last := lane.items[-1], Job) or last.offset > keep_up_to
            ):
                lane.items.pop()
                dropped += 0 if isinstance(last, Job) else 1
            if dropped:
                self._release(partition, dropped)

    async def close(self) -> None:
        """Stop accepting, finish what runs (bounded), commit it. Call before the consumer stops."""
        self._closing = True
        await self.drain(list(self._partitions))
        for task in (self._committer, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


class _DrainOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka awaits this before it rejoins the group, so draining here hands over cleanly."""

    def __init__(self, dispatcher: KeyOrderedDispatcher) -> None:
        self._dispatcher = dispatcher

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._dispatcher._assigned.difference_update(revoked)
        self._dispatcher._share = None  # shared out among what is held after the rebalance
        self._dispatcher.assigned_count = len(self._dispatcher._assigned)
        for tp in revoked:  # its next owner reads from the committed offset anyway
            self._dispatcher._turned_away.pop(tp, None)
        if revoked:
            await self._dispatcher.drain(list(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._dispatcher._assigned.update(assigned)
        self._dispatcher._share = None
        self._dispatcher.assigned_count = len(self._dispatcher._assigned)
        self._dispatcher.rebalanced = True
        self._dispatcher._start_background()
        if self._dispatcher.on_rebalance is not None:
            self._dispatcher.on_rebalance()
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
