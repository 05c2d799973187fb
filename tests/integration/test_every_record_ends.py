"""Every record ends, on the real broker: whatever it holds, a record on a command topic gets
exactly one result or one dead letter within the bound, and the next command of its key is
answered too; a claim left without a worker is resumed within seconds; a result or a dead
letter larger than the broker takes still ends its record, and the partition moves on."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import EpinSandbox, Stack
from tests.support.kafka import create_topic, unique_topic
from tests.support.records import GeneratedRecord, any_record, reproducers
from voucher_bridge.app import Service
from voucher_contracts import deadletter as dlq
from voucher_sandboxes.localstack import CommandProducer, ResultReader

TERMINALS = 150
# Each example's records and its probe must be answered within this (the service's command
# bound is 20 s; a record runs in milliseconds here).
WITHIN_S = 30.0


@dataclass
class Running:
    stack: Stack
    service: Service
    terminals: Iterator[str]
    producer: CommandProducer
    results: ResultReader
    dead_letters: ResultReader
    expected: Counter[bytes] = field(default_factory=Counter)  # outputs per record key

    def outputs(self) -> Counter[bytes]:
        return Counter(r.key or b"" for r in [*self.results.records, *self.dead_letters.records])

    async def poll(self) -> None:
        await self.results.poll(0.05)
        await self.dead_letters.poll(0.05)


@pytest.fixture
async def running(stack: Any) -> AsyncIterator[Running]:
    s: Stack = await stack(partitions=3)
    terminals = [s.terminal() for _ in range(TERMINALS)]
    async with (
        s.service(command_timeout_s=20) as service,
        CommandProducer(s.bootstrap, s.commands) as producer,
        ResultReader(s.bootstrap, s.results) as results,
        ResultReader(s.bootstrap, s.dlq) as dead_letters,
    ):
        # Cycled: a till seen again just has more records to count (hypothesis may run more
        # examples than planned while it shrinks a failure).
        yield Running(s, service, itertools.cycle(terminals), producer, results, dead_letters)


async def _one_end_each(running: Running, till: str, records: list[GeneratedRecord]) -> None:
    """Produce the records, then a valid command of the same key (the probe); every one must
    end in exactly one result or one dead letter, the probe answered `succeeded`."""
    key = till.encode()
    for record in records:
        await running.producer.send_raw(key, record.value, record.headers)
    probe = await running.producer.send("pos.bill_total", till, {"bill_total": "1"})
    running.expected[key] += len(records) + 1
    deadline = time.monotonic() + WITHIN_S
    while running.outputs()[key] < running.expected[key]:
        assert time.monotonic() < deadline, (
            f"{running.expected[key] - running.outputs()[key]} records of {till} did not end "
            f"within {WITHIN_S} s: {[r.why for r in records]}"
        )
        await running.poll()
    await running.poll()
    assert running.outputs() == running.expected, "a record ended twice"
    [answer] = [r for r in running.results.records if r.data.get("command_id") == probe.id]
    assert answer.data["outcome"] == "succeeded", answer.data
    # Each dead letter says why, and where it came from.
    for letter in running.dead_letters.records:
        if letter.key == key:
            assert letter.headers[dlq.REASON]
            assert letter.headers[dlq.ORIGINAL_TOPIC] == running.stack.commands.encode()


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
@settings(
    max_examples=100,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_every_record_ends_and_its_key_goes_on(running: Running, data: st.DataObject) -> None:
    till = next(running.terminals)
    records = data.draw(st.lists(any_record(till), min_size=1, max_size=4), label="records")
    await _one_end_each(running, till, records)


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_the_reproducers_end_and_their_key_goes_on(running: Running) -> None:
    for n in range(len(reproducers("any"))):
        till = next(running.terminals)
        await _one_end_each(running, till, [reproducers(till)[n]])
    reasons = Counter(r.headers[dlq.REASON] for r in running.dead_letters.records)
    assert reasons == {b"not_json": 1, b"too_deep": 1, b"invalid_attribute": 2}


# -- claims left without a worker -----------------------------------------------------------------


class FailingOnce:
    """The store, with `complete` failing once (a passing database error)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def complete(self, *args: Any) -> None:
        if not self.failed:
            self.failed = True
            raise ConnectionError("the database went away for a moment")
        await self._store.complete(*args)


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_complete_failing_once_leaves_no_claim_behind(stack: Any) -> None:
    s: Stack = await stack()
    till = s.terminal()
    async with (
        s.service(workers=1) as service,  # its own parts are patched
        CommandProducer(s.bootstrap, s.commands) as producer,
        ResultReader(s.bootstrap, s.results) as reader,
    ):
        flaky = FailingOnce(service.once.store)
        service.once.store = flaky
        first = await producer.send("pos.bill_total", till, {"bill_total": "20"})
        [answered] = await reader.wait_for({first.id}, 10)
        assert flaky.failed and answered.data["outcome"] == "succeeded"
        # Sent again (a redelivery): answered from the store, not waited on.
        again = await producer.send(
            "pos.bill_total", till, {"bill_total": "20"}, command_id=first.id
        )
        following = await producer.send("pos.scan", till, {"voucher_code": "99999999"})
        results = await reader.wait_for({again.id, following.id}, 5)
    assert [r.event["id"] for r in results if r.data["command_id"] == first.id] == [
        answered.event["id"]
    ] * 2


