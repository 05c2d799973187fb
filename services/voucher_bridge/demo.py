"""`make demo`: the service doing its job end to end, against the local broker and the sandbox.

Starts the eVOUCHER sandbox and the service as processes, plays two POS sessions through Kafka
(a bill, scans including refused ones, a removal, a redeem of two vouchers; and a cancelled
payment), prints each command with its result and trace id, and stops what it started.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from voucher_bridge.kafka.admin import ensure_topics
from voucher_bridge.localstack import (
    PROJECT_ROOT,
    CommandProducer,
    ResultReader,
    SentCommand,
    free_port,
    seed_tokens,
    start_sandbox,
    start_service,
    trace_id_of,
)
from voucher_bridge.settings import load_settings

TILL_1 = "limassol-3-till-1"
TILL_2 = "limassol-3-till-2"

# (terminal, command type, data): what the two tills do, in order.
SESSIONS: list[tuple[str, str, dict[str, Any] | None]] = [
    (TILL_1, "pos.bill_total", {"bill_total": "120.00"}),
    (TILL_1, "pos.scan", {"voucher_code": "12345678"}),
    (TILL_1, "pos.scan", {"voucher_code": "99999999"}),
    (TILL_1, "pos.scan", {"voucher_code": "20000001"}),
    (TILL_1, "pos.scan", {"voucher_code": "20000002"}),
    (TILL_1, "pos.scan", {"voucher_code": "30000001"}),
    (TILL_1, "pos.scan", {"voucher_code": "12345679"}),
    (TILL_1, "pos.scan", {"voucher_code": "11000001"}),
    (TILL_1, "pos.remove", {"voucher_code": "11000001"}),
    (TILL_1, "pos.redeem", {"voucher_codes": ["12345678", "12345679"]}),
    (TILL_2, "pos.bill_total", {"bill_total": 30}),
    (TILL_2, "pos.scan", {"voucher_code": "10200001"}),
    (TILL_2, "pos.scan", {"voucher_code": "10100001"}),
    (TILL_2, "pos.scan", {"voucher_code": "10100002"}),
    (TILL_2, "pos.cancel", {"voucher_codes": ["10200001", "10100001"]}),
    (TILL_2, "pos.bill_total", {"bill_total": "12.345"}),
    ("ghost-till-9", "pos.bill_total", {"bill_total": "10.00"}),
]


async def play(sandbox_url: str | None = None, *, timeout_s: float = 60.0) -> int:
    settings = load_settings()
    run_dir = PROJECT_ROOT / "var" / "demo"
    run_dir.mkdir(parents=True, exist_ok=True)
    await ensure_topics(settings)
    port = free_port()
    sandbox = start_sandbox(port, run_dir / "sandbox.log")
    env = {
        "EVOUCHER_BASE_URL": f"http://127.0.0.1:{port}",
        "EVOUCHER_TERMINALS": json.dumps(seed_tokens()),
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "KAFKA_GROUP_ID": settings.kafka_group_id,
    }
    service = start_service(env, run_dir / "service.log")
    try:
        started = time.monotonic()
        async with (
            CommandProducer(
                settings.kafka_bootstrap_servers,
                settings.pos_commands_topic,
                source="/stores/limassol-3/pos",
            ) as producer,
            ResultReader(settings.kafka_bootstrap_servers, settings.pos_results_topic) as reader,
        ):
            sent: list[SentCommand] = []
            for terminal, type_, data in SESSIONS:
                sent.append(await producer.send(type_, terminal, data, binary=len(sent) % 2 == 1))
            results = await reader.wait_for({c.id for c in sent}, timeout_s)
        elapsed = time.monotonic() - started
        by_id = {r.data["command_id"]: r for r in results}
        _print_table(sent, by_id)
        same_trace = all(
            trace_id_of(by_id[c.id].traceparent) == trace_id_of(c.traceparent) for c in sent
        )
        print(
            f"\n{len(sent)} commands, {len(by_id)} results in {elapsed:.1f}s; "
            f"every result carries its command's trace: {'yes' if same_trace else 'NO'}"
        )
        print(f"logs: {_rel(run_dir)}/service.log, {_rel(run_dir)}/sandbox.log")
        return 0 if same_trace and len(by_id) == len(sent) else 1
    finally:
        service.stop()
        sandbox.stop()


def _print_table(sent: list[SentCommand], by_id: dict[str, Any]) -> None:
    rows = [("terminal", "command", "data", "outcome", "detail", "trace id")]
    for command in sent:
        data = by_id[command.id].data
        detail = data.get("reason") or ""
        for extra in ("amount", "expires_on", "voucher_codes"):
            if extra in data and data["outcome"] in ("succeeded", "rejected"):
                value = data[extra]
                value = ",".join(value) if isinstance(value, list) else value
                detail = f"{detail} {extra}={value}".strip()
        if data.get("reason") == "upstream_rejected":
            detail += f" {data.get('upstream', {}).get('last_status')} {data.get('message')!r}"
        if data.get("errors"):
            detail += " " + "; ".join(f"{k}: {' '.join(v)}" for k, v in data["errors"].items())
        rows.append(
            (
                command.subject,
                command.type,
                json.dumps(command.data, separators=(",", ":")) if command.data else "",
                data["outcome"],
                detail[:60],
                trace_id_of(by_id[command.id].traceparent) or "",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path(os.getcwd())))
    except ValueError:
        return str(path)
