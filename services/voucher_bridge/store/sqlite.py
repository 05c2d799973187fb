"""The embedded store: one SQLite file, for a single instance of the service.

The standard library's sqlite3 in one dedicated thread, which keeps SQLite's single-writer rule
trivially true. WAL with `synchronous=FULL`: a committed claim or result survives a crash of
the process and of the machine.

Group commit: an fsync per operation would cap the service at a few hundred commands a second,
so the thread runs every operation waiting for it in one transaction, each in a savepoint of its
own (a failing operation undoes only itself), and answers each caller only after the COMMIT.
No caller is told its claim or result is stored before it is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import queue
import sqlite3
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from voucher_bridge.store.base import (
    ROW_COLUMNS,
    Claim,
    ClaimKind,
    CommandKey,
    CommandRow,
    LostClaim,
    NewCommand,
    OperatorAction,
    State,
    StoredCommand,
    Unsettled,
    UnsettledSummary,
    action_filter,
    command_row,
    decide_claim,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    type TEXT NOT NULL,
    subject TEXT NOT NULL,
    envelope TEXT NOT NULL,
    record_key BLOB,
    state TEXT NOT NULL,
    owner TEXT,
    token TEXT,
    sent_at REAL,
    result TEXT,
    revision INTEGER NOT NULL DEFAULT 0,
    unsettled INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (source, id)
);
CREATE TABLE IF NOT EXISTS instances (id TEXT PRIMARY KEY, heartbeat_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS commands_unsettled ON commands (unsettled) WHERE unsettled = 1;
CREATE INDEX IF NOT EXISTS commands_done_at ON commands (updated_at) WHERE state = 'done';
CREATE INDEX IF NOT EXISTS commands_owner ON commands (owner) WHERE owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS terminal_sessions (
    terminal TEXT PRIMARY KEY, cookies TEXT NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS terminal_bills (
    terminal TEXT PRIMARY KEY, bill TEXT NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS operator_actions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS operator_actions_target ON operator_actions (action, target);
"""


# Columns added after the first release, added to a file made before them (ALTER TABLE ... ADD
# COLUMN; SQLite has no IF NOT EXISTS for it).
ADDED_COLUMNS = {
    "kafka_topic": "TEXT",
    "kafka_partition": "INTEGER",
    "before_image": "TEXT",
    "settle_owner": "TEXT",
    "settle_until": "REAL",
    "needs_operator": "INTEGER NOT NULL DEFAULT 0",
}


def _add_columns(db: sqlite3.Connection) -> None:
    # In one write transaction: two processes opening a fresh file at once must not both add.
    db.execute("BEGIN IMMEDIATE")
    try:
        have = {row[1] for row in db.execute("PRAGMA table_info(commands)")}
        for name, kind in ADDED_COLUMNS.items():
            if name not in have:
                db.execute(f"ALTER TABLE commands ADD COLUMN {name} {kind}")
        db.execute(
            "CREATE INDEX IF NOT EXISTS commands_operator ON commands (needs_operator) "
            "WHERE needs_operator = 1"
        )
        db.execute("CREATE INDEX IF NOT EXISTS commands_subject ON commands (subject, created_at)")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _enable_wal(db: sqlite3.Connection, deadline_s: float = 10.0) -> None:
    # SQLite answers "database is locked" to a journal-mode change at once, without calling
    # the busy handler, while another connection is opening the same fresh file; so wait here.
    give_up_at = time.monotonic() + deadline_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > give_up_at:
                raise
            time.sleep(0.01)


