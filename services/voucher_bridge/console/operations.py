"""Every look and every action of the console, for the web pages, the JSON API and the CLI.

Safe by construction:
- an action is taken only for an operator (`Operator.may_act`), and recorded, whatever came
  of it (`OperatorAction`: who, when, what, how it went);
- a replay goes back to the commands topic the dead letter came from, as the original record
  (its key, value and headers, less the dead-letter ones) with `x-replay-of` and
  `x-replay-count`, so the store keeps it exactly once: a command already answered is answered
  again from the store, and no upstream is called; a chain of replays is cut at
  CONSOLE_REPLAY_MAX (quarantine), and replays are capped per minute;
- a resolution is a superseding result, made by `ExactlyOnce.resolve` under the settle lease;
- success is said only once the broker has the record (`RecordProducer.send` waits for it);
- nothing shown holds a secret (`redact`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from voucher_bridge.console.access import Operator
from voucher_bridge.console.deadletters import DeadLetterReader, DeadLetterRecord
from voucher_bridge.console.redact import redact, redact_headers, text_or_hex
from voucher_bridge.kafka.pipeline import CommandPipeline, Topics
from voucher_bridge.kafka.producer import RecordProducer
from voucher_bridge.once import ExactlyOnce, NotResolvable, PublishSuperseding
from voucher_bridge.store.base import CommandKey, CommandRow, CommandStore, OperatorAction
from voucher_contracts import Outcome, ResultData, result_id
from voucher_contracts import deadletter as dlq
from voucher_contracts.replay import DEAD_LETTER_PREFIX, REPLAY_COUNT, REPLAY_OF


class ConsoleError(Exception):
    """A request the console will not do, with the HTTP status that says so."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ConsoleLane(Protocol):
    """What the console uses of a lane of the service (app.Lane)."""

    @property
    def topics(self) -> Topics: ...
    @property
    def pipeline(self) -> CommandPipeline: ...


@dataclass(frozen=True)
class Limits:
    replay_max: int = 3
    replays_per_minute: int = 30
    dlq_scan: int = 500
    show_pins: bool = False
    trace_url: str | None = None  # with "{trace_id}"


