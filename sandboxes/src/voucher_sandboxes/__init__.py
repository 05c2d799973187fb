"""Local stand-ins for the upstream voucher APIs, for the demo, the tests and the benchmarks.

Not part of the service: this distribution is installed for development, tests, the demo and
the bench, never by the service's image or a production install.

`evoucher` is the eVOUCHER POS API as its Postman collection documents it; `epin` the Epixel
Epin coupons API as its OpenAPI document does; `faults` is the fault injection both share;
`server` and `epin_server` run one with uvicorn; `localstack` runs the sandboxes and the service
as processes (and plays the POS and the back office on Kafka), for `demo`, tests and bench.
"""

from __future__ import annotations

from pathlib import Path

# The seed files (terminals, vouchers, Epin users and coupons) shipped with the sandboxes.
SEEDS = Path(__file__).resolve().parent / "seeds"
EVOUCHER_SEED = SEEDS / "evoucher-seed.json"
EPIN_SEED = SEEDS / "epin-seed.json"

__all__ = ["EPIN_SEED", "EVOUCHER_SEED", "SEEDS"]
