"""Worker processes for the commands of the service's partitions: more than one core each.

The service's process keeps what must be one: the group membership, the key-ordered dispatch
and the offsets (`kafka.dispatcher`), settling, purging, the console and the probes. Each
record it would have run itself goes instead to one of N worker processes, chosen by its
partition and key, so that a key always meets the same worker (its till's session and bill are
cached there) and its order holds: the dispatcher hands a key's next record over only once the
worker has reported the one before done, that is once its result (or dead letter) has been
acknowledged by the broker. The offset is committed by the dispatcher after that, as before.

A worker that dies (or stops answering on its socket) is killed if it is not dead yet, and its
instance is retired in the store before anything of it is run again: its records' claims are
then a dead instance's, and the worker that takes them over goes on through the store from
where they stood (`once.ExactlyOnce`), never sending blindly. Its records are handed to its
replacement; a record whose worker died under it more than `max_losses` times (2) runs in the
service's own process, so that a record that kills workers still ends. A worker whose event
loop says nothing for `silent_after_s` (it says "alive" every second), or that is not ready
`start_timeout_s` after its start, is killed and replaced the same way. A record the service
gives up (a drain that timed out) is cancelled in its worker too, as it would be in-process.

Hand-made: FastStream and aiokafka run one event loop per consumer, and the multiprocessing
module's pools neither keep a key on one process nor tell which records a dead process held.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import socket
import sys
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from voucher_bridge import metrics, telemetry
from voucher_bridge.kafka.records import Record
from voucher_bridge.settings import Settings
from voucher_bridge.workers import wire

log = logging.getLogger(__name__)

Process = Callable[[Record], Awaitable[None]]


def worker_count(workers: int | None) -> int:
    """WORKERS; unset, the cores this process may use, at most 4 (1 core: the commands run in
    the service's own process). The service's process needs little of a core of its own
    (0.2 ms of CPU per record in `make bench`, against 2-3 ms per command in a worker), so
    the workers get every core; beyond 4, the upstream's connection bound (shared out among
    the workers) and the service's process are the limits sooner than the cores."""
    if workers is not None:
        return workers
    return max(1, min(4, available_cores()))


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, bounded by a cgroup's CPU quota (a
    container's limit, which the affinity does not show)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # cgroup v1 or none: the affinity it is
    return cores


# How long a scrape waits for the workers' metrics.
_METRICS_WAIT_S = 1.0


class WorkerLost(Exception):
    """The worker running a record died, or was stopped, before it said the record was done."""


class WorkerFailed(Exception):
    """Processing raised in the worker (a bug); the dispatcher tries the record again."""


