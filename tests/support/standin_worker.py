"""A stand-in for `voucher_bridge.workers.worker` that speaks the same wire, for the pool's
supervision tests. It runs no pipeline: it says a record done at once, unless its value says
otherwise:

- b"kills-every-worker": it dies (exit 1, nothing said); b"kills-one-worker": the same, if no
  worker has died of that record yet;
- b"freezes-once": its event loop blocks for a minute (it says nothing, "alive" included), if
  no worker has frozen yet;
- b"garbles-once": it answers with a frame that is no message, if no worker has yet;
- b"runs-until-cancelled": it answers only when the service cancels it ("cancel").

With STANDIN_WORKER_HANG_ONCE set, the first worker started after one has died never says it
is ready. Each record it receives is written to the file named by STANDIN_WORKER_LOG as a line
"<monotonic time> <instance> <value>", and each cancel it gets as "... cancelled:<value>", so
that a test can tell where and when each ran; the marker files beside it say what happened.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from pathlib import Path

from voucher_bridge.workers import wire


def _note(path: Path, line: str) -> None:
    with path.open("a") as log:
        log.write(line + "\n")


def _first_time(received: Path, what: str) -> bool:
    """Whether no worker has done `what` yet (and now one has)."""
    marker = received.with_suffix(f".{what}")
    if marker.exists():
        return False
    marker.touch()
    return True


async def serve(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    first = await wire.read_message(reader)
    assert first is not None and first[0] == "settings"
    instance = f"standin-{os.getpid()}"
    received = Path(os.environ["STANDIN_WORKER_LOG"])
    if (
        os.environ.get("STANDIN_WORKER_HANG_ONCE")
        and received.with_suffix(".died").exists()
        and _first_time(received, "hung")
    ):
        await asyncio.sleep(3600)
    writer.write(wire.frame(("ready", instance)))

    async def say_alive() -> None:
        while True:
            writer.write(wire.frame(("alive",)))
            await asyncio.sleep(wire.ALIVE_EVERY_S)

    alive = asyncio.create_task(say_alive())
    running: dict[int, tuple[bytes, asyncio.Task[None]]] = {}

    async def run(seq: int, value: bytes) -> None:
        _note(received, f"{time.monotonic()} {instance} {value.decode()}")
        if value == b"kills-every-worker" or (
            value == b"kills-one-worker" and _first_time(received, "died")
        ):
            _first_time(received, "died")
            os._exit(1)
        if value == b"freezes-once" and _first_time(received, "froze"):
            time.sleep(60)  # blocks the loop, as a stuck call would
        if value == b"garbles-once" and _first_time(received, "garbled"):
            body = b"no pickle"
            writer.write(struct.pack(">I", len(body)) + body)
            return
        if value == b"runs-until-cancelled":
            await asyncio.sleep(3600)
        writer.write(wire.frame(("done", seq)))

    while (message := await wire.read_message(reader)) is not None:
        if message[0] == "run":
            seq, value = message[1], message[2].value
            running[seq] = (value, asyncio.create_task(run(seq, value)))
        elif message[0] == "cancel" and message[1] in running:
            value, task = running.pop(message[1])
            _note(received, f"{time.monotonic()} {instance} cancelled:{value.decode()}")
            task.cancel()
        elif message[0] == "metrics?":
            writer.write(wire.frame(("collected",)))
        elif message[0] == "stop":
            break
    alive.cancel()
    writer.close()


if __name__ == "__main__":
    asyncio.run(serve(socket.socket(fileno=int(os.environ[wire.FD_VARIABLE]))))
