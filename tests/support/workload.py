"""Tills at work while something fails around the service, and what must hold afterwards.

`TillWorkload` plays many POS machines, each going through bills (total, two scans, a redeem)
one command after another, for as long as it is told, sending each command again (same id)
until the broker takes it. `check_till_results` then checks the guarantees against what the
eVOUCHER sandbox itself recorded: every command answered, one result per command (a copy has
the same id and content), no voucher redeemed twice, no `succeeded` redeem the sandbox did not
apply and no `rejected`/`failed` one it did, and each till's commands answered in its order.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from voucher_sandboxes.localstack import ReceivedResult, new_traceparent

if TYPE_CHECKING:
    from tests.conftest import Stack


def service_env(s: Stack, **overrides: str) -> dict[str, str]:
    """The environment of a voucher-bridge process on the stack's topics and sandbox."""
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": s.bootstrap,
        "KAFKA_GROUP_ID": s.group,
        "POS_COMMANDS_TOPIC": s.commands,
        "POS_RESULTS_TOPIC": s.results,
        "COUPON_COMMANDS_TOPIC": s.coupon_commands,
        "COUPON_RESULTS_TOPIC": s.coupon_results,
        "EVOUCHER_BASE_URL": s.sandbox.url,
        "EVOUCHER_TERMINALS": json.dumps(s.terminals),
        "EVOUCHER_READ_TIMEOUT_S": "1",
        "EVOUCHER_MAX_CONNECTIONS": "50",
        "IDEMPOTENCY_STORE_URL": s.store_url,
        "INSTANCE_HEARTBEAT_S": "0.5",
        "INSTANCE_STALE_AFTER_S": "3",
        "SETTLE_INTERVAL_S": "1",
        "COMMIT_INTERVAL_MS": "100",
        "SESSION_TIMEOUT_MS": "6000",
        "UPSTREAM_RETRY_BASE_DELAY_S": "0.05",
        "LOG_LEVEL": "WARNING",
    }
    epin = getattr(s, "epin", None)
    if epin is not None:
        accounts = {n: {"username": n, "password": u["password"]} for n, u in epin.users.items()}
        env.update(
            EPIN_BASE_URL=epin.settings["EPIN_BASE_URL"],
            EPIN_API_KEY=epin.settings["EPIN_API_KEY"],
            EPIN_ACCOUNTS=json.dumps(accounts),
            EPIN_READ_TIMEOUT_S="1",
        )
    env.update(overrides)
    return env


@dataclass
class Sent:
    id: str
    type: str
    till: str
    codes: list[str]


@dataclass
class TillWorkload:
    bootstrap: str
    topic: str
    tills: list[str]
    vouchers: dict[str, list[str]]  # till → codes, two per bill
    pause_s: float = 0.05
    sent: list[Sent] = field(default_factory=list)
    resends: int = 0

    @asynccontextmanager
    async def running(self, bills_per_till: int) -> AsyncIterator[asyncio.Task[None]]:
        """The tills at work in a task for the block. A block left early (a failed assertion)
        cancels it, so that its producer is closed before the test stops its broker, rather than
        retrying against it, and logging errors, through the tests that come after."""
        task = asyncio.create_task(self.run(bills_per_till))
        try:
            yield task
        finally:
            task.cancel()
            await asyncio.wait([task], timeout=30)

    async def run(self, bills_per_till: int) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", request_timeout_ms=5_000
        )
        await producer.start()
        try:
            await asyncio.gather(
                *(self._till(producer, till, bills_per_till) for till in self.tills)
            )
        finally:
            await producer.stop()

    async def _till(self, producer: AIOKafkaProducer, till: str, bills: int) -> None:
        for bill in range(bills):
            codes = self.vouchers[till][2 * bill : 2 * bill + 2]
            steps: list[tuple[str, dict[str, Any], list[str]]] = [
                ("pos.bill_total", {"bill_total": "15"}, []),
                *(("pos.scan", {"voucher_code": code}, []) for code in codes),
                ("pos.redeem", {"voucher_codes": codes}, codes),
            ]
            for type_, data, redeemed in steps:
                command = Sent(str(uuid.uuid4()), type_, till, redeemed)
                await self._send_until_taken(producer, command, data)
                self.sent.append(command)
                await asyncio.sleep(self.pause_s)

    async def _send_until_taken(
        self, producer: AIOKafkaProducer, command: Sent, data: dict[str, Any]
    ) -> None:
        value = json.dumps(
            {
                "specversion": "1.0",
                "id": command.id,
                "source": f"/stores/test/pos/{command.till}",
                "type": command.type,
                "subject": command.till,
                "time": datetime.now(UTC).isoformat(),
                "data": data,
            }
        ).encode()
        headers = [
            ("content-type", b"application/cloudevents+json"),
            ("traceparent", new_traceparent().encode()),
        ]
        while True:
            try:
                await producer.send_and_wait(
                    self.topic, value=value, key=command.till.encode(), headers=headers
                )
                return
            except KafkaError:  # the broker is away: the POS sends the same command again
                self.resends += 1
                await asyncio.sleep(0.5)


