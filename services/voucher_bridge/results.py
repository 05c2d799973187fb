"""A command's outcome as the handlers decide it, and the result data it becomes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from voucher_contracts import CommandEnvelope, Outcome, ResultData, UpstreamReport


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str | None = None
    message: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def invalid(exc: ValidationError) -> Decision:
    errors: dict[str, list[str]] = {}
    for error in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "data"
        errors.setdefault(field, []).append(error["msg"])
    return Decision(
        Outcome.REJECTED, "validation_error", "the command's data is not valid", {"errors": errors}
    )


def unanswered(*, moves_money: bool, may_have_reached: bool) -> Decision:
    """No answer within the budget: `failed` if the call cannot have taken effect, else (for a
    call that moves money) `indeterminate` until reconciled."""
    if may_have_reached and moves_money:
        return Decision(Outcome.INDETERMINATE, "upstream_unavailable")
    return Decision(Outcome.FAILED, "upstream_unavailable")


def result(command: CommandEnvelope, decision: Decision, report: UpstreamReport) -> ResultData:
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


def precheck(
    command: CommandEnvelope,
    record_key: str | None,
    model: type[BaseModel],
    known: Callable[[str], bool],
    unknown_reason: str,
) -> tuple[Any, ResultData | None]:
    """What every command goes through before any call: its data valid, its subject the
    record's key, its subject (a till, an account) one the service has credentials for.
    Returns the data, or the result that answers the command without a call."""
    try:
        # Only a missing `data` means "no fields": a list, a string, 0 or false is not an object.
        data = model.model_validate({} if command.data is None else command.data)
    except ValidationError as exc:
        return None, result(command, invalid(exc), UpstreamReport())
    if record_key is not None and record_key != command.subject:
        decision = Decision(
            Outcome.REJECTED,
            "validation_error",
            "subject must equal the record key",
            {"errors": {"subject": ["must equal the record key"]}},
        )
        return None, result(command, decision, UpstreamReport())
    if not known(command.subject):
        message = f"no credentials for {command.subject}"
        return None, result(
            command, Decision(Outcome.REJECTED, unknown_reason, message), UpstreamReport()
        )
    return data, None
