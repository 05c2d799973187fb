"""Who may use the console (HTTP Basic, CONSOLE_USERS), what it never shows, and the access
rules in front of every page and action (console/web.py), without a broker: a stand-in
console answers."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from pydantic import SecretStr

from voucher_bridge.console.access import Operator, Users, hash_password, password_matches
from voucher_bridge.console.operations import Console, ConsoleError, Limits
from voucher_bridge.console.redact import MASK, redact, redact_headers, text_or_hex
from voucher_bridge.console.web import console_app
from voucher_bridge.settings import ConsoleUser, InvalidSettings, load_settings
from voucher_bridge.store.base import OperatorAction
from voucher_bridge.store.sqlite import SqliteStore


def basic(name: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{name}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


USERS = {
    "vera": ConsoleUser(password=SecretStr("look-only"), role="viewer"),
    "otto": ConsoleUser(
        password=SecretStr(hash_password("hands-on", iterations=1000)), role="operator"
    ),
}


def test_a_password_hash_matches_only_its_password() -> None:
    stored = hash_password("s3cret", iterations=1000)
    assert stored.startswith("pbkdf2_sha256$1000$") and "s3cret" not in stored
    assert password_matches("s3cret", stored)
    assert not password_matches("s3cret ", stored)
    assert not password_matches("x", "pbkdf2_sha256$1000$salt$not-base64!")
    assert password_matches("plain", "plain") and not password_matches("plain", "Plain")


def test_users_are_checked_by_basic_auth() -> None:
    users = Users(USERS)

    def check(name: str, password: str) -> Operator | None:
        return users.check(basic(name, password)["Authorization"])

    assert check("vera", "look-only") == Operator("vera", "viewer")
    assert check("otto", "hands-on") == Operator("otto", "operator")
    assert check("otto", "hands-on") == Operator("otto", "operator")  # cached
    assert check("otto", "wrong") is None
    assert check("nobody", "look-only") is None
    assert users.check(None) is None and users.check("Bearer x") is None
    assert users.check("Basic !!!") is None
    assert not Users({}).any


def test_console_users_come_from_the_environment_as_a_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "CONSOLE_USERS", json.dumps({"otto": {"password": "hands-on", "role": "operator"}})
    )
    settings = load_settings()
    assert settings.console_users["otto"].role == "operator"
    assert "hands-on" not in repr(settings)
    monkeypatch.setenv(
        "CONSOLE_USERS", json.dumps({"otto": {"password": "pa55-w0rd", "role": "admin"}})
    )
    with pytest.raises(InvalidSettings) as refused:
        load_settings()
    assert "CONSOLE_USERS" in str(refused.value) and "pa55-w0rd" not in str(refused.value)


def test_secrets_are_masked_wherever_they_sit() -> None:
    command = {
        "type": "coupon.create",
        "data": {"mail_token": "m-123", "checksum": "c", "amount": "5.00", "pins": ["1234"]},
        "nested": [{"X-Token": "t", "password": "p", "pin": "9"}],
    }
    shown = redact(command)
    assert shown["data"] == {"mail_token": MASK, "checksum": MASK, "amount": "5.00", "pins": MASK}
    assert shown["nested"] == [{"X-Token": MASK, "password": MASK, "pin": MASK}]
    assert redact(command, show_pins=True)["data"]["pins"] == ["1234"]
    assert redact_headers([("authorization", b"Basic x"), ("ce_id", b"c-1")]) == [
        ("authorization", MASK),
        ("ce_id", "c-1"),
    ]
    assert text_or_hex(b"\xff\x00") == ("ff 00", "hex")
    assert text_or_hex(b"not json") == ("not json", "text")
    text, shown_as = text_or_hex(b'{"api_key": "k", "a": 1}')
    assert shown_as == "json" and "k" not in text.replace("api_key", "")


class StandIn:
    """Answers as a console would; says which actions reached it."""

    dead_letter_topics = ["pos.commands.dlq"]

    def __init__(self) -> None:
        self.acted: list[tuple[str, str]] = []
        self.refusals: list[tuple[str, str, str, str]] = []

    async def overview(self) -> dict[str, Any]:
        return {"instance": "i-1", "unsettled": {"settling": 0, "left_to_operator": 0}}

    async def replay(
        self, who: Operator, topic: str, partition: int, offset: int, dry_run: bool
    ) -> dict[str, Any]:
        self.acted.append((who.name, "replay"))
        if offset == 404:
            raise ConsoleError(404, "no record")
        return {"dry_run": dry_run, "summary": "a new command", "replay_count": 1}

    async def refused(self, who: Operator, action: str, target: str, why: str) -> None:
        self.refusals.append((who.name, action, target, why))


async def _run_here(work: Awaitable[Any], timeout_s: float) -> Any:
    return await work


@pytest.fixture
def stand_in() -> StandIn:
    return StandIn()


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://console")


@pytest.fixture
def client(stand_in: StandIn) -> httpx.AsyncClient:
    return _client(console_app(cast(Console, stand_in), Users(USERS), _run_here))


REPLAY = {"topic": "pos.commands.dlq", "partition": 0, "offset": 3, "dry_run": True}
ACT = {"X-Console-Action": "1"}


async def test_without_users_the_console_is_not_there() -> None:
    closed = _client(console_app(None, Users({}), _run_here))
    assert (await closed.get("/")).status_code == 404
    login = basic("otto", "hands-on")
    assert (await closed.get("/api/overview", headers=login)).status_code == 404


async def test_a_login_is_needed(client: httpx.AsyncClient) -> None:
    answer = await client.get("/api/overview")
    assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Basic")
    assert answer.headers["x-frame-options"] == "DENY"  # refusals too
    wrong = await client.get("/api/overview", headers=basic("vera", "nope"))
    assert wrong.status_code == 401
    seen = await client.get("/api/overview", headers=basic("vera", "look-only"))
    assert seen.status_code == 200 and seen.json()["instance"] == "i-1"
    assert seen.headers["x-frame-options"] == "DENY" and seen.headers["cache-control"] == "no-store"


async def test_viewers_read_and_only_operators_act_with_the_action_header(
    client: httpx.AsyncClient, stand_in: StandIn
) -> None:
    url = "/api/dead-letters/replay"
    viewer, operator = basic("vera", "look-only"), basic("otto", "hands-on")
    assert (await client.post(url, json=REPLAY, headers={**viewer, **ACT})).status_code == 403
    refused = await client.post(url, json=REPLAY, headers=operator)
    assert refused.status_code == 403 and "X-Console-Action" in refused.json()["error"]
    assert stand_in.acted == []  # neither reached the console
    # The viewer's attempt is audited, with what it tried on what; the one without the header
    # (a cross-site form's, perhaps) is not the user's doing.
    assert stand_in.refusals == [
        ("vera", "replay_dry_run", "pos.commands.dlq/0/3", "vera is a viewer: only operators act")
    ]
    resolve = {"source": "/stores/1", "id": "c-1", "outcome": "failed", "note": "n"}
    answer = await client.post("/api/unsettled/resolve", json=resolve, headers={**viewer, **ACT})
    assert answer.status_code == 403 and stand_in.acted == []
    assert stand_in.refusals[-1][1:3] == ("resolve", "/stores/1/c-1")
    stand_in.refusals.clear()
    done = await client.post(url, json=REPLAY, headers={**operator, **ACT})
    assert done.status_code == 200 and done.json()["summary"] == "a new command"
    missing = await client.post(url, json={**REPLAY, "offset": 404}, headers={**operator, **ACT})
    assert missing.status_code == 404 and missing.json() == {"error": "no record"}
    not_json = await client.post(url, content=b"[]", headers={**operator, **ACT})
    assert not_json.status_code == 422
    assert stand_in.acted == [("otto", "replay"), ("otto", "replay")]


async def test_pages_render_for_a_viewer(client: httpx.AsyncClient) -> None:
    page = await client.get("/", headers=basic("vera", "look-only"))
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "vera" in page.text and "Overview" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    css = await client.get("/static/console.css", headers=basic("vera", "look-only"))
    assert css.status_code == 200


def _console_on(store: SqliteStore, now: float) -> Console:
    """A console on a real store, with nothing else behind it (what these tests do not reach)."""
    nothing: Any = None
    return Console(
        store=store,
        once=nothing,
        lanes=[],
        producer=nothing,
        reader=nothing,
        publish=nothing,
        limits=Limits(replays_per_minute=2),
        clock=lambda: now,
    )


async def test_replays_are_capped_per_minute_across_instances_by_the_audit(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "store.sqlite3")
    await store.open()
    now = 1_800_000_000.0
    console = _console_on(store, now)
    try:
        # Another instance's (or the command line's) replays count: they are in the store.
        for at, outcome in ((now - 70, "done"), (now - 30, "done"), (now - 5, "refused")):
            await store.record_action(
                OperatorAction(at, "cli:root", "operator", "replay", "t/0/1", outcome)
            )
        await console._may_replay_now()  # one in the last minute, and one refused: room for one
        await store.record_action(
            OperatorAction(now - 1, "otto", "operator", "replay", "t/0/2", "done")
        )
        with pytest.raises(ConsoleError) as capped:
            await console._may_replay_now()
        assert capped.value.status == 429 and "CONSOLE_REPLAYS_PER_MINUTE" in capped.value.message
    finally:
        await store.close()


async def test_a_viewer_reaching_an_action_is_refused_and_audited(tmp_path: Path) -> None:
    """The second check, behind the door's (the command line and any new caller reach the
    actions without it): refused before anything is looked up, and in the audit."""
    store = SqliteStore(tmp_path / "store.sqlite3")
    await store.open()
    console = _console_on(store, 1_800_000_000.0)
    vera = Operator("vera", "viewer")
    try:
        attempts = (
            console.replay(vera, "pos.commands.dlq", 0, 7, dry_run=False),
            console.recheck(vera, "/stores/1", "c-1"),
            console.resolve(vera, "/stores/1", "c-2", "failed", "seen on the statement"),
        )
        for attempt in attempts:
            with pytest.raises(ConsoleError) as refused:
                await attempt
            assert refused.value.status == 403
        audit = [(a.actor, a.action, a.target, a.outcome) for a in await store.actions(10)]
        assert sorted(audit) == [
            ("vera", "recheck", "/stores/1/c-1", "refused"),
            ("vera", "replay", "pos.commands.dlq/0/7", "refused"),
            ("vera", "resolve", "/stores/1/c-2", "refused"),
        ]
    finally:
        await store.close()
