"""Handle one `pos.*` command: validate, call the eVOUCHER API, decide the outcome."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from pydantic import ValidationError

from voucher_bridge.evoucher.client import Answer, CallNotSent, CallOutcomeUnknown, EvoucherClient
from voucher_bridge.evoucher.decisions import (
    MONEY_MOVING,
    Decision,
    decide,
    request_for,
    unanswered,
)
from voucher_contracts import CommandEnvelope, Outcome, ResultData, UpstreamReport
from voucher_contracts.pos import POS_COMMAND_TYPES, PosCommandData


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, within a number of attempts."""

    attempts: int = 3
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)))


class PosCommandHandler:
    def __init__(self, client: EvoucherClient, retry: RetryPolicy | None = None) -> None:
        self._client = client
        self._retry = retry or RetryPolicy()

    async def handle(self, command: CommandEnvelope, record_key: str | None) -> ResultData:
        started = time.monotonic()
        data_model = POS_COMMAND_TYPES[command.type]
        try:
            data: PosCommandData = data_model.model_validate(command.data or {})  # type: ignore[assignment]
        except ValidationError as exc:
            return _result(command, _invalid(exc), UpstreamReport())
        if record_key is not None and record_key != command.subject:
            decision = Decision(
                Outcome.REJECTED,
                "validation_error",
                "subject must equal the record key (the terminal)",
                {"errors": {"subject": ["must equal the record key"]}},
            )
            return _result(command, decision, UpstreamReport())
        terminal = command.subject
        if not self._client.knows(terminal):
            decision = Decision(Outcome.REJECTED, "unknown_terminal", f"no token for {terminal}")
            return _result(command, decision, UpstreamReport())

        route, body = request_for(terminal, data)
        attempts, answer, may_have_reached = 0, None, False
        while True:
            attempts += 1
            try:
                answer = await self._client.call(terminal, route, body)
            except CallNotSent:
                retryable = True
            except CallOutcomeUnknown:
                may_have_reached = True
                # A call that moves money is never sent again once it may have arrived.
                retryable = command.type not in MONEY_MOVING
            else:
                retryable = answer.status >= 500 and command.type not in MONEY_MOVING
                if not retryable:
                    break
            if not retryable or attempts >= self._retry.attempts:
                break
            await asyncio.sleep(self._retry.delay(attempts))

        report = UpstreamReport(
            attempts=attempts,
            last_status=answer.status if answer else None,
            elapsed_ms=int((time.monotonic() - started) * 1000),
        )
        decision = _decision(command.type, data, answer, may_have_reached)
        return _result(command, decision, report)


def _decision(
    command_type: str, data: PosCommandData, answer: Answer | None, may_have_reached: bool
) -> Decision:
    if answer is None or (answer.status >= 500 and command_type not in MONEY_MOVING):
        return unanswered(command_type, may_have_reached=may_have_reached)
    return decide(command_type, data, answer)


def _invalid(exc: ValidationError) -> Decision:
    errors: dict[str, list[str]] = {}
    for error in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "data"
        errors.setdefault(field, []).append(error["msg"])
    return Decision(
        Outcome.REJECTED, "validation_error", "the command's data is not valid", {"errors": errors}
    )


def _result(command: CommandEnvelope, decision: Decision, report: UpstreamReport) -> ResultData:
    return ResultData(
        command_id=command.id,
        command_source=command.source,
        command_type=command.type,
        outcome=decision.outcome,
        reason=decision.reason,
        message=decision.message,
        upstream=report,
        **decision.details,
    )