class SqliteStore:
    """`clock`: the store's clock, by which liveness is judged (one host: its own)."""

    system = "sqlite"

    def __init__(
        self, path: Path, synchronous: str = "FULL", clock: Callable[[], float] = time.time
    ) -> None:
        self._path = path
        self._synchronous = synchronous
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._db: sqlite3.Connection | None = None
        self._turns: int | None = None  # the writers' lock file (see `_writers_take_turns`)
        self._waiting: queue.SimpleQueue[_Operation[Any]] = queue.SimpleQueue()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        operation: _Operation[T] = _Operation(fn, loop.create_future(), loop)
        self._waiting.put(operation)
        # One batch per submission at most; a batch finds the queue empty when an earlier
        # one took this operation along.
        loop.run_in_executor(self._executor, self._run_batch)
        return await operation.future

    def _run_batch(self) -> None:
        batch: list[_Operation[Any]] = []
        while True:
            try:
                batch.append(self._waiting.get_nowait())
            except queue.Empty:
                break
        if not batch:
            return
        db = self._db
        if db is None:
            for operation in batch:
                operation.fail(RuntimeError("store not opened"))
            return
        outcomes: list[tuple[_Operation[Any], Any, BaseException | None]] = []
        try:
            with self._writers_take_turns():
                self._run_in_transaction(db, batch, outcomes)
        except BaseException as exc:
            for operation in batch:
                operation.fail(exc)
            return
        for operation, value, error in outcomes:
            if error is not None:
                operation.fail(error)
            else:
                operation.succeed(value)

    @contextlib.contextmanager
    def _writers_take_turns(self) -> Iterator[None]:
        """One batch at a time across the processes that write this file (the service and
        its worker processes, workers/pool.py, or the command line's), in the order they ask.
        SQLite's own busy handler, which it still backs, polls: it sleeps 1, 2, 5, 10, 15 ms…
        between tries, far longer than a batch holds the lock, so two busy processes would
        mostly wait; a process blocked in flock() is woken the moment the lock is free."""
        if self._turns is None:
            yield
            return
        fcntl.flock(self._turns, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._turns, fcntl.LOCK_UN)

    @staticmethod
    def _run_in_transaction(
        db: sqlite3.Connection,
        batch: list[_Operation[Any]],
        outcomes: list[tuple[_Operation[Any], Any, BaseException | None]],
    ) -> None:
        try:
            db.execute("BEGIN IMMEDIATE")
            for operation in batch:
                db.execute("SAVEPOINT operation")
                try:
                    value = operation.fn(db)
                except Exception as exc:
                    db.execute("ROLLBACK TO operation")
                    outcomes.append((operation, None, exc))
                else:
                    outcomes.append((operation, value, None))
                db.execute("RELEASE operation")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    async def open(self) -> None:
        def connect() -> None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            # The busy timeout from the start: switching to WAL needs a lock that another
            # connection opening the same file at the same moment may hold.
            db = sqlite3.connect(
                self._path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
            _enable_wal(db)
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            db.executescript(SCHEMA)
            _add_columns(db)
            self._db = db  # transactions are begun and ended by _run_batch
            lock = self._path.with_name(self._path.name + ".lock")
            self._turns = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

        await asyncio.get_running_loop().run_in_executor(self._executor, connect)

    async def close(self) -> None:
        def disconnect() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._turns is not None:
                os.close(self._turns)
                self._turns = None

        await asyncio.get_running_loop().run_in_executor(self._executor, disconnect)
        self._executor.shutdown(wait=True)

    async def heartbeat(self, instance: str) -> None:
        # One instance per file, so the heartbeat is only for the next process on the same
        # file (a restart): it shares the writer, whose batches are short.
        now = self._clock()
        await self._run(
            lambda db: db.execute(
                "INSERT INTO instances (id, heartbeat_at) VALUES (?, ?) "
                "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (instance, now),
            )
        )

    async def known_instances(self, instances: Collection[str]) -> set[str]:
        wanted = list(instances)
        if not wanted:
            return set()
        marks = ",".join("?" * len(wanted))
        rows = await self._run(
            lambda db: db.execute(
                f"SELECT id FROM instances WHERE id IN ({marks})", wanted
            ).fetchall()
        )
        return {r[0] for r in rows}

    async def release_stranded(self, instance: str, running: Collection[CommandKey]) -> int:
        keep = set(running)

        def release(db: sqlite3.Connection) -> int:
            rows = db.execute(
                "SELECT source, id, token FROM commands WHERE owner = ? AND state != 'done'",
                (instance,),
            ).fetchall()
            stranded = [r for r in rows if CommandKey(r[0], r[1]) not in keep]
            for source, id_, token in stranded:
                db.execute(
                    "UPDATE commands SET owner = NULL, token = NULL "
                    "WHERE source = ? AND id = ? AND token = ?",
                    (source, id_, token),
                )
            return len(stranded)

        return await self._run(release)

    async def retire(self, instance: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM instances WHERE id = ?", (instance,)))

    async def claim(
        self,
        command: NewCommand,
        instance: str,
        now: float,
        stale_after_s: float,
        take_over: bool = False,
    ) -> Claim:
        stale_before = self._clock() - stale_after_s

        def claim(db: sqlite3.Connection) -> Claim:
            key = command.key
            row = db.execute(
                "SELECT content_hash, state, sent_at, result, revision, owner, "
                "coalesce((SELECT heartbeat_at >= ? FROM instances WHERE id = commands.owner), 0), "
                "before_image FROM commands WHERE source = ? AND id = ?",
                (stale_before, key.source, key.id),
            ).fetchone()
            token = uuid.uuid4().hex
            if row is None:
                db.execute(
                    "INSERT INTO commands (source, id, content_hash, type, subject, envelope, "
                    "record_key, kafka_topic, kafka_partition, state, owner, token, created_at, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'received', ?, ?, ?, ?)",
                    (
                        key.source,
                        key.id,
                        command.content_hash,
                        command.type,
                        command.subject,
                        command.envelope,
                        command.record_key,
                        command.topic,
                        command.partition,
                        instance,
                        token,
                        now,
                        now,
                    ),
                )
                return Claim(ClaimKind.NEW, token=token)
            stored = StoredCommand(
                row[0], State(row[1]), row[2], row[3], row[4], row[5], bool(row[6]), row[7]
            )
            claim = decide_claim(stored, command.content_hash, token, instance, take_over)
            if claim.kind is ClaimKind.RESUME:
                db.execute(
                    "UPDATE commands SET owner = ?, token = ?, updated_at = ? "
                    "WHERE source = ? AND id = ?",
                    (instance, token, now, key.source, key.id),
                )
            return claim

        return await self._run(claim)

    async def mark_sent(
        self, key: CommandKey, token: str, now: float, before: str | None = None
    ) -> None:
        def mark(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE commands SET state = 'sent', sent_at = ?, before_image = ?, "
                "updated_at = ? WHERE source = ? AND id = ? AND token = ? AND state != 'done'",
                (now, before, now, key.source, key.id, token),
            ).rowcount

        if await self._run(mark) != 1:
            raise LostClaim(f"{key}")

    async def complete(
        self, key: CommandKey, token: str, result: str, unsettled: bool, now: float
    ) -> None:
        def complete(db: sqlite3.Connection) -> int:
            return db.execute(
                # The token stays: a repeated attempt (its answer lost) matches again.
                "UPDATE commands SET state = 'done', result = ?, unsettled = ?, owner = NULL, "
                "updated_at = ? WHERE source = ? AND id = ? AND token = ? "
                "AND (state != 'done' OR result = ?)",
                (result, int(unsettled), now, key.source, key.id, token, result),
            ).rowcount

        if await self._run(complete) != 1:
            raise LostClaim(f"{key}")

    async def release(self, key: CommandKey, token: str) -> bool:
        def release(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE commands SET owner = NULL, token = NULL "
                "WHERE source = ? AND id = ? AND token = ? AND state != 'done'",
                (key.source, key.id, token),
            ).rowcount

        return bool(await self._run(release))

    async def unsettled(
        self, limit: int, partitions: Collection[tuple[str, int]] | None = None
    ) -> list[Unsettled]:
        now = self._clock()
        where = "unsettled = 1 AND (settle_until IS NULL OR settle_until < ?)"
        params: list[Any] = [now]
        if partitions is not None:
            owned = list(partitions)
            pairs = " OR ".join("(kafka_topic = ? AND kafka_partition = ?)" for _ in owned)
            where += f" AND (kafka_topic IS NULL{' OR ' + pairs if pairs else ''})"
            params += [v for pair in owned for v in pair]
        return await self._select_done(where, params, limit, "coalesce(settle_until, 0)")

    async def needing_operator(self, limit: int) -> list[Unsettled]:
        return await self._select_done("needs_operator = 1", [], limit, "updated_at")

    async def unsettled_summary(self) -> UnsettledSummary:
        def summarise(db: sqlite3.Connection) -> UnsettledSummary:
            settling, oldest = db.execute(
                "SELECT count(*), min(created_at) FROM commands "
                "WHERE unsettled = 1 AND state = 'done'"
            ).fetchone()
            (left,) = db.execute(
                "SELECT count(*) FROM commands WHERE needs_operator = 1 AND state = 'done'"
            ).fetchone()
            return UnsettledSummary(settling, oldest, left)

        return await self._run(summarise)

    async def _select_done(
        self, where: str, params: list[Any], limit: int, order: str
    ) -> list[Unsettled]:
        def select(db: sqlite3.Connection) -> list[Unsettled]:
            rows = db.execute(
                "SELECT source, id, envelope, record_key, result, revision, sent_at, "
                "before_image, kafka_topic, kafka_partition, subject, created_at "
                f"FROM commands WHERE {where} AND state = 'done' ORDER BY {order} LIMIT ?",
                (*params, limit),
            ).fetchall()
            return [Unsettled(CommandKey(r[0], r[1]), *r[2:]) for r in rows]

        return await self._run(select)

    async def postpone_settle(
        self, key: CommandKey, revision: int, instance: str, delay_s: float
    ) -> bool:
        until = self._clock() + delay_s

        def postpone(db: sqlite3.Connection) -> int:
            # No owner: a wait, not a lease (an operator's recheck may cut it short).
            return db.execute(
                "UPDATE commands SET settle_owner = NULL, settle_until = ? "
                "WHERE source = ? AND id = ? AND revision = ? AND state = 'done'",
                (until, key.source, key.id, revision),
            ).rowcount

        return bool(await self._run(postpone))

    async def later_commands(self, subject: str, after: float, limit: int) -> list[str]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT envelope FROM commands WHERE subject = ? AND created_at > ? "
                "ORDER BY created_at LIMIT ?",
                (subject, after, limit),
            ).fetchall()
        )
        return [r[0] for r in rows]

    async def known(self, key: CommandKey) -> bool:
        row = await self._run(
            lambda db: db.execute(
                "SELECT 1 FROM commands WHERE source = ? AND id = ?", (key.source, key.id)
            ).fetchone()
        )
        return row is not None

    async def lease_settle(
        self, key: CommandKey, revision: int, instance: str, lease_s: float
    ) -> bool:
        now = self._clock()

        def lease(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE commands SET settle_owner = ?, settle_until = ? "
                "WHERE source = ? AND id = ? AND revision = ? AND state = 'done' AND unsettled = 1 "
                "AND (settle_until IS NULL OR settle_until < ? OR settle_owner = ?)",
                (instance, now + lease_s, key.source, key.id, revision, now, instance),
            ).rowcount

        return bool(await self._run(lease))

    async def settle(
        self,
        key: CommandKey,
        revision: int,
        result: str,
        unsettled: bool,
        now: float,
        needs_operator: bool = False,
    ) -> bool:
        def settle(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE commands SET result = ?, revision = revision + 1, unsettled = ?, "
                "needs_operator = ?, settle_owner = NULL, settle_until = NULL, updated_at = ? "
                "WHERE source = ? AND id = ? AND revision = ? AND state = 'done'",
                (result, int(unsettled), int(needs_operator), now, key.source, key.id, revision),
            ).rowcount

        return bool(await self._run(settle))

    # -- for operators ---------------------------------------------------------------------

    async def lookup(self, key: CommandKey) -> CommandRow | None:
        rows = await self._rows("source = ? AND id = ?", [key.source, key.id], "created_at", 1)
        return rows[0] if rows else None

    async def by_subject(self, subject: str, limit: int) -> list[CommandRow]:
        return await self._rows("subject = ?", [subject], "created_at DESC", limit)

    async def unsettled_rows(self, limit: int) -> list[CommandRow]:
        return await self._rows(
            "(unsettled = 1 OR needs_operator = 1) AND state = 'done'", [], "created_at", limit
        )

    async def _rows(
        self, where: str, params: list[Any], order: str, limit: int
    ) -> list[CommandRow]:
        def select(db: sqlite3.Connection) -> list[CommandRow]:
            rows = db.execute(
                f"SELECT {ROW_COLUMNS} FROM commands WHERE {where} ORDER BY {order} LIMIT ?",
                (*params, limit),
            ).fetchall()
            return [command_row(r) for r in rows]

        return await self._run(select)

    async def recheck_now(self, key: CommandKey) -> bool:
        now = self._clock()

        def recheck(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE commands SET settle_until = NULL, settle_owner = NULL "
                "WHERE source = ? AND id = ? AND state = 'done' AND unsettled = 1 "
                "AND (settle_owner IS NULL OR settle_until IS NULL OR settle_until < ?)",
                (key.source, key.id, now),
            ).rowcount

        return bool(await self._run(recheck))

    async def lease_resolve(
        self, key: CommandKey, revision: int, instance: str, lease_s: float
    ) -> bool:
        now = self._clock()

        def lease(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE commands SET settle_owner = ?, settle_until = ? "
                "WHERE source = ? AND id = ? AND revision = ? AND state = 'done' "
                "AND (unsettled = 1 OR needs_operator = 1) AND (settle_owner IS NULL "
                "OR settle_until IS NULL OR settle_until < ? OR settle_owner = ?)",
                (instance, now + lease_s, key.source, key.id, revision, now, instance),
            ).rowcount

        return bool(await self._run(lease))

    async def record_action(self, action: OperatorAction) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT INTO operator_actions (at, actor, role, action, target, outcome, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                action.row(),
            )
        )

    async def actions(
        self,
        limit: int,
        action: str | None = None,
        target: str | None = None,
        since: float | None = None,
    ) -> list[OperatorAction]:
        where, params = action_filter(action, target, since, "?")
        rows = await self._run(
            lambda db: db.execute(
                "SELECT at, actor, role, action, target, outcome, detail FROM operator_actions "
                f"{where} ORDER BY seq DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
        )
        return [OperatorAction(*r) for r in rows]

    async def purge(self, before: float, limit: int) -> int:
        def purge(db: sqlite3.Connection) -> int:
            return db.execute(
                "DELETE FROM commands WHERE rowid IN (SELECT rowid FROM commands WHERE "
                "state = 'done' AND unsettled = 0 AND needs_operator = 0 AND updated_at < ? "
                "LIMIT ?)",
                (before, limit),
            ).rowcount

        return await self._run(purge)

    async def count(self) -> int:
        return await self._run(lambda db: db.execute("SELECT count(*) FROM commands").fetchone()[0])

    async def load_session(self, terminal: str) -> dict[str, str]:
        row = await self._run(
            lambda db: db.execute(
                "SELECT cookies FROM terminal_sessions WHERE terminal = ?", (terminal,)
            ).fetchone()
        )
        return dict(json.loads(row[0])) if row else {}

    async def save_session(self, terminal: str, cookies: dict[str, str], now: float) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT INTO terminal_sessions (terminal, cookies, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (terminal) DO UPDATE SET cookies = excluded.cookies, "
                "updated_at = excluded.updated_at",
                (terminal, json.dumps(cookies), now),
            )
        )

    async def load_bill(self, terminal: str) -> str | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT bill FROM terminal_bills WHERE terminal = ?", (terminal,)
            ).fetchone()
        )
        return str(row[0]) if row else None

    async def save_bill(self, terminal: str, bill: str, now: float) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT INTO terminal_bills (terminal, bill, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (terminal) DO UPDATE SET bill = excluded.bill, "
                "updated_at = excluded.updated_at",
                (terminal, bill, now),
            )
        )


@dataclass(eq=False)
class _Operation(Generic[T]):
    """One call waiting for the writer thread, and how to answer it on its event loop."""

    fn: Callable[[sqlite3.Connection], T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop

    def succeed(self, value: T) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, value, None)

    def fail(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, None, error)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
