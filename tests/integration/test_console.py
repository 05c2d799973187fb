"""The operator console (issue 14) against the real broker and the eVOUCHER sandbox, the
service running as a process: its JSON API under /console/api/ and the `voucher-bridge dlq` and
`unsettled` commands, with the same environment, on the same broker and store.

- A record dead-lettered as `too_large` is dry-run (a dead letter again), replayed once
  `MAX_RECORD_BYTES` is raised and answered once; replayed again, the stored result comes back
  and the sandbox sees no second call; then the quarantine limit refuses the next replay. Who
  may act: no login is 401, a viewer's replay and a POST without `X-Console-Action` are 403
  (the viewer's in the audit).
- An indeterminate result left to an operator is resolved, by the API and by the command line,
  with a superseding result under the next revision's id.
- Without CONSOLE_USERS, /console/ answers 404.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from tests.conftest import Stack
from tests.support.workload import service_env
from voucher_bridge.console.access import hash_password
from voucher_bridge.store import open_store
from voucher_bridge.store.base import CommandKey, NewCommand
from voucher_contracts import result_id
from voucher_sandboxes.localstack import (
    CommandProducer,
    Process,
    ReceivedResult,
    ResultReader,
    free_port,
    new_traceparent,
    start_service,
)

pytestmark = pytest.mark.kafka

VIEWER = ("vera", "vera-only-looks")
OPERATOR = ("otto", "otto-puts-it-right")
CLI_ACTOR = f"cli:{getpass.getuser()}"
SMALL_RECORD_BYTES = 2_000


def _console_users() -> str:
    """A viewer with a plain password, an operator with a hash (the stored form)."""
    return json.dumps(
        {
            VIEWER[0]: {"password": VIEWER[1], "role": "viewer"},
            OPERATOR[0]: {"password": hash_password(OPERATOR[1]), "role": "operator"},
        }
    )


class ConsoleApi:
    def __init__(self, port: int) -> None:
        self._client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}/console/api/", timeout=30
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def get(
        self, path: str, who: tuple[str, str] | None = OPERATOR, **params: Any
    ) -> httpx.Response:
        return await self._client.get(path, params=params, auth=who)

    async def post(
        self,
        path: str,
        body: dict[str, Any],
        who: tuple[str, str] | None = OPERATOR,
        action_header: bool = True,
    ) -> httpx.Response:
        headers = {"X-Console-Action": "1"} if action_header else {}
        auth = who if who is not None else httpx.USE_CLIENT_DEFAULT  # the client has none
        return await self._client.post(path, json=body, auth=auth, headers=headers)

    async def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await (self.get if method == "GET" else self.post)(path, **kwargs)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()


async def _until_ready(port: int, service: Process, within_s: float = 40) -> None:
    deadline = time.monotonic() + within_s
    async with httpx.AsyncClient(timeout=6) as client:
        while True:
            assert service.alive(), f"the service exited; see {service.log_path}"
            try:
                r = await client.get(f"http://127.0.0.1:{port}/health/ready")
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not become ready"
            await asyncio.sleep(0.3)


async def _cli(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`voucher-bridge ...` as an operator runs it, with the service's environment."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "voucher_bridge.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _lines(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


async def _read_topic(
    bootstrap: str, topic: str, partitions: int
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of the topic, up to its end as it is now."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        found: list[ConsumerRecord[bytes, bytes]] = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                found.extend(records)
        return found
    finally:
        await consumer.stop()


async def _results_with_id(
    reader: ResultReader, event_id: str, n: int, within_s: float = 30
) -> list[ReceivedResult]:
    deadline = time.monotonic() + within_s
    while len(found := [r for r in reader.records if r.event.get("id") == event_id]) < n:
        assert time.monotonic() < deadline, f"fewer than {n} results with id {event_id}"
        await reader.poll()
    return found


def _bill_calls(s: Stack, till: str) -> int:
    return sum(1 for c in s.sandbox.calls(till) if c["route"] == "bill_total_api")


async def test_a_dead_letter_is_replayed_once_answered_again_from_the_store_then_quarantined(
    stack: Any, tmp_path: Path
) -> None:
    s: Stack = await stack(partitions=1)
    till = s.terminal()
    port = free_port()
    env = service_env(
        s,
        MAX_RECORD_BYTES=str(SMALL_RECORD_BYTES),
        CONSOLE_USERS=_console_users(),
        CONSOLE_REPLAY_MAX="2",
        CONSOLE_TRACE_URL="http://traces.example/trace/{trace_id}",
    )
    command_id = str(uuid.uuid4())
    source = f"/stores/limassol-3/pos/{till}"
    event = {
        "specversion": "1.0",
        "id": command_id,
        "source": source,
        "type": "pos.bill_total",
        "subject": till,
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
        "data": {"bill_total": "12.50"},
        "padding": "x" * (SMALL_RECORD_BYTES + 500),  # an extension attribute, to be too large
    }
    value = json.dumps(event).encode()
    assert len(value) > SMALL_RECORD_BYTES
    original_headers = [
        ("content-type", b"application/cloudevents+json"),
        ("traceparent", new_traceparent().encode()),
        ("x-pos-app", b"till-ui/4.2"),
        ("authorization", b"Bearer a-secret-a-till-should-not-send"),
    ]
    api = ConsoleApi(port)
    service = start_service(env, tmp_path / "service-1.log", http_port=port)
    try:
        await _until_ready(port, service)
        async with CommandProducer(s.bootstrap, s.commands) as producer:
            await producer.send_raw(till.encode(), value, original_headers)

        # The dead letter, as the console lists it (the listing reads the topic when asked).
        deadline = time.monotonic() + 30
        while not (listed := (await api.ok("GET", "dead-letters", topic=s.dlq))["items"]):
            assert time.monotonic() < deadline, "the dead letter is not listed"
            await asyncio.sleep(0.3)
        [item] = listed
        assert item["topic"] == s.dlq and item["reason"] == "too_large" and item["key"] == till
        assert item["original"] == {"topic": s.commands, "partition": 0, "offset": 0}
        where = {"topic": s.dlq, "partition": item["partition"], "offset": item["offset"]}
        target = f"{s.dlq}/{item['partition']}/{item['offset']}"
        assert (await api.ok("GET", "dead-letters", topic=s.dlq, reason="not_json"))["items"] == []
        assert (await api.ok("GET", "dead-letters", topic=s.dlq, key="another-till"))["items"] == []
        later = await api.ok("GET", "dead-letters", topic=s.dlq, since="2099-01-01T00:00Z")
        assert later["items"] == []
        bad_queries: list[dict[str, Any]] = [
            {"topic": s.dlq, "limit": "many"},
            {"topic": s.dlq, "since": "yesterday"},
            {},
        ]
        for bad in bad_queries:
            refused = await api.get("dead-letters", **bad)
            assert refused.status_code == 422, (bad, refused.text)

        # Who may do what.
        assert (await api.get("dead-letters", who=None, topic=s.dlq)).status_code == 401
        wrong = (OPERATOR[0], "not-the-password")
        assert (await api.get("dead-letters", who=wrong, topic=s.dlq)).status_code == 401
        assert (await api.get("dead-letters", who=VIEWER, topic=s.dlq)).status_code == 200
        viewer = await api.post("dead-letters/replay", {**where, "dry_run": False}, who=VIEWER)
        assert viewer.status_code == 403, viewer.text
        bare = await api.post(
            "dead-letters/replay", {**where, "dry_run": False}, action_header=False
        )
        assert bare.status_code == 403 and "X-Console-Action" in bare.json()["error"]
        unknown = await api.post("dead-letters/replay", {**where, "topic": s.commands})
        assert unknown.status_code == 404, unknown.text

        dry = await api.ok("POST", "dead-letters/replay", body={**where, "dry_run": True})
        assert dry["dry_run"] is True and dry["would"] == "dead_letter", dry
        assert dry["reason"] == "too_large" and dry["replay_count"] == 1

        # The command line, beside the running service.
        [line] = _lines(await _cli(env, "dlq", "list", s.dlq))
        assert {k: line[k] for k in ("topic", "partition", "offset", "reason", "key")} == {
            **where,
            "reason": "too_large",
            "key": till,
        }
        assert _lines(await _cli(env, "dlq", "list", s.dlq, "--reason", "not_json")) == []
        [shown] = _lines(
            await _cli(env, "dlq", "show", s.dlq, str(where["partition"]), str(where["offset"]))
        )
        assert shown["reason"] == "too_large" and shown["value_shown_as"] == "json"
        assert json.loads(shown["value"]) == event
        headers = {h["name"]: h["value"] for h in shown["headers"]}
        assert headers["x-pos-app"] == "till-ui/4.2" and headers["authorization"] == "****"
        dlq_headers = {h["name"]: h["value"] for h in shown["dlq_headers"]}
        assert dlq_headers["x-dlq-reason"] == "too_large"
        assert dlq_headers["x-dlq-original-topic"] == s.commands
    finally:
        assert service.stop() == 0

    # The limit raised: the same dead letter is a command now.
    env["MAX_RECORD_BYTES"] = "1048576"
    at = (s.dlq, str(where["partition"]), str(where["offset"]))
    [dry] = _lines(await _cli(env, "dlq", "replay", *at, "--dry-run"))
    assert dry["would"] == "execute" and dry["command"]["id"] == command_id, dry
    service = start_service(env, tmp_path / "service-2.log", http_port=port)
    try:
        async with ResultReader(s.bootstrap, s.results) as results:
            await _until_ready(port, service)
            [item] = (await api.ok("GET", "dead-letters", topic=s.dlq))["items"]
            assert item["command_id"] == command_id  # readable now
            dry = await api.ok("POST", "dead-letters/replay", body={**where, "dry_run": True})
            assert dry["would"] == "execute" and dry["command"]["id"] == command_id, dry
            assert dry["command"]["source"] == source and dry["command"]["type"] == "pos.bill_total"

            done = await api.ok("POST", "dead-letters/replay", body={**where, "dry_run": False})
            assert done["dry_run"] is False and done["replayed_to"] == s.commands, done
            assert done["replay_count"] == 1 and done["would"] == "execute"
            [answer] = await results.wait_for({command_id}, 30)
            assert answer.data["outcome"] == "succeeded", answer.data
            assert answer.event["id"] == result_id(source, command_id, 0)
            assert answer.key == till.encode()
            await results.settle(1.0)
            assert len(results.for_commands({command_id})) == 1
            assert _bill_calls(s, till) == 1

            # The lookup by till: the command, its stored result, its trace (linked).
            [looked] = (await api.ok("GET", "commands", who=VIEWER, subject=till))["items"]
            trace_id = original_headers[1][1].decode().split("-")[1]
            assert looked["id"] == command_id and looked["outcome"] == "succeeded"
            assert looked["result_id"] == answer.event["id"] and looked["trace_id"] == trace_id
            assert looked["trace_url"] == f"http://traces.example/trace/{trace_id}"
            overview = await api.ok("GET", "overview", who=VIEWER)
            [pos] = [p for p in overview["partitions"] if p["topic"] == s.commands]
            assert pos["lag"] == 0 and pos["in_flight"] == 0, pos
            assert overview["outcome_totals"].get("succeeded", 0) >= 1, overview

            # Replayed again (by the command line): answered from the store, no upstream call.
            dry = await api.ok("POST", "dead-letters/replay", body={**where, "dry_run": True})
            assert dry["would"] == "answer_from_store" and dry["replay_count"] == 2, dry
            [again] = _lines(await _cli(env, "dlq", "replay", *at))
            assert again["dry_run"] is False and again["replay_count"] == 2, again
            assert again["would"] == "answer_from_store"
            first, second = await _results_with_id(results, answer.event["id"], 2)
            assert first.data == second.data  # the stored result, as it was
            assert second.data["outcome"] == "succeeded"
            assert second.data["command_id"] == command_id
            await results.settle(1.0)
            assert len(results.for_commands({command_id})) == 2
            assert _bill_calls(s, till) == 1

            # CONSOLE_REPLAY_MAX=2: quarantined, for the API and the command line, dry run too.
            refused = await api.post("dead-letters/replay", {**where, "dry_run": False})
            assert refused.status_code == 409 and "quarantined" in refused.json()["error"]
            refused = await api.post("dead-letters/replay", {**where, "dry_run": True})
            assert refused.status_code == 409 and "quarantined" in refused.json()["error"]
            cli = await _cli(env, "dlq", "replay", *at, "--dry-run")
            assert cli.returncode == 1 and "quarantined" in cli.stderr, cli.stderr
            await results.settle(1.0)
            assert len(results.for_commands({command_id})) == 2
            assert _bill_calls(s, till) == 1

        # On the commands topic: the original and two replays, each the original record (value
        # and headers) less the x-dlq-* headers, with x-replay-of and x-replay-count.
        records = await _read_topic(s.bootstrap, s.commands, 1)
        assert [r.value for r in records] == [value] * 3
        assert list(records[0].headers) == original_headers
        for count, replayed in enumerate(records[1:], start=1):
            kept = list(replayed.headers)
            assert not [k for k, _ in kept if k.startswith("x-dlq-")], kept
            assert kept[: len(original_headers)] == original_headers
            assert dict(kept)["x-replay-of"] == target.encode()
            assert dict(kept)["x-replay-count"] == str(count).encode()
            assert replayed.key == till.encode()

        # The pages, as a viewer sees them: served, and no secret on any.
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}/console", auth=VIEWER, timeout=30
        ) as client:
            for path, params in (
                ("/", {}),
                ("/dead-letters", {"topic": s.dlq, "reason": "too_large"}),
                (f"/dead-letters/{s.dlq}/{where['partition']}/0", {}),
                ("/unsettled", {}),
                ("/commands", {"subject": till}),
                ("/commands", {"source": source, "id": command_id}),
                ("/audit", {}),
            ):
                page = await client.get(path, params=params)
                assert page.status_code == 200, (path, page.status_code, page.text[:500])
                assert "text/html" in page.headers["content-type"]
                assert page.headers["x-frame-options"] == "DENY"
                assert b"a-secret-a-till-should-not-send" not in page.content, path
                assert OPERATOR[1] not in page.text and VIEWER[1] not in page.text
            record = (await client.get(f"/dead-letters/{s.dlq}/{where['partition']}/0")).text
            assert "too_large" in record and command_id in record
        shown = await api.ok("GET", "dead-letters/record", who=VIEWER, **where)
        assert {h["name"]: h["value"] for h in shown["headers"]}["authorization"] == "****"
        assert shown["command_id"] == command_id and json.loads(shown["value"])["id"] == command_id

        # The audit: who did what, refusals included, newest first.
        audit = (await api.ok("GET", "audit", who=VIEWER))["items"]
        viewer_tried, wrong_topic, *audit = reversed(audit)
        # The viewer's refused replay (the POST without the action header is not the user's).
        assert [viewer_tried[k] for k in ("actor", "role", "action", "target", "outcome")] == [
            VIEWER[0],
            "viewer",
            "replay",
            target,
            "refused",
        ], viewer_tried
        assert "only operators act" in viewer_tried["detail"]
        assert wrong_topic["outcome"] == "refused" and wrong_topic["target"] == f"{s.commands}/0/0"
        assert "not a dead-letter topic" in wrong_topic["detail"]
        audit.reverse()
        assert all(a["target"] == target for a in audit), audit
        done_by = [(a["actor"], a["action"], a["outcome"]) for a in reversed(audit)]
        assert done_by == [
            (OPERATOR[0], "replay_dry_run", "done"),  # too large still
            (CLI_ACTOR, "replay_dry_run", "done"),
            (OPERATOR[0], "replay_dry_run", "done"),
            (OPERATOR[0], "replay", "done"),
            (OPERATOR[0], "replay_dry_run", "done"),
            (CLI_ACTOR, "replay", "done"),
            (OPERATOR[0], "replay", "refused"),
            (OPERATOR[0], "replay_dry_run", "refused"),
            (CLI_ACTOR, "replay_dry_run", "refused"),
        ], done_by
        assert "too_large" in audit[-1]["detail"]
        assert "quarantined" in audit[0]["detail"] and audit[0]["role"] == "operator"
        assert all(a["at"].endswith("Z") for a in audit)
    finally:
        await api.aclose()
        assert service.stop() == 0


async def _leave_to_an_operator(s: Stack, till: str, codes: list[str]) -> tuple[str, str, str]:
    """A pos.redeem whose call went out and whose outcome the upstream could no longer tell,
    left to an operator (`needs_operator`), as the service leaves one; (source, id, traceparent)."""
    source, command_id, traceparent = (
        f"/stores/limassol-3/pos/{till}",
        str(uuid.uuid4()),
        new_traceparent(),
    )
    envelope = {
        "specversion": "1.0",
        "id": command_id,
        "source": source,
        "type": "pos.redeem",
        "subject": till,
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
        "data": {"voucher_codes": codes},
        "traceparent": traceparent,
        "tracestate": None,
        "dataschema": None,
        "extensions": {},
    }
    result = {
        "command_id": command_id,
        "command_source": source,
        "command_type": "pos.redeem",
        "voucher_codes": codes,
        "upstream": {"attempts": 1},
    }
    store = open_store(s.store_url)
    await store.open()
    try:
        key = CommandKey(source, command_id)
        now = time.time()
        await store.heartbeat("seeding")
        claim = await store.claim(
            NewCommand(
                key,
                "h-" + command_id,
                "pos.redeem",
                till,
                json.dumps(envelope),
                till.encode(),
                topic=s.commands,
                partition=0,
            ),
            "seeding",
            now - 3600,
            15,
        )
        assert claim.token is not None
        await store.mark_sent(key, claim.token, now - 3590)
        timed_out = {**result, "outcome": "indeterminate", "reason": "upstream_unavailable"}
        await store.complete(key, claim.token, json.dumps(timed_out), True, now - 3580)
        unsettled = {
            **result,
            "outcome": "indeterminate",
            "reason": "unsettled",
            "supersedes": result_id(source, command_id, 0),
        }
        assert await store.settle(
            key, 0, json.dumps(unsettled), False, now - 60, needs_operator=True
        )
    finally:
        await store.close()
    return source, command_id, traceparent


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_an_operator_resolves_an_unsettled_result_by_the_api_and_the_command_line(
    stack: Any, tmp_path: Path
) -> None:
    s: Stack = await stack(partitions=1)
    till = s.terminal()
    by_api = await _leave_to_an_operator(s, till, s.sandbox.add_vouchers("20.00"))
    by_cli = await _leave_to_an_operator(s, till, s.sandbox.add_vouchers("50.00", "10.00"))
    port = free_port()
    env = service_env(s, CONSOLE_USERS=_console_users())
    api = ConsoleApi(port)
    service = start_service(env, tmp_path / "service.log", http_port=port)
    try:
        async with ResultReader(s.bootstrap, s.results) as results:
            await _until_ready(port, service)
            listed = (await api.ok("GET", "unsettled", who=VIEWER))["items"]
            assert {i["id"] for i in listed} == {by_api[1], by_cli[1]}, listed
            for i in listed:
                assert i["left_to_operator"] and not i["settling"] and i["revision"] == 1
                assert i["reason"] == "unsettled" and i["type"] == "pos.redeem"
                assert i["subject"] == till and i["partition"] == f"{s.commands}[0]"
            [one] = [i for i in listed if i["id"] == by_api[1]]
            assert one["trace_id"] == by_api[2].split("-")[1]
            cli_listed = _lines(await _cli(env, "unsettled", "list"))
            assert {i["id"] for i in cli_listed} == {by_api[1], by_cli[1]}

            source, command_id, _ = by_api
            looked = await api.ok("GET", "commands", who=VIEWER, source=source, id=command_id)
            assert looked["state"] == "done" and looked["left_to_operator"]
            # Left to an operator: a recheck is refused (nothing left to ask the upstream).
            recheck = await api.post("unsettled/recheck", {"source": source, "id": command_id})
            assert recheck.status_code == 409 and "resolve" in recheck.json()["error"]
            viewer = await api.post(
                "unsettled/resolve",
                {"source": source, "id": command_id, "outcome": "failed", "note": "x"},
                who=VIEWER,
            )
            assert viewer.status_code == 403
            no_note = await api.post(
                "unsettled/resolve", {"source": source, "id": command_id, "outcome": "failed"}
            )
            assert no_note.status_code == 422, no_note.text

            note = "eVOUCHER support desk (ticket 4411): the redeem never reached them"
            resolved = await api.ok(
                "POST",
                "unsettled/resolve",
                body={"source": source, "id": command_id, "outcome": "failed", "note": note},
            )
            new_id = result_id(source, command_id, 2)
            assert resolved == {"resolved": True, "result_id": new_id, "outcome": "failed"}
            [superseding] = await _results_with_id(results, new_id, 1)
            assert superseding.key == till.encode()
            data = superseding.data
            assert data["outcome"] == "failed" and data["reason"] == "operator_resolved", data
            assert data["supersedes"] == result_id(source, command_id, 1)
            assert note in data["message"] and OPERATOR[0] in data["message"]
            assert data["command_id"] == command_id and data["command_type"] == "pos.redeem"
            assert superseding.event["type"] == "pos.redeem.result"
            listed = (await api.ok("GET", "unsettled"))["items"]
            assert [i["id"] for i in listed] == [by_cli[1]]
            again = await api.post(
                "unsettled/resolve",
                {"source": source, "id": command_id, "outcome": "succeeded", "note": "twice"},
            )
            assert again.status_code == 409, again.text
            looked = await api.ok("GET", "commands", source=source, id=command_id)
            assert looked["revision"] == 2 and looked["result_id"] == new_id
            assert looked["outcome"] == "failed" and looked["reason"] == "operator_resolved"
            assert not looked["left_to_operator"] and not looked["settling"]

            wrong = await api.post(
                "unsettled/resolve",
                {"source": by_cli[0], "id": by_cli[1], "outcome": "rejected", "note": "no"},
            )
            assert wrong.status_code == 422, wrong.text

            # The other by the command line.
            source, command_id, _ = by_cli
            cli_recheck = await _cli(env, "unsettled", "recheck", source, command_id)
            assert cli_recheck.returncode == 1 and "resolve it" in cli_recheck.stderr, (
                cli_recheck.stderr
            )
            note = "confirmed applied by the store manager's receipt"
            done = _lines(
                await _cli(
                    env, "unsettled", "resolve", source, command_id, "succeeded", "--note", note
                )
            )
            new_id = result_id(source, command_id, 2)
            assert done == [{"resolved": True, "result_id": new_id, "outcome": "succeeded"}]
            [superseding] = await _results_with_id(results, new_id, 1)
            data = superseding.data
            assert data["outcome"] == "succeeded" and data["reason"] == "operator_resolved"
            assert data["supersedes"] == result_id(source, command_id, 1)
            assert note in data["message"] and CLI_ACTOR in data["message"]
            assert (await api.ok("GET", "unsettled"))["items"] == []
            assert _lines(await _cli(env, "unsettled", "list")) == []
            await results.settle(1.0)
            assert len(results.for_commands({by_api[1], by_cli[1]})) == 2

        audit = (await api.ok("GET", "audit"))["items"]
        done_by = [(a["actor"], a["action"], a["outcome"], a["target"]) for a in reversed(audit)]
        assert done_by == [
            (OPERATOR[0], "recheck", "refused", f"{by_api[0]}/{by_api[1]}"),
            (VIEWER[0], "resolve", "refused", f"{by_api[0]}/{by_api[1]}"),  # a viewer
            (OPERATOR[0], "resolve", "refused", f"{by_api[0]}/{by_api[1]}"),  # no note
            (OPERATOR[0], "resolve", "done", f"{by_api[0]}/{by_api[1]}"),
            (OPERATOR[0], "resolve", "refused", f"{by_api[0]}/{by_api[1]}"),  # twice
            (OPERATOR[0], "resolve", "refused", f"{by_cli[0]}/{by_cli[1]}"),  # "rejected"
            (CLI_ACTOR, "recheck", "refused", f"{by_cli[0]}/{by_cli[1]}"),
            (CLI_ACTOR, "resolve", "done", f"{by_cli[0]}/{by_cli[1]}"),
        ], done_by
        [by_hand] = [
            a
            for a in audit
            if a["action"] == "resolve" and a["actor"] == OPERATOR[0] and a["outcome"] == "done"
        ]
        assert "ticket 4411" in by_hand["detail"] and "failed" in by_hand["detail"]
        assert (await api.ok("GET", "overview", who=VIEWER))["unsettled"] == {
            "settling": 0,
            "left_to_operator": 0,
        }
        # No console page is served without a login.
        async with httpx.AsyncClient(timeout=10) as client:
            page = await client.get(f"http://127.0.0.1:{port}/console/")
            assert page.status_code == 401
    finally:
        await api.aclose()
        assert service.stop() == 0


async def test_without_console_users_there_is_no_console(stack: Any, tmp_path: Path) -> None:
    s: Stack = await stack(partitions=1)
    port = free_port()
    service = start_service(service_env(s), tmp_path / "service.log", http_port=port)
    try:
        await _until_ready(port, service)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for path in ("/console/", "/console/api/overview", "/console/static/console.css"):
                assert (await client.get(path, auth=OPERATOR)).status_code == 404, path
            replay = await client.post(
                "/console/api/dead-letters/replay",
                json={"topic": s.dlq, "partition": 0, "offset": 0},
                headers={"X-Console-Action": "1"},
                auth=OPERATOR,
            )
            assert replay.status_code == 404
            assert (await client.get("/health/live")).status_code == 200
    finally:
        assert service.stop() == 0
