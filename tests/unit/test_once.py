"""ExactlyOnce over the SQLite store, with a scripted handler and a clock the tests move."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from voucher_bridge.once import Answered, BeforeSend, ExactlyOnce, Timing
from voucher_bridge.store import open_store
from voucher_bridge.store.base import (
    Claim,
    ClaimKind,
    CommandKey,
    CommandStore,
    NewCommand,
)
from voucher_contracts import CommandEnvelope, Outcome, ResultData, content_hash, result_id

SOURCE = "/stores/limassol-3/pos/till-1"
KEY = b"till-1"
T0 = 1_000_000.0
TIMING = Timing(stale_after_s=15.0, busy_poll_s=0.005, settle_window_s=240.0, retention_s=3600.0)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def data(command: CommandEnvelope, outcome: Outcome, **extra: Any) -> ResultData:
    return ResultData(
        command_id=command.id,
        command_source=command.source,
        command_type=command.type,
        outcome=outcome,
        **extra,
    )


@dataclass
class FakeHandler:
    """Records every call; does what its attributes say."""

    money_moving: frozenset[str] = frozenset({"pos.redeem"})
    outcome: Outcome = Outcome.SUCCEEDED
    fail_before_send: Exception | None = None
    fail_after_send: Exception | None = None
    # When set, handle() waits for it (after before_send when `wait_after_send`).
    gate: asyncio.Event | None = None
    wait_after_send: bool = False
    # What settle() returns: a fixed outcome, or None (still cannot tell).
    settle_outcome: Outcome | None = None
    calls: list[tuple[str, str, str | None]] = field(default_factory=list)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    sent: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(
        self, command: CommandEnvelope, record_key: str | None, before_send: BeforeSend | None
    ) -> ResultData:
        self.calls.append(("handle", command.id, record_key))
        self.entered.set()
        if self.gate is not None and not self.wait_after_send:
            await self.gate.wait()
        if self.fail_before_send is not None:
            raise self.fail_before_send
        if before_send is not None and command.type in self.money_moving:
            await before_send()
            self.calls.append(("sent", command.id, record_key))
            self.sent.set()
        if self.gate is not None and self.wait_after_send:
            await self.gate.wait()
        if self.fail_after_send is not None:
            raise self.fail_after_send
        return data(command, self.outcome, message=f"handled {len(self.calls)}")

    async def recover(self, command: CommandEnvelope, record_key: str | None) -> ResultData:
        self.calls.append(("recover", command.id, record_key))
        return data(command, Outcome.SUCCEEDED, message="recovered")

    async def settle(self, command: CommandEnvelope, previous: ResultData) -> ResultData | None:
        self.calls.append(("settle", command.id, previous.outcome.value))
        if self.settle_outcome is None:
            return None
        return data(command, self.settle_outcome, message="settled")

    def called(self, method: str) -> int:
        return sum(1 for call in self.calls if call[0] == method)


class Published:
    """A PublishSuperseding that keeps what it was given."""

    def __init__(self) -> None:
        self.items: list[tuple[bytes | None, CommandEnvelope, Answered]] = []

    async def __call__(
        self, record_key: bytes | None, command: CommandEnvelope, answered: Answered
    ) -> None:
        self.items.append((record_key, command, answered))


class SpyStore:
    """The store, with every claim's kind noted."""

    def __init__(self, store: CommandStore) -> None:
        self._store = store
        self.claims: list[ClaimKind] = []
        self._claimed = asyncio.Condition()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def claim(
        self, command: NewCommand, instance: str, now: float, stale_before: float
    ) -> Claim:
        claim = await self._store.claim(command, instance, now, stale_before)
        async with self._claimed:
            self.claims.append(claim.kind)
            self._claimed.notify_all()
        return claim

    async def seen(self, kind: ClaimKind, times: int = 1) -> None:
        """Returns once `times` claims of `kind` were made."""
        async with asyncio.timeout(5), self._claimed:
            await self._claimed.wait_for(lambda: self.claims.count(kind) >= times)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SpyStore]:
    store = open_store(f"sqlite:///{tmp_path / 'once.sqlite3'}")
    await store.open()
    yield SpyStore(store)
    await store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


Make = Callable[[FakeHandler], Awaitable[ExactlyOnce]]


@pytest.fixture
def make(store: SpyStore, clock: Clock) -> Make:
    """An instance on the shared store, alive (its heartbeat at the clock's now)."""

    async def make(handler: FakeHandler) -> ExactlyOnce:
        once = ExactlyOnce(store, handler, TIMING, clock)
        await store.heartbeat(once.instance, clock())
        return once

    return make


