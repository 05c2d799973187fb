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
        "unsettled", help="indeterminate results: list, recheck now, or resolve by hand"
    )
    unsettled_do = unsettled.add_subparsers(dest="action")
    listing = unsettled_do.add_parser("list", help="every indeterminate result (the default)")
    listing.add_argument("--limit", type=int, default=200)
    unsettled.add_argument("--limit", type=int, default=200)
    recheck = unsettled_do.add_parser("recheck", help="look again at the next settle")
    resolve = unsettled_do.add_parser(
        "resolve", help="a superseding result by an operator's word (reason operator_resolved)"
    )
    for each in (recheck, resolve):
        each.add_argument("source")
        each.add_argument("id")
    resolve.add_argument("outcome", choices=["succeeded", "failed"])
    resolve.add_argument("--note", required=True, help="what confirmed the outcome")

    dlq = commands.add_parser("dlq", help="dead letters: list, show, replay")
    dlq_do = dlq.add_subparsers(dest="action", required=True)
    dlq_list = dlq_do.add_parser("list", help="the newest first")
    dlq_list.add_argument("topic", help="e.g. pos.commands.dlq")
    dlq_list.add_argument("--reason")
    dlq_list.add_argument("--key")
    dlq_list.add_argument("--since", help="ISO 8601, e.g. 2026-12-01T10:00Z")
    dlq_list.add_argument("--limit", type=int, default=100)
    for name, text in (("show", "one dead letter, whole"), ("replay", "back to its topic")):
        each = dlq_do.add_parser(name, help=text)
        each.add_argument("topic")
        each.add_argument("partition", type=int)
        each.add_argument("offset", type=int)
        if name == "replay":
            each.add_argument(
                "--dry-run", action="store_true", help="only say what the service would do"
            )

    console = commands.add_parser("console", help="the operator console's tools")
    console_do = console.add_subparsers(dest="action", required=True)
    console_do.add_parser(
        "hash-password", help="a password hash for CONSOLE_USERS (the password read from stdin)"
    )

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
        if args.command in ("unsettled", "dlq"):
            return asyncio.run(_operate(args))
        if args.command == "console":
            return _hash_password()
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


async def _operate(args: argparse.Namespace) -> int:
    """`dlq` and `unsettled`: the console's own operations (console/operations.py), with
    this process's own connections to the store and Kafka, as the user running it."""
    import getpass

    from voucher_bridge.app import Service
    from voucher_bridge.console.access import Operator
    from voucher_bridge.console.operations import ConsoleError
    from voucher_bridge.console.web import since_time
    from voucher_bridge.settings import load_settings

    service = Service(load_settings())
    console = service.console()
    who = Operator(f"cli:{getpass.getuser()}", "operator")
    acting = (args.command, args.action) in (("dlq", "replay"), ("unsettled", "resolve"))
    await service.store.open()
    try:
        if acting:
            await service.producer.start()
        if args.command == "dlq" and args.action == "list":
            since = since_time(args.since)
            for item in await console.dead_letters(
                args.topic, args.reason, args.key, since, args.limit
            ):
                print(json.dumps(item))
        elif args.command == "dlq" and args.action == "show":
            print(json.dumps(await console.dead_letter(args.topic, args.partition, args.offset)))
        elif args.command == "dlq":
            done = await console.replay(who, args.topic, args.partition, args.offset, args.dry_run)
            print(json.dumps(done))
        elif args.action == "recheck":
            print(json.dumps(await console.recheck(who, args.source, args.id)))
        elif args.action == "resolve":
            print(
                json.dumps(
                    await console.resolve(who, args.source, args.id, args.outcome, args.note)
                )
            )
        else:
            for item in await console.unsettled(args.limit):
                print(json.dumps(item))
    except ConsoleError as exc:
        print(f"voucher-bridge {args.command}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await console.close()
        if acting:
            await service.producer.stop()
        await service.store.close()
    return 0


def _hash_password() -> int:
    import getpass

    from voucher_bridge.console.access import hash_password

    password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass()
    if not password:
        print("no password given", file=sys.stderr)
        return 1
    print(hash_password(password))
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
