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
        assert live.status_code == 204

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
        # uvicorn re-raises the SIGTERM it handled, so the status is the signal's.
        assert service.stop() in (0, -15)
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
