"""Run the Epin sandbox with uvicorn.

    python -m voucher_sandboxes.epin_server --port 8082 --seed deploy/sandbox/epin-seed.json \
        [--faults '{"error_rate": 0.1, "seed": 1}'] [--prefix /api/v1/] \
        [--refresh-path user/token/refresh/] [--access-ttl-s 300] [--refresh-ttl-s 86400]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from voucher_sandboxes.epin import (
    DEFAULT_PREFIX,
    DEFAULT_REFRESH_PATH,
    build_epin_server,
)
from voucher_sandboxes.faults import FaultConfig

__all__ = ["build_epin_server", "main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Epixel Epin (prepaid coupons) API sandbox")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8082)
    parser.add_argument("--seed", type=Path, required=True, help="seed JSON file")
    parser.add_argument("--faults", default="{}", help="FaultConfig as JSON")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="API base path")
    parser.add_argument("--refresh-path", default=DEFAULT_REFRESH_PATH)
    parser.add_argument("--access-ttl-s", type=float, default=None)
    parser.add_argument("--refresh-ttl-s", type=float, default=None)
    args = parser.parse_args(argv)
    faults = FaultConfig.model_validate(json.loads(args.faults))
    build_epin_server(
        args.host,
        args.port,
        args.seed,
        faults,
        prefix=args.prefix,
        refresh_path=args.refresh_path,
        access_ttl_s=args.access_ttl_s,
        refresh_ttl_s=args.refresh_ttl_s,
    ).run()


if __name__ == "__main__":
    main()
