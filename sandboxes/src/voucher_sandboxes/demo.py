"""`make demo`: the service doing its job end to end, against the local broker and sandboxes.

Starts the eVOUCHER and Epin sandboxes and the service as processes, plays two POS sessions
through Kafka (a bill, scans including refused ones, a removal, a redeem of two vouchers; and a
cancelled payment) and a back-office coupon flow (list, transfer, a share refused for its
balance, create, history), and sends one record that is not a command (a dead letter); prints
each command with its result and trace id, an excerpt of /metrics, and the operator console's
address with a viewer's login; and stops what it started (with `--keep`, `make demo KEEP=1`,
only on Ctrl-C, so that the console can be looked at).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

from voucher_bridge.kafka.admin import ensure_topics
from voucher_bridge.settings import Settings, load_settings
from voucher_sandboxes import EPIN_SEED
from voucher_sandboxes.localstack import (
    CommandProducer,
    ReceivedResult,
    ResultReader,
    SentCommand,
    epin_settings,
    free_port,
    seed_tokens,
    start_epin_sandbox,
    start_sandbox,
    start_service,
    trace_id_of,
)

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


async def play(*, timeout_s: float = 60.0, keep: bool = False) -> int:
    # The demo's own Kafka clients say nothing of their group's comings and goings.
    for noisy in ("aiokafka", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = load_settings()
    # Logs beside the caller (`make demo` runs in the project's root).
    run_dir = Path.cwd() / "var" / "demo"
    run_dir.mkdir(parents=True, exist_ok=True)
    await ensure_topics(settings)
    port, epin_port = free_port(), free_port()
    sandbox = start_sandbox(port, run_dir / "sandbox.log")
    epin = start_epin_sandbox(epin_port, run_dir / "epin-sandbox.log")
    env = {
        "EVOUCHER_BASE_URL": f"http://127.0.0.1:{port}",
        "EVOUCHER_TERMINALS": json.dumps(seed_tokens()),
        **epin_settings(f"http://127.0.0.1:{epin_port}"),
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "KAFKA_GROUP_ID": settings.kafka_group_id,
    }
    # A login for each role, made for this run (the console is never open without one).
    logins = {"viewer": secrets.token_urlsafe(9), "operator": secrets.token_urlsafe(9)}
    env["CONSOLE_USERS"] = json.dumps(
        {name: {"password": password, "role": name} for name, password in logins.items()}
    )
    http_port = _port(8080)
    service = start_service(env, run_dir / "service.log", http_port=http_port)
    bootstrap = settings.kafka_bootstrap_servers
    try:
        started = time.monotonic()
        async with (
            CommandProducer(
                bootstrap, settings.pos_commands_topic, source="/stores/limassol-3/pos"
            ) as producer,
            ResultReader(bootstrap, settings.pos_results_topic) as reader,
        ):
            sent: list[SentCommand] = []
            for terminal, type_, data in SESSIONS:
                sent.append(await producer.send(type_, terminal, data, binary=len(sent) % 2 == 1))
            results = await reader.wait_for({c.id for c in sent}, timeout_s)
            # A till whose software sends garbage: it ends on pos.commands.dlq (not_json).
            await producer.send_raw(TILL_2.encode(), b"<bill total=12.00/>", [])
        print("POS sessions (pos.commands → pos.results)\n")
        ok = _report(sent, results)
        _print_booked(results)
        coupon_sent, coupon_results = await _coupon_flow(settings, timeout_s)
        print("\nBack-office coupons (coupon.commands → coupon.results)\n")
        ok = _report(coupon_sent, coupon_results) and ok
        elapsed = time.monotonic() - started
        print(
            f"\n{len(sent) + len(coupon_sent)} commands answered in {elapsed:.1f}s; every "
            f"result carries its command's trace: {'yes' if ok else 'NO'}"
        )
        _print_metrics(http_port)
        print(f"logs: {_rel(run_dir)}/service.log, sandbox.log, epin-sandbox.log")
        console = f"http://127.0.0.1:{http_port}/console/"
        print(f"\nconsole: {console}  (viewer login: viewer / {logins['viewer']})")
        if keep:
            print(f"          operator login: operator / {logins['operator']}")
            print("running until Ctrl-C (the dead letter sent above is on its Dead letters page)")
            await _until_interrupted()
        else:
            print("          (it stops now; `make demo KEEP=1` leaves it running for the console)")
        return 0 if ok else 1
    finally:
        service.stop()
        sandbox.stop()
        epin.stop()


async def _coupon_flow(
    settings: Settings, timeout_s: float
) -> tuple[list[SentCommand], list[ReceivedResult]]:
    """List, transfer, a share refused for its balance, a fresh form key, create, history."""
    account = "backoffice-cy"
    token = _mail_token(account)
    sent: list[SentCommand] = []
    async with (
        CommandProducer(
            settings.kafka_bootstrap_servers,
            settings.coupon_commands_topic,
            source="/backoffice/cy",
        ) as producer,
        ResultReader(settings.kafka_bootstrap_servers, settings.coupon_results_topic) as reader,
    ):
        plan: list[tuple[str, dict[str, Any] | None]] = [
            ("coupon.list_active", {"wallet": "wallet1"}),
            ("coupon.transfer", {"user": "shop-limassol", "epin": 1001}),
            ("coupon.share", {"email": "guest@example.cy", "epin": 1005, "share_amount": "500"}),
            ("coupon.share", {"email": "guest@example.cy", "epin": 1005, "share_amount": "5"}),
            ("coupon.list_wallets", None),
        ]
        for type_, data in plan:
            sent.append(await producer.send(type_, account, data))
        results = await reader.wait_for({c.id for c in sent}, timeout_s)
        wallets = next(r for r in results if r.data["command_id"] == sent[-1].id)
        create = {
            "wallet_type": "wallet1",
            "epin_amount": "25",
            "number_of_pins": 2,
            "transferable": True,
            "reusable": False,
            "token_field": token,
            "token_checksum_field": hashlib.sha256(token.encode()).hexdigest()[:16],
            "form_key": wallets.data.get("form_key", ""),
        }
        sent.append(await producer.send("coupon.create", account, create))
        sent.append(await producer.send("coupon.history", account, {"wallet": "wallet1"}))
        results = await reader.wait_for({c.id for c in sent}, timeout_s)
    return sent, results


def _mail_token(account: str) -> str:
    # The back office receives it by mail; the demo reads the sandbox's seed.
    seed = json.loads(EPIN_SEED.read_text())
    return str(next(u["mail_token"] for u in seed["users"] if u["username"] == account))


def _report(sent: list[SentCommand], results: list[ReceivedResult]) -> bool:
    by_id = {r.data["command_id"]: r for r in results}
    _print_table(sent, by_id)
    return len(by_id) == len(sent) and all(
        trace_id_of(by_id[c.id].traceparent) == trace_id_of(c.traceparent) for c in sent
    )


def _print_table(sent: list[SentCommand], by_id: dict[str, Any]) -> None:
    rows = [("subject", "command", "data", "outcome", "detail", "trace id")]
    for command in sent:
        data = by_id[command.id].data
        detail = data.get("reason") or ""
        for extra in (
            "amount",
            "expires_on",
            "voucher_codes",
            "count",
            "user",
            "balance",
            "refund_status",
        ):
            if extra in data and data["outcome"] in ("succeeded", "rejected"):
                value = data[extra]
                value = ",".join(value) if isinstance(value, list) else value
                detail = f"{detail} {extra}={value}".strip()
        if data.get("reason") == "upstream_rejected":
            detail += f" {data.get('upstream', {}).get('last_status')} {data.get('message')!r}"
        if data.get("coupons") and data["command_type"] == "coupon.create":
            detail += " created=" + ",".join(str(c.get("id")) for c in data["coupons"])
        if data.get("form_key"):
            detail += " form_key=…"
        if data.get("errors"):
            detail += " " + "; ".join(f"{k}: {' '.join(v)}" for k, v in data["errors"].items())
        rows.append(
            (
                command.subject,
                command.type,
                _shown(command.data),
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


# What a ledger books a redeem from: on the result itself (no earlier event needed).
_BOOKING = ("terminal", "store", "bill_id", "vouchers", "vouchers_total", "bill_total")


def _print_booked(results: list[ReceivedResult]) -> None:
    for r in results:
        data = r.data
        if data["command_type"] == "pos.redeem" and data["outcome"] == "succeeded":
            booked = {k: data[k] for k in (*_BOOKING, "remaining_due") if k in data}
            print("\nThe redeem as a ledger books it, from its result alone:\n")
            for line in json.dumps(booked, indent=2).splitlines():
                print("  " + line)


def _shown(data: dict[str, Any] | None) -> str:
    if not data:
        return ""
    hidden = {
        k: ("…" if k in ("token_field", "token_checksum_field", "form_key") else v)
        for k, v in data.items()
    }
    text = json.dumps(hidden, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= 60 else text[:59] + "…"


# What an SRE looks at first, of everything /metrics serves.
_SHOWN_METRICS = (
    "voucher_bridge_commands_total",
    "voucher_bridge_consumer_lag",
    "voucher_bridge_records_oldest_unfinished_age_seconds",
    "voucher_bridge_in_flight",
    "voucher_bridge_partitions_assigned",
    "voucher_bridge_upstream_breaker_state",
    "voucher_bridge_results_unsettled",
    "voucher_bridge_dead_letters_total",
    "messaging_process_duration_seconds_count",
)


def _print_metrics(port: int) -> None:
    """An excerpt of the service's /metrics, without OpenTelemetry's scope labels."""
    import httpx

    time.sleep(2.5)  # the progress gauges are renewed every 2 s
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError as exc:
        print(f"\n/metrics did not answer ({type(exc).__name__})")
        return
    scope = re.compile(r'otel_scope_[a-z_]+="[^"]*",?')
    lines, per_name = [], Counter[str]()
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if line.startswith(_SHOWN_METRICS) and per_name[name] < 4:  # a few series of each
            per_name[name] += 1
            lines.append(scope.sub("", line).replace(",}", "}").replace("{}", ""))
    print(f"\n/metrics (an excerpt; curl http://127.0.0.1:{port}/metrics while it runs)\n")
    for line in lines:
        print("  " + line)


def _port(wanted: int) -> int:
    """`wanted` where it is free (a stable address to open), else any free one."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", wanted))
        except OSError:
            return free_port()
    return wanted


async def _until_interrupted() -> None:
    """Until Ctrl-C or SIGTERM (handled here: a shell may start the demo with SIGINT ignored,
    as it does for a job in the background)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    print("\nstopping")


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path(os.getcwd())))
    except ValueError:
        return str(path)
