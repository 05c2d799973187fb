"""The service as it is deployed: `voucher-bridge run`, fed by an independent Kafka client."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import EpinSandbox, Stack
from tests.support.workload import service_env
from voucher_sandboxes.localstack import (
    CommandProducer,
    ResultReader,
    free_port,
    start_service,
    trace_id_of,
)


def _env(s: Stack, http_port: int) -> dict[str, str]:
    accounts = {n: {"username": n, "password": u["password"]} for n, u in s.epin.users.items()}
    return {
        "COUPON_COMMANDS_TOPIC": s.coupon_commands,
        "COUPON_RESULTS_TOPIC": s.coupon_results,
        "EPIN_BASE_URL": s.epin.settings["EPIN_BASE_URL"],
        "EPIN_API_KEY": s.epin.settings["EPIN_API_KEY"],
        "EPIN_ACCOUNTS": json.dumps(accounts),
        "LOG_LEVEL": "DEBUG",
        "KAFKA_BOOTSTRAP_SERVERS": s.bootstrap,
        "KAFKA_GROUP_ID": s.group,
        "POS_COMMANDS_TOPIC": s.commands,
        "POS_RESULTS_TOPIC": s.results,
        "EVOUCHER_BASE_URL": s.sandbox.url,
        "EVOUCHER_TERMINALS": json.dumps(s.terminals),
    }


def _wait_ready(port: int, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    report: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5)
            report = response.json()
            if response.status_code == 200 and report["partitions"]:
                return report
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"not ready: {report}")


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed")
async def test_a_command_from_kcat_gets_its_result(
    stack: Any, epin: EpinSandbox, tmp_path: Path
) -> None:
    s: Stack = await stack(partitions=2)
    s.use_epin(epin)
    account = epin.add_account()
    till = s.terminal()
    port = free_port()
    service = start_service(_env(s, port), tmp_path / "service.log", http_port=port)
    try:
        report = _wait_ready(port)
        assert report["broker"] and report["producer"] and report["consuming"]
        live = httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=5)
        assert live.status_code == 200 and live.json()["live"] is True

        command_id = str(uuid.uuid4())
        traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
        event = {
            "specversion": "1.0",
            "id": command_id,
            "source": "/stores/kcat/pos",
            "type": "pos.bill_total",
            "subject": till,
            "data": {"bill_total": 42.10},
        }
        subprocess.run(
            [
                "kcat",
                "-P",
                "-b",
                s.bootstrap,
                "-t",
                s.commands,
                "-k",
                till,
                "-H",
                "content-type=application/cloudevents+json",
                "-H",
                f"traceparent={traceparent}",
            ],
            input=json.dumps(event).encode(),
            check=True,
            timeout=30,
        )
        async with ResultReader(s.bootstrap, s.results) as reader:
            [result] = await reader.wait_for({command_id}, 30)
        async with (
            CommandProducer(s.bootstrap, s.coupon_commands) as producer,
            ResultReader(s.bootstrap, s.coupon_results) as coupon_reader,
        ):
            listed = await producer.send("coupon.list_active", account, None)
            [coupons] = await coupon_reader.wait_for({listed.id}, 30)
        assert coupons.data["outcome"] == "succeeded"
        assert result.data["outcome"] == "succeeded"
        assert result.data["bill_total"] == "42.10"
        assert trace_id_of(result.traceparent) == traceparent.split("-")[1]
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'command_type="pos.bill_total"' in text and 'outcome="succeeded"' in text
        assert "voucher_bridge_commands" in text and "voucher_bridge_command_duration" in text
        assert "voucher_bridge_in_flight" in text
    finally:
        assert service.stop() == 0  # a drained stop on SIGTERM is a clean exit
    log = (tmp_path / "service.log").read_text()
    assert "shut down gracefully" in log
    assert "DEBUG" in log  # the most talkative level, and still:
    secrets = [
        *s.terminals.values(),
        s.epin.settings["EPIN_API_KEY"],
        epin.users[account]["password"],
    ]
    for secret in secrets:
        assert secret not in log, "a secret was logged"
    assert "Bearer " not in log and "eyJ" not in log, "an access token was logged"


async def test_sigterm_drains_commits_and_exits_0_within_the_bound(
    stack: Any, tmp_path: Path
) -> None:
    """Commands in flight when SIGTERM comes are answered, their offsets committed (the next
    member of the group has nothing to read again), and the process exits 0 within
    DRAIN_TIMEOUT_S + the margin that the Helm chart's terminationGracePeriodSeconds covers."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from voucher_bridge.serving import SHUTDOWN_MARGIN_S

    s: Stack = await stack(partitions=2)
    drain_timeout_s = 20.0
    tills = [s.terminal() for _ in range(12)]
    port = free_port()
    env = service_env(
        s, DRAIN_TIMEOUT_S=str(drain_timeout_s), EVOUCHER_READ_TIMEOUT_S="15", LOG_LEVEL="INFO"
    )
    service = start_service(env, tmp_path / "service.log", http_port=port)
    try:
        _wait_ready(port)
        s.sandbox.faults(latency_ms=1500, routes=["bill_total_api"])
        async with CommandProducer(s.bootstrap, s.commands) as producer:
            sent = [await producer.send("pos.bill_total", t, {"bill_total": "9.90"}) for t in tills]
        deadline = time.monotonic() + 20
        ready = f"http://127.0.0.1:{port}/health/ready"
        while httpx.get(ready, timeout=6).json()["in_flight"] == 0:
            assert time.monotonic() < deadline, "nothing ever ran"
            time.sleep(0.05)
        started = time.monotonic()
        status = service.stop(timeout_s=drain_timeout_s + SHUTDOWN_MARGIN_S + 5)
        took = time.monotonic() - started
    finally:
        service.kill()  # if an assertion above left it running
    assert status == 0
    assert took < drain_timeout_s + SHUTDOWN_MARGIN_S
    async with ResultReader(s.bootstrap, s.results) as reader:
        results = await reader.wait_for({c.id for c in sent}, 30)
    assert sorted(r.data["command_id"] for r in results) == sorted(c.id for c in sent)
    assert {r.data["outcome"] for r in results} == {"succeeded"}
    # Committed up to the end of every partition: nothing left for the next owner.
    consumer = AIOKafkaConsumer(bootstrap_servers=s.bootstrap, group_id=s.group)
    await consumer.start()
    try:
        partitions = [TopicPartition(s.commands, p) for p in range(2)]
        ends = await consumer.end_offsets(partitions)
        for tp in partitions:
            assert await consumer.committed(tp) == ends[tp], tp
    finally:
        await consumer.stop()
    log = (tmp_path / "service.log").read_text()
    assert "shut down gracefully" in log and "did not finish" not in log
