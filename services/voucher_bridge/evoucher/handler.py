"""Handle one `pos.*` command: validate, call the eVOUCHER API, decide the outcome."""

from __future__ import annotations

import contextlib
import functools
import time

from voucher_bridge.evoucher.client import EvoucherClient, Route
from voucher_bridge.evoucher.decisions import MONEY_MOVING, decide, request_for
from voucher_bridge.once import BeforeSend
from voucher_bridge.results import Decision, precheck, result, unanswered
from voucher_bridge.upstream import (
    Answer,
    CallNotSent,
    CallOutcomeUnknown,
    RetryPolicy,
    call_with_retries,
)
from voucher_contracts import CommandEnvelope, Outcome, ResultData, UpstreamReport
from voucher_contracts.pos import POS_COMMAND_TYPES, PosCommandData, Redeem, Scan


class PosCommandHandler:
    def __init__(self, client: EvoucherClient, retry: RetryPolicy | None = None) -> None:
        self._client = client
        self._retry = retry or RetryPolicy()

    money_moving = MONEY_MOVING

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
            return answered
        terminal = command.subject
        route, body = request_for(terminal, data)
        if before_send is not None and command.type in MONEY_MOVING:
            await before_send()
        tried = await call_with_retries(
            lambda: self._client.call(terminal, route, body),
            lambda answer: answer.status,
            moves_money=command.type in MONEY_MOVING,
            retry=self._retry,
        )
        answer, may_have_reached = tried.outcome, tried.may_have_reached
        report = UpstreamReport(
            attempts=tried.attempts,
            last_status=answer.status if answer else None,
            elapsed_ms=int((time.monotonic() - started) * 1000),
        )
        decision = _decision(command.type, data, answer, may_have_reached)
        if decision.outcome is Outcome.INDETERMINATE and isinstance(data, Redeem):
            decision = await self._reconcile_redeem(terminal, data, decision)
            report = report.model_copy(
                update={"elapsed_ms": int((time.monotonic() - started) * 1000)}
            )
        return result(command, decision, report)

    async def recover(self, command: CommandEnvelope, record_key: str | None) -> ResultData:
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
        decision = await self._reconcile_redeem(command.subject, data, unknown)
        report = UpstreamReport(elapsed_ms=int((time.monotonic() - started) * 1000))
        return result(command, decision, report)

    async def settle(self, command: CommandEnvelope, previous: ResultData) -> ResultData | None:
        """Try again to settle an indeterminate redeem; None while it still cannot be told."""
        data = POS_COMMAND_TYPES[command.type].model_validate(command.data or {})
        if not isinstance(data, Redeem):
            return None
        unknown = Decision(Outcome.INDETERMINATE, previous.reason, previous.message)
        # Later, the till has moved on to other bills: a scan that finds a voucher unredeemed
        # has just locked it to the till's current bill, so release it again.
        decision = await self._reconcile_redeem(command.subject, data, unknown, release=True)
        if decision.outcome is Outcome.INDETERMINATE:
            return None
        return result(command, decision, previous.upstream)

    async def _reconcile_redeem(
        self, terminal: str, data: Redeem, unknown: Decision, *, release: bool = False
    ) -> Decision:
        """Ask the upstream about each code with a scan (a read that is safe to repeat while
        the codes are locked to this terminal): "already redeemed" means our redeem went
        through; a price means the voucher is still held, unredeemed."""
        states: dict[str, str] = {}
        for code in data.voucher_codes:
            # A scan is safe to repeat, so a dropped connection (a server closing a kept-alive
            # one, say) or a 5xx is retried rather than left indeterminate.
            scanned = await call_with_retries(
                functools.partial(self._client.call, terminal, Route.SCAN, {"voucher_code": code}),
                lambda answer: answer.status,
                moves_money=False,
                retry=self._retry,
            )
            answer = scanned.outcome
            if answer is None:
                return unknown
            verdict = decide("pos.scan", Scan(voucher_code=code), answer)
            if verdict.outcome is Outcome.SUCCEEDED:
                states[code] = "not_redeemed"
                if release:
                    with contextlib.suppress(CallNotSent, CallOutcomeUnknown):
                        await self._client.call(terminal, Route.REMOVE, {"voucher_code": code})
            elif verdict.reason == "voucher_already_redeemed":
                states[code] = "redeemed"
            else:
                return unknown
        if all(state == "redeemed" for state in states.values()):
            return Decision(
                Outcome.SUCCEEDED,
                None,
                "reconciled: every voucher is redeemed",
                {"voucher_codes": list(data.voucher_codes), "reconciled": True},
            )
        if all(state == "not_redeemed" for state in states.values()):
            return Decision(
                Outcome.FAILED,
                "upstream_unavailable",
                "reconciled: no voucher was redeemed; the redeem may be sent again",
                {"voucher_codes": list(data.voucher_codes), "reconciled": True},
            )
        return Decision(
            Outcome.INDETERMINATE, unknown.reason, unknown.message, {"voucher_states": states}
        )


def _decision(
    command_type: str, data: PosCommandData, answer: Answer | None, may_have_reached: bool
) -> Decision:
    if answer is None or (answer.status >= 500 and command_type not in MONEY_MOVING):
        return unanswered(
            moves_money=command_type in MONEY_MOVING, may_have_reached=may_have_reached
        )
    return decide(command_type, data, answer)
