"""The service's wiring, where it can be checked without a broker."""

from __future__ import annotations

import gc

from voucher_bridge.app import Service
from voucher_bridge.settings import Settings


async def test_after_startup_freezes_what_startup_made() -> None:
    # The collector must not walk the process's long-lived objects on every full collection
    # (a ~50 ms stop of the event loop under load, `make bench`): they are frozen once started.
    service = Service(Settings.model_construct())
    gc.unfreeze()
    try:
        await service.after_startup()
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
