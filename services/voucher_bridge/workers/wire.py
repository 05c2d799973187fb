"""What the service and its worker processes say to each other, over one Unix socket pair.

Each message is a pickled tuple behind a 4-byte length. Pickle, not JSON: both ends are this
package's own code in one container (the socket is inherited, never listened on), and records
are bytes (keys, values, headers) that JSON would have to re-encode on the hot path.

From the service: ("settings", Settings, index, count) once, first; ("run", seq, record);
("cancel", seq) when the service gives a record up (a drain that timed out); ("forget",)
after a rebalance and around what ran in the service's process; ("metrics?",) when the
service is scraped; ("stop",).
From a worker: ("ready", instance); ("done", seq); ("failed", seq, detail) when processing
raised (a bug: the dispatcher tries again, as for the in-process pipeline);
("metrics", [(scope name, scope version, [Metric, ...]), ...], live) every 2 s and when
asked, if there is anything to report (live: what the console shows of it, `worker.live`);
("collected",) after that, answering "metrics?"; ("alive",) every `ALIVE_EVERY_S` from its
event loop, whatever else it does or says (the pool kills a worker silent for longer than
LIVENESS_LOOP_BLOCKED_S).
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_LENGTH = struct.Struct(">I")

# The worker's end of the socket pair, as an inherited file descriptor.
FD_VARIABLE = "VOUCHER_BRIDGE_WORKER_FD"

ALIVE_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class WireRecord:
    """A Kafka record as a worker gets it (the fields `kafka.records.Record` reads)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


def frame(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next message; None when the other end has gone (end of stream)."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        (length,) = _LENGTH.unpack(head)
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    message = pickle.loads(body)
    assert isinstance(message, tuple)
    return message
