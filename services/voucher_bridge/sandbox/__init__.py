"""Local stand-ins for the upstream voucher APIs, for the demo, integration tests and benchmarks.

`evoucher` is the eVOUCHER POS API as its Postman collection documents it; `faults` is the
fault injection every sandbox shares; `server` runs one with uvicorn (imported on its own, so
that `python -m voucher_bridge.sandbox.server` works and importing the state machine does not
need uvicorn).
"""

from __future__ import annotations

from voucher_bridge.sandbox.evoucher import (
    EvoucherSandbox,
    EvoucherSeed,
    Terminal,
    create_app,
    load_seed,
)
from voucher_bridge.sandbox.faults import FaultConfig, FaultInjector, FaultKind

__all__ = [
    "EvoucherSandbox",
    "EvoucherSeed",
    "FaultConfig",
    "FaultInjector",
    "FaultKind",
    "Terminal",
    "create_app",
    "load_seed",
]
