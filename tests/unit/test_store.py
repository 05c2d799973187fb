"""The command store's contract, held by both stores: SQLite (one instance) and PostgreSQL
(several instances, several pools). Liveness is judged by each store's own clock (the host's
for SQLite, the database's for PostgreSQL): a test makes an instance stale by moving its last
heartbeat back (`age`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from voucher_bridge.store import open_store
from voucher_bridge.store.base import (
    Claim,
    ClaimKind,
    CommandKey,
    CommandStore,
    LostClaim,
    NewCommand,
    OperatorAction,
    State,
)
from voucher_bridge.store.postgres import PostgresStore
from voucher_bridge.store.sqlite import SqliteStore

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
    store: CommandStore,
    command: NewCommand,
    instance: str = A,
    now: float = T0,
    take_over: bool = False,
) -> Claim:
    return await store.claim(command, instance, now, STALE_AFTER, take_over)


async def age(store: CommandStore, instance: str, seconds: float) -> None:
    """Make `instance`'s last heartbeat `seconds` older, by the store's own clock."""
    if isinstance(store, SqliteStore):
        await store._run(
            lambda db: db.execute(
                "UPDATE instances SET heartbeat_at = heartbeat_at - ? WHERE id = ?",
                (seconds, instance),
            )
        )
    else:
        assert isinstance(store, PostgresStore)
        await store._execute(
            "UPDATE vb_instances SET heartbeat_at = heartbeat_at - %s WHERE id = %s",
            (seconds, instance),
        )


async def claimed(store: CommandStore, command: NewCommand, instance: str = A) -> str:
    """`command` claimed NEW by a live `instance`; returns the token."""
    await store.heartbeat(instance)
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
    await store.heartbeat(A)
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
    await store.heartbeat(B)
    assert await claim(store, command, B) == Claim(ClaimKind.BUSY)
    # Just inside `stale_after` still counts as alive; a fresh heartbeat keeps it so.
    await age(store, A, STALE_AFTER - 1)
    assert (await claim(store, command, B)).kind is ClaimKind.BUSY
    await store.heartbeat(A)
    await age(store, B, 100)  # the waiter's own liveness does not matter
    assert (await claim(store, command, B)).kind is ClaimKind.BUSY


async def test_a_claim_of_the_claiming_instance_itself_is_resumed(store: CommandStore) -> None:
    # The instance runs one claim per command at a time (once.ExactlyOnce), so a claim of its
    # own that it finds is one nothing runs any more: a lane cancelled, a lost answer.
    command = new()
    old = await claimed(store, command, A)
    again = await claim(store, command, A)
    assert again.kind is ClaimKind.RESUME
    assert again.previous is State.RECEIVED
    assert again.token is not None and again.token != old
    with pytest.raises(LostClaim):
        await store.mark_sent(command.key, old, T0)


async def test_take_over_resumes_a_claim_of_a_live_instance(store: CommandStore) -> None:
    command = new()
    token = await claimed(store, command, A)
    await store.mark_sent(command.key, token, T0 + 1)
    assert (await claim(store, command, B)).kind is ClaimKind.BUSY
    taken = await claim(store, command, B, take_over=True)
    assert (taken.kind, taken.previous, taken.sent_at) == (ClaimKind.RESUME, State.SENT, T0 + 1)
    # A done command is done, take-over or not.
    assert taken.token is not None
    await store.complete(command.key, taken.token, result(), False, T0 + 2)
    assert (await claim(store, command, A, take_over=True)).kind is ClaimKind.DONE


async def test_resume_from_received_when_the_owner_went_stale(store: CommandStore) -> None:
    command = new()
    old = await claimed(store, command, A)
    await store.heartbeat(B)
    await age(store, A, STALE_AFTER + 1)
    resumed = await claim(store, command, B)
    assert resumed.kind is ClaimKind.RESUME
    assert resumed.previous is State.RECEIVED
    assert resumed.sent_at is None
    assert resumed.token is not None and resumed.token != old
    # B owns it now, and B is alive: A (back from the dead) must wait.
    await store.heartbeat(A)
    assert (await claim(store, command, A)).kind is ClaimKind.BUSY


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
    await age(store, A, STALE_AFTER + 1)
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


async def test_complete_is_repeatable_with_the_same_token_and_result(store: CommandStore) -> None:
    # The first attempt's answer may be lost after it committed: the retry must not fail.
    command = new()
    token = await claimed(store, command)
    await store.complete(command.key, token, result(), False, T0 + 1)
    await store.complete(command.key, token, result(), False, T0 + 2)
    assert (await claim(store, command)).result == result()
    # A settled result is not put back by a late repeat.
    assert await store.settle(command.key, 0, result("settled"), False, T0 + 3)
    with pytest.raises(LostClaim):
        await store.complete(command.key, token, result(), False, T0 + 4)
    assert (await claim(store, command)).result == result("settled")


async def test_release_frees_the_claim_where_it_got_to(store: CommandStore) -> None:
    command = new()
    token = await claimed(store, command, A)
    await store.mark_sent(command.key, token, T0 + 1)
    assert not await store.release(command.key, "not-the-token")
    assert await store.release(command.key, token)
    assert not await store.release(command.key, token)  # released already
    # The next owner resumes at once, from `sent`, though A is alive.
    await store.heartbeat(B)
    resumed = await claim(store, command, B)
    assert (resumed.kind, resumed.previous, resumed.sent_at) == (
        ClaimKind.RESUME,
        State.SENT,
        T0 + 1,
    )
    with pytest.raises(LostClaim):
        await store.complete(command.key, token, result(), False, T0 + 2)
    # A done command cannot be released.
    assert resumed.token is not None
    await store.complete(command.key, resumed.token, result(), False, T0 + 2)
    assert not await store.release(command.key, resumed.token)
    assert (await claim(store, command, A)).kind is ClaimKind.DONE


async def test_release_stranded_frees_only_claims_nothing_runs(store: CommandStore) -> None:
    running, stranded, sent = new(1), new(2), new(3)
    for command in (running, stranded, sent):
        token = await claimed(store, command, A)
    await store.mark_sent(sent.key, token, T0)
    others = new(4)
    await claimed(store, others, B)
    await done(store, new(5))

    assert await store.release_stranded(A, [running.key]) == 2
    assert await store.release_stranded(A, [running.key]) == 0
    await store.heartbeat(B)
    await store.heartbeat("instance-c")
    assert (await claim(store, running, "instance-c")).kind is ClaimKind.BUSY  # A runs it
    assert (await claim(store, stranded, "instance-c")).kind is ClaimKind.RESUME
    resumed = await claim(store, sent, "instance-c")
    assert (resumed.kind, resumed.previous) == (ClaimKind.RESUME, State.SENT)
    assert (await claim(store, others, "instance-c")).kind is ClaimKind.BUSY  # B's
    assert (await claim(store, new(5), "instance-c")).kind is ClaimKind.DONE


async def test_liveness_is_judged_by_the_stores_clock(url: str, store: CommandStore) -> None:
    if url.startswith("sqlite"):
        # One host: its own clock, which the store takes as a setting (tests move it).
        ahead = time.time() + 1000
        moved = SqliteStore(Path(url.removeprefix("sqlite:///")), clock=lambda: ahead)
        await moved.open()
        try:
            await claimed(store, new(1), A)  # A's heartbeat at the real now
            assert (await claim(moved, new(1), B)).kind is ClaimKind.RESUME
        finally:
            await moved.close()
        return
    # PostgreSQL: the database's clock; whatever the host's says, a fresh beat is fresh.
    assert isinstance(store, PostgresStore)
    await store.heartbeat(A)
    async with store._pool.connection() as db:
        cursor = await db.execute(
            "SELECT abs(heartbeat_at - extract(epoch from now())) FROM vb_instances WHERE id = %s",
            (A,),
        )
        row = await cursor.fetchone()
    assert row is not None and row[0] < 5


async def test_heartbeats_do_not_wait_for_the_pool(url: str) -> None:
    if url.startswith("sqlite"):
        pytest.skip("SQLite: one writer, whose batches are short")
    store = PostgresStore(url, max_connections=1, timeout_s=1.0)
    await store.open()
    try:
        async with store._pool.connection():  # command traffic holds every connection
            async with asyncio.timeout(2):
                await store.heartbeat(A)
                assert await store.release_stranded(A, []) == 0
    finally:
        await store.close()


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
    await store.heartbeat(A)
    await store.heartbeat(B)
    for n in range(10):
        claims = await asyncio.gather(claim(store, new(n), A), claim(store, new(n), B))
        assert sorted(c.kind for c in claims) == [ClaimKind.BUSY, ClaimKind.NEW], n


async def test_concurrent_claims_through_two_pools_give_one_new(
    url: str, stores: OpenStore
) -> None:
    if url.startswith("sqlite"):
        pytest.skip("one SQLite store per database: one instance of the service")
    one, two = await stores(), await stores()
    await one.heartbeat(A)
    await two.heartbeat(B)
    await two.heartbeat("instance-c")
    for n in range(20):
        claims = await asyncio.gather(
            claim(one, new(n), A), claim(two, new(n), B), claim(two, new(n), "instance-c")
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


async def test_unsettled_summary_counts_settling_and_left_to_an_operator(
    store: CommandStore,
) -> None:
    summary = await store.unsettled_summary()
    assert (summary.settling, summary.oldest_settling_created_at, summary.left_to_operator) == (
        0,
        None,
        0,
    )
    await done(store, new(1))  # settled: not counted
    for n in (2, 3, 4):
        await done(store, new(n), "indeterminate", unsettled=True)
    assert await store.settle(new(4).key, 0, result("unsettled"), False, T0 + 9, True)
    summary = await store.unsettled_summary()
    assert (summary.settling, summary.left_to_operator) == (2, 1)
    assert summary.oldest_settling_created_at is not None


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


async def test_unsettled_leaves_out_what_is_leased_or_put_off_and_owned_elsewhere(
    store: CommandStore,
) -> None:
    for n in (1, 2, 3):
        await done(store, new(n), "indeterminate", unsettled=True)
    one, two, three = new(1).key, new(2).key, new(3).key
    assert await store.lease_settle(one, 0, A, 60)
    assert not await store.lease_settle(one, 0, B, 60)  # one instance at a time
    assert await store.lease_settle(one, 0, A, 60)  # its holder may take it again
    assert await store.postpone_settle(two, 0, A, 60)
    assert [u.key for u in await store.unsettled(limit=10)] == [three]
    # Those from other partitions than the given ones are left out (these have none: they
    # are from before partitions were kept, and count everywhere).
    assert [u.key for u in await store.unsettled(10, partitions=[("t", 0)])] == [three]


async def test_later_commands_and_known(store: CommandStore) -> None:
    first = new(1)
    await claimed(store, first)
    assert await store.known(first.key) and not await store.known(new(9).key)
    [pending] = [u for u in [await _unsettled_after_done(store, first)] if u]
    assert await store.later_commands("till-1", pending.created_at, 10) == []
    await claim(store, new(2), now=T0 + 1)
    await claim(store, new(3), now=T0 + 2)
    later = await store.later_commands("till-1", pending.created_at, 10)
    assert later == [new(2).envelope, new(3).envelope]
    assert await store.later_commands("another-till", 0, 10) == []


async def _unsettled_after_done(store: CommandStore, command: NewCommand) -> Any:
    await store.heartbeat(A)
    again = await claim(store, command, A)
    assert again.token is not None
    await store.complete(command.key, again.token, result("indeterminate"), True, T0)
    [pending] = [u for u in await store.unsettled(limit=10) if u.key == command.key]
    return pending


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
    await store.heartbeat(B)
    assert (await claim(store, command, B)).kind is ClaimKind.BUSY


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


# -- for operators (the console) -------------------------------------------------------------


async def test_lookup_and_by_subject_show_what_the_store_keeps(store: CommandStore) -> None:
    assert await store.lookup(new(1).key) is None
    await done(store, new(1), sent=True)
    await claimed(store, new(2))
    row = await store.lookup(new(1).key)
    assert row is not None
    assert (row.type, row.subject, row.state, row.revision) == (
        "pos.redeem",
        "till-1",
        State.DONE,
        0,
    )
    assert row.result == result() and row.sent_at == T0 and row.record_key == b"till-1"
    assert not row.unsettled and not row.needs_operator
    newest_first = await store.by_subject("till-1", 10)
    assert [r.key.id for r in newest_first] == ["cmd-2", "cmd-1"]
    assert newest_first[0].state is State.RECEIVED
    assert await store.by_subject("till-9", 10) == []


async def test_unsettled_rows_hold_both_those_settling_and_those_left_to_an_operator(
    store: CommandStore,
) -> None:
    await done(store, new(1))
    await done(store, new(2), "indeterminate", unsettled=True)
    await done(store, new(3), "indeterminate", unsettled=True)
    assert await store.settle(new(3).key, 0, result("unsettled"), False, T0 + 1, True)
    rows = {r.key.id: r for r in await store.unsettled_rows(10)}
    assert set(rows) == {"cmd-2", "cmd-3"}
    assert rows["cmd-2"].unsettled and not rows["cmd-2"].needs_operator
    assert rows["cmd-3"].needs_operator and not rows["cmd-3"].unsettled
    assert rows["cmd-3"].as_unsettled().revision == 1


async def test_a_recheck_cuts_a_wait_short_but_never_a_lease(store: CommandStore) -> None:
    one, two = new(1), new(2)
    for command in (one, two):
        await done(store, command, "indeterminate", unsettled=True)
    # Put off (a wait): a recheck makes it due at once.
    assert await store.postpone_settle(one.key, 0, A, 600)
    assert [u.key for u in await store.unsettled(10)] == [two.key]
    assert await store.recheck_now(one.key)
    assert one.key in [u.key for u in await store.unsettled(10)]
    # Leased (a settle looking at it now): refused, and the lease holds.
    assert await store.lease_settle(two.key, 0, A, 600)
    assert not await store.recheck_now(two.key)
    assert not await store.lease_settle(two.key, 0, B, 600)
    # Not being settled: nothing to recheck.
    await done(store, new(3))
    assert not await store.recheck_now(new(3).key)


async def test_lease_resolve_takes_one_left_to_an_operator_not_one_leased(
    store: CommandStore,
) -> None:
    left, settling = new(1), new(2)
    await done(store, left, "indeterminate", unsettled=True)
    assert await store.settle(left.key, 0, result("unsettled"), False, T0 + 1, True)
    await done(store, settling, "indeterminate", unsettled=True)
    assert await store.lease_resolve(left.key, 1, A, 60)
    assert not await store.lease_resolve(left.key, 0, A, 60)  # the revision moved on
    assert await store.lease_settle(settling.key, 0, B, 60)
    assert not await store.lease_resolve(settling.key, 0, A, 60)  # a settle holds it
    assert await store.settle(left.key, 1, result("failed"), False, T0 + 2)
    assert not await store.lease_resolve(left.key, 2, A, 60)  # settled: nothing to resolve


async def test_operator_actions_are_kept_newest_first_and_filtered(store: CommandStore) -> None:
    for n, outcome in ((1, "done"), (2, "refused"), (3, "done")):
        await store.record_action(
            OperatorAction(T0 + n, "otto", "operator", "replay", f"t/0/{n % 2}", outcome, "d")
        )
    await store.record_action(OperatorAction(T0 + 4, "vera", "viewer", "resolve", "s/i", "refused"))
    assert [a.at for a in await store.actions(10)] == [T0 + 4, T0 + 3, T0 + 2, T0 + 1]
    replays = await store.actions(10, action="replay", target="t/0/1")
    assert [(a.at, a.outcome) for a in replays] == [(T0 + 3, "done"), (T0 + 1, "done")]
    assert [a.at for a in await store.actions(10, action="replay", since=T0 + 2)] == [
        T0 + 3,
        T0 + 2,
    ]
    assert (await store.actions(1))[0] == OperatorAction(
        T0 + 4, "vera", "viewer", "resolve", "s/i", "refused", ""
    )


async def test_a_tills_bill_is_kept_beside_its_session(store: CommandStore) -> None:
    assert await store.load_bill("till-1") is None
    await store.save_bill("till-1", '{"bill_id": "b-1"}', T0)
    await store.save_bill("till-1", '{"bill_id": "b-2"}', T0 + 1)
    assert await store.load_bill("till-1") == '{"bill_id": "b-2"}'
    assert await store.load_bill("till-2") is None
