"""`make soak`: voucher-bridge at a steady rate for a while (10 minutes by default), sampling
the service's resident memory and the idempotency store's size, to show both stay flat:
memory does not grow with the number of commands, and the store is bounded by its retention.

A short retention (60 s, purged every 10 s) stands in for the production 7 days, so that the
plateau shows within minutes; the bound is rate x (retention + purge interval).

    uv run python -m bench.soak [--minutes 10] [--rate 200] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.support.kafka import create_topic, ensure_kafka
from voucher_sandboxes.localstack import free_port, start_sandbox, start_service

RETENTION_S = 60
PURGE_INTERVAL_S = 10
TERMINALS = 100


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _store_rows(path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT count(*) FROM commands").fetchone()[0])
    except sqlite3.Error:
        return -1


async def soak(minutes: float, rate: float, out: Path) -> dict[str, Any]:
    bootstrap = ensure_kafka()
    work = Path(tempfile.mkdtemp(prefix="vb-soak-"))
    suffix = uuid.uuid4().hex[:8]
    commands, results = f"soak.commands-{suffix}", f"soak.results-{suffix}"
    for topic in (commands, results, commands + ".dlq"):
        await create_topic(bootstrap, topic, 6)
    for topic in (f"soak.coupons-{suffix}", f"soak.coupon-results-{suffix}"):
        await create_topic(bootstrap, topic, 1)

    port = free_port()
    sandbox = start_sandbox(port, work / "sandbox.log")
    import httpx

    tills = {f"soak-till-{i:04d}": f"soak-token-{i:04d}" for i in range(TERMINALS)}
    httpx.post(
        f"http://127.0.0.1:{port}/_sandbox/terminals",
        json=[{"token": t, "machine_name": n, "store": "limassol-3"} for n, t in tills.items()],
    ).raise_for_status()
    store = work / "store.sqlite3"
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_GROUP_ID": f"soak-{suffix}",
        "POS_COMMANDS_TOPIC": commands,
        "POS_RESULTS_TOPIC": results,
        "COUPON_COMMANDS_TOPIC": f"soak.coupons-{suffix}",
        "COUPON_RESULTS_TOPIC": f"soak.coupon-results-{suffix}",
        "EVOUCHER_BASE_URL": f"http://127.0.0.1:{port}",
        "EVOUCHER_TERMINALS": json.dumps(tills),
        "EVOUCHER_MAX_CONNECTIONS": "100",
        "IDEMPOTENCY_STORE_URL": f"sqlite:///{store}",
        "IDEMPOTENCY_RETENTION_S": str(RETENTION_S),
        "IDEMPOTENCY_PURGE_INTERVAL_S": str(PURGE_INTERVAL_S),
        "LOG_LEVEL": "WARNING",
    }
    service = start_service(env, work / "service.log")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    reader = AIOKafkaConsumer(results, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await producer.start()
    await reader.start()
    samples: list[dict[str, float]] = []
    received = 0
    sent = 0

    async def read() -> None:
        nonlocal received
        while True:
            batch = await reader.getmany(timeout_ms=500)
            received += sum(len(records) for records in batch.values())

    reading = asyncio.create_task(read())
    names = list(tills)
    started = time.monotonic()
    next_sample = started
    try:
        while (now := time.monotonic()) - started < minutes * 60:
            due = int((now - started) * rate)
            while sent < due:
                till = names[sent % len(names)]
                event = {
                    "specversion": "1.0",
                    "id": str(uuid.uuid4()),
                    "source": "/soak",
                    "type": "pos.bill_total",
                    "subject": till,
                    "data": {"bill_total": sent % 500},
                }
                await producer.send(
                    commands,
                    json.dumps(event).encode(),
                    key=till.encode(),
                    headers=[("content-type", b"application/cloudevents+json")],
                )
                sent += 1
            if now >= next_sample:
                sample = {
                    "t_s": round(now - started, 1),
                    "sent": sent,
                    "answered": received,
                    "rss_mib": round(_rss_mib(service.popen.pid), 1),
                    "store_rows": _store_rows(store),
                }
                samples.append(sample)
                print(json.dumps(sample), flush=True)
                next_sample += 10
            await asyncio.sleep(0.01)
        deadline = time.monotonic() + 60
        while received < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
    finally:
        reading.cancel()
        await producer.stop()
        await reader.stop()
        service.stop()
        sandbox.stop()

    settled = [s for s in samples if s["t_s"] >= 120]  # after warm-up and the first purges
    report: dict[str, Any] = {
        "minutes": minutes,
        "rate_per_s": rate,
        "sent": sent,
        "answered": received,
        "retention_s": RETENTION_S,
        "purge_interval_s": PURGE_INTERVAL_S,
        "store_bound_rows": int(rate * (RETENTION_S + PURGE_INTERVAL_S)),
        "rss_mib_after_2min": {
            "min": min(s["rss_mib"] for s in settled) if settled else None,
            "max": max(s["rss_mib"] for s in settled) if settled else None,
        },
        "store_rows_after_2min_max": max(s["store_rows"] for s in settled) if settled else None,
        "machine": {"cpus": os.cpu_count()},
        "samples": samples,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(samples, out / "soak.png", report["store_bound_rows"])
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    return report


def _plot(samples: list[dict[str, float]], path: Path, bound: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    figure, (memory, rows) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    memory.plot(t, [s["rss_mib"] for s in samples])
    memory.set_ylabel("service RSS (MiB)")
    memory.set_ylim(bottom=0)
    rows.plot(t, [s["store_rows"] for s in samples], label="store rows")
    rows.axhline(bound, linestyle="--", color="grey", label="rate x (retention + purge interval)")
    rows.set_ylabel("idempotency store rows")
    rows.set_xlabel("minutes")
    rows.legend(loc="lower right")
    figure.suptitle("voucher-bridge soak: memory and store size at a steady rate")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0, help="commands per second")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    asyncio.run(soak(args.minutes, args.rate, args.out))


if __name__ == "__main__":
    main()
