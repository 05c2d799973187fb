"""The POS flow through a real Kafka broker and the eVOUCHER sandbox."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.conftest import Stack
from voucher_contracts import deadletter as dlq
from voucher_contracts import result_id
from voucher_sandboxes.localstack import CommandProducer, ResultReader, trace_id_of


async def test_pos_sessions_end_to_end(stack: Any) -> None:
    s: Stack = await stack(partitions=3)
    till = s.terminal()
    other_store = s.sandbox.add_vouchers("50.00", store="nicosia-1")[0]
    v50, v20, v100 = s.sandbox.add_vouchers("50.00", "20.00", "100.00")
    redeemed = s.sandbox.add_vouchers("50.00", redeemed=True)[0]
    expired = s.sandbox.add_vouchers("20.00")[0]
    s.sandbox.admin.post(
        "vouchers",
        json=[{"code": expired, "value": "20.00", "store": "limassol-3", "expires": "2024-11-30"}],
    ).raise_for_status()
    plan: list[tuple[str, dict[str, Any] | None]] = [
        ("pos.bill_total", {"bill_total": "120.00"}),
        ("pos.scan", {"voucher_code": v50}),
        ("pos.scan", {"voucher_code": "999999999999"}),
        ("pos.scan", {"voucher_code": redeemed}),
        ("pos.scan", {"voucher_code": expired}),
        ("pos.scan", {"voucher_code": other_store}),
        ("pos.scan", {"voucher_code": v20}),
        ("pos.scan", {"voucher_code": v100}),
        ("pos.remove", {"voucher_code": v100}),
        ("pos.redeem", {"voucher_codes": [v50, v20]}),
        ("pos.bill_total", {"bill_total": 0.5}),  # a JSON float: decoded as Decimal
        ("pos.cancel", None),
    ]
    async with s.service(), CommandProducer(s.bootstrap, s.commands) as producer:
        sent = [await producer.send(t, till, d, binary=i % 2 == 1) for i, (t, d) in enumerate(plan)]
        async with ResultReader(s.bootstrap, s.results) as reader:
            results = await reader.wait_for({c.id for c in sent}, 30)
    by_id = {r.data["command_id"]: r for r in results}
    assert len(results) == len(sent)
    got = [(by_id[c.id].data["outcome"], by_id[c.id].data.get("reason")) for c in sent]
    assert got == [
        ("succeeded", None),
        ("succeeded", None),
        ("rejected", "voucher_not_found"),
        ("rejected", "voucher_already_redeemed"),
        ("rejected", "voucher_expired"),
        ("rejected", "voucher_not_allowed_at_store"),
        ("succeeded", None),
        ("succeeded", None),
        ("succeeded", None),
        ("succeeded", None),
        ("succeeded", None),
        ("succeeded", None),
    ]
    assert by_id[sent[1].id].data["amount"] == "50.00"
    assert by_id[sent[4].id].data["expires_on"] == "2024-11-30"
    assert by_id[sent[6].id].data["amount"] == "20.00"
    assert by_id[sent[7].id].data["amount"] == "50.00"  # all that remained due of 120
    assert by_id[sent[9].id].data["voucher_codes"] == [v50, v20]
    assert by_id[sent[10].id].data["bill_total"] == "0.50"
    assert s.sandbox.vouchers([v50, v20])[v50]["redeem_count"] == 1

    for command in sent:
        result = by_id[command.id]
        event = result.event
        assert event["specversion"] == "1.0"
        assert event["id"] == result_id(command.source, command.id)
        assert event["type"] == command.type + ".result"
        assert event["subject"] == till
        assert event["causationid"] == command.id
        assert event["data"]["command_source"] == command.source
        assert result.key == till.encode()
        assert result.headers["content-type"] == b"application/cloudevents+json"
        assert trace_id_of(result.traceparent) == trace_id_of(command.traceparent)
        assert result.data["upstream"]["attempts"] >= 1 or result.data["outcome"] == "rejected"


async def test_bad_fields_unknown_terminal_and_key_mismatch_are_rejected(stack: Any) -> None:
    s: Stack = await stack(partitions=1)
    till = s.terminal()
    async with s.service(), CommandProducer(s.bootstrap, s.commands) as producer:
        bad = [
            await producer.send("pos.bill_total", till, {"bill_total": "12.345"}),
            await producer.send("pos.bill_total", till, {"bill_total": -1}),
            await producer.send("pos.scan", till, {}),
            await producer.send("pos.redeem", till, {"voucher_codes": []}),
            await producer.send("pos.scan", till, {"voucher_code": "a;b"}),
            await producer.send("pos.bill_total", "no-such-till", {"bill_total": 1}),
        ]
        async with ResultReader(s.bootstrap, s.results) as reader:
            results = await reader.wait_for({c.id for c in bad}, 30)
    by_id = {r.data["command_id"]: r.data for r in results}
    reasons = [by_id[c.id]["reason"] for c in bad]
    assert reasons == ["validation_error"] * 5 + ["unknown_terminal"]
    assert "bill_total" in by_id[bad[0].id]["errors"]
    assert by_id[bad[5].id]["upstream"]["attempts"] == 0  # no call made
    assert all(by_id[c.id]["outcome"] == "rejected" for c in bad)


async def test_unusable_records_go_to_the_dead_letter_topic_and_processing_goes_on(
    stack: Any,
) -> None:
    s: Stack = await stack(partitions=1)
    till = s.terminal()
    unusable: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]], str]] = [
        (b"k1", b"\xff\xfenot json at all", [("x-odd", b"\xff\x00")], "not_json"),
        (
            b"k2",
            json.dumps({"specversion": "1.0", "type": "pos.scan"}).encode(),
            [],
            "missing_attribute",
        ),
        (
            b"k3",
            json.dumps(
                {
                    "specversion": "1.0",
                    "id": "1",
                    "source": "s",
                    "subject": till,
                    "type": "pos.teleport",
                    "data": {},
                }
            ).encode(),
            [],
            "unknown_type",
        ),
        (b"k4", b"{}", [("ce_specversion", b"1.0"), ("ce_id", b"\xff")], "invalid_header"),
        (None, b"x" * 2048, [], "too_large"),
    ]
    async with (
        s.service(max_record_bytes=1024),
        CommandProducer(s.bootstrap, s.commands) as producer,
    ):
        for key, value, headers, _ in unusable:
            await producer.send_raw(key, value, headers)
        good = await producer.send("pos.bill_total", till, {"bill_total": "10.00"})
        async with ResultReader(s.bootstrap, s.results) as results:
            [result] = await results.wait_for({good.id}, 30)
        async with ResultReader(s.bootstrap, s.dlq) as dead:
            while len(dead.records) < len(unusable):
                await dead.poll(0.5)
    assert result.data["outcome"] == "succeeded"
    # Different keys run concurrently, so their dead letters may come out in any order: put
    # them back in the order of the records they stand for.
    dead_letters = sorted(dead.records, key=lambda r: int(r.headers[dlq.ORIGINAL_OFFSET]))
    assert len(dead_letters) == len(unusable)
    for letter, (key, _, headers, reason) in zip(dead_letters, unusable, strict=True):
        assert letter.key == key
        assert letter.headers[dlq.REASON] == reason.encode()
        assert letter.headers[dlq.ORIGINAL_TOPIC] == s.commands.encode()
        assert letter.headers[dlq.ORIGINAL_GROUP] == s.group.encode()
        for name, original in headers:
            assert letter.headers[name] == original
    raw = await _raw_values(s.bootstrap, s.dlq, len(unusable))
    assert raw == [value for _, value, _, _ in unusable]  # byte for byte
    offsets = [int(letter.headers[dlq.ORIGINAL_OFFSET]) for letter in dead_letters]
    assert offsets == list(range(len(unusable)))


async def _raw_values(bootstrap: str, topic: str, count: int) -> list[bytes | None]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        values: list[bytes | None] = []
        while len(values) < count:
            batch = await consumer.getmany(timeout_ms=1000)
            values += [r.value for records in batch.values() for r in records]
        return values
    finally:
        await consumer.stop()


async def test_two_terminals_interleaved_on_one_partition_keep_their_own_order(
    stack: Any,
) -> None:
    """Each till's scans only add up if they run in order after its bill: bill 35 and five
    10.00 vouchers give 10, 10, 10, 5, then no amount due. Jittered upstream latency would
    reorder them if the service ran a till's commands concurrently."""
    s: Stack = await stack(partitions=1)
    s.sandbox.faults(latency_ms=2, latency_jitter_ms=30)
    tills = [s.terminal() for _ in range(2)]
    vouchers = {t: s.sandbox.add_vouchers(*["10.00"] * 5) for t in tills}
    async with s.service(), CommandProducer(s.bootstrap, s.commands) as producer:
        sent: dict[str, list[str]] = defaultdict(list)
        for t in tills:
            sent[t].append((await producer.send("pos.bill_total", t, {"bill_total": 35})).id)
        for i in range(5):
            for t in tills:
                command = await producer.send("pos.scan", t, {"voucher_code": vouchers[t][i]})
                sent[t].append(command.id)
        for t in tills:
            command = await producer.send("pos.redeem", t, {"voucher_codes": vouchers[t][:4]})
            sent[t].append(command.id)
        async with ResultReader(s.bootstrap, s.results) as reader:
            results = await reader.wait_for({i for ids in sent.values() for i in ids}, 60)
    for t in tills:
        mine = sorted((r for r in results if r.key == t.encode()), key=lambda r: r.offset)
        assert [r.data["command_id"] for r in mine] == sent[t]  # published in command order
        amounts = [r.data.get("amount") or r.data.get("reason") for r in mine[1:6]]
        assert amounts == ["10.00", "10.00", "10.00", "5.00", "no_amount_due"]
        assert mine[-1].data["outcome"] == "succeeded"


