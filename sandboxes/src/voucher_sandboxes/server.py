"""Run the eVOUCHER sandbox with uvicorn (`voucher-bridge sandbox evoucher --port 8081 --seed ...`).

Also runnable alone: `python -m voucher_sandboxes.server --port 8081 --seed <file>`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import uvicorn

from voucher_sandboxes.evoucher import DEFAULT_LOCK_TTL_S, EvoucherSandbox, create_app
from voucher_sandboxes.faults import FaultConfig, sandbox_server


def build_evoucher_server(
    host: str,
    port: int,
    seed_path: Path,
    faults: FaultConfig | None = None,
    strict_session: bool = True,
    *,
    lock_ttl_s: float = DEFAULT_LOCK_TTL_S,
) -> uvicorn.Server:
    """A uvicorn server for the sandbox, not started (see `faults.sandbox_server`)."""
    sandbox = EvoucherSandbox.from_seed_file(
        seed_path, strict_session=strict_session, lock_ttl_s=lock_ttl_s
    )
    return sandbox_server(create_app(sandbox, faults or FaultConfig()), host, port)


def serve_evoucher(
    host: str,
    port: int,
    seed_path: Path,
    faults: FaultConfig,
    strict_session: bool = True,
) -> None:
    """Serve until interrupted (blocking)."""
    build_evoucher_server(host, port, seed_path, faults, strict_session).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="eVOUCHER POS API sandbox")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--seed", type=Path, required=True, help="seed JSON file")
    parser.add_argument("--faults", default="{}", help="FaultConfig as JSON")
    parser.add_argument("--no-strict-session", action="store_true")
    args = parser.parse_args(argv)
    faults = FaultConfig.model_validate(json.loads(args.faults))
    serve_evoucher(args.host, args.port, args.seed, faults, not args.no_strict_session)


if __name__ == "__main__":
    main()
