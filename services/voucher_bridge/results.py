"""A command's outcome as the handlers decide it, and the result data it becomes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

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
