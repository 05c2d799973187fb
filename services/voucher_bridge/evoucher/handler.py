"""Handle one `pos.*` command: validate, call the eVOUCHER API, decide the outcome, and put on
its result what a ledger books from (the till's bill as the service saw it: bill.py).

A redeem whose answer is lost is reconciled by scanning its vouchers (safe to repeat while they
stay locked to the till): all "already redeemed" proves it applied (`succeeded`); all still
priced shows it not applied, but that is `failed` only once the redeem can no longer be under
way at the shop (`apply_grace_s` after it went out), and `indeterminate` until then.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol

from voucher_bridge.evoucher.bill import Bill, book, carried
from voucher_bridge.evoucher.client import UPSTREAM, EvoucherClient, Route
from voucher_bridge.evoucher.decisions import MONEY_MOVING, decide, request_for
from voucher_bridge.once import BeforeSend, SentCall
from voucher_bridge.results import Decision, precheck, result, unanswered
from voucher_bridge.upstream import (
    Answer,
    RetryPolicy,
    UpstreamOpen,
    call_with_retries,
)
from voucher_contracts import CommandEnvelope, Outcome, ResultData, UpstreamReport
from voucher_contracts.pos import POS_COMMAND_TYPES, PosCommandData, Redeem, Remove, Scan


class TerminalBills(Protocol):
    """Where each till's bill is kept (store.StoreBills), as bill.py's JSON text."""

    async def load(self, terminal: str) -> str | None: ...
    async def save(self, terminal: str, bill: str) -> None: ...


class _InMemoryBills:
    def __init__(self) -> None:
        self._bills: dict[str, str] = {}

    async def load(self, terminal: str) -> str | None:
        return self._bills.get(terminal)

    async def save(self, terminal: str, bill: str) -> None:
        self._bills[terminal] = bill


log = logging.getLogger(__name__)

# A bill is read and kept within this (the store's own bound is the command's: STORE_TIMEOUT_S).
_BILL_TIMEOUT_S = 5.0

# A command's `source` names its shop so: /stores/<store>/pos (design.md's examples).
_STORE_IN_SOURCE = re.compile(r"^/stores/([^/]+)(?:/|$)")


class PosCommandHandler:
    def __init__(
        self,
        client: EvoucherClient,
        retry: RetryPolicy | None = None,
        *,
        apply_grace_s: float = 120.0,
        settle_window_s: float = 240.0,
        bills: TerminalBills | None = None,
        terminal_stores: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._retry = retry or RetryPolicy()
        self._apply_grace_s = apply_grace_s
        self._settle_window_s = settle_window_s
        self._bills = bills or _InMemoryBills()
        self._terminal_stores = dict(terminal_stores or {})
        self._clock = clock

    money_moving = MONEY_MOVING

    def settle_window(self, command_type: str) -> float:
        # A scan tells only while the vouchers stay locked to the till: 5 minutes upstream.
        return self._settle_window_s

    async def handle(
        self,
        command: CommandEnvelope,
        record_key: str | None,
        before_send: BeforeSend | None = None,
    ) -> ResultData:
        """Validate and apply the command; `before_send` runs once, just before a call that
        moves money first goes out (the store's recovery point)."""
        started = time.monotonic()
        data, answered = precheck(
            command,
            record_key,
            POS_COMMAND_TYPES[command.type],
            self._client.knows,
            "unknown_terminal",
        )
        if answered is not None:
            return self._labelled(command, answered)
        terminal = command.subject
        route, body = request_for(terminal, data)
        if command.type in MONEY_MOVING:
            try:
                # Refused here, before the recovery point, a redeem leaves nothing to
                # reconcile after a crash. The send path asks the breaker again (it may open
                # in between): refused there, nothing was sent either, and it is `failed` too.
                await self._client.ready()
            except UpstreamOpen as refused:
                decision = Decision(
                    Outcome.FAILED, "upstream_unavailable", f"{refused}: nothing was sent"
                )
                return await self._booked(
                    command, result(command, decision, _report(0, None, started))
                )
            if before_send is not None:
                await before_send(None)  # the scans after are the evidence; nothing to keep
        sent_at = self._clock()
        tried = await call_with_retries(
            lambda: self._client.call(terminal, route, body),
            lambda answer: answer.status,
            moves_money=command.type in MONEY_MOVING,
            retry=self._retry,
            upstream=UPSTREAM,
            ready=self._client.ready,
        )
        answer, may_have_reached = tried.outcome, tried.may_have_reached
        report = _report(tried.attempts, answer, started)
        decision = _decision(command.type, data, answer, may_have_reached, tried.refusal)
        if decision.outcome is Outcome.INDETERMINATE and isinstance(data, Redeem):
            decision = await self._reconcile_redeem(terminal, data, decision, sent_at)
            report = report.model_copy(
                update={"elapsed_ms": int((time.monotonic() - started) * 1000)}
            )
        return await self._booked(command, result(command, decision, report))

    async def recover(
        self, command: CommandEnvelope, record_key: str | None, sent: SentCall
    ) -> ResultData:
        """A previous instance died after a money-moving call may have gone out: never send it
        again; find out what happened instead."""
        data = POS_COMMAND_TYPES[command.type].model_validate(command.data or {})
        if not isinstance(data, Redeem):
            return await self.handle(command, record_key)  # safe to send again
        unknown = Decision(
            Outcome.INDETERMINATE,
            "upstream_unavailable",
            "the service stopped while the redeem was under way",
        )
        started = time.monotonic()
        decision = await self._reconcile_redeem(command.subject, data, unknown, sent.at)
        report = UpstreamReport(elapsed_ms=int((time.monotonic() - started) * 1000))
        return await self._booked(command, result(command, decision, report))

    async def settle(
        self, command: CommandEnvelope, previous: ResultData, sent: SentCall
    ) -> ResultData | None:
        """Try again to settle an indeterminate redeem; None while it still cannot be told.

        A scan that finds a voucher unredeemed locks it to the till's bill of now. While the
        redeem may still be under way, that is harmless only if the till is still at the
        redeem's bill (nothing of it ran since): then the scans are read as they are. Once the
        till has moved on, it waits out the grace, and then scans, concludes and removes each
        voucher it found unredeemed again, so the till's newer bill is left as it was."""
        data = POS_COMMAND_TYPES[command.type].model_validate(command.data or {})
        if not isinstance(data, Redeem):
            return None
        in_grace = sent.at is None or self._clock() - sent.at < self._apply_grace_s
        if in_grace and sent.followed:
            return None
        unknown = Decision(Outcome.INDETERMINATE, previous.reason, previous.message)
        decision = await self._reconcile_redeem(
            command.subject,
            data,
            unknown,
            sent.at,
            release=not in_grace,
            redeemed_proves=not _codes_used_later(list(data.voucher_codes), sent.later),
        )
        if decision.outcome is Outcome.INDETERMINATE:
            return None
        settled = self._labelled(command, result(command, decision, previous.upstream))
        fields = carried(previous)  # the bill as the redeem found it, not as it is now
        if decision.outcome is Outcome.SUCCEEDED:
            await self._end_bill(command, fields)
        return settled.model_copy(update=fields)

    # -- what a ledger books from (bill.py) ---------------------------------------------------

    def _labelled(self, command: CommandEnvelope, data: ResultData) -> ResultData:
        """Every result names its till, and its shop where the source or a setting does."""
        labels: dict[str, Any] = {"terminal": command.subject}
        found = _STORE_IN_SOURCE.match(command.source)
        store = self._terminal_stores.get(command.subject) or (found.group(1) if found else None)
        if store is not None:
            labels["store"] = store
        return data.model_copy(update=labels)

    async def _booked(self, command: CommandEnvelope, data: ResultData) -> ResultData:
        """The result with its booking fields; the till's bill moved on by it (idempotent: a
        command run again after a crash leaves the bill, and gets the fields, as before)."""
        terminal = command.subject
        try:
            async with asyncio.timeout(_BILL_TIMEOUT_S):
                kept = await self._bills.load(terminal)
        except Exception as exc:
            # The answer stands whatever happens to the bookkeeping: a redeem that succeeded is
            # `succeeded`. Its amounts are then unknown (null, with the reason), not guessed.
            log.warning("%s: the bill could not be read (%s)", terminal, type(exc).__name__)
            kept = None
        bill, fields = book(Bill.loads(kept), command, data)
        try:
            async with asyncio.timeout(_BILL_TIMEOUT_S):
                await self._bills.save(terminal, bill.dumps())
        except Exception as exc:
            log.warning("%s: the bill could not be kept (%s)", terminal, type(exc).__name__)
        return self._labelled(command, data).model_copy(update=fields)

    async def _end_bill(self, command: CommandEnvelope, fields: dict[str, Any]) -> None:
        """A redeem settled `succeeded` later ends its bill, if the till is still at it."""
        try:
            async with asyncio.timeout(_BILL_TIMEOUT_S):
                bill = Bill.loads(await self._bills.load(command.subject))
                still_at_it = bill.bill_id is not None and bill.bill_id == fields.get("bill_id")
                if bill.ended_by is None and still_at_it:
                    ended = replace(bill, ended_by=command.id, ended_with=fields)
                    await self._bills.save(command.subject, ended.dumps())
        except Exception as exc:
            log.warning("%s: the bill could not be ended (%s)", command.subject, type(exc).__name__)

    async def _removed(self, terminal: str, code: str) -> bool:
        """Remove a voucher from the till's bill (safe to repeat): whether the shop said so."""
        removed = await call_with_retries(
            functools.partial(self._client.call, terminal, Route.REMOVE, {"voucher_code": code}),
            lambda answer: answer.status,
            moves_money=False,
            retry=self._retry,
            upstream=UPSTREAM,
            ready=self._client.ready,
        )
        answer = removed.outcome
        return (
            answer is not None
            and decide("pos.remove", Remove(voucher_code=code), answer).outcome is Outcome.SUCCEEDED
        )

    async def _reconcile_redeem(
        self,
        terminal: str,
        data: Redeem,
        unknown: Decision,
        sent_at: float | None,
        *,
        release: bool = False,
        redeemed_proves: bool = True,
    ) -> Decision:
        """Ask the upstream about each code with a scan (a read that is safe to repeat while
        the codes are locked to this terminal): "already redeemed" means our redeem went
        through (unless `redeemed_proves` is False: a later command of the till used these
        vouchers, so a redeem of its own may have); a price means the voucher is still held,
        unredeemed. With `release`, each voucher found unredeemed is removed again (the scan
        locked it to the till's bill of now); one that cannot be leaves it undecided."""
        states: dict[str, str] = {}
        for code in data.voucher_codes:
            # A scan is safe to repeat, so a dropped connection (a server closing a kept-alive
            # one, say) or a 5xx is retried rather than left indeterminate.
            scanned = await call_with_retries(
                functools.partial(self._client.call, terminal, Route.SCAN, {"voucher_code": code}),
                lambda answer: answer.status,
                moves_money=False,
                retry=self._retry,
                upstream=UPSTREAM,
                ready=self._client.ready,
            )
            answer = scanned.outcome
            if answer is None:
                return unknown
            verdict = decide("pos.scan", Scan(voucher_code=code), answer)
            if verdict.outcome is Outcome.SUCCEEDED:
                states[code] = "not_redeemed"
                if release and not await self._removed(terminal, code):
                    return unknown  # scanned and removed again at the next look
            elif verdict.reason == "voucher_already_redeemed":
                states[code] = "redeemed"
            else:
                return unknown
        if all(state == "redeemed" for state in states.values()) and not redeemed_proves:
            return Decision(
                Outcome.INDETERMINATE,
                unknown.reason,
                "every voucher is redeemed, but a later command of the till used them too",
                {"voucher_states": states},
            )
        if all(state == "redeemed" for state in states.values()):
            return Decision(
                Outcome.SUCCEEDED,
                None,
                "reconciled: every voucher is redeemed",
                {"voucher_codes": list(data.voucher_codes), "reconciled": True},
            )
        not_yet = all(state == "not_redeemed" for state in states.values())
        if not_yet and sent_at is not None and self._clock() - sent_at >= self._apply_grace_s:
            return Decision(
                Outcome.FAILED,
                "upstream_unavailable",
                f"reconciled: no voucher was redeemed {self._apply_grace_s:g} s after the "
                "redeem; it may be sent again",
                {"voucher_codes": list(data.voucher_codes), "reconciled": True},
            )
        if not_yet:
            return Decision(
                Outcome.INDETERMINATE,
                unknown.reason,
                "no voucher redeemed so far; the redeem may still be under way at the shop",
                {"voucher_states": states},
            )
        return Decision(
            Outcome.INDETERMINATE, unknown.reason, unknown.message, {"voucher_states": states}
        )


def _codes_used_later(codes: list[str], later: tuple[CommandEnvelope, ...] | None) -> bool:
    """Whether a later command of the till named any of these vouchers (None: not known)."""
    if later is None:
        return True
    wanted = set(codes)
    for command in later:
        data = command.data if isinstance(command.data, dict) else {}
        named = data.get("voucher_codes"), data.get("voucher_code")
        for value in named:
            if isinstance(value, list) and wanted.intersection(
                v for v in value if isinstance(v, str)
            ):
                return True
            if isinstance(value, str) and value in wanted:
                return True
    return False


def _decision(
    command_type: str,
    data: PosCommandData,
    answer: Answer | None,
    may_have_reached: bool,
    refusal: str | None = None,
) -> Decision:
    if answer is None or (answer.status >= 500 and command_type not in MONEY_MOVING):
        decision = unanswered(
            moves_money=command_type in MONEY_MOVING, may_have_reached=may_have_reached
        )
        if refusal is not None and decision.outcome is Outcome.FAILED:
            # Ended by an open circuit: say so (and whether anything went out at all).
            decision = replace(decision, message=refusal)
        return decision
    return decide(command_type, data, answer)


def _report(attempts: int, answer: Answer | None, started: float) -> UpstreamReport:
    return UpstreamReport(
        attempts=attempts,
        last_status=answer.status if answer else None,
        elapsed_ms=int((time.monotonic() - started) * 1000),
    )
