"""The durable record of every command, keyed by its CloudEvents (source, id).

A command's record moves through three states, in the manner of Stripe's idempotency keys with
recovery points (shared/research/anchors.md §4):

    received ──(a money-moving call is about to go out)──▶ sent ──▶ done
        └──────────────────────────────────────────────────────────────▲

`received`: claimed, nothing sent that cannot be sent again. `sent`: the upstream may have
acted, so a crash here means reconciling, never resending; it keeps when the call went out and
what the upstream said just before (the handler's before-image), which reconciling compares
with. `done`: the result is stored and is what every redelivery publishes again. A done result
that is `indeterminate` is settled later, one instance at a time (a lease), and one the
upstream can no longer tell about is left for an operator (`needs_operator`).

A claim belongs to an instance of the service; an instance is alive while its heartbeat is
fresh by the store's own clock (PostgreSQL's `now()` for several hosts, so that no host's clock
decides). A claim of a dead instance is taken over; a claim of a live one is waited for, so two
copies of a command in flight (a rebalance, a duplicate on another partition) make one call.
A claim of the claiming instance itself is one nothing runs any more (a lane cancelled, a
result that could not be stored): the caller runs one claim per command at a time
(`once.ExactlyOnce`), so it resumes it, as a crash would be resumed.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol


class State(StrEnum):
    RECEIVED = "received"
    SENT = "sent"
    DONE = "done"


class ClaimKind(StrEnum):
    NEW = "new"  # first time: go ahead
    RESUME = "resume"  # claimed by a dead instance: go on from `previous`
    DONE = "done"  # answered before: publish the stored result again
    CONFLICT = "conflict"  # same key, different content
    BUSY = "busy"  # a live instance holds it: wait


@dataclass(frozen=True)
class Claim:
    kind: ClaimKind
    token: str | None = None  # proves ownership to mark_sent/complete
    previous: State | None = None  # for RESUME: where the dead instance got to
    sent_at: float | None = None  # for RESUME from SENT: when the call went out
    before: str | None = None  # for RESUME from SENT: the handler's before-image
    result: str | None = None  # for DONE: the stored result (ResultData JSON)
    revision: int = 0


@dataclass(frozen=True)
class CommandKey:
    source: str
    id: str


@dataclass(frozen=True)
class NewCommand:
    key: CommandKey
    content_hash: str
    type: str
    subject: str
    envelope: str  # the command as JSON, so a completer can act on it later
    record_key: bytes | None
    # Where it was read: its settling runs in that partition's lane for its key.
    topic: str | None = None
    partition: int | None = None


@dataclass(frozen=True)
class UnsettledSummary:
    settling: int
    oldest_settling_created_at: float | None
    left_to_operator: int


@dataclass(frozen=True)
class Unsettled:
    """A done command whose outcome is indeterminate and may still be settled."""

    key: CommandKey
    envelope: str
    record_key: bytes | None
    result: str
    revision: int
    sent_at: float | None
    before: str | None = None
    topic: str | None = None
    partition: int | None = None
    subject: str = ""
    created_at: float = 0.0  # when it was first claimed (this service's clock)


@dataclass(frozen=True)
class StoredCommand:
    content_hash: str
    state: State
    sent_at: float | None
    result: str | None
    revision: int
    owner: str | None  # None: released, or done
    owner_alive: bool  # the owner's heartbeat is fresh by the store's clock
    before: str | None = None


@dataclass(frozen=True)
class CommandRow:
    """Everything the store keeps of one command, for operators (the console, the CLI)."""

    key: CommandKey
    type: str
    subject: str
    state: State
    revision: int
    result: str | None
    unsettled: bool  # indeterminate, still being settled
    needs_operator: bool  # indeterminate, and the upstream can no longer tell
    created_at: float
    updated_at: float
    sent_at: float | None
    settle_until: float | None  # leased until, or not looked at again before (store's clock)
    settle_owner: str | None  # the instance settling it now (None: nobody; a wait)
    topic: str | None
    partition: int | None
    envelope: str
    record_key: bytes | None
    before: str | None

    def as_unsettled(self) -> Unsettled:
        assert self.result is not None
        return Unsettled(
            self.key,
            self.envelope,
            self.record_key,
            self.result,
            self.revision,
            self.sent_at,
            self.before,
            self.topic,
            self.partition,
            self.subject,
            self.created_at,
        )


@dataclass(frozen=True)
class OperatorAction:
    """One thing an operator did or tried (the console's audit): who, when, what, how it went."""

    at: float  # epoch seconds
    actor: str
    role: str
    action: str  # "replay", "replay_dry_run", "recheck", "resolve"
    target: str  # "pos.commands.dlq/0/17", "source/id"
    outcome: str  # "done", "refused", "failed"
    detail: str = ""  # what was decided, or why not (no secret: see console.operations)

    def row(self) -> tuple[float, str, str, str, str, str, str]:
        """As both stores insert it: at, actor, role, action, target, outcome, detail."""
        return (
            self.at,
            self.actor,
            self.role,
            self.action,
            self.target,
            self.outcome,
            self.detail,
        )


# The columns `command_row` reads, in its order (both stores name them alike).
ROW_COLUMNS = (
    "source, id, type, subject, state, revision, result, unsettled, needs_operator, "
    "created_at, updated_at, sent_at, settle_until, settle_owner, kafka_topic, "
    "kafka_partition, envelope, record_key, before_image"
)


def command_row(r: Any) -> CommandRow:
    return CommandRow(
        CommandKey(r[0], r[1]),
        r[2],
        r[3],
        State(r[4]),
        r[5],
        r[6],
        bool(r[7]),
        bool(r[8]),
        r[9],
        r[10],
        r[11],
        r[12],
        r[13],
        r[14],
        r[15],
        r[16],
        bytes(r[17]) if r[17] is not None else None,  # psycopg: a memoryview
        r[18],
    )


def action_filter(
    action: str | None, target: str | None, since: float | None, mark: str
) -> tuple[str, list[Any]]:
    """The WHERE of an operator-action query (both stores'), with `mark` as placeholder."""
    clauses: list[str] = []
    params: list[Any] = []
    if since is not None:
        clauses.append(f"at >= {mark}")
        params.append(since)
    if action is not None:
        clauses.append(f"action = {mark}")
        params.append(action)
    if target is not None:
        clauses.append(f"target = {mark}")
        params.append(target)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


def decide_claim(
    stored: StoredCommand, content_hash: str, token: str, instance: str, take_over: bool = False
) -> Claim:
    """What a command already in the store means for a copy of it that `instance` has now.

    `take_over`: the caller has waited on a live owner for longer than that owner can take
    to finish a command, so the claim is stranded there (see `once.ExactlyOnce`)."""
    if stored.content_hash != content_hash:
        return Claim(ClaimKind.CONFLICT)
    if stored.state is State.DONE:
        return Claim(ClaimKind.DONE, result=stored.result, revision=stored.revision)
    held_elsewhere = stored.owner is not None and stored.owner != instance and stored.owner_alive
    if held_elsewhere and not take_over:
        return Claim(ClaimKind.BUSY)
    return Claim(
        ClaimKind.RESUME,
        token=token,
        previous=stored.state,
        sent_at=stored.sent_at,
        before=stored.before,
    )


class LostClaim(Exception):
    """The claim was taken over by another instance (this one was thought dead)."""


class CommandStore(Protocol):
    # The database, as metrics name it (`db.system.name`: "sqlite", "postgresql").
    system: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    # Liveness, by the store's clock; kept off the path of command traffic.
    async def heartbeat(self, instance: str) -> None: ...
    async def retire(self, instance: str) -> None: ...
    async def known_instances(self, instances: Collection[str]) -> set[str]:
        """Those of `instances` that ever heartbeat in this store (and did not retire)."""
        ...

    async def release_stranded(self, instance: str, running: Collection[CommandKey]) -> int:
        """Free every unfinished claim of `instance` whose command is not in `running`."""
        ...

    async def claim(
        self,
        command: NewCommand,
        instance: str,
        now: float,
        stale_after_s: float,
        take_over: bool = False,
    ) -> Claim: ...
    async def mark_sent(
        self, key: CommandKey, token: str, now: float, before: str | None = None
    ) -> None: ...
    async def complete(
        self, key: CommandKey, token: str, result: str, unsettled: bool, now: float
    ) -> None:
        """Store the result. Repeatable with the same token and result: an attempt whose
        answer was lost may be made again."""
        ...

    async def release(self, key: CommandKey, token: str) -> bool:
        """Give the claim up, where it got to (received or sent), for the next owner."""
        ...

    async def unsettled(
        self, limit: int, partitions: Collection[tuple[str, int]] | None = None
    ) -> list[Unsettled]:
        """Results still to settle, those not looked at for longest first, leaving out those
        leased (or put off) now; with `partitions`, only those read from them (and those from
        before partitions were kept)."""
        ...

    async def postpone_settle(
        self, key: CommandKey, revision: int, instance: str, delay_s: float
    ) -> bool:
        """Look at it again no sooner than `delay_s` from now (the lease, shortened or not)."""
        ...

    async def later_commands(self, subject: str, after: float, limit: int) -> list[str]:
        """The envelopes of the subject's commands first claimed after `after`, oldest first:
        what a till or an account did since (a settle must not take their effect for its own)."""
        ...

    async def known(self, key: CommandKey) -> bool:
        """Whether the store has a record of the command (done, or under way)."""
        ...

    async def lease_settle(
        self, key: CommandKey, revision: int, instance: str, lease_s: float
    ) -> bool:
        """Take the settling of this revision for `lease_s` (by the store's clock); False when
        another instance holds it, or the revision moved on."""
        ...

    async def settle(
        self,
        key: CommandKey,
        revision: int,
        result: str,
        unsettled: bool,
        now: float,
        needs_operator: bool = False,
    ) -> bool:
        """Store the next revision's result (compare-and-set on `revision`); the lease ends."""
        ...

    async def needing_operator(self, limit: int) -> list[Unsettled]:
        """Results the upstream could no longer tell about: an operator decides."""
        ...

    async def unsettled_summary(self) -> UnsettledSummary:
        """How many results are indeterminate (still being settled, or left to an
        operator), and when the oldest of those still being settled was first claimed."""
        ...

    # -- for operators (console/operations.py) --------------------------------------------

    async def lookup(self, key: CommandKey) -> CommandRow | None: ...
    async def by_subject(self, subject: str, limit: int) -> list[CommandRow]:
        """The subject's (a terminal's, an account's) commands, newest first."""
        ...

    async def unsettled_rows(self, limit: int) -> list[CommandRow]:
        """Every done command still indeterminate (settling or left to an operator), oldest
        first."""
        ...

    async def recheck_now(self, key: CommandKey) -> bool:
        """Settle it at the next look rather than after its wait; False when it is not being
        settled, or is being looked at right now (a lease is held)."""
        ...

    async def lease_resolve(
        self, key: CommandKey, revision: int, instance: str, lease_s: float
    ) -> bool:
        """Take this revision for an operator's resolution (as `lease_settle`, and for a
        result left to an operator too); False when a settle holds it or it moved on."""
        ...

    async def record_action(self, action: OperatorAction) -> None: ...
    async def actions(
        self,
        limit: int,
        action: str | None = None,
        target: str | None = None,
        since: float | None = None,
    ) -> list[OperatorAction]:
        """Operators' actions, newest first; only of `action`, on `target`, at or after
        `since`, where given."""
        ...

    async def purge(self, before: float, limit: int) -> int: ...
    async def count(self) -> int: ...

    async def load_session(self, terminal: str) -> dict[str, str]: ...
    async def save_session(self, terminal: str, cookies: dict[str, str], now: float) -> None: ...

    # Each till's bill as the service saw it (evoucher/bill.py), as JSON text.
    async def load_bill(self, terminal: str) -> str | None: ...
    async def save_bill(self, terminal: str, bill: str, now: float) -> None: ...