class _Worker:
    """One worker process and what the service has handed it."""

    def __init__(self, index: int, generation: int) -> None:
        self.index = index
        self.generation = generation
        self.process: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.instance: str | None = None  # its ExactlyOnce's, in the store
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending: dict[int, asyncio.Future[None]] = {}
        self.lost = False
        self.replaced = asyncio.Event()  # set once a successor has taken its place
        self.reading: asyncio.Task[None] | None = None
        # When it last said anything (monotonic): its event loop says "alive" every second
        # (`wire.ALIVE_EVERY_S`), so a silent worker is one whose loop is stuck.
        self.heard = time.monotonic()
        self.spawned = time.monotonic()
        self.metrics_asked: asyncio.Future[None] | None = None  # a scrape waits on its answer

    def kill(self) -> None:
        """SIGKILL, if it still runs: its socket then closes, and it is replaced as a crash is."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    def send(self, message: tuple[object, ...]) -> None:
        if self.writer is None or self.writer.is_closing():
            raise WorkerLost(f"worker {self.index} has no socket")
        self.writer.write(wire.frame(message))


class WorkerPool:
    def __init__(
        self,
        settings: Settings,
        count: int,
        *,
        in_process: Process,
        retire: Callable[[str], Awaitable[None]],
        retire_timeout_s: float = 5.0,
        max_losses: int = 2,
        start_timeout_s: float = 60.0,
        # After the drain a worker runs nothing: it stops its producer and store connection.
        stop_timeout_s: float = 10.0,
        silent_after_s: float = 30.0,
        # The module each worker process runs (`python -m`); the tests' stand-ins differ.
        worker_module: str = "voucher_bridge.workers.worker",
    ) -> None:
        self._settings = settings
        self.count = count
        self._in_process = in_process
        self._retire = retire
        self._retire_timeout_s = retire_timeout_s
        self._max_losses = max_losses
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._silent_after_s = silent_after_s
        self._worker_module = worker_module
        self._workers: list[_Worker] = []
        self._seq = itertools.count()
        self._generations = itertools.count()
        self._closing = False
        self._replacing: set[asyncio.Task[None]] = set()
        self._watching: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._start_delay = [0.25] * count  # before a worker is started again (backoff)
        self._metrics: dict[str, telemetry.ForwardedMetrics] = {}
        # Each worker process's last `worker.live` (recent outcomes and requests, circuit
        # states), by generation: a dead one's counts stay in the console's last minutes.
        self._live: dict[int, dict[str, Any]] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each is ready (its store and producer up)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        telemetry.worker_metrics = self.forwarded_metrics
        self._workers = [_Worker(i, next(self._generations)) for i in range(self.count)]
        try:
            await asyncio.gather(*(self._spawn(w) for w in self._workers))
            async with asyncio.timeout(self._start_timeout_s):
                await asyncio.gather(*(w.ready for w in self._workers))
        except BaseException:
            await self.stop()
            raise
        log.info("%d worker processes ready", self.count)
        self._watching = asyncio.create_task(self._watch(), name="worker-watch")

    async def stop(self) -> None:
        """Stop every worker (what each runs finishes first), bounded; kill what is left."""
        self._closing = True
        if self._watching is not None:
            self._watching.cancel()
        for task in list(self._replacing):
            task.cancel()
        for worker in self._workers:
            worker.replaced.set()  # nothing waits for a successor any more
        workers = [w for w in self._workers if w.process is not None]
        for worker in workers:
            with contextlib.suppress(WorkerLost, ConnectionError):
                worker.send(("stop",))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._stop_timeout_s):
                await asyncio.gather(*(w.process.wait() for w in workers if w.process))
        for worker in workers:
            await self._ended(worker, "stopped")
        telemetry.worker_metrics = None

    def ready(self) -> bool:
        """Every worker is up (readiness)."""
        return bool(self._workers) and all(
            w.ready.done()
            and not w.ready.cancelled()
            and w.ready.exception() is None
            and not w.lost
            for w in self._workers
        )

    def forwarded_metrics(self) -> Mapping[str, telemetry.ForwardedMetrics]:
        """The workers' metrics as of now: asked for, on the scrape's thread, and waited for
        up to `_METRICS_WAIT_S` (past that, each worker's last, at most 2 s old)."""
        loop = self._loop
        if loop is not None and not loop.is_closed() and threading.get_ident() != self._thread:
            asked = asyncio.run_coroutine_threadsafe(self.ask_for_metrics(), loop)
            with contextlib.suppress(Exception):  # late, or the loop stopping: the last ones
                asked.result(timeout=_METRICS_WAIT_S)
        return dict(self._metrics)

    async def ask_for_metrics(self) -> None:
        """Have every running worker send its metrics and console counts now (at most
        `_METRICS_WAIT_S`), rather than reading the last ones, up to 2 s old."""
        asked = []
        for worker in self._workers:
            if worker.lost or not worker.ready.done() or worker.ready.exception():
                continue
            if worker.metrics_asked is None or worker.metrics_asked.done():
                worker.metrics_asked = asyncio.get_running_loop().create_future()
                with contextlib.suppress(WorkerLost, ConnectionError):
                    worker.send(("metrics?",))
            asked.append(worker.metrics_asked)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_METRICS_WAIT_S):
                await asyncio.gather(*asked)

    def recent(self, what: str, upstream: str | None = None) -> list[dict[int, dict[str, int]]]:
        """The workers' recent counts per minute: "outcomes", or "requests" of `upstream`."""
        found = []
        for live in self._live.values():
            counts = live.get(what, {})
            found.append(counts.get(upstream, {}) if upstream is not None else counts)
        return found

    def breaker_states(self, upstream: str) -> list[str]:
        """Each running worker's circuit state for `upstream`, as it last said."""
        return [
            live["breakers"][upstream]
            for w in self._workers
            if (live := self._live.get(w.generation)) is not None
        ]

    async def _watch(self) -> None:
        """Kill a worker whose event loop has said nothing for `silent_after_s` (blocked, or
        stuck in a call that never yields), or that is still not ready `start_timeout_s` after
        its start: its records then go on in its replacement, as a crash's would, rather than
        waiting for ever."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for worker in self._workers:
                process = worker.process
                if worker.lost or process is None or process.returncode is not None:
                    continue
                if worker.ready.done():
                    why, since, bound = "has said nothing", worker.heard, self._silent_after_s
                else:
                    why, since, bound = "is not ready", worker.spawned, self._start_timeout_s
                if now - since > bound:
                    log.error(
                        "worker %d (pid %d) %s after %.0f s: killing it",
                        worker.index,
                        process.pid,
                        why,
                        now - since,
                    )
                    worker.kill()

    def _forget_old_live(self) -> None:
        """Drop the counts of dead workers that are older than any the console shows."""
        running = {w.generation for w in self._workers}
        shown_since = int(time.time() // 60) - metrics.recent_outcomes.minutes
        for generation, live in list(self._live.items()):
            if generation in running:
                continue
            minutes = [*live["outcomes"], *(m for r in live["requests"].values() for m in r)]
            if max(minutes, default=0) < shown_since:
                del self._live[generation]

    # -- records ------------------------------------------------------------------------------

    def index_of(self, record: Record) -> int:
        # crc32, not hash(): the same key meets the same worker in every process and run.
        key = record.key if record.key is not None else b""
        return zlib.crc32(record.partition.to_bytes(4, "big") + key) % self.count

    async def process(self, record: Record) -> None:
        """Run `record` in its worker and wait until the worker has ended it."""
        index = self.index_of(record)
        lost = 0
        while True:
            if self._closing:
                raise WorkerLost("the workers are stopping")
            worker = self._workers[index]
            if worker.lost:  # died under another record: wait for its replacement
                await self._replaced(worker)
                continue
            try:
                await self._run(worker, record)
                return
            except WorkerLost as exc:
                lost += 1
                if lost > self._max_losses:
                    break
                log.warning(
                    "%s[%d]@%d: %s (%d of %d); handing it to the worker's replacement",
                    record.topic,
                    record.partition,
                    record.offset,
                    exc,
                    lost,
                    self._max_losses + 1,
                )
        log.error(
            "%s[%d]@%d: its worker died under it %d times; running it in the service's process",
            record.topic,
            record.partition,
            record.offset,
            self._max_losses + 1,
        )
        await self._in_process(record)

    async def _run(self, worker: _Worker, record: Record) -> None:
        try:
            async with asyncio.timeout(self._start_timeout_s):
                await asyncio.shield(worker.ready)
        except TimeoutError:
            # Stuck in its start: killed (once, counted once), and the record waits for the
            # worker that replaces it.
            worker.lost = True
            worker.kill()
            raise WorkerLost(f"worker {worker.index} did not start") from None
        if worker.lost:
            raise WorkerLost(f"worker {worker.index} died")
        seq = next(self._seq)
        done = asyncio.get_running_loop().create_future()
        worker.pending[seq] = done
        try:
            worker.send(
                (
                    "run",
                    seq,
                    wire.WireRecord(
                        record.topic,
                        record.partition,
                        record.offset,
                        record.timestamp,
                        record.key,
                        record.value,
                        list(record.headers),
                    ),
                )
            )
            await done
        except asyncio.CancelledError:
            # A drain that timed out (or the service stopping) gives the record up, as
            # in-process: the worker cancels it too, and its claim is given back at once.
            with contextlib.suppress(WorkerLost, ConnectionError):
                worker.send(("cancel", seq))
            raise
        finally:
            worker.pending.pop(seq, None)

    async def _replaced(self, worker: _Worker) -> None:
        """Until the lost `worker` has a replacement (or the pool closes)."""
        await worker.replaced.wait()

    def forget(self) -> None:
        """After a rebalance: each worker drops what it caches of tills (sessions, bills)."""
        for worker in self._workers:
            if worker.ready.done() and not worker.lost:
                with contextlib.suppress(WorkerLost, ConnectionError):
                    worker.send(("forget",))

    # -- one process --------------------------------------------------------------------------

    async def _spawn(self, worker: _Worker) -> None:
        ours, theirs = socket.socketpair()
        try:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                self._worker_module,
                env={**os.environ, wire.FD_VARIABLE: str(theirs.fileno())},
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        reader, worker.writer = await asyncio.open_unix_connection(sock=ours)
        worker.send(("settings", self._settings, worker.index, self.count))
        worker.reading = asyncio.create_task(
            self._read(worker, reader), name=f"worker-{worker.index}"
        )

    async def _read(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        try:
            await self._read_messages(worker, reader)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A message that cannot be read (a bug): the worker is treated as lost, so that
            # what it held goes on in its replacement rather than waiting for ever.
            log.exception("worker %d: reading its messages failed", worker.index)
        if not self._closing:
            metrics.workers_lost.add(1)
            task = asyncio.create_task(self._replace(worker))
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)

    async def _read_messages(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        while (message := await wire.read_message(reader)) is not None:
            worker.heard = time.monotonic()
            kind = message[0]
            if kind == "done":
                if (done := worker.pending.get(message[1])) is not None and not done.done():
                    done.set_result(None)
            elif kind == "failed":
                if (done := worker.pending.get(message[1])) is not None and not done.done():
                    done.set_exception(WorkerFailed(f"worker {worker.index}: {message[2]}"))
            elif kind == "metrics":
                self._metrics[str(worker.index)] = message[1]
                self._live[worker.generation] = message[2]
            elif kind == "collected":  # the answer to "metrics?", after any "metrics"
                if worker.metrics_asked is not None and not worker.metrics_asked.done():
                    worker.metrics_asked.set_result(None)
            elif kind == "ready":
                worker.instance = message[1]
                if not worker.ready.done():
                    worker.ready.set_result(None)

    async def _ended(self, worker: _Worker, why: str) -> None:
        """Make sure `worker` is dead, retire its instance, and fail what it still held."""
        worker.lost = True
        # Not answering but alive: killed before anything of it runs again, so that it can
        # never call an upstream beside its replacement.
        worker.kill()
        if worker.process is not None:
            await worker.process.wait()
        if worker.writer is not None:
            worker.writer.close()
        if worker.instance is not None:
            try:
                async with asyncio.timeout(self._retire_timeout_s):
                    await self._retire(worker.instance)
            except Exception as exc:
                # Its claims are free once its heartbeat is stale (INSTANCE_STALE_AFTER_S).
                log.warning("could not retire worker %d's instance: %s", worker.index, exc)
        if not worker.ready.done():
            worker.ready.set_exception(WorkerLost(f"worker {worker.index} {why}"))
            worker.ready.exception()  # retrieved: a worker stopped before its start says so
        for done in worker.pending.values():
            if not done.done():
                done.set_exception(WorkerLost(f"worker {worker.index} {why}"))

    async def _replace(self, worker: _Worker) -> None:
        await self._ended(worker, "died")
        process = worker.process
        log.error(
            "worker %d (pid %s) has gone (exit %s); starting another",
            worker.index,
            process.pid if process else "?",
            process.returncode if process else "?",
        )
        if worker.instance is None:
            # It died before it was ready (its store or broker refused it, say): the next one
            # waits, longer each time, rather than being started in a tight loop.
            self._start_delay[worker.index] = min(10.0, 2 * self._start_delay[worker.index])
            await asyncio.sleep(self._start_delay[worker.index])
        else:
            self._start_delay[worker.index] = 0.25
        delay = 0.5
        while not self._closing:
            successor = _Worker(worker.index, next(self._generations))
            try:
                await self._spawn(successor)
            except Exception as exc:  # the records of its keys wait for it: never give up
                log.error("could not start a worker: %s; trying again in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            self._workers[worker.index] = successor
            worker.replaced.set()
            self._forget_old_live()
            log.warning("worker %d started again", worker.index)
            return