@dataclass(frozen=True)
class _Replayed:
    """A dead letter as it would go back: where, and the record."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    count: int  # replays of its chain, this one included
    target: str  # "<dlq topic>/<partition>/<offset>"


class _Replay:
    """A record for `CommandPipeline.decode` (the Record protocol)."""

    def __init__(self, replayed: _Replayed) -> None:
        self.topic, self.partition, self.offset, self.timestamp = replayed.topic, 0, 0, 0
        self.key, self.value, self.headers = replayed.key, replayed.value, replayed.headers


class Console:
    def __init__(
        self,
        *,
        store: CommandStore,
        once: ExactlyOnce,
        lanes: Sequence[ConsoleLane],
        producer: RecordProducer,
        reader: DeadLetterReader,
        publish: PublishSuperseding,
        limits: Limits,
        live: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        instance: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._once = once
        self._lanes = list(lanes)
        self._producer = producer
        self._reader = reader
        self._publish = publish
        self._limits = limits
        self._live = live
        self._instance = instance
        self._clock = clock

    async def close(self) -> None:
        await self._reader.close()

    # -- looking ----------------------------------------------------------------------------

    @property
    def dead_letter_topics(self) -> list[str]:
        return [lane.topics.dead_letters for lane in self._lanes]

    async def overview(self) -> dict[str, Any]:
        summary = await self._store.unsettled_summary()
        view: dict[str, Any] = {
            "instance": self._instance,
            "unsettled": {
                "settling": summary.settling,
                "left_to_operator": summary.left_to_operator,
            },
        }
        if self._live is not None:
            view.update(await self._live())
        return view

    async def dead_letters(
        self,
        topic: str,
        reason: str | None = None,
        key: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """The topic's newest dead letters first, filtered by reason, key (its text) and time."""
        self._dead_letter_lane(topic)
        found = []
        for record in await self._reader.newest(topic, self._limits.dlq_scan):
            item = self._dead_letter_item(record, full=False)
            if reason and item["reason"] != reason:
                continue
            if key and item["key"] != key:
                continue
            if since and record.timestamp < since.timestamp() * 1000:
                continue
            found.append(item)
            if len(found) >= limit:
                break
        return found

    async def dead_letter(self, topic: str, partition: int, offset: int) -> dict[str, Any]:
        self._dead_letter_lane(topic)
        record = await self._reader.one(topic, partition, offset)
        if record is None:
            raise ConsoleError(404, f"no record at {topic}/{partition}/{offset}")
        return self._dead_letter_item(record, full=True)

    async def unsettled(self, limit: int = 200) -> list[dict[str, Any]]:
        return [self._command_item(row) for row in await self._store.unsettled_rows(limit)]

    async def command(self, source: str, id: str) -> dict[str, Any]:
        row = await self._store.lookup(CommandKey(source, id))
        if row is None:
            raise ConsoleError(404, f"no command ({source!r}, {id!r}) in the store")
        return self._command_item(row)

    async def commands_of(self, subject: str, limit: int = 50) -> list[dict[str, Any]]:
        return [self._command_item(row) for row in await self._store.by_subject(subject, limit)]

    async def audit(self, limit: int = 200) -> list[dict[str, Any]]:
        return [
            {
                "at": _iso(a.at),
                "actor": a.actor,
                "role": a.role,
                "action": a.action,
                "target": a.target,
                "outcome": a.outcome,
                "detail": a.detail,
            }
            for a in await self._store.actions(limit)
        ]

    # -- acting -----------------------------------------------------------------------------

    async def replay(
        self, who: Operator, topic: str, partition: int, offset: int, dry_run: bool
    ) -> dict[str, Any]:
        """A dead letter back to its commands topic (see the module's note); with `dry_run`,
        only what the service would do with it now."""
        target = f"{topic}/{partition}/{offset}"
        action = "replay_dry_run" if dry_run else "replay"
        await self._may_act(who, action, target)
        try:
            replayed = await self._replayable(topic, partition, offset)
            would = await self._would(replayed)
            if dry_run:
                await self._record(who, action, target, "done", would["summary"])
                return {"dry_run": True, "replay_count": replayed.count, **would}
            await self._may_replay_now()
            await self._producer.send(
                replayed.topic, replayed.key, replayed.value, replayed.headers
            )
        except ConsoleError as refused:
            await self._record(who, action, target, "refused", refused.message)
            raise
        except Exception as exc:
            await self._record(who, action, target, "failed", f"{type(exc).__name__}: {exc}")
            raise
        detail = f"to {replayed.topic} (replay {replayed.count}): {would['summary']}"
        await self._record(who, action, target, "done", detail)
        return {
            "dry_run": False,
            "replayed_to": replayed.topic,
            "replay_count": replayed.count,
            **would,
        }

    async def recheck(self, who: Operator, source: str, id: str) -> dict[str, Any]:
        target = f"{source}/{id}"
        await self._may_act(who, "recheck", target)
        row = await self._store.lookup(CommandKey(source, id))
        if row is None or not row.unsettled:
            why = (
                "left to an operator: the upstream can no longer tell; resolve it"
                if row is not None and row.needs_operator
                else "its result is not being settled"
            )
            await self._record(who, "recheck", target, "refused", why)
            raise ConsoleError(409, why)
        if not await self._once.recheck(CommandKey(source, id)):
            why = "it is being looked at right now"
            await self._record(who, "recheck", target, "refused", why)
            raise ConsoleError(409, why)
        await self._record(who, "recheck", target, "done", "looked at again at the next settle")
        return {"rechecking": True, "command": self._command_item(row)}

    async def resolve(
        self, who: Operator, source: str, id: str, outcome: str, note: str
    ) -> dict[str, Any]:
        target = f"{source}/{id}"
        await self._may_act(who, "resolve", target)
        note = note.strip()
        try:
            if not note:
                raise ConsoleError(422, "a note is required: what confirmed the outcome")
            if len(note) > 500:
                raise ConsoleError(422, "the note is longer than 500 characters")
            # Only these two: "rejected" or "indeterminate" is not an operator's word.
            chosen = next((o for o in (Outcome.SUCCEEDED, Outcome.FAILED) if o == outcome), None)
            if chosen is None:
                raise ConsoleError(422, "outcome must be succeeded or failed")
            try:
                new_id = await self._once.resolve(
                    CommandKey(source, id),
                    chosen,
                    f"{note} (resolved by {who.name})",
                    self._publish,
                )
            except NotResolvable as exc:
                raise ConsoleError(409, str(exc)) from None
        except ConsoleError as refused:
            await self._record(who, "resolve", target, "refused", refused.message)
            raise
        await self._record(who, "resolve", target, "done", f"{outcome}: {note} (result {new_id})")
        return {"resolved": True, "result_id": new_id, "outcome": outcome}

    # -- the parts ----------------------------------------------------------------------------

    async def refused(self, who: Operator, action: str, target: str, why: str) -> None:
        """An attempt refused before it reached the action (the console's door refuses a
        viewer's POST), in the audit as the actions' own refusals are."""
        await self._record(who, action, target, "refused", why)

    async def _may_act(self, who: Operator, action: str, target: str) -> None:
        if not who.may_act:
            why = viewer_refusal(who)
            await self.refused(who, action, target, why)
            raise ConsoleError(403, why)

    def _dead_letter_lane(self, topic: str) -> ConsoleLane:
        for lane in self._lanes:
            if lane.topics.dead_letters == topic:
                return lane
        raise ConsoleError(404, f"{topic!r} is not a dead-letter topic of this service")

    def _lane_of_commands(self, topic: str) -> ConsoleLane | None:
        return next((lane for lane in self._lanes if lane.topics.commands == topic), None)

    async def _replayable(self, topic: str, partition: int, offset: int) -> _Replayed:
        lane = self._dead_letter_lane(topic)
        record = await self._reader.one(topic, partition, offset)
        if record is None:
            raise ConsoleError(404, f"no record at {topic}/{partition}/{offset}")
        headers = dict(record.headers)
        if dlq.OMITTED in headers:
            raise ConsoleError(
                409, "the dead letter does not hold the original record (x-dlq-omitted)"
            )
        original = _text(headers.get(dlq.ORIGINAL_TOPIC)) or lane.topics.commands
        if self._lane_of_commands(original) is None:
            raise ConsoleError(409, f"it came from {original!r}, not a commands topic here")
        target = f"{topic}/{partition}/{offset}"
        earlier = _int(headers.get(REPLAY_COUNT))
        again = len(
            [
                a
                for a in await self._store.actions(1000, action="replay", target=target)
                if a.outcome == "done"
            ]
        )
        count = earlier + again + 1
        if count > self._limits.replay_max:
            raise ConsoleError(
                409,
                f"quarantined: replayed {count - 1} time(s) already "
                f"(CONSOLE_REPLAY_MAX={self._limits.replay_max})",
            )
        kept = [
            (k, v)
            for k, v in record.headers
            if not k.startswith(DEAD_LETTER_PREFIX) and k not in (REPLAY_OF, REPLAY_COUNT)
        ]
        kept += [(REPLAY_OF, target.encode()), (REPLAY_COUNT, str(count).encode())]
        return _Replayed(original, record.key, record.value, kept, count, target)

    async def _would(self, replayed: _Replayed) -> dict[str, Any]:
        """What the service would do with the replayed record now."""
        lane = self._lane_of_commands(replayed.topic)
        assert lane is not None
        command, unusable = lane.pipeline.decode(_Replay(replayed))
        if unusable is not None:
            return {
                "would": "dead_letter",
                "reason": unusable.reason,
                "summary": f"dead letter again: {unusable.reason} ({unusable.detail})",
            }
        assert command is not None
        row = await self._store.lookup(CommandKey(command.source, command.id))
        about = {"command": {"source": command.source, "id": command.id, "type": command.type}}
        if row is not None and row.result is not None:
            outcome = ResultData.model_validate_json(row.result).outcome.value
            return {
                "would": "answer_from_store",
                **about,
                "summary": f"{command.type} {command.id}: answered already ({outcome}); "
                "the stored result is published again, no upstream call",
            }
        if row is not None:
            return {
                "would": "resume",
                **about,
                "summary": f"{command.type} {command.id}: under way; resumed as the store has it",
            }
        return {
            "would": "execute",
            **about,
            "summary": f"{command.type} {command.id} of {command.subject}: a new command, "
            "executed once",
        }

    async def _may_replay_now(self) -> None:
        """At most CONSOLE_REPLAYS_PER_MINUTE replays in the last minute, counted in the audit
        (the store): the whole group's and the command line's together."""
        cap = self._limits.replays_per_minute
        recent = await self._store.actions(10_000, action="replay", since=self._clock() - 60)
        if len([a for a in recent if a.outcome == "done"]) >= cap:
            raise ConsoleError(
                429,
                f"at most {cap} replays a minute (CONSOLE_REPLAYS_PER_MINUTE); try again shortly",
            )

    async def _record(
        self, who: Operator, action: str, target: str, outcome: str, detail: str
    ) -> None:
        await self._store.record_action(
            OperatorAction(self._clock(), who.name, who.role, action, target, outcome, detail)
        )

    def _dead_letter_item(self, record: DeadLetterRecord, full: bool) -> dict[str, Any]:
        headers = dict(record.headers)
        key_text, key_shown = text_or_hex(record.key)
        item: dict[str, Any] = {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "timestamp": _iso(record.timestamp / 1000),
            "reason": _text(headers.get(dlq.REASON)) or "",
            "detail": _text(headers.get(dlq.DETAIL)) or "",
            "key": key_text if key_shown != "hex" else None,
            "key_hex": record.key.hex() if record.key is not None else None,
            "command_id": None,
            "replay_count": _int(headers.get(REPLAY_COUNT)),
            "original": {
                "topic": _text(headers.get(dlq.ORIGINAL_TOPIC)),
                "partition": _int(headers.get(dlq.ORIGINAL_PARTITION), None),
                "offset": _int(headers.get(dlq.ORIGINAL_OFFSET), None),
            },
        }
        lane = next((x for x in self._lanes if x.topics.dead_letters == record.topic), None)
        if lane is not None:
            plain = [(k, v) for k, v in record.headers if not k.startswith(DEAD_LETTER_PREFIX)]
            replay = _Replayed(lane.topics.commands, record.key, record.value, plain, 0, "")
            command, _ = lane.pipeline.decode(_Replay(replay))
            if command is not None:
                item["command_id"] = command.id
                item["command_source"] = command.source
        if full:
            value, shown = text_or_hex(record.value, self._limits.show_pins)
            item["value"] = value
            item["value_shown_as"] = shown
            item["headers"] = [
                {"name": k, "value": v}
                for k, v in redact_headers(
                    [h for h in record.headers if not h[0].startswith(DEAD_LETTER_PREFIX)]
                )
            ]
            item["dlq_headers"] = [
                {"name": k, "value": v}
                for k, v in redact_headers(
                    [h for h in record.headers if h[0].startswith(DEAD_LETTER_PREFIX)]
                )
            ]
        return item

    def _command_item(self, row: CommandRow) -> dict[str, Any]:
        envelope = _json(row.envelope)
        result = _json(row.result) if row.result is not None else None
        traceparent = envelope.get("traceparent") if isinstance(envelope, dict) else None
        trace_id = _trace_id(traceparent)
        item: dict[str, Any] = {
            "source": row.key.source,
            "id": row.key.id,
            "type": row.type,
            "subject": row.subject,
            "state": row.state.value,
            "revision": row.revision,
            "result_id": result_id(row.key.source, row.key.id, row.revision)
            if row.result is not None
            else None,
            "outcome": result.get("outcome") if isinstance(result, dict) else None,
            "reason": result.get("reason") if isinstance(result, dict) else None,
            "settling": row.unsettled,
            "left_to_operator": row.needs_operator,
            "received_at": _iso(row.created_at),
            "updated_at": _iso(row.updated_at),
            "sent_at": _iso(row.sent_at) if row.sent_at is not None else None,
            "age_s": round(max(0.0, self._clock() - row.created_at), 1),
            "next_look_at": _iso(row.settle_until)
            if row.unsettled and row.settle_until is not None
            else ("at the next settle" if row.unsettled else None),
            "settled_by": row.settle_owner,
            "partition": f"{row.topic}[{row.partition}]" if row.topic is not None else None,
            "command": redact(envelope, self._limits.show_pins),
            "result": redact(result, self._limits.show_pins),
            "trace_id": trace_id,
            "trace_url": self._limits.trace_url.replace("{trace_id}", trace_id)
            if trace_id and self._limits.trace_url
            else None,
        }
        return item


def viewer_refusal(who: Operator) -> str:
    return f"{who.name} is a viewer: only operators act"


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _trace_id(traceparent: Any) -> str | None:
    if isinstance(traceparent, str):
        parts = traceparent.split("-")
        if len(parts) == 4 and len(parts[1]) == 32:
            return parts[1]
    return None


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    return raw.decode(errors="replace")


def _int(raw: bytes | None, default: Any = 0) -> Any:
    try:
        return int(raw.decode()) if raw is not None else default
    except (ValueError, UnicodeDecodeError):
        return default
