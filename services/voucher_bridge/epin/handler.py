"""Handle one `coupon.*` command: validate, call the Epin API as the account, decide.

Transfer, share, create and delete move value and are not idempotent upstream: each is sent
at most once after it may have reached the API. Just before one goes out, the handler reads
what the API says (the before-image, kept with the recovery point); when its answer is lost, it
compares what the API says now: the active list (was the coupon ours, is it still?), the refund
status, the share and creation counts in the history and the coupon's balance (an identical
action made earlier is never taken for this one). A read that shows the call applied is
`succeeded`; one that shows it not applied is `failed` only once the call can no longer be under
way at the API (`apply_grace_s` after it went out), and `indeterminate` until then.
`coupon.create` carries a single-use `form_key`: a create that may have arrived is never sent
again, so the key is never burnt by a retry of ours.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from decimal import Decimal
from typing import Any, cast

from voucher_bridge.epin.client import UPSTREAM, EpinClient, Unauthorized
from voucher_bridge.epin.decisions import (
    MONEY_MOVING,
    PAGINATED,
    decide,
    request_for,
    without_pins,
)
from voucher_bridge.once import BeforeSend, SentCall
from voucher_bridge.results import Decision, precheck, result, unanswered
from voucher_bridge.upstream import (
    Answer,
    CallNotSent,
    CallOutcomeUnknown,
    RetryPolicy,
    UpstreamOpen,
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

    def __init__(
        self,
        client: EpinClient,
        retry: RetryPolicy | None = None,
        *,
        apply_grace_s: float = 120.0,
        settle_window_s: float = 3600.0,
        show_pins: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._show_pins = show_pins
        self._retry = retry or RetryPolicy()
        self._apply_grace_s = apply_grace_s
        self._settle_window_s = settle_window_s
        self._clock = clock

    def settle_window(self, command_type: str) -> float:
        # The history keeps every action, but an answer this old is an operator's to find.
        return self._settle_window_s

    async def handle(
        self,
        command: CommandEnvelope,
        record_key: str | None,
        before_send: BeforeSend | None = None,
    ) -> ResultData:
        started = time.monotonic()
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

        sent_at = self._clock()
        try:
            before = _Before()
            if moves_money:
                # What the API says now, so that a lost answer can be told apart later: kept
                # with the recovery point, for whoever settles it. While the API's circuit is
                # open these reads wait for it (nothing has been sent yet).
                before = await self._before(account, data)
                # Those reads may have opened it: wait (or be refused) here, before the
                # recovery point, where nothing has been sent; past it the send path no
                # longer waits, and a refusal there is `failed` (nothing was sent either).
                await self._client.ready()
                if before_send is not None:
                    await before_send(before.as_json())
            sent_at = self._clock()
            tried = await call_with_retries(
                send,
                lambda sent: sent[0].status,
                moves_money=moves_money,
                retry=self._retry,
                upstream=UPSTREAM,
                ready=self._client.ready,
            )
        except Unauthorized as exc:
            decision = Decision(Outcome.FAILED, "unauthorized", exc.message)
            return self._result(command, decision, _report(1, None, started))
        except UpstreamOpen as refused:
            # Waited as long as the API's circuit lets a command wait (or it does not wait):
            # only reads went out.
            message = f"{refused}: the {command.type} was not sent"
            decision = Decision(Outcome.FAILED, "upstream_unavailable", message)
            return self._result(command, decision, _report(0, None, started))
        answer, listed = tried.outcome if tried.outcome is not None else (None, None)
        attempts, may_have_reached = tried.attempts, tried.may_have_reached
        decision = self._decision(
            command.type, data, answer, listed, may_have_reached, tried.refusal
        )
        if decision.outcome is Outcome.INDETERMINATE and moves_money:
            decision = await self._reconcile(account, data, decision, before, sent_at)
        return self._result(command, decision, _report(attempts, answer, started))

    def _result(
        self, command: CommandEnvelope, decision: Decision, report: UpstreamReport
    ) -> ResultData:
        # Every coupon result leaves through here, so no path can publish (or store) a PIN
        # that the setting keeps out of coupon.results.
        if not self._show_pins:
            decision = replace(decision, details=without_pins(decision.details))
        return result(command, decision, report)

    def _decision(
        self,
        command_type: str,
        data: CouponCommandData,
        answer: Answer | None,
        listed: list[dict[str, Any]] | None,
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
        return decide(command_type, data, answer, listed)

    async def recover(
        self, command: CommandEnvelope, record_key: str | None, sent: SentCall
    ) -> ResultData:
        """A previous instance died after a value-moving call may have gone out: never send
        it again; find out what happened instead."""
        data = _data(command)
        if command.type not in MONEY_MOVING:
            return await self.handle(command, record_key)  # safe to send again
        unknown = Decision(
            Outcome.INDETERMINATE,
            "upstream_unavailable",
            "the service stopped while the call was under way",
        )
        started = time.monotonic()
        decision = await self._reconcile(
            command.subject, data, unknown, _Before.from_json(sent.before), sent.at
        )
        return self._result(command, decision, _report(0, None, started))

    async def settle(
        self, command: CommandEnvelope, previous: ResultData, sent: SentCall
    ) -> ResultData | None:
        data = _data(command)
        unknown = Decision(Outcome.INDETERMINATE, previous.reason, previous.message)
        decision = await self._reconcile(
            command.subject,
            data,
            unknown,
            _Before.from_json(sent.before),
            sent.at,
            applied_proves=not _touched_later(data, sent.later),
        )
        if decision.outcome is Outcome.INDETERMINATE:
            return None
        return self._result(command, decision, previous.upstream)

    # -- finding out what happened --------------------------------------------------------------

    async def _before(self, account: str, data: CouponCommandData) -> _Before:
        """What the API says before a value-moving call; a part it cannot read stays None (a
        lost answer is then told from the other parts, or not at all)."""
        at = self._clock()
        try:
            match data:
                case Share(epin=epin, share_amount=amount):
                    return _Before(
                        at=at,
                        balance=await self._balance_or_none(account, epin),
                        shares=await self._history_count(
                            account, "share", epin=epin, amount=amount
                        ),
                    )
                case Transfer(epin=epin):
                    coupons = await self._active(account)
                    held = None if coupons is None else any(_is(c, epin) for c in coupons)
                    return _Before(at=at, held=held)
                case Delete(epin=epin):
                    return _Before(at=at, refund=await self._refund_status(account, epin))
                case Create(wallet_type=wallet, epin_amount=amount):
                    created = await self._history_count(
                        account, "create", wallet=wallet, amount=amount
                    )
                    return _Before(at=at, created=created)
        except UpstreamOpen:
            raise  # the command waited as long as it may: nothing to send it after
        except (CallNotSent, CallOutcomeUnknown):
            pass
        return _Before(at=at)

    async def _reconcile(
        self,
        account: str,
        data: CouponCommandData,
        unknown: Decision,
        before: _Before,
        sent_at: float | None,
        applied_proves: bool = True,
    ) -> Decision:
        """What the API says now against what it said before. `succeeded` needs a read that
        shows the call applied; `failed` needs a read that shows it not applied once the call
        can no longer be under way at the API (`apply_grace_s` after it went out): until then
        a lost answer stays `indeterminate`, with what was seen.

        `applied_proves` False: a later command of the account touched the same coupon (or
        made the same creation), so what looks applied may be its doing; only what shows
        this call not applied still counts (counts only grow, a refund is not undone)."""
        decision = await self._reconciled(account, data, unknown, before, sent_at)
        if decision.outcome is Outcome.SUCCEEDED and not applied_proves:
            return Decision(
                Outcome.INDETERMINATE,
                unknown.reason,
                "it looks applied, but a later command of the account touched the same coupon",
                {"seen": decision.message or ""},
            )
        return decision

    async def _reconciled(
        self,
        account: str,
        data: CouponCommandData,
        unknown: Decision,
        before: _Before,
        sent_at: float | None,
    ) -> Decision:
        try:
            match data:
                case Transfer(epin=epin, user=user):
                    coupons = await self._active(account)
                    if coupons is None:
                        return unknown
                    if any(_is(c, epin) for c in coupons):
                        return self._not_applied(
                            unknown, sent_at, "the coupon is still in the account"
                        )
                    # Gone from the list: ours if it was there just before the call (a coupon
                    # can also leave by a delete or by being used up, but no other command of
                    # the account ran in between: they run one at a time).
                    if before.held:
                        return _applied("the coupon left the account", {"epin": epin, "user": user})
                    return unknown
                case Delete(epin=epin):
                    status = await self._refund_status(account, epin)
                    if status == "refunded" and before.refund == "not_refunded":
                        return _applied("the coupon is refunded", {"epin": epin})
                    if status == "not_refunded":
                        return self._not_applied(unknown, sent_at, "the coupon is not refunded")
                    return unknown
                case Share(epin=epin, share_amount=amount, email=email):
                    # Counted against the history before the call: an identical share made
                    # earlier is never taken for this one.
                    shares = None
                    if before.shares is not None:
                        shares = await self._history_count(
                            account, "share", epin=epin, amount=amount, counterparty=email
                        )
                    if shares is not None and before.shares is not None:
                        if shares - before.shares == 1:
                            return _applied(
                                "the share is in the history",
                                {"epin": epin, "share_amount": amount},
                            )
                        if shares != before.shares:
                            return unknown
                    after = None
                    if before.balance is not None:
                        after = await self._balance_or_none(account, epin, gone_is_zero=True)
                        if after == before.balance - amount and shares is None:
                            return _applied(
                                "the share was taken off the coupon's balance",
                                {"epin": epin, "share_amount": amount, "balance": after},
                            )
                    unchanged = (shares is None or shares == before.shares) and (
                        after is None or after == before.balance
                    )
                    if unchanged and (shares is not None or after is not None):
                        return self._not_applied(
                            unknown, sent_at, "neither the history nor the balance changed"
                        )
                    return unknown
                case Create(wallet_type=wallet, epin_amount=amount, number_of_pins=pins):
                    # Only with a count from before: an identical creation made earlier must
                    # not be taken for this one.
                    if before.created is None or not pins.isdigit():
                        return unknown
                    now = await self._history_count(account, "create", wallet=wallet, amount=amount)
                    if now is not None and now - before.created == int(pins):
                        return _applied("the coupons are in the history", {})
                    if now == before.created:
                        return self._not_applied(unknown, sent_at, "no coupon was created")
                    return unknown
        except (CallNotSent, CallOutcomeUnknown, Unauthorized):
            return unknown
        return unknown

    def _not_applied(self, unknown: Decision, sent_at: float | None, seen: str) -> Decision:
        """Not applied, as far as a read can tell now: `failed` once the call can no longer be
        under way at the API, else still `indeterminate` (settled later)."""
        if sent_at is not None and self._clock() - sent_at >= self._apply_grace_s:
            return Decision(
                Outcome.FAILED,
                "upstream_unavailable",
                f"reconciled: {seen} {self._apply_grace_s:g} s after the call; "
                "the command may be sent again",
                {"reconciled": True},
            )
        return Decision(
            Outcome.INDETERMINATE,
            unknown.reason,
            f"{seen} so far; the call may still be under way at the API",
            {"seen": seen},
        )

    async def _active(self, account: str) -> list[dict[str, Any]] | None:
        answer, coupons = await self._client.call_all_pages(account, "user/get/active-epin/")
        return coupons if answer.status == 200 else None

    async def _balance_or_none(
        self, account: str, epin: str, *, gone_is_zero: bool = False
    ) -> Decimal | None:
        try:
            coupons = await self._active(account)
        except UpstreamOpen:
            raise  # not "unknown": the caller tells a refusal from a failed read
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

    async def _history_count(
        self,
        account: str,
        action: str,
        *,
        wallet: str | None = None,
        epin: str | None = None,
        amount: Decimal | None = None,
        counterparty: str | None = None,
    ) -> int | None:
        """How many entries of the account's history match; None when it cannot be read. The
        API filters by `wallet` when given; the entries are still checked here. An entry with
        no `counterparty` is not told apart by one."""
        params = {"wallet": wallet} if wallet is not None else None
        answer, entries = await self._client.call_all_pages(account, "user/epin/history/", params)
        if answer.status != 200:
            return None
        return sum(
            1
            for e in entries
            if e.get("action") == action
            and (wallet is None or e.get("wallet_type") == wallet)
            and (epin is None or str(e.get("epin")) == epin)
            and (amount is None or money(e.get("amount")) == amount)
            and (counterparty is None or e.get("counterparty") in (None, counterparty))
        )


@dataclass(frozen=True)
class _Before:
    """What the API said just before a value-moving call (None: it could not be read)."""

    at: float | None = None  # when it was read
    balance: Decimal | None = None  # share: the coupon's balance
    shares: int | None = None  # share: matching shares already in the history
    held: bool | None = None  # transfer: the coupon was in the account's active list
    refund: str | None = None  # delete: the refund status
    created: int | None = None  # create: matching creations already in the history

    def as_json(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if v is not None}
        if self.balance is not None:
            fields["balance"] = str(self.balance)
        return json.dumps(fields)

    @classmethod
    def from_json(cls, text: str | None) -> _Before:
        """From the store (an older record, or none: nothing is known from before)."""
        if not text:
            return cls()
        try:
            fields = json.loads(text)
        except ValueError:
            return cls()
        if not isinstance(fields, dict):
            return cls()
        known = {k: v for k, v in fields.items() if k in cls.__dataclass_fields__}
        if isinstance(known.get("balance"), str):
            known["balance"] = Decimal(known["balance"])
        return cls(**known)


def _touched_later(data: CouponCommandData, later: tuple[CommandEnvelope, ...] | None) -> bool:
    """Whether a later command of the account named the same coupon or made the same
    creation (None: not known, so it may have)."""
    if later is None:
        return True
    for command in later:
        fields = command.data if isinstance(command.data, dict) else {}
        match data:
            case Create(wallet_type=wallet, epin_amount=amount):
                same = command.type == "coupon.create" and fields.get("wallet_type") == wallet
                if same and money(fields.get("epin_amount")) in (amount, None):
                    return True
            case Transfer(epin=epin) | Share(epin=epin) | Delete(epin=epin):
                if str(fields.get("epin")) == epin:
                    return True
    return False


def _data(command: CommandEnvelope) -> CouponCommandData:
    model = COUPON_COMMAND_TYPES[command.type]
    return cast(CouponCommandData, model.model_validate(command.data or {}))


def _is(coupon: dict[str, Any], epin: str) -> bool:
    return str(coupon.get("id")) == epin


def _applied(message: str, details: dict[str, Any]) -> Decision:
    return Decision(
        Outcome.SUCCEEDED, None, f"reconciled: {message}", {**details, "reconciled": True}
    )


def _report(attempts: int, answer: Answer | None, started: float) -> UpstreamReport:
    return UpstreamReport(
        attempts=attempts,
        last_status=answer.status if answer else None,
        elapsed_ms=int((time.monotonic() - started) * 1000),
    )
