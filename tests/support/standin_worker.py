"""A stand-in for `voucher_bridge.workers.worker` that speaks the same wire, for the pool's
supervision tests: it runs no pipeline, it says each record done at once, and it dies (exit 1,
nothing said) on a record whose value is b"kills-every-worker", or on b"kills-one-worker" if
no worker has died of that record yet. Each record it receives is written to the file named by
STANDIN_WORKER_LOG as a line "<monotonic time> <instance> <value>", so that a test can tell
where and when each record ran."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

from voucher_bridge.workers import wire


def _note(path: Path, line: str) -> None:
    with path.open("a") as log:
        log.write(line + "\n")


async def serve(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    first = await wire.read_message(reader)
    assert first is not None and first[0] == "settings"
    instance = f"standin-{os.getpid()}"
    received = Path(os.environ["STANDIN_WORKER_LOG"])
    writer.write(wire.frame(("ready", instance)))
    while (message := await wire.read_message(reader)) is not None:
        if message[0] == "run":
            seq, record = message[1], message[2]
            _note(received, f"{time.monotonic()} {instance} {record.value.decode()}")
            marker = received.with_suffix(".died")
            if record.value == b"kills-every-worker" or (
                record.value == b"kills-one-worker" and not marker.exists()
            ):
                marker.touch()
                os._exit(1)
            writer.write(wire.frame(("done", seq)))
        elif message[0] == "stop":
            break
    writer.close()


if __name__ == "__main__":
    asyncio.run(serve(socket.socket(fileno=int(os.environ[wire.FD_VARIABLE]))))
