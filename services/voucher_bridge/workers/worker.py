"""A worker process: runs the commands the service hands it, with its own event loop, store
connection, upstream clients and producer (`runtime.CommandRuntime`, the same parts the service
runs in-process with one worker).

Started by `pool.WorkerPool` only, as `python -m voucher_bridge.workers.worker`, with the socket
to the service inherited (VOUCHER_BRIDGE_WORKER_FD). It reports each record when the pipeline
has ended it (its result or dead letter acknowledged by the broker); the service commits.
SIGINT and SIGTERM are the service's to act on: a worker stops when the service says so, or
when the service has gone (end of stream), each time after what it runs has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import math
import os
import signal
import socket
from typing import Any

from voucher_bridge import metrics
from voucher_bridge.kafka.records import Record
from voucher_bridge.runtime import CommandRuntime
from voucher_bridge.settings import Settings
from voucher_bridge.telemetry import (
    ForwardedMetrics,
    configure_tracing,
    configure_worker_metrics,
)
from voucher_bridge.workers import wire

log = logging.getLogger(__name__)


def share_of(settings: Settings, count: int) -> Settings:
    """A worker's settings: the upstreams' connection bounds are the instance's, shared out
    (EVOUCHER_MAX_CONNECTIONS bounds what the shop site gets from the instance, not per
    process)."""
    return settings.model_copy(
        update={
            "evoucher_max_connections": max(
                1, math.floor(settings.evoucher_max_connections / count)
            ),
            "epin_max_connections": max(1, math.floor(settings.epin_max_connections / count)),
        }
    )


def live(runtime: CommandRuntime) -> dict[str, Any]:
    """What the console's overview shows of this worker: its recent outcomes and requests
    per minute, and its upstreams' circuit states."""
    return {
        "outcomes": metrics.recent_outcomes.snapshot(),
        "requests": {name: r.snapshot() for name, r in metrics.recent_requests.items()},
        "breakers": {
            name: breaker.state.name.lower() if breaker is not None else "off"
            for name, breaker in (
                ("evoucher", runtime.evoucher.guard.breaker),
                ("epin", runtime.epin.guard.breaker),
            )
        },
    }


async def serve(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    first = await wire.read_message(reader)
    if first is None or first[0] != "settings":
        return
    _, given, index, count = first
    settings = share_of(given, count)
    loop = asyncio.get_running_loop()

    def send(message: tuple[Any, ...]) -> None:
        if not writer.is_closing():
            writer.write(wire.frame(message))

    configure_tracing()
    runtime = CommandRuntime(settings)

    def forward(batch: ForwardedMetrics) -> None:  # on the exporter's thread
        with contextlib.suppress(RuntimeError):  # the loop has closed: the service has gone
            loop.call_soon_threadsafe(send_metrics, batch)

    def send_metrics(batch: ForwardedMetrics) -> None:  # on the loop, which owns what it reads
        send(("metrics", batch, live(runtime)))

    metrics_provider, forwarding = configure_worker_metrics(forward)
    await runtime.start(background=False)
    # As the service does after its start (app.after_startup): what lives as long as the
    # process is left out of the collector's full passes.
    gc.collect()
    gc.freeze()
    send(("ready", runtime.once.instance))
    log.info("worker %d of %d ready (instance %s)", index, count, runtime.once.instance)

    running: dict[int, asyncio.Task[None]] = {}

    async def say_alive() -> None:
        while True:
            send(("alive",))
            await asyncio.sleep(wire.ALIVE_EVERY_S)

    alive = asyncio.create_task(say_alive(), name="alive")

    def forget_task(seq: int, _: asyncio.Task[None]) -> None:
        running.pop(seq, None)

    async def run(seq: int, record: Record) -> None:
        try:
            await runtime.process(record)
        except Exception as exc:
            # The pipeline ends every record itself; what still raises is a bug, reported so
            # that the service's dispatcher tries it again as it would in-process.
            log.exception(
                "processing %s[%d]@%d failed", record.topic, record.partition, record.offset
            )
            send(("failed", seq, type(exc).__name__))
        else:
            send(("done", seq))

    while (message := await wire.read_message(reader)) is not None:
        kind = message[0]
        if kind == "run":
            seq = message[1]
            running[seq] = asyncio.create_task(run(seq, message[2]))
            running[seq].add_done_callback(functools.partial(forget_task, seq))
        elif kind == "cancel":  # given up by the service: its claim is given back at once
            if (task := running.get(message[1])) is not None:
                task.cancel()
        elif kind == "metrics?":  # the service is being scraped
            # Exports only if there is anything, its "metrics" queued on the loop: the answer
            # goes after it.
            forwarding.collect()
            loop.call_soon(send, ("collected",))
        elif kind == "forget":
            runtime.forget()
        elif kind == "stop":
            break
    # Stopped, or the service has gone: what runs finishes first (each command is bounded by
    # COMMAND_TIMEOUT_S), and its claims are retired, free at once for the next owner.
    if running:
        await asyncio.wait(running.values(), timeout=settings.command_timeout_s + 30)
    alive.cancel()
    await runtime.stop()
    await runtime.aclose_clients()
    # The last figures, and no export after the loop has closed (at the interpreter's exit).
    await asyncio.to_thread(metrics_provider.shutdown, 5_000)
    await asyncio.sleep(0)  # the flushed batch's send, queued from the exporter's thread
    writer.close()
    log.info("worker %d stopped", index)


def main() -> None:
    import uvloop

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s [worker %(process)d]: %(message)s",
    )
    sock = socket.socket(fileno=int(os.environ[wire.FD_VARIABLE]))
    uvloop.run(serve(sock))


if __name__ == "__main__":
    main()
