"""The shared store: PostgreSQL, for several instances of the service in one consumer group.

A claim runs in one transaction that locks the command's row (`SELECT … FOR UPDATE`), so two
instances that see the same command at once get one `new` and one `busy`.

Liveness is judged by the database's clock (`clock_timestamp()`), never a host's own, and the
heartbeat (with the sweep of stranded claims) runs on a connection of its own, so that it never
waits behind command traffic for a connection of the pool.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

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

SCHEMA = """
CREATE TABLE IF NOT EXISTS vb_commands (
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    type TEXT NOT NULL,
    subject TEXT NOT NULL,
    envelope TEXT NOT NULL,
    record_key BYTEA,
    state TEXT NOT NULL,
    owner TEXT,
    token TEXT,
    sent_at DOUBLE PRECISION,
    result TEXT,
    revision INTEGER NOT NULL DEFAULT 0,
    unsettled BOOLEAN NOT NULL DEFAULT FALSE,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (source, id)
);
CREATE INDEX IF NOT EXISTS vb_commands_unsettled ON vb_commands (unsettled) WHERE unsettled;
CREATE INDEX IF NOT EXISTS vb_commands_done_at ON vb_commands (updated_at) WHERE state = 'done';
CREATE INDEX IF NOT EXISTS vb_commands_owner ON vb_commands (owner) WHERE owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS vb_instances (
    id TEXT PRIMARY KEY, heartbeat_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS vb_terminal_sessions (
    terminal TEXT PRIMARY KEY, cookies TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS vb_terminal_bills (
    terminal TEXT PRIMARY KEY, bill TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS vb_operator_actions (
    seq BIGSERIAL PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS vb_operator_actions_target ON vb_operator_actions (action, target);
"""


# Columns added after the first release: added where missing (looked up first, so that a start
# does not take ALTER TABLE's exclusive lock when nothing is missing), and their indexes.
ADDED_COLUMNS = {
    "kafka_topic": "TEXT",
    "kafka_partition": "INTEGER",
    "before_image": "TEXT",
    "settle_owner": "TEXT",
    "settle_until": "DOUBLE PRECISION",
    "needs_operator": "BOOLEAN NOT NULL DEFAULT FALSE",
}
ADDED_INDEXES = """
CREATE INDEX IF NOT EXISTS vb_commands_operator ON vb_commands (needs_operator)
    WHERE needs_operator;
CREATE INDEX IF NOT EXISTS vb_commands_subject ON vb_commands (subject, created_at);
"""

_DB_NOW = "extract(epoch from clock_timestamp())"


class PostgresStore:
    system = "postgresql"

    def __init__(self, url: str, max_connections: int = 20, timeout_s: float = 5.0) -> None:
        self._url = url
        self._timeout_s = timeout_s
        # `timeout`: how long an operation waits for a connection; with the server down it
        # fails after that rather than after the pool's default 30 s, and is tried again.
        self._pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            open=False,
            timeout=timeout_s,
            kwargs={"autocommit": True, "connect_timeout": max(1, round(timeout_s))},
        )
        self._liveness: AsyncConnection[Any] | None = None

    async def open(self) -> None:
        await self._pool.open(wait=True, timeout=30)
        # One instance at a time creates the schema (CREATE … IF NOT EXISTS can race).
        async with self._pool.connection() as db, db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock(727274)")
            await db.execute(SCHEMA)
            cursor = await db.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'vb_commands'"
            )
            have = {row[0] for row in await cursor.fetchall()}
            for name, kind in ADDED_COLUMNS.items():
                if name not in have:
                    await db.execute(f"ALTER TABLE vb_commands ADD COLUMN {name} {kind}")
            await db.execute(ADDED_INDEXES)

    async def close(self) -> None:
        if self._liveness is not None:
            await self._liveness.close()
            self._liveness = None
        await self._pool.close()

    async def _on_liveness_connection(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        """Run `sql` on the heartbeat's own connection, made again after any failure."""
        if self._liveness is None or self._liveness.closed:
            self._liveness = await AsyncConnection.connect(
                self._url, autocommit=True, connect_timeout=max(1, round(self._timeout_s))
            )
        try:
            cursor = await self._liveness.execute(sql, params)
            return await cursor.fetchall() if cursor.description else []
        except Exception:
            await self._liveness.close()
            self._liveness = None
            raise

    async def _execute(self, sql: str, params: tuple[Any, ...]) -> int:
        async with self._pool.connection() as db:
            cursor = await db.execute(sql, params)
            return cursor.rowcount

    async def heartbeat(self, instance: str) -> None:
        await self._on_liveness_connection(
            f"INSERT INTO vb_instances (id, heartbeat_at) VALUES (%s, {_DB_NOW}) "
            "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            (instance,),
        )

    async def known_instances(self, instances: Collection[str]) -> set[str]:
        async with self._pool.connection() as db:
            cursor = await db.execute(
                "SELECT id FROM vb_instances WHERE id = ANY(%s)", (list(instances),)
            )
            rows = await cursor.fetchall()
        return {r[0] for r in rows}

    async def release_stranded(self, instance: str, running: Collection[CommandKey]) -> int:
        rows = await self._on_liveness_connection(
            "SELECT source, id, token FROM vb_commands WHERE owner = %s AND state != 'done'",
            (instance,),
        )
        keep = set(running)
        stranded = [r for r in rows if CommandKey(r[0], r[1]) not in keep]
        for source, id_, token in stranded:
            # The token guards against a claim made again (by this instance) since the select.
            await self._on_liveness_connection(
                "UPDATE vb_commands SET owner = NULL, token = NULL "
                "WHERE source = %s AND id = %s AND token = %s",
                (source, id_, token),
            )
        return len(stranded)

    async def retire(self, instance: str) -> None:
        await self._execute("DELETE FROM vb_instances WHERE id = %s", (instance,))

    async def claim(
        self,
        command: NewCommand,
        instance: str,
        now: float,
        stale_after_s: float,
        take_over: bool = False,
    ) -> Claim:
        key = command.key
        token = uuid.uuid4().hex
        async with self._pool.connection() as db, db.transaction():
            inserted = await db.execute(
                "INSERT INTO vb_commands (source, id, content_hash, type, subject, envelope, "
                "record_key, kafka_topic, kafka_partition, state, owner, token, created_at, "
                "updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 'received', %s, %s, "
                "%s, %s) ON CONFLICT (source, id) DO NOTHING",
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
            if inserted.rowcount == 1:
                return Claim(ClaimKind.NEW, token=token)
            stored = await _locked_row(db, key, stale_after_s)
            claim = decide_claim(stored, command.content_hash, token, instance, take_over)
            if claim.kind is ClaimKind.RESUME:
                await db.execute(
                    "UPDATE vb_commands SET owner = %s, token = %s, updated_at = %s "
                    "WHERE source = %s AND id = %s",
                    (instance, token, now, key.source, key.id),
                )
            return claim

    async def mark_sent(
        self, key: CommandKey, token: str, now: float, before: str | None = None
    ) -> None:
        updated = await self._execute(
            "UPDATE vb_commands SET state = 'sent', sent_at = %s, before_image = %s, "
            "updated_at = %s WHERE source = %s AND id = %s AND token = %s AND state != 'done'",
            (now, before, now, key.source, key.id, token),
        )
        if updated != 1:
            raise LostClaim(f"{key}")

    async def complete(
        self, key: CommandKey, token: str, result: str, unsettled: bool, now: float
    ) -> None:
        updated = await self._execute(
            # The token stays: a repeated attempt (its answer lost) matches again.
            "UPDATE vb_commands SET state = 'done', result = %s, unsettled = %s, owner = NULL, "
            "updated_at = %s WHERE source = %s AND id = %s AND token = %s "
            "AND (state != 'done' OR result = %s)",
            (result, unsettled, now, key.source, key.id, token, result),
        )
        if updated != 1:
            raise LostClaim(f"{key}")

    async def release(self, key: CommandKey, token: str) -> bool:
        updated = await self._execute(
            "UPDATE vb_commands SET owner = NULL, token = NULL "
            "WHERE source = %s AND id = %s AND token = %s AND state != 'done'",
            (key.source, key.id, token),
        )
        return updated == 1

    async def unsettled(
        self, limit: int, partitions: Collection[tuple[str, int]] | None = None
    ) -> list[Unsettled]:
        where = f"unsettled AND (settle_until IS NULL OR settle_until < {_DB_NOW})"
        params: list[Any] = []
        if partitions is not None:
            owned = list(partitions)
            where += (
                " AND (kafka_topic IS NULL OR (kafka_topic, kafka_partition) IN "
                "(SELECT * FROM unnest(%s::text[], %s::int[])))"
            )
            params += [[t for t, _ in owned], [p for _, p in owned]]
        return await self._select_done(where, params, limit, "coalesce(settle_until, 0)")

    async def needing_operator(self, limit: int) -> list[Unsettled]:
        return await self._select_done("needs_operator", [], limit, "updated_at")

    async def unsettled_summary(self) -> UnsettledSummary:
        async with self._pool.connection() as db:
            cursor = await db.execute(
                "SELECT count(*) FILTER (WHERE unsettled), "
                "min(created_at) FILTER (WHERE unsettled), "
                "count(*) FILTER (WHERE needs_operator) "
                "FROM vb_commands WHERE (unsettled OR needs_operator) AND state = 'done'"
            )
            settling, oldest, left = await cursor.fetchone() or (0, None, 0)
        return UnsettledSummary(int(settling), oldest, int(left))

    async def _select_done(
        self, where: str, params: list[Any], limit: int, order: str
    ) -> list[Unsettled]:
        async with self._pool.connection() as db:
            cursor = await db.execute(
                "SELECT source, id, envelope, record_key, result, revision, sent_at, "
                "before_image, kafka_topic, kafka_partition, subject, created_at "
                f"FROM vb_commands WHERE {where} AND state = 'done' ORDER BY {order} LIMIT %s",
                (*params, limit),
            )
            rows = await cursor.fetchall()
        return [Unsettled(CommandKey(r[0], r[1]), r[2], _bytes(r[3]), *r[4:]) for r in rows]

    async def postpone_settle(
        self, key: CommandKey, revision: int, instance: str, delay_s: float
    ) -> bool:
        # No owner: a wait, not a lease (an operator's recheck may cut it short).
        updated = await self._execute(
            f"UPDATE vb_commands SET settle_owner = NULL, settle_until = {_DB_NOW} + %s "
            "WHERE source = %s AND id = %s AND revision = %s AND state = 'done'",
            (delay_s, key.source, key.id, revision),
        )
        return updated == 1

    async def later_commands(self, subject: str, after: float, limit: int) -> list[str]:
        async with self._pool.connection() as db:
            cursor = await db.execute(
                "SELECT envelope FROM vb_commands WHERE subject = %s AND created_at > %s "
                "ORDER BY created_at LIMIT %s",
                (subject, after, limit),
            )
            rows = await cursor.fetchall()
        return [r[0] for r in rows]

    async def known(self, key: CommandKey) -> bool:
        async with self._pool.connection() as db:
            cursor = await db.execute(
                "SELECT 1 FROM vb_commands WHERE source = %s AND id = %s", (key.source, key.id)
            )
            return await cursor.fetchone() is not None

    async def lease_settle(
        self, key: CommandKey, revision: int, instance: str, lease_s: float
    ) -> bool:
        updated = await self._execute(
            f"UPDATE vb_commands SET settle_owner = %s, settle_until = {_DB_NOW} + %s "
            "WHERE source = %s AND id = %s AND revision = %s AND state = 'done' AND unsettled "
            f"AND (settle_until IS NULL OR settle_until < {_DB_NOW} OR settle_owner = %s)",
            (instance, lease_s, key.source, key.id, revision, instance),
        )
        return updated == 1

    async def settle(
        self,
        key: CommandKey,
        revision: int,
        result: str,
        unsettled: bool,
        now: float,
        needs_operator: bool = False,
    ) -> bool:
        updated = await self._execute(
            "UPDATE vb_commands SET result = %s, revision = revision + 1, unsettled = %s, "
            "needs_operator = %s, settle_owner = NULL, settle_until = NULL, updated_at = %s "
            "WHERE source = %s AND id = %s AND revision = %s AND state = 'done'",
            (result, unsettled, needs_operator, now, key.source, key.id, revision),
        )
        return updated == 1

    # -- for operators ---------------------------------------------------------------------

    async def lookup(self, key: CommandKey) -> CommandRow | None:
        rows = await self._rows("source = %s AND id = %s", [key.source, key.id], "created_at", 1)
        return rows[0] if rows else None

    async def by_subject(self, subject: str, limit: int) -> list[CommandRow]:
        return await self._rows("subject = %s", [subject], "created_at DESC", limit)

    async def unsettled_rows(self, limit: int) -> list[CommandRow]:
        return await self._rows(
            "(unsettled OR needs_operator) AND state = 'done'", [], "created_at", limit
        )

    async def _rows(
        self, where: str, params: list[Any], order: str, limit: int
    ) -> list[CommandRow]:
        async with self._pool.connection() as db:
            cursor = await db.execute(
                f"SELECT {ROW_COLUMNS} FROM vb_commands WHERE {where} ORDER BY {order} LIMIT %s",
                (*params, limit),
            )
            rows = await cursor.fetchall()
        return [command_row(r) for r in rows]

    async def recheck_now(self, key: CommandKey) -> bool:
        updated = await self._execute(
            "UPDATE vb_commands SET settle_until = NULL, settle_owner = NULL "
            "WHERE source = %s AND id = %s AND state = 'done' AND unsettled "
            f"AND (settle_owner IS NULL OR settle_until IS NULL OR settle_until < {_DB_NOW})",
            (key.source, key.id),
        )
        return updated == 1

    async def lease_resolve(
        self, key: CommandKey, revision: int, instance: str, lease_s: float
    ) -> bool:
        updated = await self._execute(
            f"UPDATE vb_commands SET settle_owner = %s, settle_until = {_DB_NOW} + %s "
            "WHERE source = %s AND id = %s AND revision = %s AND state = 'done' "
            "AND (unsettled OR needs_operator) AND (settle_owner IS NULL "
            f"OR settle_until IS NULL OR settle_until < {_DB_NOW} OR settle_owner = %s)",
            (instance, lease_s, key.source, key.id, revision, instance),
        )
        return updated == 1

    async def record_action(self, action: OperatorAction) -> None:
        await self._execute(
            "INSERT INTO vb_operator_actions (at, actor, role, action, target, outcome, detail) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            action.row(),
        )

    async def actions(
        self,
        limit: int,
        action: str | None = None,
        target: str | None = None,
        since: float | None = None,
    ) -> list[OperatorAction]:
        where, params = action_filter(action, target, since, "%s")
        async with self._pool.connection() as db:
            cursor = await db.execute(
                "SELECT at, actor, role, action, target, outcome, detail "
                f"FROM vb_operator_actions {where} ORDER BY seq DESC LIMIT %s",
                (*params, limit),
            )
            rows = await cursor.fetchall()
        return [OperatorAction(*r) for r in rows]

    async def purge(self, before: float, limit: int) -> int:
        return await self._execute(
            "DELETE FROM vb_commands WHERE ctid IN (SELECT ctid FROM vb_commands WHERE "
            "state = 'done' AND NOT unsettled AND NOT needs_operator AND updated_at < %s "
            "LIMIT %s)",
            (before, limit),
        )

    async def count(self) -> int:
        async with self._pool.connection() as db:
            cursor = await db.execute("SELECT count(*) FROM vb_commands")
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def load_session(self, terminal: str) -> dict[str, str]:
        async with self._pool.connection() as db:
            cursor = await db.execute(
                "SELECT cookies FROM vb_terminal_sessions WHERE terminal = %s", (terminal,)
            )
            row = await cursor.fetchone()
        return dict(json.loads(row[0])) if row else {}

    async def save_session(self, terminal: str, cookies: dict[str, str], now: float) -> None:
        await self._execute(
            "INSERT INTO vb_terminal_sessions (terminal, cookies, updated_at) "
            "VALUES (%s, %s, %s) ON CONFLICT (terminal) DO UPDATE SET "
            "cookies = excluded.cookies, updated_at = excluded.updated_at",
            (terminal, json.dumps(cookies), now),
        )

    async def load_bill(self, terminal: str) -> str | None:
        async with self._pool.connection() as db:
            cursor = await db.execute(
                "SELECT bill FROM vb_terminal_bills WHERE terminal = %s", (terminal,)
            )
            row = await cursor.fetchone()
        return str(row[0]) if row else None

    async def save_bill(self, terminal: str, bill: str, now: float) -> None:
        await self._execute(
            "INSERT INTO vb_terminal_bills (terminal, bill, updated_at) "
            "VALUES (%s, %s, %s) ON CONFLICT (terminal) DO UPDATE SET "
            "bill = excluded.bill, updated_at = excluded.updated_at",
            (terminal, bill, now),
        )


async def _locked_row(
    db: AsyncConnection[Any], key: CommandKey, stale_after_s: float
) -> StoredCommand:
    cursor = await db.execute(
        "SELECT c.content_hash, c.state, c.sent_at, c.result, c.revision, c.owner, "
        f"coalesce(i.heartbeat_at >= {_DB_NOW} - %s, FALSE), c.before_image "
        "FROM vb_commands c LEFT JOIN vb_instances i ON i.id = c.owner "
        "WHERE c.source = %s AND c.id = %s FOR UPDATE OF c",
        (stale_after_s, key.source, key.id),
    )
    row = await cursor.fetchone()
    assert row is not None  # it conflicted on insert, and records are never deleted in flight
    return StoredCommand(
        row[0], State(row[1]), row[2], row[3], row[4], row[5], bool(row[6]), row[7]
    )


def _bytes(value: Any) -> bytes | None:
    return bytes(value) if value is not None else None
