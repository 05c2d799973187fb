"""The console command's operator listing, on a store made here."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from voucher_bridge.cli import main
from voucher_bridge.store.base import CommandKey, NewCommand
from voucher_bridge.store.sqlite import SqliteStore


def test_unsettled_lists_what_an_operator_must_decide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "store.sqlite3"

    async def leave_one_to_an_operator() -> None:
        store = SqliteStore(path)
        await store.open()
        key = CommandKey("/stores/x/pos/till-1", "cmd-1")
        envelope = json.dumps({"type": "pos.redeem", "subject": "till-1", "id": "cmd-1"})
        await store.heartbeat("i")
        claim = await store.claim(
            NewCommand(key, "h", "pos.redeem", "till-1", envelope, b"till-1"), "i", 1.0, 15
        )
        assert claim.token is not None
        await store.mark_sent(key, claim.token, 2.0)
        await store.complete(key, claim.token, '{"outcome": "indeterminate"}', True, 3.0)
        unsettled = '{"outcome": "indeterminate", "reason": "unsettled"}'
        assert await store.settle(key, 0, unsettled, False, 4.0, needs_operator=True)
        await store.close()

    asyncio.run(leave_one_to_an_operator())
    monkeypatch.setenv("IDEMPOTENCY_STORE_URL", f"sqlite:///{path}")
    assert main(["unsettled"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    listed = json.loads(line)
    assert listed["id"] == "cmd-1" and listed["type"] == "pos.redeem"
    assert listed["sent_at"] == "1970-01-01T00:00:02Z" and listed["revision"] == 1
    assert listed["result"]["reason"] == "unsettled" and listed["left_to_operator"]
