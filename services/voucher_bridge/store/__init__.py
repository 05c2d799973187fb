"""Where each command's record (and each terminal's upstream session) lives."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlparse

from voucher_bridge.store.base import CommandStore


def open_store(url: str, timeout_s: float = 5.0) -> CommandStore:
    """`sqlite:///relative/path`, `sqlite:////absolute/path`, or `postgresql://…`; `timeout_s`:
    how long a PostgreSQL operation waits for a connection."""
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        from voucher_bridge.store.sqlite import SqliteStore

        return SqliteStore(Path(url.removeprefix("sqlite:///")))
    if scheme in ("postgresql", "postgres"):
        from voucher_bridge.store.postgres import PostgresStore

        return PostgresStore(url, timeout_s=timeout_s)
    raise ValueError(f"IDEMPOTENCY_STORE_URL: unsupported scheme {scheme!r}")


class StoreSessions:
    """Each terminal's upstream cookie jar, kept in the store (survives restarts and moves),
    with a write-through copy in memory: a till's commands run on the instance that owns its
    partition, so the copy is right until the partitions move. `forget()` on every rebalance."""

    def __init__(self, store: CommandStore) -> None:
        self._store = store
        self._cache: dict[str, dict[str, str]] = {}

    async def load(self, terminal: str) -> dict[str, str]:
        cached = self._cache.get(terminal)
        if cached is None:
            cached = self._cache[terminal] = await self._store.load_session(terminal)
        return dict(cached)

    async def save(self, terminal: str, cookies: dict[str, str]) -> None:
        await self._store.save_session(terminal, cookies, time.time())
        self._cache[terminal] = dict(cookies)

    def forget(self) -> None:
        self._cache.clear()


class StoreBills:
    """Each till's bill (evoucher/bill.py), kept in the store with a write-through copy in
    memory, as StoreSessions keeps the cookie jars: right while this instance owns the till's
    partition; `forget()` on every rebalance."""

    def __init__(self, store: CommandStore) -> None:
        self._store = store
        self._cache: dict[str, str | None] = {}

    async def load(self, terminal: str) -> str | None:
        if terminal not in self._cache:
            self._cache[terminal] = await self._store.load_bill(terminal)
        return self._cache[terminal]

    async def save(self, terminal: str, bill: str) -> None:
        if self._cache.get(terminal) == bill and terminal in self._cache:
            return  # unchanged: no write
        await self._store.save_bill(terminal, bill, time.time())
        self._cache[terminal] = bill

    def forget(self) -> None:
        self._cache.clear()
