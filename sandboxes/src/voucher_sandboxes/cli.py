"""The `voucher-sandbox` console command: an upstream API sandbox, or the demo.

voucher-sandbox evoucher [--port 8081] [--seed FILE] [--latency-ms ...]
voucher-sandbox epin [--port 8082] [--seed FILE] [--access-ttl-s ...]
voucher-sandbox demo     the sandboxes and the service end to end (`make demo`)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from voucher_sandboxes import EPIN_SEED, EVOUCHER_SEED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voucher-sandbox", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    # What both sandboxes take: where to listen, and the faults to inject.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default="127.0.0.1")
    common.add_argument("--latency-ms", type=float, default=0.0)
    common.add_argument("--error-rate", type=float, default=0.0)
    common.add_argument("--timeout-rate", type=float, default=0.0)
    common.add_argument("--drop-after-apply-rate", type=float, default=0.0)

    evoucher = commands.add_parser(
        "evoucher", parents=[common], help="the eVOUCHER POS API sandbox"
    )
    evoucher.add_argument("--port", type=int, default=8081)
    evoucher.add_argument("--seed", type=Path, default=EVOUCHER_SEED)
    evoucher.add_argument("--no-strict-session", action="store_true")

    epin = commands.add_parser("epin", parents=[common], help="the Epixel Epin coupons API sandbox")
    epin.add_argument("--port", type=int, default=8082)
    epin.add_argument("--seed", type=Path, default=EPIN_SEED)
    epin.add_argument("--access-ttl-s", type=float, default=None)

    demo = commands.add_parser(
        "demo", help="start the sandboxes and the service, play POS and coupon flows"
    )
    demo.add_argument("--timeout", type=float, default=60.0)
    demo.add_argument(
        "--keep",
        action="store_true",
        help="leave the service and sandboxes running for the console, until Ctrl-C",
    )

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "demo":
        from voucher_sandboxes.demo import play

        try:
            return asyncio.run(play(timeout_s=args.timeout, keep=args.keep))
        except KeyboardInterrupt:  # the end of `--keep`: everything it started is stopped
            return 0

    from voucher_sandboxes.faults import FaultConfig

    faults = FaultConfig(
        latency_ms=args.latency_ms,
        error_rate=args.error_rate,
        timeout_rate=args.timeout_rate,
        drop_after_apply_rate=args.drop_after_apply_rate,
    )
    if args.command == "epin":
        from voucher_sandboxes.epin import build_epin_server

        build_epin_server(
            args.host, args.port, args.seed, faults, access_ttl_s=args.access_ttl_s
        ).run()
        return 0
    from voucher_sandboxes.server import serve_evoucher

    serve_evoucher(
        args.host, args.port, args.seed, faults, strict_session=not args.no_strict_session
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
