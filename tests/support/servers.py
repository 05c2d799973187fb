"""Test servers on real sockets: the port a uvicorn server started with port 0 listens on."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn


async def serving_port(server: uvicorn.Server) -> int:
    """Waits (up to 5 s) for `server` to listen; returns its port."""
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    assert server.started
    port: int = server.servers[0].sockets[0].getsockname()[1]
    return port
