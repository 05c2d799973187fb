"""Exactly-once effect: every command applied to the upstream at most once, answered always.

Kafka redelivers (restarts, rebalances, producer retries) and no Kafka transaction covers an
HTTP call, so each command's (source, id) gets a durable record (`store.base`) that says what
was done about it. This module drives that record around one command:

- first time: act, store the result, publish it;
- seen and answered: publish the stored result again (same result id), no upstream call;
- same key, different content: `rejected`, `idempotency_key_reused`, no upstream call;
- held by a live instance (a copy in flight elsewhere): wait for it, then publish its result;
- held by a dead instance: go on from where it got to; if a money-moving call may have gone
  out, find out what happened (the handler's `recover`) instead of sending it again.

Background work: the instance's heartbeat (how others tell it is alive), settling results that
were `indeterminate` (published again, superseding the earlier one, once the upstream can tell),
and removing records past their retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from voucher_bridge import metrics
from voucher_bridge.results import Decision, result
from voucher_bridge.store.base import (
    ClaimKind,
    CommandKey,
    CommandStore,
    LostClaim,
    NewCommand,
    State,
    Unsettled,
)
from voucher_contracts import (
    CommandEnvelope,
    Outcome,
    ResultData,
    UpstreamReport,
    content_hash,
    result_id,
)

log = logging.getLogger(__name__)

BeforeSend = Callable[[], Awaitable[None]]


class Handler(Protocol):
    money_moving: frozenset[str]

    async def handle(
        self, command: CommandEnvelope, record_key: str | None, before_send: BeforeSend | None
    ) -> ResultData: ...

    async def recover(self, command: CommandEnvelope, record_key: str | None) -> ResultData: ...

    async def settle(self, command: CommandEnvelope, previous: ResultData) -> ResultData | None: ...


class RoutedHandler:
    """One handler made of several, chosen by the command's type."""

    def __init__(self, routes: Mapping[str, Handler]) -> None:
        self._routes = dict(routes)
        self.money_moving = frozenset().union(*(h.money_moving for h in self._routes.values()))

    async def handle(
        self, command: CommandEnvelope, record_key: str | None, before_send: BeforeSend | None
    ) -> ResultData:
        return await self._routes[command.type].handle(command, record_key, before_send)

    async def recover(self, command: CommandEnvelope, record_key: str | None) -> ResultData:
        return await self._routes[command.type].recover(command, record_key)

    async def settle(self, command: CommandEnvelope, previous: ResultData) -> ResultData | None:
        return await self._routes[command.type].settle(command, previous)


@dataclass(frozen=True)
class Answered:
    """A command's result, ready to publish under `result_id`."""

    data: ResultData
    result_id: str
    # Answered from the store, no upstream call this time: bookkeeping, not part of the answer.
    replayed: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Timing:
    heartbeat_interval_s: float = 2.0
    # An instance whose heartbeat is older than this is taken for dead; keep it well above
    # the heartbeat interval and any clock skew between instances.
    stale_after_s: float = 15.0
    busy_poll_s: float = 0.2
    settle_interval_s: float = 5.0
    # How long after a redeem went out a scan can still tell what happened: the upstream
    # keeps a scanned voucher locked to the terminal for 5 minutes.
    settle_window_s: float = 240.0
    retention_s: float = 7 * 24 * 3600.0
    purge_interval_s: float = 600.0


