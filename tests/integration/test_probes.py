"""What an SRE sees of a running service (issue 13): lag and the oldest unfinished record move
when the upstream slows down and come back when it recovers, a record past STUCK_AFTER_S is
logged with its command, and every series the alert rules and the dashboard use is served."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Stack
from tests.deploy.test_monitoring import SERVED
from tests.support.workload import http_ready, service_env, until, wait_for_log
from voucher_sandboxes.localstack import CommandProducer, ResultReader, free_port, start_service

pytestmark = pytest.mark.kafka


async def _metrics(port: int) -> str:
    response = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/metrics", timeout=5)
    return response.text


def _value(text: str, name: str, topic: str) -> float:
    pattern = rf'^{name}\{{[^}}]*messaging_destination_name="{re.escape(topic)}"[^}}]*\}} (\S+)$'
    values = [float(v) for v in re.findall(pattern, text, re.MULTILINE)]
    return max(values) if values else 0.0


async def test_lag_and_the_oldest_unfinished_record_follow_a_slow_upstream(
    stack: Any, tmp_path: Path
) -> None:
    s: Stack = await stack(partitions=2)
    till = s.terminal()
    port = free_port()
    env = service_env(s, STUCK_AFTER_S="2", EVOUCHER_READ_TIMEOUT_S="10", LOG_LEVEL="INFO")
    service = start_service(env, tmp_path / "service.log", http_port=port)
    try:
        await until(lambda: http_ready(port), 30, "the service did not become ready")
        s.sandbox.faults(latency_ms=2500, routes=["bill_total_api"])
        async with (
            CommandProducer(s.bootstrap, s.commands) as producer,
            ResultReader(s.bootstrap, s.results) as reader,
        ):
            # One till's commands run one after another: the lag builds behind the slow one.
            sent = [
                await producer.send("pos.bill_total", till, {"bill_total": f"{n}.00"})
                for n in range(6)
            ]
            await producer.send_raw(till.encode(), b"not json", [])  # a dead letter too

            async def behind() -> bool:
                text = await _metrics(port)
                return (
                    _value(text, "voucher_bridge_consumer_lag", s.commands) >= 4
                    and _value(
                        text, "voucher_bridge_records_oldest_unfinished_age_seconds", s.commands
                    )
                    >= 1.5
                )

            await until(behind, 20, "lag and the oldest unfinished age did not rise")
            await wait_for_log(service, "has run for", within_s=20)
            log = (tmp_path / "service.log").read_text()
            assert f"pos.bill_total {sent[0].id} of {till}" in log or any(
                f"pos.bill_total {c.id} of {till}" in log for c in sent
            ), "the stuck line does not name the command"
            s.sandbox.faults(latency_ms=0)
            await reader.wait_for({c.id for c in sent}, 60)

            async def caught_up() -> bool:
                text = await _metrics(port)
                return (
                    _value(text, "voucher_bridge_consumer_lag", s.commands) == 0
                    and _value(
                        text, "voucher_bridge_records_oldest_unfinished_age_seconds", s.commands
                    )
                    == 0
                )

            await until(caught_up, 20, "lag and age did not come back to 0")

            # A bill total (no money moves) answered 5xx is sent again: counted as retries,
            # and each request's duration by upstream, route and status.
            s.sandbox.faults(error_rate=1.0, routes=["bill_total_api"])
            failing = await producer.send("pos.bill_total", till, {"bill_total": "1.00"})
            await reader.wait_for({failing.id}, 60)
            s.sandbox.faults(error_rate=0.0)
        text = await _metrics(port)
        retries = re.findall(
            r'^voucher_bridge_upstream_retries_total\{[^}]*after="(5\d\d)"[^}]*'
            r'voucher_bridge_upstream="evoucher"[^}]*\} (\S+)$',
            text,
            re.MULTILINE,
        )
        assert retries and float(retries[0][1]) >= 1, "no retry counted"
        requests = {
            (m["route"], m["status"]): float(m["count"])
            for m in re.finditer(
                r'^http_client_request_duration_seconds_count\{(?=[^}]*http_request_method="POST")'
                r'(?=[^}]*http_response_status_code="(?P<status>\d+)")'
                r'(?=[^}]*url_template="(?P<route>[^"]+)")'
                r'(?=[^}]*voucher_bridge_upstream="evoucher")[^}]*\} (?P<count>\S+)$',
                text,
                re.MULTILINE,
            )
        }
        route = "index.php?route=account/bill_total_api"
        assert requests.get((route, "200"), 0) >= 6, requests
        assert any(r == route and st.startswith("5") for r, st in requests), requests
        assert re.search(
            r'^db_client_operation_duration_seconds_count\{(?=[^}]*db_operation_name="claim")'
            r'(?=[^}]*db_system_name="sqlite")[^}]*\} [1-9]',
            text,
            re.MULTILINE,
        ), "no store operation timed"
        # Both partitions have a lag series, the one no record of this till went to as well.
        lags = re.findall(
            rf'^voucher_bridge_consumer_lag\{{[^}}]*messaging_destination_name="{s.commands}"',
            text,
            re.MULTILINE,
        )
        assert len(lags) == 2, lags
        served = {
            line.split("{")[0].split(" ")[0]
            for line in text.splitlines()
            if line and not line.startswith("#")
        }
        assert served >= SERVED, SERVED - served
        assert "voucher_bridge_records_stuck_total{" in text
    finally:
        assert service.stop() == 0