def redeem(id_: str = "cmd-1", codes: tuple[str, ...] = ("123456789012",)) -> CommandEnvelope:
    return CommandEnvelope(
        id=id_,
        source=SOURCE,
        type="pos.redeem",
        subject="till-1",
        data={"voucher_codes": list(codes)},
    )


def scan(id_: str = "cmd-2") -> CommandEnvelope:
    return CommandEnvelope(
        id=id_, source=SOURCE, type="pos.scan", subject="till-1", data={"voucher_code": "1"}
    )


async def stranded(
    make: Make, command: CommandEnvelope, after_send: bool
) -> tuple[ExactlyOnce, FakeHandler]:
    """`command` claimed by an instance that died in its handler (before or after the send)."""
    handler = FakeHandler(gate=asyncio.Event(), wait_after_send=after_send)
    dead = await make(handler)
    task = asyncio.create_task(dead.execute(command, KEY))
    await asyncio.wait_for(handler.entered.wait(), 5)
    if after_send:
        await asyncio.wait_for(handler.sent.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return dead, handler


# -- one command -------------------------------------------------------------------------------


async def test_first_execute_handles_once(make: Make) -> None:
    handler = FakeHandler()
    once = await make(handler)
    command = redeem()
    answered = await once.execute(command, KEY)
    assert answered.result_id == result_id(SOURCE, "cmd-1")
    assert answered.data.outcome is Outcome.SUCCEEDED
    assert handler.calls == [("handle", "cmd-1", "till-1"), ("sent", "cmd-1", "till-1")]


async def test_record_key_reaches_the_handler_as_text(make: Make) -> None:
    handler = FakeHandler()
    once = await make(handler)
    await once.execute(scan("k1"), None)
    await once.execute(scan("k2"), b"till-\xff")
    assert handler.calls == [("handle", "k1", None), ("handle", "k2", "till-\ufffd")]


async def test_redelivery_returns_the_stored_answer(make: Make, store: SpyStore) -> None:
    handler = FakeHandler()
    once = await make(handler)
    first = await once.execute(redeem(), KEY)
    handler.outcome = Outcome.FAILED  # would answer differently if asked again
    second = await once.execute(redeem(), KEY)
    assert second == first
    assert handler.called("handle") == 1
    # Another instance, too.
    other = await make(FakeHandler())
    assert await other.execute(redeem(), KEY) == first
    assert store.claims == [ClaimKind.NEW, ClaimKind.DONE, ClaimKind.DONE]


async def test_same_key_different_content_is_rejected(make: Make) -> None:
    handler = FakeHandler()
    once = await make(handler)
    original = await once.execute(redeem(codes=("111",)), KEY)
    reused = await once.execute(redeem(codes=("222",)), KEY)
    assert reused.data.outcome is Outcome.REJECTED
    assert reused.data.reason == "idempotency_key_reused"
    assert reused.data.command_id == "cmd-1"
    assert reused.result_id != original.result_id
    assert handler.called("handle") == 1
    # The original's answer is untouched.
    assert await once.execute(redeem(codes=("111",)), KEY) == original


async def test_received_by_a_dead_instance_is_handled_again(
    make: Make, store: SpyStore, clock: Clock
) -> None:
    command = redeem()
    _, dead = await stranded(make, command, after_send=False)
    clock.now += TIMING.stale_after_s + 1
    handler = FakeHandler()
    live = await make(handler)
    answered = await live.execute(command, KEY)
    assert answered.data.outcome is Outcome.SUCCEEDED
    assert answered.result_id == result_id(SOURCE, "cmd-1")
    assert handler.called("handle") == 1
    assert handler.called("recover") == 0
    assert dead.called("sent") == 0
    assert store.claims == [ClaimKind.NEW, ClaimKind.RESUME]


async def test_received_by_a_live_instance_is_waited_for(
    make: Make, store: SpyStore, clock: Clock
) -> None:
    command = redeem()
    owner = await make(FakeHandler())
    await stranded(make, command, after_send=False)
    # Not stale yet: the other instance waits (its heartbeat keeps it alive meanwhile).
    waiting = asyncio.create_task(owner.execute(command, KEY))
    await store.seen(ClaimKind.BUSY, 2)
    assert not waiting.done()
    clock.now += TIMING.stale_after_s + 1  # now it is dead
    await store.heartbeat(owner.instance, clock())
    answered = await asyncio.wait_for(waiting, 5)
    assert answered.data.outcome is Outcome.SUCCEEDED


async def test_sent_by_a_dead_instance_is_recovered_never_resent(make: Make, clock: Clock) -> None:
    command = redeem()
    await stranded(make, command, after_send=True)
    clock.now += TIMING.stale_after_s + 1
    handler = FakeHandler()
    live = await make(handler)
    answered = await live.execute(command, KEY)
    assert handler.calls == [("recover", "cmd-1", "till-1")]
    assert answered.data.message == "recovered"
    assert answered.result_id == result_id(SOURCE, "cmd-1")
    assert await live.execute(command, KEY) == answered
    assert handler.calls == [("recover", "cmd-1", "till-1")]


async def test_retired_owner_frees_its_claims_at_once(make: Make, store: SpyStore) -> None:
    command = redeem()
    dead, _ = await stranded(make, command, after_send=False)
    await store.retire(dead.instance)
    handler = FakeHandler()
    answered = await (await make(handler)).execute(command, KEY)  # no clock change
    assert answered.data.outcome is Outcome.SUCCEEDED
    assert handler.called("handle") == 1


async def test_handler_error_before_the_send_is_failed(make: Make) -> None:
    handler = FakeHandler(fail_before_send=RuntimeError("boom"))
    once = await make(handler)
    answered = await once.execute(redeem(), KEY)
    assert answered.data.outcome is Outcome.FAILED
    assert answered.data.reason == "internal_error"
    assert answered.data.message == "RuntimeError"
    assert answered.result_id == result_id(SOURCE, "cmd-1")
    assert await once.store.unsettled(limit=10) == []
    handler.fail_before_send = None
    assert await once.execute(redeem(), KEY) == answered  # stored, not retried
    assert handler.called("handle") == 1


async def test_handler_error_after_the_send_is_indeterminate(make: Make) -> None:
    handler = FakeHandler(fail_after_send=ValueError("boom"))
    once = await make(handler)
    answered = await once.execute(redeem(), KEY)
    assert answered.data.outcome is Outcome.INDETERMINATE
    assert answered.data.reason == "internal_error"
    assert answered.data.message == "ValueError"
    handler.fail_after_send = None
    assert await once.execute(redeem(), KEY) == answered
    assert handler.called("handle") == 1
    [pending] = await once.store.unsettled(limit=10)  # money may have moved: to be settled
    assert pending.key == CommandKey(SOURCE, "cmd-1")
    assert pending.sent_at == T0


async def test_indeterminate_non_money_moving_is_not_unsettled(make: Make) -> None:
    once = await make(FakeHandler(outcome=Outcome.INDETERMINATE))
    answered = await once.execute(scan(), KEY)
    assert answered.data.outcome is Outcome.INDETERMINATE
    assert await once.store.unsettled(limit=10) == []


async def test_concurrent_copies_make_one_call(make: Make, store: SpyStore) -> None:
    handler = FakeHandler(gate=asyncio.Event())
    once = await make(handler)
    both = asyncio.gather(once.execute(redeem(), KEY), once.execute(redeem(), KEY))
    await store.seen(ClaimKind.BUSY)
    assert handler.called("handle") == 1
    assert handler.gate is not None
    handler.gate.set()
    first, second = await asyncio.wait_for(both, 5)
    assert first == second
    assert first.result_id == result_id(SOURCE, "cmd-1")
    assert handler.called("handle") == 1
    assert store.claims[0] is ClaimKind.NEW
    assert store.claims[-1] is ClaimKind.DONE
    assert set(store.claims[1:-1]) == {ClaimKind.BUSY}


async def test_claim_lost_on_complete_answers_with_the_winners_result(
    make: Make, clock: Clock
) -> None:
    command = scan()
    slow = FakeHandler(gate=asyncio.Event(), outcome=Outcome.FAILED)
    late = await make(slow)
    task = asyncio.create_task(late.execute(command, KEY))
    await asyncio.wait_for(slow.entered.wait(), 5)
    clock.now += TIMING.stale_after_s + 1  # `late` looks dead (its event loop stalled, say)
    winner = await (await make(FakeHandler(outcome=Outcome.SUCCEEDED))).execute(command, KEY)
    assert slow.gate is not None
    slow.gate.set()
    assert await asyncio.wait_for(task, 5) == winner
    assert winner.data.outcome is Outcome.SUCCEEDED


async def test_claim_lost_before_the_send_answers_with_the_winners_result(
    make: Make, clock: Clock
) -> None:
    command = redeem()
    slow = FakeHandler(gate=asyncio.Event())
    late = await make(slow)
    task = asyncio.create_task(late.execute(command, KEY))
    await asyncio.wait_for(slow.entered.wait(), 5)
    clock.now += TIMING.stale_after_s + 1
    winner = await (await make(FakeHandler())).execute(command, KEY)
    assert slow.gate is not None
    slow.gate.set()
    try:
        assert await asyncio.wait_for(task, 5) == winner
    finally:
        assert slow.called("sent") == 0  # whatever happens, the late one never sends


# -- settling and retention --------------------------------------------------------------------


async def indeterminate(make: Make, handler: FakeHandler) -> tuple[ExactlyOnce, Answered]:
    handler.outcome = Outcome.INDETERMINATE
    once = await make(handler)
    first = await once.execute(redeem(), KEY)
    assert first.data.outcome is Outcome.INDETERMINATE
    assert len(await once.store.unsettled(limit=10)) == 1
    return once, first


async def test_settle_publishes_the_definitive_result_once(make: Make, clock: Clock) -> None:
    handler = FakeHandler(settle_outcome=Outcome.SUCCEEDED)
    once, first = await indeterminate(make, handler)
    published = Published()
    clock.now += 30

    assert await once.settle(published) == 1
    [(record_key, command, answered)] = published.items
    assert record_key == KEY
    assert command == redeem()
    assert answered.data.outcome is Outcome.SUCCEEDED
    assert answered.data.supersedes == first.result_id == result_id(SOURCE, "cmd-1")
    assert answered.result_id == result_id(SOURCE, "cmd-1", 1)
    assert handler.calls[-1] == ("settle", "cmd-1", "indeterminate")

    assert await once.settle(published) == 0
    assert len(published.items) == 1
    assert handler.called("settle") == 1
    assert await once.store.unsettled(limit=10) == []
    # A redelivery now gets the settled result, under its own id.
    assert await once.execute(redeem(), KEY) == answered
    assert handler.called("handle") == 1


async def test_settle_waits_while_the_upstream_cannot_tell(make: Make, clock: Clock) -> None:
    handler = FakeHandler(settle_outcome=None)
    once, first = await indeterminate(make, handler)
    published = Published()
    for _ in range(3):
        clock.now += 60
        assert await once.settle(published) == 0
    assert published.items == []
    assert handler.called("settle") == 3
    [pending] = await once.store.unsettled(limit=10)
    assert pending.revision == 0
    assert await once.execute(redeem(), KEY) == first


async def test_settle_outside_the_window_gives_up_quietly(make: Make, clock: Clock) -> None:
    handler = FakeHandler(settle_outcome=Outcome.SUCCEEDED)
    once, first = await indeterminate(make, handler)
    published = Published()
    clock.now += TIMING.settle_window_s + 1
    assert await once.settle(published) == 0
    assert published.items == []
    assert handler.called("settle") == 0  # the upstream can no longer tell
    assert await once.store.unsettled(limit=10) == []
    again = await once.execute(redeem(), KEY)
    assert again.data == first.data  # still indeterminate: the ledger reconciles it


async def test_giving_up_keeps_the_result_id(make: Make, clock: Clock) -> None:
    once, first = await indeterminate(make, FakeHandler())
    clock.now += TIMING.settle_window_s + 1
    await once.settle(Published())
    assert await once.execute(redeem(), KEY) == first


async def test_purge_after_retention(make: Make, clock: Clock) -> None:
    handler = FakeHandler()
    once = await make(handler)
    await once.execute(redeem(), KEY)
    clock.now += TIMING.retention_s - 1
    assert await once.purge() == 0
    assert await once.store.count() == 1
    clock.now += 2
    assert await once.purge() == 1
    assert await once.store.count() == 0


async def test_purge_keeps_unsettled_results(make: Make, clock: Clock) -> None:
    once, _ = await indeterminate(make, FakeHandler())
    clock.now += TIMING.retention_s * 2
    assert await once.purge() == 0
    assert await once.store.count() == 1


async def test_purge_in_batches(make: Make, store: SpyStore, clock: Clock) -> None:
    once = await make(FakeHandler())
    for n in range(1005):
        command = NewCommand(CommandKey(SOURCE, f"c{n}"), "h", "pos.scan", "till-1", "{}", None)
        claim = await store.claim(command, once.instance, T0, T0)
        assert claim.token is not None
        await store.complete(command.key, claim.token, "{}", False, T0)
    clock.now += TIMING.retention_s + 1
    assert await once.purge() == 1005
    assert await store.count() == 0


def test_content_hash_tells_replays_from_reuse() -> None:
    assert content_hash(redeem()) == content_hash(redeem())
    assert content_hash(redeem()) != content_hash(redeem(codes=("999",)))