class ExactlyOnce:
    def __init__(
        self,
        store: CommandStore,
        handler: Handler,
        timing: Timing | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._handler = handler
        self._timing = timing or Timing()
        self._clock = clock
        self.instance = uuid.uuid4().hex
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, publish_superseding: PublishSuperseding) -> None:
        await self.store.open()
        await self.store.heartbeat(self.instance, self._clock())
        self._tasks = [
            asyncio.create_task(self._every(self._timing.heartbeat_interval_s, self._beat)),
            asyncio.create_task(
                self._every(
                    self._timing.settle_interval_s, lambda: self.settle(publish_superseding)
                )
            ),
            asyncio.create_task(self._every(self._timing.purge_interval_s, self.purge)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.store.retire(self.instance)  # its claims are free at once, not after a wait
        await self.store.close()

    async def _every(self, interval_s: float, work: Callable[[], Awaitable[object]]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await work()
            except Exception:
                log.exception("background %s failed; trying again later", work)

    async def _beat(self) -> None:
        await self.store.heartbeat(self.instance, self._clock())

    # -- one command --------------------------------------------------------------------------

    async def execute(self, command: CommandEnvelope, record_key: bytes | None) -> Answered:
        key = CommandKey(command.source, command.id)
        digest = content_hash(command)
        new = NewCommand(
            key=key,
            content_hash=digest,
            type=command.type,
            subject=command.subject,
            envelope=command.model_dump_json(),
            record_key=record_key,
        )
        text_key = record_key.decode("utf-8", "replace") if record_key is not None else None
        while True:
            now = self._clock()
            claim = await self.store.claim(
                new, self.instance, now, now - self._timing.stale_after_s
            )
            if claim.kind is ClaimKind.DONE:
                assert claim.result is not None
                data = ResultData.model_validate_json(claim.result)
                answer_id = result_id(key.source, key.id, claim.revision)
                return Answered(data, answer_id, replayed=True)
            if claim.kind is ClaimKind.CONFLICT:
                return Answered(
                    _key_reused(command),
                    # Not the original's result id: this answers a different command.
                    result_id(key.source, f"{key.id}#{digest}"),
                )
            if claim.kind is ClaimKind.BUSY:
                await asyncio.sleep(self._timing.busy_poll_s)
                continue
            assert claim.token is not None
            token = claim.token

            async def before_send(token: str = token) -> None:
                await self.store.mark_sent(key, token, self._clock())

            resuming_sent = claim.kind is ClaimKind.RESUME and claim.previous is State.SENT
            try:
                data = await self._act(command, text_key, before_send, resuming_sent)
            except LostClaim:
                # Taken over before the call went out: the other instance answers it.
                log.warning("%s %s: claim lost to another instance", command.type, command.id)
                continue
            unsettled = (
                data.outcome is Outcome.INDETERMINATE and command.type in self._handler.money_moving
            )
            try:
                await self.store.complete(
                    key, token, data.model_dump_json(), unsettled, self._clock()
                )
            except LostClaim:
                # Another instance thought this one dead and took the command over: its
                # answer is the one that counts. Ask the store again.
                log.warning("%s %s: claim lost to another instance", command.type, command.id)
                continue
            return Answered(data, result_id(key.source, key.id))

    async def _act(
        self,
        command: CommandEnvelope,
        text_key: str | None,
        before_send: BeforeSend,
        resuming_sent: bool,
    ) -> ResultData:
        sent = resuming_sent

        async def mark_and_note() -> None:
            nonlocal sent
            await before_send()
            sent = True

        try:
            if resuming_sent:
                log.warning("%s %s: resuming after a crash mid-call", command.type, command.id)
                return await self._handler.recover(command, text_key)
            return await self._handler.handle(command, text_key, mark_and_note)
        except LostClaim:
            raise
        except Exception as exc:
            # A bug must not stop the partition, and the sender must hear back. Whether a
            # money-moving call went out is known: it had if the recovery point was passed.
            log.exception("handling %s %s failed", command.type, command.id)
            outcome = Outcome.INDETERMINATE if sent else Outcome.FAILED
            decision = Decision(outcome, "internal_error", type(exc).__name__)
            return result(command, decision, UpstreamReport())

    # -- background ---------------------------------------------------------------------------

    async def settle(self, publish: PublishSuperseding) -> int:
        """Try again to settle indeterminate results; publish each one settled. Returns how many."""
        settled = 0
        for pending in await self.store.unsettled(limit=100):
            try:
                settled += await self._settle_one(pending, publish)
            except Exception:
                # One record the upstream keeps failing on must not hold up the others.
                log.exception("settling %s failed; trying again later", pending.key)
        return settled

    async def _settle_one(self, pending: Unsettled, publish: PublishSuperseding) -> int:
        previous = ResultData.model_validate_json(pending.result)
        command = CommandEnvelope.model_validate_json(pending.envelope)
        now = self._clock()
        window = self._timing.settle_window_s
        if pending.sent_at is not None and now - pending.sent_at >= window:
            # The upstream can no longer tell: the result stays indeterminate, under its id,
            # and the ledger reconciles it.
            await self.store.give_up(pending.key, pending.revision, now)
            return 0
        data = await self._handler.settle(command, previous)
        if data is None:
            return 0
        old_id = result_id(pending.key.source, pending.key.id, pending.revision)
        new_id = result_id(pending.key.source, pending.key.id, pending.revision + 1)
        data = data.model_copy(update={"supersedes": old_id})
        # Published before it is stored as settled: a crash in between publishes it again
        # (same id) rather than never.
        await publish(pending.record_key, command, Answered(data, new_id))
        metrics.superseded.add(1, {"command_type": command.type})
        stored = await self.store.settle(
            pending.key, pending.revision, data.model_dump_json(), False, self._clock()
        )
        return 1 if stored else 0

    async def purge(self) -> int:
        before = self._clock() - self._timing.retention_s
        removed = 0
        while True:
            count = await self.store.purge(before, limit=1000)
            removed += count
            if count < 1000:
                return removed
            await asyncio.sleep(0)  # let commands through between batches


class PublishSuperseding(Protocol):
    async def __call__(
        self, record_key: bytes | None, command: CommandEnvelope, answered: Answered
    ) -> None: ...


def _key_reused(command: CommandEnvelope) -> ResultData:
    decision = Decision(
        Outcome.REJECTED,
        "idempotency_key_reused",
        "another command with this source and id, with different content, came first",
    )
    return result(command, decision, UpstreamReport())
