"""The operator console in a real browser (issue 14): Debian's Chromium, driven by Playwright,
against a voucher-bridge process on the real broker.

A viewer reads the overview and a dead letter but is offered no action; an operator dry-runs
and replays the dead letter and finds both in the audit; the unsettled and command pages show
what the service holds; the overview fits a phone. Each page visited is saved as a screenshot
under var/screenshots/console/; with CONSOLE_README_SHOT=1, the operator's overview is also
written to docs/console-overview.png (README shows it; a test run leaves tracked files alone).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Page, expect

from tests.conftest import Stack
from tests.support.browser import PHONE, browser_page, chromium_path
from tests.support.workload import http_ready, service_env, until
from voucher_sandboxes.localstack import CommandProducer, ResultReader, free_port, start_service

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(
        chromium_path() is None, reason="no Chromium: apt-get install chromium fonts-dejavu-core"
    ),
]

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "var" / "screenshots" / "console"
README_SHOT = REPO / "docs" / "console-overview.png"
VIEWER, OPERATOR = ("vera", "viewer pass 1"), ("otto", "operator pass 2")
USERS = {
    VIEWER[0]: {"password": VIEWER[1], "role": "viewer"},
    OPERATOR[0]: {"password": OPERATOR[1], "role": "operator"},
}


async def test_viewer_and_operator_in_a_browser(stack: Any, tmp_path: Path) -> None:
    s: Stack = await stack(partitions=2)
    till = s.terminal()
    codes = s.sandbox.add_vouchers("10.00")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = service_env(s, CONSOLE_USERS=json.dumps(USERS))
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    service = start_service(env, tmp_path / "service.log", http_port=port)
    try:
        await until(lambda: http_ready(port), 30, "the service did not become ready")
        async with (
            CommandProducer(s.bootstrap, s.commands) as producer,
            ResultReader(s.bootstrap, s.results) as results,
            ResultReader(s.bootstrap, s.dlq) as dead_letters,
        ):
            # Outcomes for the chart: succeeded, rejected, and a redeem left indeterminate (the
            # shop answers 504 and the grace is 120 s: it stays unsettled while the test runs).
            answered = [
                await producer.send("pos.bill_total", till, {"bill_total": "20.00"}),
                await producer.send("pos.scan", till, {"voucher_code": codes[0]}),
                await producer.send("pos.scan", till, {"voucher_code": "000000000000"}),
            ]
            await results.wait_for({c.id for c in answered}, 30)
            s.sandbox.faults(timeout_rate=1.0, timeout_sleep_s=0.2, routes=["redeem_voucher_api"])
            redeem = await producer.send("pos.redeem", till, {"voucher_codes": codes})
            await producer.send_raw(till.encode(), b"not json {", [("origin", b"till-test")])
            [first] = (await results.wait_for({redeem.id}, 30))[:1]
            assert first.data["outcome"] == "indeterminate", first.data
            deadline = time.monotonic() + 20
            while not dead_letters.records:
                assert time.monotonic() < deadline, "the record was not dead-lettered"
                await dead_letters.poll()
        outcomes = {r.data["command_id"]: r.data["outcome"] for r in results.records}
        assert {outcomes[c.id] for c in answered} == {"succeeded", "rejected"}, outcomes
        dead = dead_letters.records[0]
        record = f"{s.dlq}/{dead.partition}/{dead.offset}"

        # -- no login, a wrong one: nothing shown ----------------------------------------------
        async with browser_page(base) as page:
            # Debian's Chromium fails the navigation to a Basic challenge it cannot answer.
            with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                await page.goto("/console/")
            assert (await page.request.get("/console/")).status == 401
        async with browser_page(base, VIEWER[0], "not the password") as page:
            response = await page.goto("/console/")
            assert response is not None and response.status == 401
            await expect(page.locator("body")).to_have_text("a console login is needed")

        # -- the viewer: reads, finds the dead letter, is offered no action ---------------------
        async with browser_page(base, *VIEWER) as page:
            errors = _watch(page)
            await _open(page, "/console/")
            await expect(page.get_by_role("heading", name="Overview")).to_be_visible()
            await expect(page.locator("header .who")).to_have_text("vera · viewer")
            partitions = page.locator("table", has=page.get_by_role("columnheader", name="lag"))
            for p in (0, 1):
                await expect(partitions).to_contain_text(f"{s.commands}[{p}]")
            await expect(page.locator("svg.chart rect.o-succeeded").first).to_be_attached()
            await expect(page.locator("svg.chart rect.o-rejected").first).to_be_attached()
            await expect(page.locator(".legend")).to_contain_text("succeeded (")
            await _shot(page, "viewer-overview")

            await page.get_by_role("link", name="Dead letters").click()
            await expect(page.get_by_role("heading", name="Dead letters")).to_be_visible()
            row = page.get_by_role("row").filter(has_text=record)
            await expect(row).to_contain_text("not_json")
            await expect(row).to_contain_text(till)
            await _shot(page, "viewer-dead-letters")
            await row.get_by_role("link", name=record).click()
            await expect(page.get_by_role("heading", name="Dead letter")).to_contain_text(record)
            await expect(page.locator("pre.value")).to_have_text("not json {")
            await expect(page.locator("table.headers").first).to_contain_text("till-test")
            await expect(page.locator("table.headers").last).to_contain_text("x-dlq-reason")
            assert await page.get_by_role("button", name="Dry run").count() == 0
            assert await page.get_by_role("button", name="Replay").count() == 0
            await _shot(page, "viewer-dead-letter")
            await page.get_by_role("link", name="Unsettled").click()
            await expect(page.locator(f"tr[data-id='{redeem.id}']")).to_contain_text(till)
            assert await page.get_by_role("button", name="Resolve").count() == 0
            assert await page.get_by_role("button", name="Recheck now").count() == 0
            await _shot(page, "viewer-unsettled")
            assert errors == [], errors

        # -- the operator: dry run, replay, audit ----------------------------------------------
        async with browser_page(base, *OPERATOR) as page:
            errors = _watch(page)
            await _open(page, "/console/")
            await expect(page.locator("header .who")).to_have_text("otto · operator")
            await expect(page.locator(".card").filter(has_text="settling")).to_contain_text("1")
            await _shot(page, "operator-overview")
            if os.environ.get("CONSOLE_README_SHOT") == "1":
                shutil.copyfile(SHOTS / "operator-overview.png", README_SHOT)

            await page.get_by_role("link", name="Dead letters").click()
            await page.get_by_role("row").filter(has_text=record).get_by_role("link").click()
            replay = page.get_by_role("button", name="Replay", exact=True)
            await expect(replay).to_be_disabled()  # a dry run first
            await page.get_by_role("button", name="Dry run").click()
            outcome = page.locator("#replay-outcome")
            await expect(outcome).to_contain_text("Dry run: dead letter again: not_json")
            await _shot(page, "operator-dry-run")
            dialogs: list[str] = []

            async def accept(dialog: Any) -> None:
                dialogs.append(dialog.message)
                await dialog.accept()

            page.on("dialog", accept)
            await expect(replay).to_be_enabled()
            await replay.click()
            await expect(outcome).to_contain_text(f"Replayed to {s.commands} (replay 1)")
            assert dialogs and "Replay" in dialogs[0], dialogs
            await _shot(page, "operator-replayed")
            missing = f"/console/dead-letters/{s.dlq}/{dead.partition}/999"
            response = await page.goto(missing)
            assert response is not None and response.status == 404
            await expect(page.get_by_role("alert")).to_contain_text("no record at")
            await expect(page.get_by_role("link", name="Audit")).to_be_visible()
            await _shot(page, "operator-missing-dead-letter")
            errors[:] = [e for e in errors if missing not in e]  # that 404 was asked for

            await page.get_by_role("link", name="Audit").click()
            await expect(page.get_by_role("heading", name="Audit")).to_be_visible()
            done = page.get_by_role("row").filter(has_text=record).filter(has_text="otto")
            await expect(
                done.filter(has=page.locator("td", has_text="replay_dry_run"))
            ).to_have_count(1)
            await expect(done.filter(has=page.locator("td:text-is('replay')"))).to_contain_text(
                f"to {s.commands} (replay 1)"
            )
            await _shot(page, "operator-audit")

            # -- unsettled and commands ----------------------------------------------------------
            await page.get_by_role("link", name="Unsettled").click()
            await expect(page.get_by_role("heading", name="Unsettled results")).to_be_visible()
            unsettled = page.locator(f"tr[data-id='{redeem.id}']")
            await expect(unsettled).to_contain_text(till)
            await expect(unsettled.get_by_role("button", name="Resolve")).to_be_visible()
            await _shot(page, "operator-unsettled")

            bill = answered[0]
            await page.get_by_role("link", name="Commands").click()
            await page.get_by_label("source").fill(bill.source)
            await page.get_by_label("id", exact=True).fill(bill.id)
            await page.get_by_role("button", name="Look up").click()
            command = page.locator("article.command")
            await expect(command).to_have_count(1)
            await expect(command.get_by_role("heading")).to_contain_text(bill.id)
            stored = command.locator("details", has_text="stored result").locator("pre")
            await expect(stored).to_contain_text(f'"command_id": "{bill.id}"')
            await expect(stored).to_contain_text('"outcome": "succeeded"')
            await _shot(page, "operator-command")
            await _open(page, f"/console/commands?subject={till}")
            await expect(page.locator("article.command")).to_have_count(4)
            await _shot(page, "operator-commands-of-till")
            assert errors == [], errors

        # -- a phone ---------------------------------------------------------------------------
        async with browser_page(base, *OPERATOR, phone=True) as page:
            errors = _watch(page)
            for path, name in [
                ("/console/", "phone-overview"),
                ("/console/dead-letters", "phone-dead-letters"),
                (f"/console/dead-letters/{record}", "phone-dead-letter"),
                ("/console/unsettled", "phone-unsettled"),
                (f"/console/commands?source={bill.source}&id={bill.id}", "phone-command"),
                ("/console/audit", "phone-audit"),
            ]:
                await _open(page, path)
                await _shot(page, name)
                # A phone's page may zoom out to what overflows (innerWidth grows with it):
                # the content must fit the screen's 390 CSS pixels as well.
                wide, inner = await page.evaluate(
                    "[document.scrollingElement.scrollWidth, window.innerWidth]"
                )
                assert wide <= min(inner, PHONE["width"]) + 1, f"{path} is {wide} px wide"
            assert errors == [], errors
    finally:
        assert service.stop() == 0
    overview = SHOTS / "operator-overview.png"
    size = overview.stat().st_size
    assert size < 300_000, f"{overview} is {size} bytes"
    with Image.open(overview) as image:
        assert image.size[0] == 1280


async def _open(page: Page, path: str) -> None:
    response = await page.goto(path)
    assert response is not None and response.status == 200, (path, response)


async def _shot(page: Page, name: str) -> None:
    await page.screenshot(path=SHOTS / f"{name}.png", full_page=True)


def _watch(page: Page) -> list[str]:
    """Script errors and console errors (a CSP refusal is one) of the page, as they come."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda m: (
            errors.append(f"{m.text} ({m.location.get('url')})") if m.type == "error" else None
        ),
    )
    page.on(
        "response",
        lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None,
    )
    return errors
