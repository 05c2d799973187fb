"""The `voucher-bridge` console command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voucher-bridge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the service in the foreground")
    run.add_argument("--http-port", type=int, help="health endpoint port (0: none)")

    topics = commands.add_parser("topics", help="create the service's topics where missing")
    topics.add_argument("--partitions", type=int, default=6)

    unsettled = commands.add_parser(
        "unsettled",
        help="list the results the upstream could no longer tell about (an operator decides)",
    )
    unsettled.add_argument("--limit", type=int, default=100)

    spec = commands.add_parser(
        "asyncapi", help="write the AsyncAPI document and the JSON Schema of each event"
    )
    spec.add_argument("--out", type=Path, default=Path("contracts/asyncapi.json"))
    spec.add_argument(
        "--schemas", type=Path, help="the JSON Schemas' folder (default: schemas/ beside --out)"
    )

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from voucher_bridge.settings import InvalidSettings

    try:
        if args.command == "run":
            return _run(args.http_port)
        if args.command == "topics":
            return _topics(args.partitions)
        if args.command == "asyncapi":
            return _asyncapi(args.out, args.schemas or args.out.parent / "schemas")
        if args.command == "unsettled":
            return asyncio.run(_unsettled(args.limit))
    except InvalidSettings as exc:
        # One line naming the settings, no traceback: nothing to debug, and no value shown.
        logging.getLogger("voucher_bridge").error("%s", exc)
        return 2
    return 2


def _run(http_port: int | None) -> int:
    import uvloop

    from voucher_bridge.app import Service
    from voucher_bridge.health import HealthServer
    from voucher_bridge.serving import StopWatchdog, shutdown_bound_s
    from voucher_bridge.settings import load_settings

    settings = load_settings()
    port = settings.http_port if http_port is None else http_port
    service = Service(settings)
    service.stop_watchdog = StopWatchdog(shutdown_bound_s(settings.drain_timeout_s))
    app = service.app()
    # Probes and metrics on a thread of their own, up before the service starts (a startup
    # probe asks from the first second) and answering while its loop is busy or stuck.
    health = HealthServer(service.probes(), settings.http_host, port) if port else None
    if health is not None:
        health.start()
    try:
        # FastStream handles SIGTERM and SIGINT: it drains (on_shutdown), stops and returns,
        # so a stop on a signal exits 0. uvloop costs less CPU per command than asyncio's
        # loop (`make bench`).
        uvloop.run(app.run())
    finally:
        if health is not None:
            health.stop()
    return 0


def _topics(partitions: int) -> int:
    from voucher_bridge.kafka.admin import ensure_topics
    from voucher_bridge.settings import load_settings

    created = asyncio.run(ensure_topics(load_settings(), partitions))
    print("created: " + (", ".join(created) if created else "nothing (all exist)"))
    return 0


async def _unsettled(limit: int) -> int:
    """One JSON line per result left to an operator: the command and what was last known."""
    from voucher_bridge.settings import load_settings
    from voucher_bridge.store import open_store

    settings = load_settings()
    store = open_store(settings.idempotency_store_url.get_secret_value(), settings.store_timeout_s)
    await store.open()
    try:
        for item in await store.needing_operator(limit):
            envelope = json.loads(item.envelope)
            print(
                json.dumps(
                    {
                        "source": item.key.source,
                        "id": item.key.id,
                        "type": envelope.get("type"),
                        "subject": envelope.get("subject"),
                        "sent_at": item.sent_at,
                        "revision": item.revision,
                        "result": json.loads(item.result),
                    }
                )
            )
    finally:
        await store.close()
    return 0


def _asyncapi(out: Path, schemas: Path) -> int:
    from voucher_bridge.app import Service
    from voucher_bridge.settings import Settings
    from voucher_contracts.schema import dumps, write_schema_files

    # The contract's defaults, whatever this shell's environment says.
    document = Service(Settings.model_construct()).asyncapi_document()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(document))
    print(f"wrote {out}")
    written = write_schema_files(schemas)
    print(f"wrote {len(written)} JSON Schemas in {schemas}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