async def test_a_restart_neither_loses_nor_repeats_a_committed_command(stack: Any) -> None:
    s: Stack = await stack(partitions=3)
    # 5 tills at 20-30 ms a call: about 200 commands a second, so the stop after the first
    # 60 results lands well before the 300th.
    s.sandbox.faults(latency_ms=20, latency_jitter_ms=10)
    tills = [s.terminal() for _ in range(5)]
    async with CommandProducer(s.bootstrap, s.commands) as producer:
        sent = [
            await producer.send("pos.bill_total", tills[i % 5], {"bill_total": i})
            for i in range(300)
        ]
    ids = {c.id for c in sent}
    async with ResultReader(s.bootstrap, s.results) as reader:
        async with s.service(max_in_flight=50):
            while len(reader.records) < 60:
                await reader.poll(0.05)
        # Stopped mid-stream: what it finished is committed, the rest is not started.
        await reader.settle(1.0)
        first_run = len(reader.for_commands(ids))
        committed = await _committed(s)
        async with s.service():
            await reader.wait_for(ids, 60)
            await reader.settle(1.0)
    assert first_run < len(sent)
    assert committed == first_run  # every finished command committed at stop, nothing more
    counts: dict[str, int] = defaultdict(int)
    for r in reader.for_commands(ids):
        counts[r.data["command_id"]] += 1
    assert set(counts) == ids
    assert max(counts.values()) == 1, "a command was answered twice"


