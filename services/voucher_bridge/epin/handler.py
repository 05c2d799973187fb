"""Handle one `coupon.*` command: validate, call the Epin API as the account, decide.

Transfer, share, create and delete move value and are not idempotent upstream: each is sent
at most once after it may have reached the API. When its answer is lost, the handler finds out
what happened where the API lets it tell: the active list (is the coupon still ours?), the
refund status (was it deleted?), the coupon's balance before and after (was the share taken
off?), the history (was the share or the creation recorded?); else it stays `indeterminate`.
`coupon.create` carries a single-use `form_key`: a create that may have arrived is never sent
again, so the key is never burnt by a retry of ours.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from voucher_bridge.epin.client import EpinClient, Unauthorized
from voucher_bridge.epin.decisions import MONEY_MOVING, PAGINATED, decide, request_for
from voucher_bridge.once import BeforeSend
from voucher_bridge.results import Decision, precheck, result, unanswered
from voucher_bridge.upstream import (
    Answer,
    CallNotSent,
    CallOutcomeUnknown,
    RetryPolicy,
    call_with_retries,
    money,
)
from voucher_contracts import CommandEnvelope, Outcome, ResultData, UpstreamReport
from voucher_contracts.coupon import (
    COUPON_COMMAND_TYPES,
    CouponCommandData,
    Create,
    Delete,
    RefundStatus,
    Share,
    Transfer,
)


class CouponCommandHandler:
    money_moving = MONEY_MOVING

    def __init__(self, client: EpinClient, retry: RetryPolicy | None = None) -> None:
        self._client = client
        self._retry = retry or RetryPolicy()

    async def handle(
        self,
        command: CommandEnvelope,
        record_key: str | None,
        before_send: BeforeSend | None = None,
    ) -> ResultData:
        started = time.monotonic()
        since = time.time()
        data, answered = precheck(
            command,
            record_key,
            COUPON_COMMAND_TYPES[command.type],
            self._client.knows,
            "unknown_account",
        )
        if answered is not None:
            return answered
        account = command.subject
        moves_money = command.type in MONEY_MOVING
        request = request_for(data)

        async def send() -> tuple[Answer, list[dict[str, Any]] | None]:
            if command.type in PAGINATED:
                return await self._client.call_all_pages(account, request.path, request.params)
            answer = await self._client.call(
                account, request.method, request.path, params=request.params, form=request.form
            )
            return answer, None

        try:
            # What the API says now, so that a lost answer can be told apart later.
            before = await self._before(account, data, since) if moves_money else _Before()
            if moves_money and before_send is not None:
                await before_send()
            tried = await call_with_retries(
                send, lambda sent: sent[0].status, moves_money=moves_money, retry=self._retry
            )
        except Unauthorized as exc:
            decision = Decision(Outcome.FAILED, "unauthorized", exc.message)
            return result(command, decision, _report(1, None, started))
        answer, listed = tried.outcome if tried.outcome is not None else (None, None)
        attempts, may_have_reached = tried.attempts, tried.may_have_reached
        decision = self._decision(command.type, data, answer, listed, may_have_reached)
        if decision.outcome is Outcome.INDETERMINATE and moves_money:
            decision = await self._reconcile(account, data, decision, before, since)
        return result(command, decision, _report(attempts, answer, started))

    def _decision(
        self,
        command_type: str,
        data: CouponCommandData,
        answer: Answer | None,
        listed: list[dict[str, Any]] | None,
        may_have_reached: bool,
    ) -> Decision:
        if answer is None or (answer.status >= 500 and command_type not in MONEY_MOVING):
            return unanswered(
                moves_money=command_type in MONEY_MOVING, may_have_reached=may_have_reached
            )
        return decide(command_type, data, answer, listed)

    async def recover(self, command: CommandEnvelope, record_key: str | None) -> ResultData:
        """A previous instance died after a value-moving call may have gone out: never send
        it again; find out what happened instead."""
        data = COUPON_COMMAND_TYPES[command.type].model_validate(command.data or {})
        if command.type not in MONEY_MOVING:
            return await self.handle(command, record_key)  # safe to send again
        unknown = Decision(
            Outcome.INDETERMINATE,
            "upstream_unavailable",
            "the service stopped while the call was under way",
        )
        started = time.monotonic()
        since = command.time.timestamp() if command.time else time.time() - 3600
        decision = await self._reconcile(command.subject, data, unknown, _Before(), since)  # type: ignore[arg-type]
        return result(command, decision, _report(0, None, started))

    async def settle(self, command: CommandEnvelope, previous: ResultData) -> ResultData | None:
        data = COUPON_COMMAND_TYPES[command.type].model_validate(command.data or {})
        unknown = Decision(Outcome.INDETERMINATE, previous.reason, previous.message)
        since = command.time.timestamp() if command.time else time.time() - 3600
        decision = await self._reconcile(command.subject, data, unknown, _Before(), since)  # type: ignore[arg-type]
        if decision.outcome is Outcome.INDETERMINATE:
            return None
        return result(command, decision, previous.upstream)

    # -- finding out what happened --------------------------------------------------------------

    async def _before(self, account: str, data: CouponCommandData, since: float) -> _Before:
        try:
            match data:
                case Share(epin=epin):
                    return _Before(balance=await self._balance_or_none(account, epin))
                case Transfer(epin=epin):
                    coupons = await self._active(account)
                    held = None if coupons is None else any(_is(c, epin) for c in coupons)
                    return _Before(held=held)
                case Create(wallet_type=wallet, epin_amount=amount):
                    created = await self._history_count(
                        account, "create", since, wallet=wallet, amount=money(amount)
                    )
                    return _Before(created=created)
        except (CallNotSent, CallOutcomeUnknown):
            pass  # no before-image: a lost answer is then told from the history, or not at all
        return _Before()

    async def _reconcile(
        self,
        account: str,
        data: CouponCommandData,
        unknown: Decision,
        before: _Before,
        since: float,
    ) -> Decision:
        try:
            match data:
                case Transfer(epin=epin, user=user):
                    coupons = await self._active(account)
                    if coupons is None:
                        return unknown
                    if any(_is(c, epin) for c in coupons):
                        return _not_applied("the coupon is still in the account")
                    # Gone from the list: ours if it was there before, or if the history says
                    # it was transferred (a coupon can also leave by a delete or by emptying).
                    if before.held or await self._in_history(account, "transfer", since, epin=epin):
                        return _applied("the coupon left the account", {"epin": epin, "user": user})
                    return unknown
                case Delete(epin=epin):
                    status = await self._refund_status(account, epin)
                    if status == "refunded":
                        return _applied("the coupon is refunded", {"epin": epin})
                    if status == "not_refunded":
                        return _not_applied("the coupon is not refunded")
                    return unknown
                case Share(epin=epin, share_amount=amount):
                    if before.balance is not None:
                        after = await self._balance_or_none(account, epin, gone_is_zero=True)
                        if after == before.balance:
                            return _not_applied("the coupon's balance did not change")
                        if after == before.balance - amount:
                            return _applied(
                                "the share was taken off the coupon's balance",
                                {"epin": epin, "share_amount": amount, "balance": after},
                            )
                    if await self._in_history(account, "share", since, epin=epin, amount=amount):
                        return _applied("the share is in the history", {"epin": epin})
                    return unknown
                case Create(wallet_type=wallet, epin_amount=amount, number_of_pins=pins):
                    # Only with a count from before: an identical creation made earlier must
                    # not be taken for this one.
                    if before.created is None or not pins.isdigit():
                        return unknown
                    now = await self._history_count(
                        account, "create", since, wallet=wallet, amount=money(amount)
                    )
                    if now is not None and now - before.created == int(pins):
                        return _applied("the coupons are in the history", {})
                    return unknown
        except (CallNotSent, CallOutcomeUnknown, Unauthorized):
            return unknown
        return unknown

    async def _active(self, account: str) -> list[dict[str, Any]] | None:
        answer, coupons = await self._client.call_all_pages(account, "user/get/active-epin/")
        return coupons if answer.status == 200 else None

    async def _balance_or_none(
        self, account: str, epin: str, *, gone_is_zero: bool = False
    ) -> Decimal | None:
        try:
            coupons = await self._active(account)
        except (CallNotSent, CallOutcomeUnknown, Unauthorized):
            return None
        if coupons is None:
            return None
        for coupon in coupons:
            if _is(coupon, epin):
                return money(coupon.get("balance"))
        # An emptied coupon leaves the active list.
        return Decimal("0.00") if gone_is_zero else None

    async def _refund_status(self, account: str, epin: str) -> str | None:
        request = request_for(RefundStatus(epin=epin))
        answer = await self._client.call(
            account, request.method, request.path, params=request.params
        )
        data = answer.body.get("data") if answer.status == 200 and answer.body else None
        status = data.get("refund_status") if isinstance(data, dict) else None
        return status if isinstance(status, str) else None

    async def _history(
        self, account: str, params: dict[str, str] | None = None
    ) -> list[dict[str, Any]] | None:
        answer, entries = await self._client.call_all_pages(account, "user/epin/history/", params)
        return entries if answer.status == 200 else None

    async def _in_history(
        self, account: str, action: str, since: float, *, epin: str, amount: Decimal | None = None
    ) -> bool:
        entries = await self._history(account)
        return any(
            e.get("action") == action
            and str(e.get("epin")) == epin
            and (amount is None or money(e.get("amount")) == amount)
            and _after(e.get("date"), since)
            for e in entries or []
        )

    async def _history_count(
        self, account: str, action: str, since: float, *, wallet: str, amount: Decimal | None
    ) -> int | None:
        # Only that wallet's history is read (the API filters by `wallet`); the entries are
        # still checked here, whatever the filter did.
        entries = await self._history(account, {"wallet": wallet})
        if entries is None:
            return None
        return sum(
            1
            for e in entries
            if e.get("action") == action
            and e.get("wallet_type") == wallet
            and money(e.get("amount")) == amount
            and _after(e.get("date"), since)
        )


@dataclass(frozen=True)
class _Before:
    """What the API said just before a value-moving call (None: it could not be read)."""

    balance: Decimal | None = None  # share: the coupon's balance
    held: bool | None = None  # transfer: the coupon was in the account's active list
    created: int | None = None  # create: matching creations already in the history


def _is(coupon: dict[str, Any], epin: str) -> bool:
    return str(coupon.get("id")) == epin


def _applied(message: str, details: dict[str, Any]) -> Decision:
    return Decision(
        Outcome.SUCCEEDED, None, f"reconciled: {message}", {**details, "reconciled": True}
    )


def _not_applied(message: str) -> Decision:
    return Decision(
        Outcome.FAILED,
        "upstream_unavailable",
        f"reconciled: {message}; the command may be sent again",
        {"reconciled": True},
    )


def _after(value: Any, since: float) -> bool:
    # A minute of slack for clocks that differ between us and the upstream.
    if not isinstance(value, str):
        return False
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp() >= since - 60


def _report(attempts: int, answer: Answer | None, started: float) -> UpstreamReport:
    return UpstreamReport(
        attempts=attempts,
        last_status=answer.status if answer else None,
        elapsed_ms=int((time.monotonic() - started) * 1000),
    )
