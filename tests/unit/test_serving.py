"""How the process ends: a stop that cannot finish is ended at its bound, saying so."""

from __future__ import annotations

import subprocess
import sys
import time

from voucher_bridge.serving import UNFINISHED_STOP_STATUS, shutdown_bound_s


def test_the_watchdog_ends_a_stop_that_does_not_finish() -> None:
    script = (
        "import logging, time\n"
        "logging.basicConfig()\n"
        "from voucher_bridge.serving import StopWatchdog\n"
        "StopWatchdog(0.5).start()\n"
        "time.sleep(30)\n"  # a close that hangs
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == UNFINISHED_STOP_STATUS
    assert time.monotonic() - started < 10
    assert "the stop did not finish within 0 s" in done.stderr or "within 1 s" in done.stderr


def test_a_cancelled_watchdog_lets_the_process_end_by_itself() -> None:
    script = (
        "import time\n"
        "from voucher_bridge.serving import StopWatchdog\n"
        "w = StopWatchdog(0.5); w.start(); w.cancel()\n"
        "time.sleep(1.0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=20)
    assert done.returncode == 0


def test_the_bound_is_the_drain_and_a_margin() -> None:
    assert shutdown_bound_s(30.0) == 40.0
