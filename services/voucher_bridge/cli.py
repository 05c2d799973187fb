"""The `voucher-bridge` console command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from voucher_bridge.sandbox.faults import FaultConfig


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

    spec = commands.add_parser("asyncapi", help="write the AsyncAPI document")
    spec.add_argument("--out", type=Path, default=Path("contracts/asyncapi.json"))

    sandbox = commands.add_parser("sandbox", help="run an upstream API sandbox")
    which = sandbox.add_subparsers(dest="sandbox", required=True)
    # What both sandboxes take: where to listen, and the faults to inject.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default="127.0.0.1")
    common.add_argument("--latency-ms", type=float, default=0.0)
    common.add_argument("--error-rate", type=float, default=0.0)
    common.add_argument("--timeout-rate", type=float, default=0.0)
    common.add_argument("--drop-after-apply-rate", type=float, default=0.0)

    evoucher = which.add_parser("evoucher", parents=[common], help="the eVOUCHER POS API sandbox")
    evoucher.add_argument("--port", type=int, default=8081)
    evoucher.add_argument("--seed", type=Path, default=Path("deploy/sandbox/evoucher-seed.json"))
    evoucher.add_argument("--no-strict-session", action="store_true")

    epin = which.add_parser("epin", parents=[common], help="the Epixel Epin coupons API sandbox")
    epin.add_argument("--port", type=int, default=8082)
    epin.add_argument("--seed", type=Path, default=Path("deploy/sandbox/epin-seed.json"))
    epin.add_argument("--access-ttl-s", type=float, default=None)

    demo = commands.add_parser(
        "demo", help="start the sandboxes and the service, play POS and coupon flows"
    )
    demo.add_argument("--timeout", type=float, default=60.0)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "run":
        return _run(args.http_port)
    if args.command == "topics":
        return _topics(args.partitions)
    if args.command == "asyncapi":
        return _asyncapi(args.out)
    if args.command == "unsettled":
        return asyncio.run(_unsettled(args.limit))
    if args.command == "sandbox" and args.sandbox == "epin":
        return _sandbox_epin(args)
    if args.command == "sandbox":
        return _sandbox_evoucher(args)
    if args.command == "demo":
        from voucher_bridge.demo import play

        return asyncio.run(play(timeout_s=args.timeout))
    return 2


def _run(http_port: int | None) -> int:
    from voucher_bridge.app import Service
    from voucher_bridge.settings import load_settings

    settings = load_settings()
    port = settings.http_port if http_port is None else http_port
    service = Service(settings)
    if port:
        import uvicorn

        # loop="auto": uvloop, as below.
        uvicorn.run(service.asgi_app(), host=settings.http_host, port=port, log_level="warning")
    else:
        import uvloop

        # uvloop's event loop costs less CPU per command than asyncio's (`make bench`).
        uvloop.run(service.app().run())
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
    store = open_store(settings.idempotency_store_url, settings.store_timeout_s)
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


def _asyncapi(out: Path) -> int:
    from voucher_bridge.app import Service
    from voucher_bridge.settings import Settings

    # The contract's defaults, whatever this shell's environment says.
    document = Service(Settings.model_construct()).asyncapi_document()
    out.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return 0


def _faults(args: argparse.Namespace) -> FaultConfig:
    from voucher_bridge.sandbox.faults import FaultConfig

    return FaultConfig(
        latency_ms=args.latency_ms,
        error_rate=args.error_rate,
        timeout_rate=args.timeout_rate,
        drop_after_apply_rate=args.drop_after_apply_rate,
    )


def _sandbox_evoucher(args: argparse.Namespace) -> int:
    from voucher_bridge.sandbox.server import serve_evoucher

    serve_evoucher(
        args.host, args.port, args.seed, _faults(args), strict_session=not args.no_strict_session
    )
    return 0


def _sandbox_epin(args: argparse.Namespace) -> int:
    from voucher_bridge.sandbox.epin import build_epin_server

    server = build_epin_server(
        args.host, args.port, args.seed, _faults(args), access_ttl_s=args.access_ttl_s
    )
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