def final_results(results: list[ReceivedResult], ids: set[str]) -> dict[str, dict[str, Any]]:
    """Each command's last result (following `supersedes`); checks that every copy of a
    result (same id) says the same."""
    final: dict[str, dict[str, Any]] = {}
    by_result_id: dict[str, dict[str, Any]] = {}
    for r in results:
        data = r.data
        if data.get("command_id") not in ids:
            continue
        comparable = {k: v for k, v in data.items() if k != "upstream"}
        if r.event["id"] in by_result_id:
            assert by_result_id[r.event["id"]] == comparable, "two results under one id"
        by_result_id[r.event["id"]] = comparable
        current = final.get(data["command_id"])
        if current is None or data.get("supersedes") == current["_id"]:
            final[data["command_id"]] = {**data, "_id": r.event["id"]}
    return final


def check_till_results(
    workload: TillWorkload,
    results: list[ReceivedResult],
    vouchers: dict[str, dict[str, Any]],
    double_redemptions: int,
) -> dict[str, int]:
    """Asserts the guarantees; returns the final outcomes counted by type and outcome."""
    ids = {c.id for c in workload.sent}
    final = final_results(results, ids)
    missing = ids - set(final)
    assert not missing, f"{len(missing)} commands unanswered, e.g. {sorted(missing)[:3]}"
    assert double_redemptions == 0
    assert all(v["redeem_count"] <= 1 for v in vouchers.values())
    outcomes: dict[str, int] = defaultdict(int)
    for command in workload.sent:
        data = final[command.id]
        outcomes[f"{command.type}:{data['outcome']}"] += 1
        if command.type != "pos.redeem":
            assert data["outcome"] != "indeterminate", data
            continue
        counts = {vouchers[code]["redeem_count"] for code in command.codes}
        if data["outcome"] == "succeeded":
            assert counts == {1}, (data, counts)
        elif data["outcome"] in ("rejected", "failed"):
            assert counts == {0}, (data, counts)
    # Each till's commands were answered in its order (first answers, in the results topic).
    order: dict[str, list[str]] = defaultdict(list)
    for command in workload.sent:
        order[command.till].append(command.id)
    answered: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for r in sorted(results, key=lambda r: (r.partition, r.offset)):
        command_id = r.data.get("command_id")
        if command_id in ids and command_id not in seen:
            seen.add(command_id)
            answered[r.key.decode() if r.key else ""].append(command_id)
    for till, expected in order.items():
        assert answered[till] == expected, f"{till}: answered out of order"
    return dict(outcomes)


async def read_until_answered(
    reader: Any, ids: set[str], timeout_s: float, alive: Any = None
) -> None:
    """Poll `reader` until every command in `ids` has a result; `alive()` must hold meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        answered = {r.data.get("command_id") for r in reader.records}
        if answered >= ids:
            return
        if alive is not None:
            assert alive(), "the service died"
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids - answered)} of {len(ids)} commands unanswered")
        await reader.poll(0.5)


async def wait_for_log(process: Any, text: str, within_s: float) -> None:
    """Wait until a service process's log says `text`; it must stay alive meanwhile."""
    deadline = time.monotonic() + within_s
    while text not in process.log_path.read_text(errors="replace"):
        assert process.alive(), process.log_path.read_text(errors="replace")[-2000:]
        assert time.monotonic() < deadline, f"{process.log_path} never said {text!r}"
        await asyncio.sleep(0.2)


async def until(condition: Any, within_s: float, what: str) -> None:
    """Wait until the coroutine function `condition` answers true; fail saying `what`."""
    deadline = time.monotonic() + within_s
    while not await condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.5)


async def http_ready(port: int) -> bool:
    """Whether the service on `port` says it is ready (/health/ready answers 200)."""
    try:
        response = await asyncio.to_thread(
            httpx.get, f"http://127.0.0.1:{port}/health/ready", timeout=6
        )
    except httpx.TransportError:
        return False
    return response.status_code == 200
