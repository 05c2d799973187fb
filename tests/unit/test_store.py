"""The command store's contract, held by both stores: SQLite (one instance) and PostgreSQL
(several instances, several pools)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from voucher_bridge.store import open_store
from voucher_bridge.store.base import (
    Claim,
    ClaimKind,
    CommandKey,
    CommandStore,
    LostClaim,
    NewCommand,
    State,
)

SOURCE = "/stores/limassol-3/pos/till-1"
T0 = 1_000_000.0
STALE_AFTER = 15.0
A, B = "instance-a", "instance-b"

OpenStore = Callable[[], Awaitable[CommandStore]]


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.sqlite3'}"
        return
    from tests.support.postgres import drop_database, fresh_database

    database = fresh_database(request.getfixturevalue("postgres_server"))
    yield database
    drop_database(database)


@pytest.fixture
async def stores(url: str) -> AsyncIterator[OpenStore]:
    """Opens another store object (for PostgreSQL: another pool) on the same database."""
    opened: list[CommandStore] = []

    async def open_one() -> CommandStore:
        store = open_store(url)
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


@pytest.fixture
async def store(stores: OpenStore) -> CommandStore:
    return await stores()


def new(
    n: int = 1, content_hash: str = "hash-1", record_key: bytes | None = b"till-1"
) -> NewCommand:
    return NewCommand(
        key=CommandKey(SOURCE, f"cmd-{n}"),
        content_hash=content_hash,
        type="pos.redeem",
        subject="till-1",
        envelope=f'{{"id": "cmd-{n}"}}',
        record_key=record_key,
    )


def result(text: str = "succeeded") -> str:
    return f'{{"outcome": "{text}"}}'


async def claim(
    store: CommandStore, command: NewCommand, instance: str = A, now: float = T0
) -> Claim:
    return await store.claim(command, instance, now, now - STALE_AFTER)


async def claimed(store: CommandStore, command: NewCommand, instance: str = A) -> str:
    """`command` claimed NEW by a live `instance`; returns the token."""
    await store.heartbeat(instance, T0)
    first = await claim(store, command, instance)
    assert first.kind is ClaimKind.NEW
    assert first.token is not None
    return first.token


async def done(
    store: CommandStore,
    command: NewCommand,
    text: str = "succeeded",
    unsettled: bool = False,
    sent: bool = False,
    now: float = T0,
) -> None:
    token = await claimed(store, command)
    if sent:
        await store.mark_sent(command.key, token, now)
    await store.complete(command.key, token, result(text), unsettled, now)


# -- claims ------------------------------------------------------------------------------------


async def test_new_then_done_returns_the_stored_result(store: CommandStore) -> None:
    command = new()
    token = await claimed(store, command)
    await store.complete(command.key, token, result(), False, T0 + 1)

    again = await claim(store, command, now=T0 + 2)
    assert again == Claim(ClaimKind.DONE, result=result(), revision=0)
    # Done is done for any instance, whether or not it is alive.
    assert (await claim(store, command, B, now=T0 + 10_000)).kind is ClaimKind.DONE


async def test_new_claims_get_distinct_tokens(store: CommandStore) -> None:
    await store.heartbeat(A, T0)
    one, two = await claim(store, new(1)), await claim(store, new(2))
    assert one.kind is two.kind is ClaimKind.NEW
    assert one.token and two.token and one.token != two.token
    assert one.previous is None and one.result is None and one.revision == 0


async def test_conflict_on_different_content(store: CommandStore) -> None:
    await claimed(store, new(1))
    other = new(1, content_hash="hash-2")
    assert await claim(store, other, B) == Claim(ClaimKind.CONFLICT)

    await done(store, new(2))
    assert await claim(store, new(2, content_hash="hash-2"), B) == Claim(ClaimKind.CONFLICT)
    # The conflict changed nothing: the original is still there, done.
    assert (await claim(store, new(2))).kind is ClaimKind.DONE


async def test_busy_while_the_owner_is_alive(store: CommandStore) -> None:
    command = new()
    await claimed(store, command, A)
    await store.heartbeat(B, T0)
    assert await claim(store, command, B) == Claim(ClaimKind.BUSY)
    # The owner itself is told to wait too (a second copy in flight on the same instance).
    assert await claim(store, command, A) == Claim(ClaimKind.BUSY)
    # Exactly `stale_after` old still counts as alive; a fresh heartbeat keeps it so.
    assert (await claim(store, command, B, now=T0 + STALE_AFTER)).kind is ClaimKind.BUSY
    await store.heartbeat(A, T0 + 100)
    assert (await claim(store, command, B, now=T0 + 110)).kind is ClaimKind.BUSY


async def test_resume_from_received_when_the_owner_went_stale(store: CommandStore) -> None:
    command = new()
    old = await claimed(store, command, A)
    later = T0 + STALE_AFTER + 1
    await store.heartbeat(B, later)
    resumed = await claim(store, command, B, now=later)
    assert resumed.kind is ClaimKind.RESUME
    assert resumed.previous is State.RECEIVED
    assert resumed.sent_at is None
    assert resumed.token is not None and resumed.token != old
    # B owns it now, and B is alive: A (back from the dead) must wait.
    assert (await claim(store, command, A, now=later)).kind is ClaimKind.BUSY


async def test_resume_when_the_owner_retired(store: CommandStore) -> None:
    command = new()
    await claimed(store, command, A)
    await store.retire(A)
    resumed = await claim(store, command, B)  # at once, no waiting for staleness
    assert resumed.kind is ClaimKind.RESUME
    assert resumed.previous is State.RECEIVED


async def test_resume_when_the_owner_never_heartbeat(store: CommandStore) -> None:
    command = new()
    first = await claim(store, command, "ghost")
    assert first.kind is ClaimKind.NEW
    assert (await claim(store, command, B)).kind is ClaimKind.RESUME


async def test_resume_from_sent_carries_sent_at(store: CommandStore) -> None:
    command = new()
    token = await claimed(store, command, A)
    await store.mark_sent(command.key, token, T0 + 3)
    later = T0 + 100
    resumed = await claim(store, command, B, now=later)
    assert resumed.kind is ClaimKind.RESUME
    assert resumed.previous is State.SENT
    assert resumed.sent_at == T0 + 3
    # A second takeover still sees where the first owner got to.
    again = await claim(store, command, "instance-c", now=later + 100)
    assert again.kind is ClaimKind.RESUME
    assert again.previous is State.SENT
    assert again.sent_at == T0 + 3


async def test_old_token_is_dead_after_a_takeover(store: CommandStore) -> None:
    command = new()
    old = await claimed(store, command, A)
    await store.retire(A)
    resumed = await claim(store, command, B)
    assert resumed.token is not None

    with pytest.raises(LostClaim):
        await store.mark_sent(command.key, old, T0 + 1)
    with pytest.raises(LostClaim):
        await store.complete(command.key, old, result("stale"), False, T0 + 1)

    await store.mark_sent(command.key, resumed.token, T0 + 2)
    await store.complete(command.key, resumed.token, result("fresh"), False, T0 + 3)
    assert (await claim(store, command)).result == result("fresh")
    # Once done, no token (not even the winner's) can change it.
    with pytest.raises(LostClaim):
        await store.complete(command.key, resumed.token, result("again"), False, T0 + 4)
    with pytest.raises(LostClaim):
        await store.mark_sent(command.key, resumed.token, T0 + 4)
    assert (await claim(store, command)).result == result("fresh")


async def test_unknown_key_or_token_is_a_lost_claim(store: CommandStore) -> None:
    with pytest.raises(LostClaim):
        await store.mark_sent(CommandKey(SOURCE, "nope"), "token", T0)
    with pytest.raises(LostClaim):
        await store.complete(CommandKey(SOURCE, "nope"), "token", result(), False, T0)
    command = new()
    await claimed(store, command)
    with pytest.raises(LostClaim):
        await store.mark_sent(command.key, "not-the-token", T0)


async def test_concurrent_claims_of_a_new_command_give_one_new(store: CommandStore) -> None:
    await store.heartbeat(A, T0)
    await store.heartbeat(B, T0)
    for n in range(10):
        claims = await asyncio.gather(claim(store, new(n), A), claim(store, new(n), B))
        assert sorted(c.kind for c in claims) == [ClaimKind.BUSY, ClaimKind.NEW], n


async def test_concurrent_claims_through_two_pools_give_one_new(
    url: str, stores: OpenStore
) -> None:
    if url.startswith("sqlite"):
        pytest.skip("one SQLite store per database: one instance of the service")
    one, two = await stores(), await stores()
    await one.heartbeat(A, T0)
    await two.heartbeat(B, T0)
    for n in range(20):
        claims = await asyncio.gather(
            claim(one, new(n), A), claim(two, new(n), B), claim(two, new(n), B)
        )
        kinds = sorted(c.kind for c in claims)
        assert kinds == [ClaimKind.BUSY, ClaimKind.BUSY, ClaimKind.NEW], n


# -- settling ----------------------------------------------------------------------------------


async def test_unsettled_lists_only_done_and_unsettled(store: CommandStore) -> None:
    await claimed(store, new(1))  # received
    token = await claimed(store, new(2))
    await store.mark_sent(new(2).key, token, T0)  # sent
    await done(store, new(3))  # done, settled
    await done(store, new(4), "indeterminate", unsettled=True, sent=True, now=T0 + 4)
    await done(store, new(5), "indeterminate", unsettled=True)

    pending = {u.key.id: u for u in await store.unsettled(limit=10)}
    assert set(pending) == {"cmd-4", "cmd-5"}
    four = pending["cmd-4"]
    assert four.key == new(4).key
    assert four.envelope == new(4).envelope
    assert four.record_key == b"till-1"
    assert four.result == result("indeterminate")
    assert four.revision == 0
    assert four.sent_at == T0 + 4
    assert pending["cmd-5"].sent_at is None

    assert len(await store.unsettled(limit=1)) == 1


async def test_settle_is_a_compare_and_set_on_revision(store: CommandStore) -> None:
    command = new()
    await done(store, command, "indeterminate", unsettled=True)

    # Still unsettled after this one: it stays listed, at the next revision.
    assert await store.settle(command.key, 0, result("still"), True, T0 + 1)
    [pending] = await store.unsettled(limit=10)
    assert (pending.revision, pending.result) == (1, result("still"))

    assert await store.settle(command.key, 1, result("succeeded"), False, T0 + 2)
    assert not await store.settle(command.key, 1, result("late"), False, T0 + 3)
    assert not await store.settle(command.key, 0, result("later"), False, T0 + 3)
    assert await store.unsettled(limit=10) == []
    assert await claim(store, command) == Claim(
        ClaimKind.DONE, result=result("succeeded"), revision=2
    )


async def test_concurrent_settles_of_one_revision_give_one_winner(stores: OpenStore) -> None:
    one, two = await stores(), await stores()
    command = new()
    await done(one, command, "indeterminate", unsettled=True)
    wins = await asyncio.gather(
        *(
            s.settle(command.key, 0, result(f"r{i}"), False, T0 + 1)
            for i, s in enumerate([one, two] * 3)
        )
    )
    assert sorted(wins) == [False] * 5 + [True]
    assert (await claim(one, command)).revision == 1


async def test_settle_leaves_records_in_flight_alone(store: CommandStore) -> None:
    command = new()
    await claimed(store, command)
    assert not await store.settle(command.key, 0, result(), False, T0)
    assert not await store.settle(CommandKey(SOURCE, "nope"), 0, result(), False, T0)
    assert (await claim(store, command)).kind is ClaimKind.BUSY


# -- retention ---------------------------------------------------------------------------------


async def test_purge_removes_only_old_settled_done_records_in_batches(
    store: CommandStore,
) -> None:
    for n in range(5):
        await done(store, new(n), now=T0)  # old, settled: purged
    await done(store, new(10), now=T0 + 100)  # settled, but too recent
    await done(store, new(11), "indeterminate", unsettled=True, now=T0)  # old, unsettled
    await claimed(store, new(12))  # old, received
    token = await claimed(store, new(13))
    await store.mark_sent(new(13).key, token, T0)  # old, sent
    assert await store.count() == 9

    before = T0 + 50
    assert await store.purge(before, limit=2) == 2
    assert await store.purge(before, limit=2) == 2
    assert await store.purge(before, limit=2) == 1
    assert await store.purge(before, limit=2) == 0
    assert await store.count() == 4
    for n in range(5):
        assert (await claim(store, new(n), B)).kind is ClaimKind.NEW  # gone: new again
    assert (await claim(store, new(10), B)).kind is ClaimKind.DONE

    # Once settled, the unsettled one goes too (its age counts from the settling).
    assert await store.settle(new(11).key, 0, result(), False, T0 + 10)
    assert await store.purge(before, limit=100) == 1
    assert (await claim(store, new(11), B)).kind is ClaimKind.NEW


async def test_count(store: CommandStore) -> None:
    assert await store.count() == 0
    await claimed(store, new(1))
    await done(store, new(2))
    await claim(store, new(2))  # seen again: not another record
    await claim(store, new(2, content_hash="other"))  # a conflict: not another record
    assert await store.count() == 2


# -- sessions, schema, bytes -------------------------------------------------------------------


async def test_sessions_round_trip_and_overwrite(store: CommandStore) -> None:
    assert await store.load_session("till-1") == {}
    await store.save_session("till-1", {"PHPSESSID": "abc", "lang": "en"}, T0)
    await store.save_session("till-2", {"PHPSESSID": "xyz"}, T0)
    assert await store.load_session("till-1") == {"PHPSESSID": "abc", "lang": "en"}
    await store.save_session("till-1", {"PHPSESSID": "def"}, T0 + 1)
    assert await store.load_session("till-1") == {"PHPSESSID": "def"}
    assert await store.load_session("till-2") == {"PHPSESSID": "xyz"}
    await store.save_session("till-2", {}, T0 + 2)
    assert await store.load_session("till-2") == {}


async def test_open_twice_on_one_database(stores: OpenStore) -> None:
    one = await stores()
    await done(one, new(1))
    await one.save_session("till-1", {"k": "v"}, T0)
    two = await stores()  # the schema is there already: no error, nothing lost
    assert await two.count() == 1
    assert (await claim(two, new(1))).kind is ClaimKind.DONE
    assert await two.load_session("till-1") == {"k": "v"}


async def test_concurrent_opens_on_a_fresh_database(stores: OpenStore) -> None:
    opened = await asyncio.gather(*(stores() for _ in range(3)))
    for store in opened:
        assert await store.count() == 0


@pytest.mark.parametrize(
    "record_key", [b"till-1", b"\x00\xff\xfe binary \x00", b"", None], ids=repr
)
async def test_record_key_round_trip(store: CommandStore, record_key: bytes | None) -> None:
    await done(store, new(record_key=record_key), "indeterminate", unsettled=True)
    [pending] = await store.unsettled(limit=10)
    assert pending.record_key == record_key
    assert pending.record_key is None or type(pending.record_key) is bytes
