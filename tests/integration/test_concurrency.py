"""Key-ordered concurrency through the real broker: what runs at once, what is committed when,
and what a slow upstream or a rebalance does to it. (Ordering per till:
test_pos_flow.py::test_two_terminals_interleaved_on_one_partition_keep_their_own_order.)"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.conftest import EpinSandbox, Stack
from voucher_sandboxes.localstack import CommandProducer, ResultReader


def _calls(s: Stack, route: str) -> int:
    totals = s.sandbox.admin.get("state", params={"vouchers": "0"}).json()["totals"]
    return int(totals["calls"][route])


async def _committed(s: Stack, partition: int = 0) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=s.bootstrap, group_id=s.group)
    await consumer.start()
    try:
        committed: int | None = await consumer.committed(TopicPartition(s.commands, partition))
        return committed
    finally:
        await consumer.stop()


async def test_different_tills_on_one_partition_run_concurrently(stack: Any) -> None:
    """20 tills, one command each, 300 ms a call, ONE partition: one at a time would take 6 s."""
    s: Stack = await stack(partitions=1)
    tills = [s.terminal() for _ in range(20)]
    async with (
        s.service(),
        CommandProducer(s.bootstrap, s.commands) as producer,
        ResultReader(s.bootstrap, s.results) as reader,
    ):
        warm = await producer.send("pos.bill_total", tills[0], {"bill_total": 1})
        await reader.wait_for({warm.id}, 30)
        s.sandbox.faults(latency_ms=300)
        started = time.monotonic()
        sent = [await producer.send("pos.bill_total", t, {"bill_total": 2}) for t in tills]
        await reader.wait_for({c.id for c in sent}, 30)
        elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"20 calls of 300 ms took {elapsed:.1f}s: not concurrent"


async def test_no_offset_is_committed_past_an_unfinished_record(stack: Any) -> None:
    """A slow first record (4 s) and twenty quick ones behind it on the same partition: the
    quick ones are answered at once, but the committed offset stays at the slow one until it
    is done."""
    s: Stack = await stack(partitions=1)
    slow_till, *tills = [s.terminal() for _ in range(21)]
    async with (
        s.service(),
        CommandProducer(s.bootstrap, s.commands) as producer,
        ResultReader(s.bootstrap, s.results) as reader,
    ):
        warm = await producer.send("pos.bill_total", slow_till, {"bill_total": 1})
        await reader.wait_for({warm.id}, 30)
        await asyncio.sleep(0.5)  # its offset committed
        base = await _committed(s)
        assert base is not None
        s.sandbox.faults(latency_ms=4000, routes=["remove_voucher_api"])
        slow = await producer.send("pos.remove", slow_till, {"voucher_code": "1"})
        quick = [await producer.send("pos.bill_total", t, {"bill_total": 2}) for t in tills]
        await reader.wait_for({c.id for c in quick}, 10)
        await asyncio.sleep(0.6)  # several commit intervals
        assert not reader.for_commands({slow.id}), "the slow one should still be running"
        assert await _committed(s) == base  # held at the slow record's offset
        await reader.wait_for({slow.id}, 15)
        await asyncio.sleep(0.6)
        assert await _committed(s) == base + 1 + len(quick)


async def test_a_slow_upstream_never_costs_the_group_membership(stack: Any) -> None:
    """Calls slower than max_poll_interval_ms with few slots in flight: fetching pauses but the
    consumer keeps polling, so it stays in the group: nothing is redelivered or answered twice."""
    s: Stack = await stack(partitions=2)
    tills = [s.terminal() for _ in range(8)]
    async with (
        s.service(max_in_flight=2, max_poll_interval_ms=3000, session_timeout_ms=6000),
        CommandProducer(s.bootstrap, s.commands) as producer,
        ResultReader(s.bootstrap, s.results) as reader,
    ):
        warm = await producer.send("pos.bill_total", tills[0], {"bill_total": 1})
        await reader.wait_for({warm.id}, 30)
        s.sandbox.faults(latency_ms=3500, routes=["bill_total_api"])
        calls = _calls(s, "bill_total_api")
        sent = [await producer.send("pos.bill_total", t, {"bill_total": 2}) for t in tills]
        await reader.wait_for({c.id for c in sent}, 60)
        await reader.settle(2.0)
    assert len(reader.for_commands({c.id for c in sent})) == len(sent)  # once each
    assert _calls(s, "bill_total_api") - calls == len(sent)


async def test_records_waiting_in_one_topic_never_stop_another_from_being_read(
    stack: Any, epin: EpinSandbox
) -> None:
    """MAX_IN_FLIGHT 6, shared among the three partitions held (one POS, two coupon): 2 each.
    Epin takes 12 s a list and the back office has sent 12 coupon commands: each coupon
    partition holds its share and is paused, and a POS command sent after them is answered at
    once. With one bound for all partitions the coupon records took every place, fetching
    stopped everywhere, and the till waited for Epin."""
    s: Stack = await stack(partitions=1)
    s.use_epin(epin)
    accounts = [epin.add_account() for _ in range(12)]
    till = s.terminal()
    async with (
        s.service(max_in_flight=6, epin_read_timeout_s=30.0),
        CommandProducer(s.bootstrap, s.commands) as pos,
        CommandProducer(s.bootstrap, s.coupon_commands, source="/backoffice") as office,
        ResultReader(s.bootstrap, s.results) as pos_results,
        ResultReader(s.bootstrap, s.coupon_results) as coupon_results,
    ):
        warm = await pos.send("pos.bill_total", till, {"bill_total": 1})
        await pos_results.wait_for({warm.id}, 30)
        epin.faults(latency_ms=12_000, routes=["active"])
        slow = {(await office.send("coupon.list_active", a, None)).id for a in accounts}
        await asyncio.sleep(2.0)  # fetched and waiting on Epin
        asked = time.monotonic()
        quick = await pos.send("pos.bill_total", till, {"bill_total": 2})
        await pos_results.wait_for({quick.id}, 30)
        waited = time.monotonic() - asked
        assert not coupon_results.for_commands(slow), "Epin answered sooner than it was set to"
        epin.faults(latency_ms=0, routes=None)
        await coupon_results.wait_for(slow, 90)
        await coupon_results.settle(1.0)
    assert waited < 5.0, f"the till waited {waited:.1f} s behind the coupon topic"
    assert len(coupon_results.for_commands(slow)) == len(slow)  # once each


async def test_a_revoked_partition_is_finished_and_committed_before_it_moves(
    stack: Any,
) -> None:
    """Instance A is in the middle of a slow call when instance B joins: A finishes it and
    commits before giving the partition up, so B neither calls the upstream again for it nor
    answers it again."""
    s: Stack = await stack(partitions=2)
    tills = [s.terminal() for _ in range(8)]
    async with (
        CommandProducer(s.bootstrap, s.commands) as producer,
        ResultReader(s.bootstrap, s.results) as reader,
        s.service(),
    ):
        warm = [await producer.send("pos.bill_total", t, {"bill_total": 1}) for t in tills]
        await reader.wait_for({c.id for c in warm}, 30)
        s.sandbox.faults(latency_ms=3000, routes=["remove_voucher_api"])
        calls = _calls(s, "remove_voucher_api")
        slow = [await producer.send("pos.remove", t, {"voucher_code": "1"}) for t in tills]
        await asyncio.sleep(1.0)  # A is in the middle of them
        async with s.service():  # B joins: A's partitions are revoked and rebalanced
            await reader.wait_for({c.id for c in slow}, 30)
            await reader.settle(1.5)
    assert len(reader.for_commands({c.id for c in slow})) == len(slow)  # answered once each
    assert _calls(s, "remove_voucher_api") - calls == len(slow)  # called once each


async def test_a_record_given_up_by_a_drain_gives_its_claim_back_while_its_call_hangs(
    stack: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A's call hangs (60 s) when A stops: its drain gives up after 1 s and cancels the
    record, in its worker process too when there are workers (the pool forwards the cancel).
    So A is gone within seconds, not when the call would end or the pool's stop bound (10 s)
    kills the worker, and B resumes the command at once: with INSTANCE_STALE_AFTER_S at
    120 s, waiting for A's claim to look stale would take minutes."""
    s: Stack = await stack(partitions=1)
    till = s.terminal()
    bounds = {"drain_timeout_s": 1.0, "instance_stale_after_s": 120.0}
    async with (
        CommandProducer(s.bootstrap, s.commands) as producer,
        ResultReader(s.bootstrap, s.results) as reader,
    ):
        async with s.service(**bounds, evoucher_read_timeout_s=90.0):
            warm = await producer.send("pos.bill_total", till, {"bill_total": 1})
            await reader.wait_for({warm.id}, 30)
            s.sandbox.faults(latency_ms=60_000, routes=["bill_total_api"])
            hanging = await producer.send("pos.bill_total", till, {"bill_total": 2})
            await asyncio.sleep(2.0)  # its call sent, hanging
            stopping = time.monotonic()
        stopped_in = time.monotonic() - stopping
        assert "drain timed out" in caplog.text, "the call was not running when A stopped"
        assert stopped_in < 9.0, f"A took {stopped_in:.1f} s to stop"
        assert not reader.for_commands({hanging.id}), "A answered a call it gave up"
        s.sandbox.faults(latency_ms=0, routes=None)
        async with s.service(**bounds):
            await reader.wait_for({hanging.id}, 30)  # minutes if its claim were still A's
            await reader.settle(1.5)
    assert len(reader.for_commands({hanging.id})) == 1