async def _committed(s: Stack) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=s.bootstrap, group_id=s.group)
    await consumer.start()
    try:
        total = 0
        for p in range(3):
            offset = await consumer.committed(TopicPartition(s.commands, p))
            total += offset or 0
        return total
    finally:
        await consumer.stop()


async def test_a_rebalance_hands_partitions_over_without_loss_or_repeat(stack: Any) -> None:
    """A second instance joins mid-run and the first leaves: revoked partitions are drained
    and committed before they move, so no command is lost or answered twice."""
    s: Stack = await stack(partitions=4)
    s.sandbox.faults(latency_ms=5, latency_jitter_ms=10)
    tills = [s.terminal() for _ in range(40)]
    async with CommandProducer(s.bootstrap, s.commands) as producer:
        sent = [
            await producer.send("pos.bill_total", tills[i % 40], {"bill_total": i})
            for i in range(600)
        ]
    ids = {c.id for c in sent}
    async with ResultReader(s.bootstrap, s.results) as reader, s.service(max_in_flight=40):
        while len(reader.records) < 100:
            await reader.poll(0.1)
        async with s.service(max_in_flight=40):
            while len(reader.records) < 300:
                await reader.poll(0.1)
        # The second instance left; the first takes everything back.
        await reader.wait_for(ids, 90)
        await asyncio.sleep(1)
        await reader.settle(1.0)
    counts: dict[str, int] = defaultdict(int)
    for r in reader.for_commands(ids):
        counts[r.data["command_id"]] += 1
    assert set(counts) == ids
    assert max(counts.values()) == 1, "a command was answered twice"
