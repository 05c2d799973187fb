"""How the service's process ends.

SIGTERM is how an orchestrator asks a pod to stop: the service drains (bounded by
DRAIN_TIMEOUT_S), commits, and exits 0 (FastStream's run handles the signal; the HTTP server
runs on a thread of its own, health.py, so no server of its own raises the signal again, as
uvicorn's does, to end with the signal's status). A stop that cannot finish (a broker that no
longer answers the final commit, a hung close) must still end before the orchestrator's
SIGKILL, so a watchdog ends the process at `shutdown_bound_s`, saying so: what was not
committed is read again by the partition's next owner and answered from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import sys
import threading
import traceback

log = logging.getLogger(__name__)

# Beyond the drain: the broker stops its consumers, the store and the producer close.
SHUTDOWN_MARGIN_S = 10.0
# The exit status when the watchdog had to end a stop that did not finish (EX_SOFTWARE).
UNFINISHED_STOP_STATUS = 70


def shutdown_bound_s(drain_timeout_s: float) -> float:
    """How long after SIGTERM the process has ended, at the latest. The Helm chart's
    terminationGracePeriodSeconds is above it (DRAIN_TIMEOUT_S + 15)."""
    return drain_timeout_s + SHUTDOWN_MARGIN_S


class StopWatchdog:
    """Started when the stop begins; ends the process if the stop is not over in time."""

    def __init__(self, bound_s: float) -> None:
        self._bound_s = bound_s
        self._timer: threading.Timer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop that stops, to say what it waits on
            self._loop = asyncio.get_running_loop()
        if self._timer is None:
            self._timer = threading.Timer(self._bound_s, self._give_up)
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _give_up(self) -> None:
        log.error(
            "the stop did not finish within %.0f s (DRAIN_TIMEOUT_S + %.0f s): exiting now; "
            "what was not committed is answered again from the store by the next owner",
            self._bound_s,
            SHUTDOWN_MARGIN_S,
        )
        self._say_where_it_hangs()
        logging.shutdown()
        os._exit(UNFINISHED_STOP_STATUS)

    def _say_where_it_hangs(self) -> None:
        """Every thread's stack and every task's await, on stderr: what the stop waited on
        (read from this thread while the loop's is stuck: good enough for a last word)."""
        with contextlib.suppress(Exception):
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(Exception):
            for task in list(asyncio.all_tasks(loop)):
                frames = task.get_stack()
                where = "".join(traceback.format_stack(frames[-1])) if frames else "(no frame)\n"
                sys.stderr.write(f"task {task.get_name()} waits at:\n{where}")
            sys.stderr.flush()
