"""KeyOrderedDispatcher with a fake consumer: key order, concurrency, commits, back-pressure,
revocation and shutdown."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from voucher_bridge.kafka.dispatcher import KeyOrderedDispatcher

TOPIC = "pos.commands"
TP0 = TopicPartition(TOPIC, 0)
TP1 = TopicPartition(TOPIC, 1)
TP2 = TopicPartition(TOPIC, 2)


@dataclass(frozen=True)
class FakeRecord:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


def rec(offset: int, key: str | None = "k", partition: int = 0) -> FakeRecord:
    return FakeRecord(
        topic=TOPIC,
        partition=partition,
        offset=offset,
        timestamp=1_700_000_000_000 + offset,
        key=key.encode() if key is not None else None,
        value=b"{}",
    )


class FakeConsumer:
    """What the dispatcher uses of AIOKafkaConsumer, recorded."""

    def __init__(self, *assigned: TopicPartition) -> None:
        self.assigned = set(assigned)
        self.pauses: list[set[TopicPartition]] = []
        self.resumes: list[set[TopicPartition]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.commits: list[dict[TopicPartition, int]] = []
        self.fail_commits = 0
        self.check: Callable[[dict[TopicPartition, int]], None] | None = None
        self.ends: dict[TopicPartition, int] = {}  # the broker's end offsets, per partition

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None:
        self.pauses.append(set(tps))

    def resume(self, *tps: TopicPartition) -> None:
        self.resumes.append(set(tps))

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.check is not None:
            self.check(offsets)
        await asyncio.sleep(0)
        if self.fail_commits:
            self.fail_commits -= 1
            raise KafkaError("coordinator not available")
        self.commits.append(dict(offsets))

    def committed(self, tp: TopicPartition) -> int | None:
        found = None
        for commit in self.commits:
            found = commit.get(tp, found)
        return found

    # What the watcher asks of partitions nothing was read from (their lag).
    async def position(self, tp: TopicPartition) -> int:
        return self.committed(tp) or 0

    def highwater(self, tp: TopicPartition) -> int | None:
        return None

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.ends.get(tp, 0) for tp in tps}

    def all_committed(self, tp: TopicPartition) -> list[int]:
        return [commit[tp] for commit in self.commits if tp in commit]

    @property
    def as_consumer(self) -> AIOKafkaConsumer:
        return cast(AIOKafkaConsumer, self)


@dataclass
class Processor:
    """A `process` callable: optional gates per record, delays, concurrency bookkeeping."""

    delay: Callable[[FakeRecord], float] = lambda record: 0.0
    gates: dict[tuple[int, int], asyncio.Event] = field(default_factory=dict)
    fail_once: set[tuple[int, int]] = field(default_factory=set)
    fail_always: set[tuple[int, int]] = field(default_factory=set)
    started: list[FakeRecord] = field(default_factory=list)
    done: list[FakeRecord] = field(default_factory=list)
    cancelled: list[FakeRecord] = field(default_factory=list)
    calls: int = 0
    running: int = 0
    max_running: int = 0
    running_per_key: dict[tuple[int, bytes | None], int] = field(
        default_factory=lambda: defaultdict(int)
    )
    max_per_key: int = 0

    def gate(self, offset: int, partition: int = 0) -> asyncio.Event:
        event = self.gates[(partition, offset)] = asyncio.Event()
        return event

    def open_all(self) -> None:
        for event in self.gates.values():
            event.set()

    def done_offsets(self, partition: int = 0) -> list[int]:
        return [r.offset for r in self.done if r.partition == partition]

    def is_done(self, partition: int, offset: int) -> bool:
        return any(r.partition == partition and r.offset == offset for r in self.done)

    async def __call__(self, record: Any) -> None:
        assert isinstance(record, FakeRecord)
        self.calls += 1
        where = (record.partition, record.offset)
        lane = (record.partition, record.key)
        self.started.append(record)
        self.running += 1
        self.running_per_key[lane] += 1
        self.max_running = max(self.max_running, self.running)
        self.max_per_key = max(self.max_per_key, self.running_per_key[lane])
        try:
            if where in self.fail_once:
                self.fail_once.discard(where)
                raise RuntimeError("transient")
            if where in self.fail_always:
                raise RuntimeError("a bug")
            gate = self.gates.get(where)
            if gate is not None:
                await gate.wait()
            delay = self.delay(record)
            await asyncio.sleep(delay)
            self.done.append(record)
        except asyncio.CancelledError:
            self.cancelled.append(record)
            raise
        finally:
            self.running -= 1
            self.running_per_key[lane] -= 1


async def wait_until(condition: Callable[[], bool], within: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


async def settle(seconds: float = 0.02) -> None:
    """Give the lanes and the commit loop time to do whatever they would do."""
    await asyncio.sleep(seconds)


@pytest.fixture
async def setup() -> AsyncIterator[Callable[..., tuple[KeyOrderedDispatcher, Processor]]]:
    made: list[tuple[KeyOrderedDispatcher, Processor]] = []

    def make(
        processor: Processor | None = None, **kw: Any
    ) -> tuple[KeyOrderedDispatcher, Processor]:
        processor = processor or Processor()
        kw.setdefault("commit_interval_s", 0.001)
        kw.setdefault("drain_timeout_s", 2.0)
        dispatcher = KeyOrderedDispatcher(processor, **kw)
        made.append((dispatcher, processor))
        return dispatcher, processor

    yield make
    for dispatcher, processor in made:
        processor.open_all()
        await asyncio.wait_for(dispatcher.close(), 3)


async def submit_all(
    dispatcher: KeyOrderedDispatcher, consumer: FakeConsumer, records: Iterable[FakeRecord]
) -> None:
    for record in records:
        await dispatcher.submit(record, consumer.as_consumer)


def prefix_checker(
    processor: Processor,
) -> Callable[[dict[TopicPartition, int]], None]:
    """A commit must never pass an offset that is not finished."""

    def check(offsets: dict[TopicPartition, int]) -> None:
        for tp, position in offsets.items():
            finished = set(processor.done_offsets(tp.partition))
            submitted = {r.offset for r in processor.started if r.partition == tp.partition}
            for offset in submitted:
                if offset < position:
                    assert offset in finished, f"{tp} committed {position} past {offset}"

    return check


# -- order and concurrency -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_per_key_order_under_random_processing_delays(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]], seed: int
) -> None:
    rng = random.Random(seed)
    delays: dict[tuple[int, int], float] = {}
    processor = Processor(delay=lambda record: delays[(record.partition, record.offset)])
    dispatcher, _ = setup(processor, max_in_flight=10_000)
    consumer = FakeConsumer(TP0, TP1)
    consumer.check = prefix_checker(processor)
    records = []
    for partition in (0, 1):
        for offset in range(120):
            key = f"terminal-{rng.randrange(6)}"
            delays[(partition, offset)] = rng.uniform(0, 0.003)
            records.append(rec(offset, key, partition))
    records.sort(key=lambda r: (r.offset, r.partition))  # the partitions interleave
    await submit_all(dispatcher, consumer, records)

    await wait_until(lambda: len(processor.done) == len(records))
    by_lane: dict[tuple[int, bytes | None], list[int]] = defaultdict(list)
    for record in processor.done:
        by_lane[(record.partition, record.key)].append(record.offset)
    for offsets in by_lane.values():
        assert offsets == sorted(offsets)
    started_by_lane: dict[tuple[int, bytes | None], list[int]] = defaultdict(list)
    for record in processor.started:
        started_by_lane[(record.partition, record.key)].append(record.offset)
    assert started_by_lane == by_lane
    assert processor.max_per_key == 1  # one key never runs two records at once
    assert processor.max_running > 1  # different keys did overlap
    assert processor.calls == len(records)
    await wait_until(lambda: consumer.committed(TP0) == 120 and consumer.committed(TP1) == 120)
    for tp in (TP0, TP1):
        positions = consumer.all_committed(tp)
        assert positions == sorted(positions)  # commits never go back
    assert dispatcher.in_flight == 0


async def test_different_keys_overlap(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, processor = setup()
    consumer = FakeConsumer(TP0)
    gate = processor.gate(0)
    await submit_all(dispatcher, consumer, [rec(0, "a"), rec(1, "b"), rec(2, "c")])
    await wait_until(
        lambda: processor.done_offsets() == [1, 2] or processor.done_offsets() == [2, 1]
    )
    assert processor.running == 1  # "a" is still running while "b" and "c" finished
    gate.set()
    await wait_until(lambda: len(processor.done) == 3)


async def test_same_key_waits_for_its_predecessor(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, processor = setup()
    consumer = FakeConsumer(TP0)
    gate = processor.gate(0)
    await submit_all(dispatcher, consumer, [rec(0, "a"), rec(1, "a"), rec(2, "b"), rec(3, "a")])
    await wait_until(lambda: processor.done_offsets() == [2])
    await settle()
    assert [r.offset for r in processor.started] == [0, 2]
    assert dispatcher.in_flight == 3
    gate.set()
    await wait_until(lambda: len(processor.done) == 4)
    assert [r.offset for r in processor.done if r.key == b"a"] == [0, 1, 3]


async def test_keyless_records_run_in_order(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    processor = Processor(delay=lambda record: 0.002 if record.offset % 2 == 0 else 0.0)
    dispatcher, _ = setup(processor)
    consumer = FakeConsumer(TP0)
    await submit_all(dispatcher, consumer, [rec(i, None) for i in range(6)])
    await wait_until(lambda: len(processor.done) == 6)
    assert processor.done_offsets() == list(range(6))
    assert processor.max_running == 1


# -- commits -------------------------------------------------------------------------------------


async def test_commits_never_pass_an_unfinished_offset(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, processor = setup()
    consumer = FakeConsumer(TP0)
    consumer.check = prefix_checker(processor)
    slow = processor.gate(0)
    await submit_all(
        dispatcher, consumer, [rec(0, "slow")] + [rec(i, f"k{i}") for i in range(1, 10)]
    )
    await wait_until(lambda: sorted(processor.done_offsets()) == list(range(1, 10)))
    await settle(0.03)
    assert all(position <= 0 for position in consumer.all_committed(TP0))
    assert dispatcher.in_flight == 1
    slow.set()
    await wait_until(lambda: consumer.committed(TP0) == 10)
    assert dispatcher.in_flight == 0


async def test_partitions_commit_independently(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, processor = setup()
    consumer = FakeConsumer(TP0, TP1)
    slow = processor.gate(0, partition=0)
    await submit_all(
        dispatcher,
        consumer,
        [rec(0, "a", 0), rec(1, "b", 0), rec(0, "a", 1), rec(1, "b", 1), rec(2, "a", 1)],
    )
    await wait_until(lambda: consumer.committed(TP1) == 3)
    assert all(position <= 0 for position in consumer.all_committed(TP0))
    slow.set()
    await wait_until(lambda: consumer.committed(TP0) == 2)


async def test_nothing_new_is_not_committed_again(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, _ = setup()
    consumer = FakeConsumer(TP0)
    await submit_all(dispatcher, consumer, [rec(0), rec(1)])
    await wait_until(lambda: consumer.committed(TP0) == 2)
    count = len(consumer.commits)
    await dispatcher.commit([TP0])
    await settle()
    assert len(consumer.commits) == count


async def test_failed_commit_is_retried_by_itself(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    """A partition that goes idle after a failed commit still gets its offset committed."""
    dispatcher, _ = setup()
    consumer = FakeConsumer(TP0)
    consumer.fail_commits = 1
    await submit_all(dispatcher, consumer, [rec(0)])
    await wait_until(lambda: consumer.fail_commits == 0)
    await wait_until(lambda: consumer.committed(TP0) == 1)


async def test_failed_commit_is_retried_at_drain(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, _ = setup()
    consumer = FakeConsumer(TP0)
    consumer.fail_commits = 1
    await submit_all(dispatcher, consumer, [rec(0)])
    await wait_until(lambda: consumer.fail_commits == 0)
    await dispatcher.drain([TP0])
    assert consumer.committed(TP0) == 1


async def test_commit_without_a_consumer_does_nothing(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, _ = setup()
    await dispatcher.commit([TP0])  # nothing submitted yet: no consumer known


async def test_a_record_that_raises_is_retried_not_skipped(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    processor = Processor(fail_once={(0, 0)})
    dispatcher, _ = setup(processor)
    consumer = FakeConsumer(TP0)
    consumer.check = prefix_checker(processor)
    await submit_all(dispatcher, consumer, [rec(0, "a"), rec(1, "a"), rec(2, "b")])
    await wait_until(lambda: processor.done_offsets() == [2])
    assert all(position <= 0 for position in consumer.all_committed(TP0))
    # The dispatcher backs off 0.5 s before the retry.
    await wait_until(lambda: len(processor.done) == 3, within=3)
    assert [r.offset for r in processor.started] == [0, 2, 0, 1]
    await wait_until(lambda: consumer.committed(TP0) == 3)


async def test_a_record_that_always_raises_is_given_up_and_the_partition_moves_on(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from voucher_bridge.kafka import dispatcher as module

    monkeypatch.setattr(module, "_ATTEMPTS", 2)
    processor = Processor(fail_always={(0, 0)})
    dispatcher, _ = setup(processor)
    consumer = FakeConsumer(TP0)
    await submit_all(dispatcher, consumer, [rec(0, "a"), rec(1, "a"), rec(2, "b")])
    # Tried twice (0.5 s apart), then given up: the key's next record runs, commits go on.
    await wait_until(lambda: consumer.committed(TP0) == 3, within=5)
    assert [r.offset for r in processor.started].count(0) == 2
    assert processor.done_offsets() == [2, 1]


async def test_a_lane_cancelled_outside_a_drain_starts_again(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    processor = Processor()
    gate = processor.gate(0)
    dispatcher, _ = setup(processor)
    consumer = FakeConsumer(TP0)
    await submit_all(dispatcher, consumer, [rec(0, "a"), rec(1, "a")])
    await wait_until(lambda: len(processor.started) == 1)
    [lane] = dispatcher._partitions[TP0].lanes.values()
    assert lane.task is not None
    lane.task.cancel()  # killed, as by a bug elsewhere
    await wait_until(lambda: len(processor.started) == 2)  # the record starts again
    gate.set()
    await wait_until(lambda: consumer.committed(TP0) == 2)
    assert processor.done_offsets() == [0, 1]


async def test_a_job_runs_in_its_keys_lane_between_its_records(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    processor = Processor()
    gate = processor.gate(0)
    dispatcher, _ = setup(processor)
    consumer = FakeConsumer(TP0)
    # Not assigned to this instance (yet): the job is for the partition's owner.
    assert not dispatcher.submit_job(TP0.topic, TP0.partition, b"a", _noop)
    await dispatcher.listener.on_partitions_assigned([TP0])
    order: list[str] = []

    async def job() -> None:
        order.append(f"job after {[r.offset for r in processor.done]}")

    await submit_all(dispatcher, consumer, [rec(0, "a")])
    assert dispatcher.submit_job(TP0.topic, TP0.partition, b"a", job)
    await submit_all(dispatcher, consumer, [rec(1, "a"), rec(2, "b")])
    await wait_until(lambda: processor.done_offsets() == [2])  # another key is not held up
    assert order == []  # the job waits for the record before it
    gate.set()
    await wait_until(lambda: consumer.committed(TP0) == 3)
    assert order == ["job after [2, 0]"]  # after record 0, before record 1
    assert processor.done_offsets() == [2, 0, 1]


async def test_a_job_that_fails_does_not_stop_its_lane(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, _ = setup()
    consumer = FakeConsumer(TP0)
    await dispatcher.listener.on_partitions_assigned([TP0])

    async def broken() -> None:
        raise RuntimeError("a bug")

    assert dispatcher.submit_job(TP0.topic, TP0.partition, b"a", broken)
    await submit_all(dispatcher, consumer, [rec(0, "a")])
    await wait_until(lambda: consumer.committed(TP0) == 1)


async def test_a_revoked_partition_takes_no_jobs_and_drops_those_not_started(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    processor = Processor()
    gate = processor.gate(0)
    dispatcher, _ = setup(processor)
    consumer = FakeConsumer(TP0)
    await dispatcher.listener.on_partitions_assigned([TP0])
    ran: list[str] = []

    async def job() -> None:
        ran.append("job")

    await submit_all(dispatcher, consumer, [rec(0, "a")])
    assert dispatcher.submit_job(TP0.topic, TP0.partition, b"a", job)
    revoking = asyncio.create_task(dispatcher.listener.on_partitions_revoked([TP0]))
    await asyncio.sleep(0.01)
    gate.set()
    await revoking
    assert ran == []  # left for the next owner's settling
    assert not dispatcher.submit_job(TP0.topic, TP0.partition, b"a", job)
    assert consumer.committed(TP0) == 1


async def _noop() -> None:
    return None


async def test_while_fenced_nothing_new_is_taken_and_it_is_read_again_after(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, processor = setup()
    consumer = FakeConsumer(TP0, TP1)
    await submit_all(dispatcher, consumer, [rec(0, "a")])
    await wait_until(lambda: consumer.committed(TP0) == 1)
    dispatcher.fence("a member of another store")
    assert consumer.pauses[-1] == {TP0, TP1}
    await submit_all(dispatcher, consumer, [rec(1, "a"), rec(2, "b"), rec(5, "c", partition=1)])
    await asyncio.sleep(0.05)
    assert processor.done_offsets() == [0] and dispatcher.fenced
    dispatcher.unfence()
    # Read again from the first record turned away in each partition.
    assert sorted(consumer.seeks) == sorted([(TP0, 1), (TP1, 5)])
    assert consumer.resumes[-1] == {TP0, TP1}
    await submit_all(dispatcher, consumer, [rec(1, "a"), rec(2, "b")])
    await wait_until(lambda: consumer.committed(TP0) == 3)


async def test_lifting_a_fence_leaves_a_full_partition_paused_until_it_has_room(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    """A fence pauses everything and its end resumes only what back-pressure has not paused;
    a partition that got its room back while fenced is resumed when the fence is lifted."""
    dispatcher, processor = setup(max_in_flight=4)  # 2 each
    consumer = FakeConsumer(TP0, TP1)
    gates = [processor.gate(i) for i in range(2)]
    await submit_all(dispatcher, consumer, [rec(0, "a"), rec(1, "b")])
    assert consumer.pauses == [{TP0}]
    dispatcher.fence("a member of another store")
    dispatcher.unfence()
    assert consumer.resumes[-1] == {TP1}  # TP0 still holds its share
    dispatcher.fence("again")
    for gate in gates:
        gate.set()
    await wait_until(lambda: dispatcher.in_flight == 0)
    assert consumer.resumes[-1] == {TP1}  # room again, but fenced: not resumed yet
    dispatcher.unfence()
    assert consumer.resumes[-1] == {TP0, TP1}


# -- intake --------------------------------------------------------------------------------------


async def test_refetched_record_is_processed_once(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, processor = setup()
    consumer = FakeConsumer(TP0)
    await submit_all(dispatcher, consumer, [rec(0), rec(1), rec(0), rec(1)])
    await wait_until(lambda: consumer.committed(TP0) == 2)
    await submit_all(dispatcher, consumer, [rec(1)])
    await settle()
    assert processor.done_offsets() == [0, 1]
    assert dispatcher.in_flight == 0


async def test_record_of_an_unassigned_partition_is_ignored(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, processor = setup()
    consumer = FakeConsumer(TP0)
    await submit_all(dispatcher, consumer, [rec(0, partition=1)])
    await settle()
    assert processor.started == []
    assert dispatcher.in_flight == 0
    assert consumer.commits == []


# -- back-pressure -------------------------------------------------------------------------------


async def test_a_partition_holding_its_share_is_paused_alone_and_resumed_at_half(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    """Two partitions share max_in_flight (8): 4 each. The one whose records wait is paused
    at 4 and resumed at 2; the other is never paused and its records run meanwhile."""
    dispatcher, processor = setup(max_in_flight=8)
    consumer = FakeConsumer(TP0, TP1)
    gates = [processor.gate(i) for i in range(6)]
    await submit_all(dispatcher, consumer, [rec(i, f"k{i}") for i in range(3)])
    assert dispatcher.in_flight == 3
    assert consumer.pauses == []
    await submit_all(dispatcher, consumer, [rec(3, "k3")])
    assert dispatcher.in_flight == 4
    assert consumer.pauses == [{TP0}]
    # Records fetched already are still taken (submit never blocks), with no second pause.
    await submit_all(dispatcher, consumer, [rec(4, "k4"), rec(5, "k5")])
    assert dispatcher.in_flight == 6
    assert consumer.pauses == [{TP0}]
    # The other partition goes on: its records run while the first one's wait.
    await submit_all(dispatcher, consumer, [rec(i, f"o{i}", partition=1) for i in range(3)])
    await wait_until(lambda: processor.done_offsets(1) == [0, 1, 2])
    assert consumer.pauses == [{TP0}] and consumer.resumes == []

    for index, in_flight in [(0, 5), (1, 4), (2, 3)]:
        gates[index].set()
        await wait_until(lambda: dispatcher.in_flight == in_flight)  # noqa: B023
        assert consumer.resumes == []
    gates[3].set()
    await wait_until(lambda: dispatcher.in_flight == 2)
    assert consumer.resumes == [{TP0}]
    gates[4].set()
    gates[5].set()
    await wait_until(lambda: dispatcher.in_flight == 0)
    assert consumer.resumes == [{TP0}]
    assert consumer.pauses == [{TP0}]
    # And it pauses again when full again.
    more = [processor.gate(i) for i in range(6, 10)]
    await submit_all(dispatcher, consumer, [rec(i, f"k{i}") for i in range(6, 10)])
    assert consumer.pauses == [{TP0}, {TP0}]
    for gate in more:
        gate.set()
    await wait_until(lambda: len(consumer.resumes) == 2)


async def test_the_share_follows_the_partitions_assigned(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    """The share is worked out again at each rebalance: 6 among three partitions is 2 each,
    then 3 each when one of them goes; never less than one record, however many partitions."""
    dispatcher, processor = setup(max_in_flight=6)
    consumer = FakeConsumer(TP0, TP1, TP2)
    await dispatcher.listener.on_partitions_assigned([TP0, TP1, TP2])
    first = [processor.gate(i, partition=1) for i in range(2)]
    await submit_all(dispatcher, consumer, [rec(i, f"k{i}", partition=1) for i in range(2)])
    assert consumer.pauses == [{TP1}]
    for gate in first:
        gate.set()
    await dispatcher.listener.on_partitions_revoked([TP0, TP1, TP2])
    consumer.assigned = {TP1, TP2}
    await dispatcher.listener.on_partitions_assigned([TP1, TP2])
    later = [processor.gate(i, partition=1) for i in range(2, 5)]
    await submit_all(dispatcher, consumer, [rec(i, f"k{i}", partition=1) for i in range(2, 4)])
    assert consumer.pauses == [{TP1}]  # 2 of 3
    await submit_all(dispatcher, consumer, [rec(4, "k4", partition=1)])
    assert consumer.pauses == [{TP1}, {TP1}]
    for gate in later:
        gate.set()

    tiny, _ = setup(max_in_flight=1)
    crowded = FakeConsumer(TP0, TP1, TP2)
    await submit_all(tiny, crowded, [rec(0, "a"), rec(0, "b", partition=1)])
    assert crowded.pauses == [{TP0}, {TP1}]


async def test_same_key_records_count_towards_max_in_flight(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, processor = setup(max_in_flight=3)
    consumer = FakeConsumer(TP0)
    gate = processor.gate(0)
    await submit_all(dispatcher, consumer, [rec(0), rec(1), rec(2)])
    assert consumer.pauses == [{TP0}]
    gate.set()
    await wait_until(lambda: consumer.resumes == [{TP0}])


# -- revocation ----------------------------------------------------------------------------------


async def test_drain_finishes_what_lies_below_a_finished_record(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    """5 finished while 0 and 3 run: 1, 2 and 4 must finish too, or 5 would be answered but
    never committed (and answered again by the next owner)."""
    dispatcher, processor = setup()
    consumer = FakeConsumer(TP0, TP1)
    consumer.check = prefix_checker(processor)
    head_a, head_b = processor.gate(0), processor.gate(3)
    other = processor.gate(0, partition=1)
    await submit_all(
        dispatcher,
        consumer,
        [
            rec(0, "a"),
            rec(1, "a"),
            rec(2, "a"),
            rec(3, "b"),
            rec(4, "b"),
            rec(5, "c"),
            rec(0, "a", 1),
            rec(1, "a", 1),
        ],
    )
    await wait_until(lambda: processor.done_offsets() == [5])
    assert dispatcher.in_flight == 7

    drain = asyncio.create_task(dispatcher.drain([TP0]))
    await settle()
    assert not drain.done()  # waits for the running heads
    assert dispatcher.in_flight == 7  # nothing of TP0 given up: all of it lies below 5
    # A record of the revoked partition fetched late is not taken.
    await submit_all(dispatcher, consumer, [rec(6, "d")])
    assert dispatcher.in_flight == 7

    head_a.set()
    head_b.set()
    await asyncio.wait_for(drain, 1)
    assert sorted(processor.done_offsets(0)) == [0, 1, 2, 3, 4, 5]
    assert consumer.committed(TP0) == 6
    other.set()


async def test_drain_gives_up_queued_records_above_everything_running(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, processor = setup()
    consumer = FakeConsumer(TP0)
    consumer.check = prefix_checker(processor)
    head_a, head_b = processor.gate(0), processor.gate(1)
    await submit_all(dispatcher, consumer, [rec(0, "a"), rec(1, "b"), rec(4, "a"), rec(5, "a")])
    await settle()
    drain = asyncio.create_task(dispatcher.drain([TP0]))
    await settle()
    assert dispatcher.in_flight == 2  # 4 and 5 go to the next owner
    head_a.set()
    head_b.set()
    await asyncio.wait_for(drain, 1)
    assert sorted(processor.done_offsets(0)) == [0, 1]
    assert consumer.committed(TP0) == 4  # offsets 2 and 3 do not exist; 4 is next to read


async def test_drain_of_an_idle_or_unknown_partition(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, _ = setup()
    consumer = FakeConsumer(TP0)
    await submit_all(dispatcher, consumer, [rec(0)])
    await wait_until(lambda: consumer.committed(TP0) == 1)
    await asyncio.wait_for(dispatcher.drain([TP0, TP1]), 1)
    assert consumer.committed(TP0) == 1


async def test_drain_timeout_abandons_the_running_record(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, processor = setup(drain_timeout_s=0.05)
    consumer = FakeConsumer(TP0)
    processor.gate(1)  # never opened
    await submit_all(dispatcher, consumer, [rec(0, "a"), rec(1, "b"), rec(2, "b")])
    await wait_until(lambda: processor.done_offsets() == [0])
    await asyncio.wait_for(dispatcher.drain([TP0]), 1)
    assert [r.offset for r in processor.cancelled] == [1]
    assert dispatcher.in_flight == 0
    assert consumer.committed(TP0) == 1  # 0 finished; 1 was abandoned, so not past it


async def test_revoke_listener_drains(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, processor = setup()
    consumer = FakeConsumer(TP0)
    gate = processor.gate(0)
    await submit_all(dispatcher, consumer, [rec(0), rec(1)])
    revoked = asyncio.create_task(dispatcher.listener.on_partitions_revoked([TP0]))
    await settle()
    assert not revoked.done()
    gate.set()
    await asyncio.wait_for(revoked, 1)
    assert processor.done_offsets() == [0]
    assert consumer.committed(TP0) == 1
    await dispatcher.listener.on_partitions_revoked([])
    await dispatcher.listener.on_partitions_assigned([TP0, TP1])


# -- shutdown ------------------------------------------------------------------------------------


async def test_close_stops_accepting_and_commits_what_finished(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, processor = setup(max_in_flight=2)
    consumer = FakeConsumer(TP0, TP1)
    gate = processor.gate(0)
    await submit_all(dispatcher, consumer, [rec(0, "a"), rec(1, "a"), rec(0, "x", 1)])
    await wait_until(lambda: processor.done_offsets(1) == [0])
    assert consumer.pauses == [{TP0}, {TP1}]  # a share of 1 each
    assert consumer.resumes == [{TP1}]  # its record done, before the close

    closing = asyncio.create_task(dispatcher.close())
    await settle()
    assert not closing.done()
    await submit_all(dispatcher, consumer, [rec(2, "b"), rec(1, "x", 1)])
    gate.set()
    await asyncio.wait_for(closing, 1)

    assert processor.done_offsets(0) == [0]  # the queued 1 and the late 2 were not taken
    assert processor.done_offsets(1) == [0]
    assert consumer.committed(TP0) == 1
    assert consumer.committed(TP1) == 1
    assert dispatcher.in_flight == 0
    assert consumer.resumes == [{TP1}]  # a consumer about to stop is not resumed

    count, started = len(consumer.commits), len(processor.started)
    await submit_all(dispatcher, consumer, [rec(3, "c")])
    await settle()
    assert len(processor.started) == started
    assert len(consumer.commits) == count


async def test_submit_after_close_starts_nothing(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, processor = setup()
    await dispatcher.close()
    await submit_all(dispatcher, FakeConsumer(TP0), [rec(0)])
    committer = dispatcher._committer
    try:
        assert processor.started == []
        assert committer is None or committer.done()
    finally:
        if committer is not None:
            committer.cancel()


# -- progress, for readiness, metrics and operators ----------------------------------------------


class WatermarkConsumer(FakeConsumer):
    def __init__(self, *assigned: TopicPartition, highwater: int) -> None:
        super().__init__(*assigned)
        self._highwater = highwater

    def highwater(self, tp: TopicPartition) -> int:
        return self._highwater


async def test_progress_measures_the_lag_of_partitions_nothing_was_read_from(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    # An idle partition, or one paused since its assignment, still has a lag: an SRE's alert
    # on lag must not miss the partition this instance never got to.
    consumer = FakeConsumer(TP0, TP1)
    consumer.commits.append({TP0: 3})
    consumer.ends = {TP0: 10, TP1: 4}
    dispatcher, _ = setup(stuck_after_s=1.0, find_consumer=lambda: consumer.as_consumer)
    await dispatcher.listener.on_partitions_assigned([TP0, TP1])
    await wait_until(
        lambda: [p.lag for p in dispatcher.snapshot] not in ([], [None, None]), within=5
    )
    found = {p.partition: (p.committed, p.lag, p.in_flight) for p in dispatcher.progress()}
    assert found == {0: (3, 7, 0), 1: (0, 4, 0)}

    # Once a record of TP1 is read, its lag is the reading's own (highwater unknown: none).
    consumer.ends[TP0] = 12
    await dispatcher.submit(rec(4, "a", partition=1), consumer.as_consumer)
    await wait_until(
        lambda: next(p.lag for p in dispatcher.snapshot if p.partition == 0) == 9, within=5
    )
    assert [p.partition for p in dispatcher.progress()] == [0, 1]


async def test_progress_names_the_oldest_unfinished_record_lag_and_busiest_lanes(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
) -> None:
    dispatcher, processor = setup()
    consumer = WatermarkConsumer(TP0, highwater=20)
    stuck = processor.gate(10)
    processor.gate(12)
    # Offset 10 (key a) holds the partition's commits; key b has three records waiting.
    await submit_all(
        dispatcher, consumer, [rec(10, "a"), rec(11, "c"), *(rec(o, "b") for o in (12, 13, 14))]
    )
    await wait_until(lambda: processor.is_done(0, 11))
    await asyncio.sleep(0.05)
    [progress] = dispatcher.progress()
    assert (progress.topic, progress.partition) == (TOPIC, 0)
    assert progress.oldest_unfinished_offset == 10
    assert progress.oldest_unfinished_age_s is not None and progress.oldest_unfinished_age_s >= 0.05
    assert progress.in_flight == 4
    assert progress.lag == 20 - 10  # nothing committed yet: from the first offset it was given
    assert progress.lanes == 2
    busiest = progress.busiest[0]
    assert (busiest.key, busiest.depth, busiest.running_offset) == (b"b", 3, 12)
    assert busiest.running_s is not None and busiest.running_s >= 0.05

    stuck.set()
    processor.open_all()
    await wait_until(lambda: consumer.committed(TP0) == 15)
    [progress] = dispatcher.progress()
    assert progress.oldest_unfinished_offset is None and progress.in_flight == 0
    assert progress.lag == 20 - 15


async def test_a_record_running_past_the_bound_is_logged_once_and_counted(
    setup: Callable[..., tuple[KeyOrderedDispatcher, Processor]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    dispatcher, processor = setup(
        stuck_after_s=0.2, describe=lambda record: f"command cmd-{record.offset}"
    )
    consumer = WatermarkConsumer(TP0, highwater=2)
    gate = processor.gate(0)
    await submit_all(dispatcher, consumer, [rec(0, "slow"), rec(1, "quick")])
    await asyncio.sleep(1.5)
    lines = [r.getMessage() for r in caplog.records if "has run for" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "pos.commands[0]@0 (command cmd-0)" in lines[0] and "STUCK_AFTER_S=0.2" in lines[0]
    # The snapshot the metric callbacks read was renewed meanwhile.
    assert [p.oldest_unfinished_offset for p in dispatcher.snapshot] == [0]
    gate.set()
