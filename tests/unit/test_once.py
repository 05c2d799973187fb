"""ExactlyOnce over the SQLite store, with a scripted handler and a clock the tests move."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from voucher_bridge.once import Answered, BeforeSend, ExactlyOnce, SentCall, Timing
from voucher_bridge.store.base import (
    Claim,
    ClaimKind,
    CommandKey,
    CommandStore,
    NewCommand,
)
from voucher_bridge.store.sqlite import SqliteStore
from voucher_contracts import CommandEnvelope, Outcome, ResultData, content_hash, result_id

SOURCE = "/stores/limassol-3/pos/till-1"
KEY = b"till-1"
T0 = 1_000_000.0
TIMING = Timing(stale_after_s=15.0, busy_poll_s=0.005, retention_s=3600.0)
SETTLE_WINDOW_S = 240.0


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
    # What handle() keeps with the recovery point, and what recover()/settle() were given.
    before_image: str | None = None
    sent_calls: list[Any] = field(default_factory=list)
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
            await before_send(self.before_image)
            self.calls.append(("sent", command.id, record_key))
            self.sent.set()
        if self.gate is not None and self.wait_after_send:
            await self.gate.wait()
        if self.fail_after_send is not None:
            raise self.fail_after_send
        return data(command, self.outcome, message=f"handled {len(self.calls)}")

    def settle_window(self, command_type: str) -> float:
        return SETTLE_WINDOW_S

    async def recover(
        self, command: CommandEnvelope, record_key: str | None, sent: SentCall
    ) -> ResultData:
        self.calls.append(("recover", command.id, record_key))
        self.sent_calls.append(sent)
        return data(command, Outcome.SUCCEEDED, message="recovered")

    async def settle(
        self, command: CommandEnvelope, previous: ResultData, sent: SentCall
    ) -> ResultData | None:
        self.calls.append(("settle", command.id, previous.outcome.value))
        self.sent_calls.append(sent)
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
        self,
        command: NewCommand,
        instance: str,
        now: float,
        stale_after_s: float,
        take_over: bool = False,
    ) -> Claim:
        claim = await self._store.claim(command, instance, now, stale_after_s, take_over)
        async with self._claimed:
            self.claims.append(claim.kind)
            self._claimed.notify_all()
        return claim

    async def seen(self, kind: ClaimKind, times: int = 1) -> None:
        """Returns once `times` claims of `kind` were made."""
        async with asyncio.timeout(5), self._claimed:
            await self._claimed.wait_for(lambda: self.claims.count(kind) >= times)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(tmp_path: Path, clock: Clock) -> AsyncIterator[SpyStore]:
    # The store judges liveness by its own clock: the one the tests move.
    store = SqliteStore(tmp_path / "once.sqlite3", clock=clock)
    await store.open()
    yield SpyStore(store)
    await store.close()


class Crashing:
    """The store as an instance that is about to crash sees it: what it would give back on
    the way down (a cancelled command's claim) never arrives."""

    def __init__(self, store: SpyStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def release(self, key: CommandKey, token: str) -> bool:
        return False


Make = Callable[..., Awaitable[ExactlyOnce]]


@pytest.fixture
def make(store: SpyStore, clock: Clock) -> Make:
    """An instance on the shared store, alive (its heartbeat at the clock's now)."""

    async def make(
        handler: FakeHandler, crashing: bool = False, timing: Timing = TIMING, on: Any = None
    ) -> ExactlyOnce:
        used: Any = on if on is not None else Crashing(store) if crashing else store
        once = ExactlyOnce(used, handler, timing, clock)
        await store.heartbeat(once.instance)
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
    make: Make, command: CommandEnvelope, after_send: bool, before_image: str | None = None
) -> tuple[ExactlyOnce, FakeHandler]:
    """`command` claimed by an instance that died in its handler (before or after the send):
    its task is gone, and a dead process gives nothing back (no release)."""
    handler = FakeHandler(
        gate=asyncio.Event(), wait_after_send=after_send, before_image=before_image
    )
    dead = await make(handler, crashing=True)
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
    await store.heartbeat(owner.instance)
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
    # In one instance the second copy waits for the first in memory, not on its claim.
    handler = FakeHandler(gate=asyncio.Event())
    once = await make(handler)
    both = asyncio.gather(once.execute(redeem(), KEY), once.execute(redeem(), KEY))
    await asyncio.wait_for(handler.entered.wait(), 5)
    await asyncio.sleep(0.05)
    assert handler.called("handle") == 1
    assert store.claims == [ClaimKind.NEW]
    assert handler.gate is not None
    handler.gate.set()
    first, second = await asyncio.wait_for(both, 5)
    assert first == second
    assert first.result_id == result_id(SOURCE, "cmd-1")
    assert handler.called("handle") == 1
    assert store.claims == [ClaimKind.NEW, ClaimKind.DONE]


async def test_concurrent_copies_on_two_instances_make_one_call(
    make: Make, store: SpyStore
) -> None:
    handler, other = FakeHandler(gate=asyncio.Event()), FakeHandler()
    one, two = await make(handler), await make(other)
    first = asyncio.create_task(one.execute(redeem(), KEY))
    await asyncio.wait_for(handler.entered.wait(), 5)
    second = asyncio.create_task(two.execute(redeem(), KEY))
    await store.seen(ClaimKind.BUSY)
    assert handler.gate is not None
    handler.gate.set()
    assert await asyncio.wait_for(first, 5) == await asyncio.wait_for(second, 5)
    assert handler.called("handle") == 1 and other.called("handle") == 0


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
    # When the call went out; nothing of the key ran here since.
    assert handler.sent_calls[-1] == SentCall(T0, None, later=())

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
        await once.settle(published)
    assert published.items == []
    assert handler.called("settle") == 3
    # Put off until the next interval, then looked at again.
    assert await once.store.unsettled(limit=10) == []
    clock.now += TIMING.settle_interval_s + 1
    [pending] = await once.store.unsettled(limit=10)
    assert pending.revision == 0
    assert await once.execute(redeem(), KEY) == first


async def test_the_before_image_reaches_recover_and_settle(make: Make, clock: Clock) -> None:
    command = redeem()
    await stranded(make, command, after_send=True, before_image='{"held": true}')
    clock.now += TIMING.stale_after_s + 1
    handler = FakeHandler()
    await (await make(handler)).execute(command, KEY)
    assert handler.sent_calls == [SentCall(T0, '{"held": true}', later=())]


async def test_outside_the_window_it_is_left_to_an_operator(make: Make, clock: Clock) -> None:
    handler = FakeHandler(settle_outcome=Outcome.SUCCEEDED)
    once, first = await indeterminate(make, handler)
    published = Published()
    clock.now += SETTLE_WINDOW_S + 1
    await once.settle(published)
    assert handler.called("settle") == 0  # the upstream can no longer tell
    [(_, _, answered)] = published.items
    assert (answered.data.outcome, answered.data.reason) == (Outcome.INDETERMINATE, "unsettled")
    assert answered.data.supersedes == first.result_id
    assert answered.result_id == result_id(SOURCE, "cmd-1", 1)
    assert await once.store.unsettled(limit=10) == []
    [waiting] = await once.store.needing_operator(limit=10)
    assert waiting.key.id == "cmd-1" and waiting.revision == 1
    assert await once.execute(redeem(), KEY) == answered
    # Kept past the retention until an operator has decided.
    clock.now += TIMING.retention_s * 2
    assert await once.purge() == 0


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


# -- every command ends: no claim without a worker, every failure bounded (issue 10) ------------

# Bounds small enough for a unit test: a command's time, a store operation's, the sweep.
QUICK = replace(
    TIMING, command_timeout_s=0.5, store_timeout_s=0.1, sweep_interval_s=0.0, stale_after_s=60.0
)


class FlakyStore:
    """The store, with operations that fail as a test says: `fail[name]` times each, or for
    good while `down` holds."""

    def __init__(self, store: SpyStore) -> None:
        self._store = store
        self.fail: dict[str, int] = {}
        self.down: set[str] = set()
        self.attempts: dict[str, int] = {}
        self.hang: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if not callable(attribute):
            return attribute

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.attempts[name] = self.attempts.get(name, 0) + 1
            if name in self.hang:
                await asyncio.sleep(3600)
            if name in self.down or self.fail.get(name, 0) > 0:
                self.fail[name] = self.fail.get(name, 0) - 1
                raise ConnectionError(f"{name}: the store went away")
            return await attribute(*args, **kwargs)

        return call


async def test_a_claim_of_its_own_that_nothing_runs_is_resumed_not_waited_on(
    make: Make, store: SpyStore
) -> None:
    # A lane cancelled (a drain that timed out) whose release never reached the store: the
    # instance, alive, gets the command again and must not wait for itself.
    command = redeem()
    crashing, handler = await stranded(make, command, after_send=True)
    handler.gate = None
    answered = await asyncio.wait_for(crashing.execute(command, KEY), 2)
    assert answered.data.message == "recovered"  # from `sent`: reconciled, never resent
    assert handler.called("recover") == 1 and handler.called("handle") == 1
    assert store.claims[-1] is ClaimKind.RESUME


async def test_a_cancelled_command_is_resumable_by_the_next_owner_at_once(
    make: Make, store: SpyStore
) -> None:
    # A drain that timed out cancels the lane: its claim is given up, so the next owner (the
    # instance that gets the partition) resumes it at once, though the first is alive.
    handler = FakeHandler(gate=asyncio.Event(), wait_after_send=True)
    first = await make(handler)
    task = asyncio.create_task(first.execute(redeem(), KEY))
    await asyncio.wait_for(handler.sent.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    successor = FakeHandler()
    answered = await asyncio.wait_for((await make(successor)).execute(redeem(), KEY), 2)
    assert answered.data.message == "recovered"
    assert successor.called("handle") == 0  # sent before: never sent again
    assert ClaimKind.BUSY not in store.claims


async def test_the_sweep_frees_claims_of_a_live_instance_that_nothing_runs(
    make: Make, store: SpyStore
) -> None:
    command = scan()
    owner, _ = await stranded(make, command, after_send=False)
    waiter_handler = FakeHandler()
    waiter = await make(waiter_handler)
    waiting = asyncio.create_task(waiter.execute(command, KEY))
    await store.seen(ClaimKind.BUSY)
    await owner._beat()  # the owner's heartbeat, with its sweep
    answered = await asyncio.wait_for(waiting, 2)
    assert answered.data.outcome is Outcome.SUCCEEDED
    assert waiter_handler.called("handle") == 1


async def test_a_busy_wait_is_bounded_then_taken_over(make: Make, store: SpyStore) -> None:
    # The holder is alive but does not run it and never sweeps (its store calls fail, say):
    # after longer than a command can take there, the waiter takes it over.
    timing = replace(QUICK, command_timeout_s=0.2, sweep_interval_s=0.1, stale_after_s=0.1)
    command = scan()
    await stranded(make, command, after_send=False)
    waiter = FakeHandler()
    once = await make(waiter, timing=timing)
    started = asyncio.get_running_loop().time()
    answered = await asyncio.wait_for(once.execute(command, KEY), 5)
    waited = asyncio.get_running_loop().time() - started
    assert timing.busy_limit_s <= waited < timing.busy_limit_s + 1
    assert answered.data.outcome is Outcome.SUCCEEDED and waiter.called("handle") == 1
    assert ClaimKind.BUSY in store.claims and store.claims[-1] is ClaimKind.RESUME


async def test_complete_failing_once_is_retried_with_the_same_token(
    make: Make, store: SpyStore
) -> None:
    flaky = FlakyStore(store)
    flaky.fail["complete"] = 1
    handler = FakeHandler()
    once = await make(handler, timing=QUICK, on=flaky)
    answered = await asyncio.wait_for(once.execute(redeem(), KEY), 2)
    assert answered.data.outcome is Outcome.SUCCEEDED
    assert flaky.attempts["complete"] == 2
    # Stored: the next copy is answered from the store, by any instance, with no call.
    other = FakeHandler()
    again = await (await make(other)).execute(redeem(), KEY)
    assert again.replayed and again.data == answered.data and other.calls == []


async def test_a_result_the_store_will_not_take_is_published_and_stored_later(
    make: Make, store: SpyStore
) -> None:
    flaky = FlakyStore(store)
    flaky.down.add("complete")
    handler = FakeHandler()
    once = await make(handler, timing=QUICK, on=flaky)
    answered = await asyncio.wait_for(once.execute(redeem(), KEY), 3)
    assert answered.data.outcome is Outcome.SUCCEEDED
    assert answered.result_id == result_id(SOURCE, "cmd-1")
    # A copy meanwhile gets the same answer, with no second call.
    copy = await asyncio.wait_for(once.execute(redeem(), KEY), 1)
    assert copy.replayed and copy.data == answered.data and handler.called("handle") == 1
    # The sweep leaves its claim alone; the store takes the result when it is back.
    flaky.down.clear()
    await once._beat()
    stored = await (await make(FakeHandler())).execute(redeem(), KEY)
    assert stored.replayed and stored.data == answered.data


@pytest.mark.parametrize(
    ("command", "outcome"), [(scan(), Outcome.FAILED), (redeem(), Outcome.INDETERMINATE)]
)
async def test_a_store_unreachable_before_the_claim_is_answered_unrecorded_in_bounded_time(
    make: Make, store: SpyStore, command: CommandEnvelope, outcome: Outcome
) -> None:
    # This instance sent nothing; an earlier owner of a redeem (a crashed one) may have, and
    # without the store nothing can tell: never `failed` for a money-moving command.
    from voucher_contracts.envelope import unrecorded_result_id

    flaky = FlakyStore(store)
    flaky.hang.add("claim")
    handler = FakeHandler()
    once = await make(handler, timing=QUICK, on=flaky)
    started = asyncio.get_running_loop().time()
    answered = await asyncio.wait_for(once.execute(command, KEY), 3)
    assert asyncio.get_running_loop().time() - started < QUICK.command_timeout_s + 0.5
    assert (answered.data.outcome, answered.data.reason) == (outcome, "internal_error")
    assert answered.result_id == unrecorded_result_id(SOURCE, command.id)
    assert handler.calls == [] and flaky.attempts["claim"] >= 2


async def test_a_recovery_point_that_cannot_be_stored_means_nothing_is_sent(
    make: Make, store: SpyStore
) -> None:
    flaky = FlakyStore(store)
    flaky.down.add("mark_sent")
    handler = FakeHandler()
    once = await make(handler, timing=QUICK, on=flaky)
    answered = await asyncio.wait_for(once.execute(redeem(), KEY), 3)
    assert (answered.data.outcome, answered.data.reason) == (Outcome.FAILED, "internal_error")
    assert handler.called("sent") == 0  # the money-moving call never went out


@pytest.mark.parametrize(
    ("command", "after_send", "outcome"),
    [
        (scan(), False, Outcome.FAILED),
        (redeem(), False, Outcome.FAILED),
        (redeem(), True, Outcome.INDETERMINATE),
    ],
)
async def test_a_handler_that_hangs_is_cancelled_at_the_commands_bound(
    make: Make, command: CommandEnvelope, after_send: bool, outcome: Outcome
) -> None:
    handler = FakeHandler(gate=asyncio.Event(), wait_after_send=after_send)
    once = await make(handler, timing=QUICK)
    started = asyncio.get_running_loop().time()
    answered = await asyncio.wait_for(once.execute(command, KEY), 3)
    elapsed = asyncio.get_running_loop().time() - started
    assert QUICK.command_timeout_s <= elapsed < QUICK.command_timeout_s + 0.5
    assert (answered.data.outcome, answered.data.reason) == (outcome, "upstream_unavailable")
    # Settled later where the money may have moved; stored either way.
    unsettled = await once.store.unsettled(limit=10)
    assert len(unsettled) == (1 if outcome is Outcome.INDETERMINATE else 0)
    assert (await once.execute(command, KEY)).replayed


# -- safe forgetting and settling in order (issue 11) ---------------------------------------------


def _aged(command: CommandEnvelope, seconds: float) -> CommandEnvelope:
    from datetime import UTC, datetime

    happened = datetime.fromtimestamp(T0 - seconds, UTC)
    return command.model_copy(update={"time": happened})


async def test_a_command_older_than_the_retention_is_rejected_never_sent(make: Make) -> None:
    from voucher_bridge.once import Origin

    handler = FakeHandler()
    once = await make(handler)
    old = _aged(redeem("old"), TIMING.retention_s + 1)
    answered = await once.execute(old, KEY)
    assert (answered.data.outcome, answered.data.reason) == (Outcome.REJECTED, "command_expired")
    # Not under the id its answer had before it was forgotten, and not recorded now.
    from voucher_contracts.envelope import expired_result_id

    assert answered.result_id == expired_result_id(SOURCE, "old") != result_id(SOURCE, "old")
    assert not await once.store.known(CommandKey(SOURCE, "old"))
    # Without a `time`, the record's own timestamp tells its age.
    by_record = await once.execute(
        redeem("by-record"), KEY, Origin("t", 0, int((T0 - TIMING.retention_s - 1) * 1000))
    )
    assert by_record.data.reason == "command_expired"
    young = await once.execute(_aged(redeem("young"), TIMING.retention_s - 1), KEY)
    assert young.data.outcome is Outcome.SUCCEEDED
    # A `time` ahead of the clock does not make an old record young.
    ahead = _aged(redeem("ahead"), -3600)
    stamped = Origin("t", 0, int((T0 - TIMING.retention_s - 1) * 1000))
    assert (await once.execute(ahead, KEY, stamped)).data.reason == "command_expired"
    assert handler.called("handle") == 1


async def test_an_old_command_already_answered_is_answered_the_same(
    make: Make, clock: Clock
) -> None:
    handler = FakeHandler()
    once = await make(handler)
    command = _aged(redeem(), 10)
    first = await once.execute(command, KEY)
    clock.now += TIMING.retention_s  # still in the store (purge not run)
    assert await once.execute(command, KEY) == first


async def test_an_old_command_resumed_from_sent_is_recovered_not_rejected(
    make: Make, clock: Clock
) -> None:
    command = _aged(redeem(), TIMING.retention_s - 5)
    await stranded(make, command, after_send=True)
    clock.now += TIMING.stale_after_s + 1  # past the retention now, and the owner dead
    handler = FakeHandler()
    answered = await (await make(handler)).execute(command, KEY)
    assert answered.data.message == "recovered"


async def test_settling_runs_as_a_job_in_the_keys_lane_where_it_is_owned(
    make: Make, clock: Clock
) -> None:
    from voucher_bridge.once import Origin

    handler = FakeHandler(outcome=Outcome.INDETERMINATE, settle_outcome=Outcome.SUCCEEDED)
    once = await make(handler)
    await once.execute(redeem(), KEY, Origin("pos.commands", 3, None))
    jobs: list[tuple[str, int, bytes | None, Any]] = []
    owned = False

    def schedule(topic: str, partition: int, key: bytes | None, job: Any) -> bool:
        if owned:
            jobs.append((topic, partition, key, job))
        return owned

    once._schedule = schedule
    published = Published()
    assert await once.settle(published) == 0  # not this instance's partition: nothing
    owned = True
    assert await once.settle(published) == 1
    assert await once.settle(published) == 0  # queued already
    [(topic, partition, key, job)] = jobs
    assert (topic, partition, key) == ("pos.commands", 3, KEY)
    assert handler.called("settle") == 0  # not run beside the lane, only in it
    await job()
    assert handler.called("settle") == 1 and len(published.items) == 1


async def test_two_instances_settle_a_result_once(make: Make, clock: Clock) -> None:
    gate = asyncio.Event()

    class Slow(FakeHandler):
        async def settle(
            self, command: CommandEnvelope, previous: ResultData, sent: SentCall
        ) -> ResultData | None:
            await gate.wait()
            return await super().settle(command, previous, sent)

    one = Slow(outcome=Outcome.INDETERMINATE, settle_outcome=Outcome.SUCCEEDED)
    two = Slow(outcome=Outcome.INDETERMINATE, settle_outcome=Outcome.SUCCEEDED)
    first = await make(one)
    await first.execute(redeem(), KEY)
    second = await make(two)
    published = Published()
    both = asyncio.gather(first.settle(published), second.settle(published))
    await asyncio.sleep(0.05)
    gate.set()
    await both
    assert one.called("settle") + two.called("settle") == 1
    assert len(published.items) == 1