async def test_a_lane_task_killed_mid_command_is_resumed_within_seconds(stack: Any) -> None:
    s: Stack = await stack()
    till = s.terminal()
    s.sandbox.faults(latency_ms=1500, routes=["bill_total_api"])
    async with (
        s.service(workers=1) as service,  # its own parts are patched
        CommandProducer(s.bootstrap, s.commands) as producer,
        ResultReader(s.bootstrap, s.results) as reader,
    ):
        first = await producer.send("pos.bill_total", till, {"bill_total": "20"})
        lane = await _lane_of(service, till)
        lane.cancel()  # killed, by a bug elsewhere, mid-call
        following = await producer.send("pos.scan", till, {"voucher_code": "99999999"})
        started = time.monotonic()
        results = await reader.wait_for({first.id, following.id}, 10)
        assert time.monotonic() - started < 6
    assert {r.data["command_id"]: r.data["outcome"] for r in results} == {
        first.id: "succeeded",
        following.id: "rejected",
    }


async def _lane_of(service: Service, till: str) -> asyncio.Task[None]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for partition in service.dispatcher._partitions.values():
            lane = partition.lanes.get(till.encode())
            if lane is not None and lane.task is not None and service.once.running:
                return lane.task
        await asyncio.sleep(0.01)
    raise AssertionError("the command never started")


# -- what the broker will not take ----------------------------------------------------------------


async def test_a_result_larger_than_the_broker_takes_ends_its_record(
    stack: Any, epin: EpinSandbox
) -> None:
    """An account with 120 coupons: its list is ~20 kB, its topic takes 4 kB. The service cuts
    it to fit its own bound (`MAX_RESULT_BYTES`), and when the broker still refuses, sends the
    compact result; the account's next command is answered."""
    s: Stack = await stack()
    s.use_epin(epin)
    account = epin.add_account(
        coupons=[{"id": 70_000_000 + n, "balance": "40.00"} for n in range(120)]
    )
    small = s.coupon_results + "-small"
    await create_topic(s.bootstrap, small, 2, configs={"max.message.bytes": "4000"})
    async with (
        s.service(coupon_results_topic=small, max_result_bytes=12_000) as _,
        CommandProducer(s.bootstrap, s.coupon_commands, source="/backoffice") as producer,
        ResultReader(s.bootstrap, small) as reader,
    ):
        listed = await producer.send("coupon.list_active", account, {})
        following = await producer.send("coupon.refund_status", account, {"epin": 70_000_001})
        results = {
            r.data["command_id"]: r for r in await reader.wait_for({listed.id, following.id}, 20)
        }
    compact = results[listed.id]
    assert compact.data["outcome"] == "succeeded" and compact.data["truncated"] is True
    assert "coupons" not in compact.data
    assert results[following.id].data["outcome"] == "succeeded"

    # With room for part of the list: the first coupons, as many as fit, `truncated`.
    async with (
        s.service(max_result_bytes=6_000) as _,
        CommandProducer(s.bootstrap, s.coupon_commands, source="/backoffice") as producer,
        ResultReader(s.bootstrap, s.coupon_results) as reader,
    ):
        listed = await producer.send("coupon.list_active", account, {})
        [cut] = await reader.wait_for({listed.id}, 20)
    assert cut.data["truncated"] is True and cut.data["count"] == 120
    assert 0 < len(cut.data["coupons"]) < 120
    as_sent = json.dumps(cut.event, separators=(",", ":"), ensure_ascii=False)
    assert len(as_sent.encode()) <= 6_000


async def test_a_dead_letter_larger_than_the_broker_takes_ends_its_record(stack: Any) -> None:
    """A record of 50 kB that is not JSON, on a topic whose dead-letter topic takes 4 kB: the
    dead letter goes without the value and the original headers, saying so; the till's next
    command is answered."""
    s: Stack = await stack()
    till = s.terminal()
    commands = unique_topic("pos.commands")
    await create_topic(s.bootstrap, commands, 3)
    await create_topic(s.bootstrap, commands + ".dlq", 3, configs={"max.message.bytes": "4000"})
    async with (
        s.service(pos_commands_topic=commands),
        CommandProducer(s.bootstrap, commands) as producer,
        ResultReader(s.bootstrap, s.results) as results,
        ResultReader(s.bootstrap, commands + ".dlq") as letters,
    ):
        await producer.send_raw(till.encode(), b"x" * 50_000, [("x-big", b"y" * 2_000)])
        following = await producer.send("pos.bill_total", till, {"bill_total": "5"})
        await results.wait_for({following.id}, 20)
        await letters.settle(0.5)
    [letter] = letters.records
    assert letter.key == till.encode()
    assert letter.headers[dlq.REASON] == b"not_json"
    assert letter.headers[dlq.ORIGINAL_OFFSET] == b"0"
    assert letter.headers[dlq.OMITTED].startswith(b"the value (50000 bytes) and 1 headers")
    assert "x-big" not in letter.headers
