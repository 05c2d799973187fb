"""CloudEvents 1.0 envelopes of voucher-bridge's commands and results.

Only the attributes the outer contract (design.md) uses are modelled; any other CloudEvents
extension attribute on a command is kept in ``extensions``, with its JSON type (Boolean,
Integer or String), so nothing a sender wrote is lost.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

SPEC_VERSION = "1.0"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
JSON_CONTENT_TYPE = "application/json"
RESULT_SOURCE = "/services/voucher-bridge"
RESULT_TYPE_SUFFIX = ".result"

# A fixed namespace, so that every instance derives the same result id for the same command.
_RESULT_ID_NAMESPACE = uuid.UUID("6f1c1f3e-2a47-4c55-9a3e-0b0c9f7d2a10")


class Outcome(StrEnum):
    """What a command came to; see design.md for what a ledger does with each."""

    SUCCEEDED = "succeeded"
    REJECTED = "rejected"
    FAILED = "failed"
    INDETERMINATE = "indeterminate"


class CommandEnvelope(BaseModel):
    """A command as received, in either Kafka binding of CloudEvents."""

    model_config = ConfigDict(frozen=True)

    specversion: str = SPEC_VERSION
    id: str = Field(min_length=1)
    source: str = Field(min_length=1)
    type: str = Field(min_length=1)
    subject: str = Field(min_length=1)
    time: datetime | None = None
    datacontenttype: str | None = None
    dataschema: str | None = None
    # The command's fields, decoded with decimals kept exact (never through float).
    data: Any = None
    # W3C distributed-tracing extension attributes, when the sender used them.
    traceparent: str | None = None
    tracestate: str | None = None
    # StrictBool first: a JSON `true` stays a Boolean, never the text "True" or the number 1.
    extensions: dict[str, StrictBool | StrictInt | StrictStr] = Field(default_factory=dict)

    @property
    def idempotency_key(self) -> tuple[str, str]:
        """(source, id): unique per distinct event by the CloudEvents spec."""
        return (self.source, self.id)


class UpstreamReport(BaseModel):
    """What it took to get the upstream's answer."""

    attempts: int = 0
    last_status: int | None = None
    elapsed_ms: int = 0


class ResultData(BaseModel):
    """The `data` of every result event; per-type fields are optional extras."""

    model_config = ConfigDict(extra="allow")

    command_id: str
    command_source: str
    command_type: str
    outcome: Outcome = Field(
        description="succeeded: the upstream confirmed it, or a read after a lost answer showed "
        "it applied (`reconciled`). rejected: refused, nothing changed upstream. failed: "
        "known not to have taken effect (no answer and nothing sent, or a read showed it "
        "unapplied once it could no longer be under way upstream); it may be sent again. "
        "indeterminate: it may have taken effect; a superseding result follows once the "
        "upstream can tell, or reason `unsettled` when it no longer can (an operator decides)."
    )
    reason: str | None = Field(
        default=None,
        description="Why, when not succeeded: e.g. voucher_not_found, validation_error, "
        "upstream_unavailable, unauthorized, internal_error, command_expired (older than the "
        "store's retention: never sent), unsettled.",
    )
    message: str | None = None
    upstream: UpstreamReport = Field(default_factory=UpstreamReport)
    # Set when this result replaces an earlier one for the same command (e.g. an
    # `indeterminate` later resolved): the `id` of the result it supersedes.
    supersedes: str | None = None
    # Set when the result was cut to fit the largest record the broker takes: its lists hold
    # only their first items, or (`compact`) only the fields above are kept.
    truncated: bool | None = None


class ResultEnvelope(BaseModel):
    """A result event, published in structured mode on the results topic."""

    specversion: str = SPEC_VERSION
    id: str
    source: str = RESULT_SOURCE
    type: str
    subject: str
    time: datetime
    datacontenttype: str = JSON_CONTENT_TYPE
    # CloudEvents correlation extension: the command this result answers.
    causationid: str
    data: ResultData


def result_type(command_type: str) -> str:
    return command_type + RESULT_TYPE_SUFFIX


def result_id(command_source: str, command_id: str, revision: int = 0) -> str:
    """The result's id, derived from the command's (source, id).

    A re-published result has the same id, so a consumer can drop the copy. A later result
    that supersedes an earlier one for the same command gets the next revision. The parts are
    joined by NUL, which no command's `source` or `id` holds (decoding refuses control
    characters, as CloudEvents Strings forbid them), so no two commands share a name.
    """
    name = f"{command_source}\x00{command_id}"
    if revision:
        name += f"\x00{revision}"
    return str(uuid.uuid5(_RESULT_ID_NAMESPACE, name))


def unrecorded_result_id(command_source: str, command_id: str) -> str:
    """The id of a result published without a record in the store (the store could not be
    reached within the command's time): never the id of the command's recorded result, so
    a consumer that drops copies by id still sees the recorded one should it come later."""
    return str(uuid.uuid5(_RESULT_ID_NAMESPACE, f"{command_source}\x00{command_id}\x00unrecorded"))


def expired_result_id(command_source: str, command_id: str) -> str:
    """The id of the `command_expired` answer to a command older than the store's memory and
    not in it: never the id of a result the command had before it was forgotten."""
    return str(uuid.uuid5(_RESULT_ID_NAMESPACE, f"{command_source}\x00{command_id}\x00expired"))


def content_hash(command: CommandEnvelope) -> str:
    """A stable digest of what a command asks for, to tell a replay from a reused key."""
    canonical = json.dumps(
        {"type": command.type, "subject": command.subject, "data": command.data},
        sort_keys=True,
        separators=(",", ":"),
        default=str,  # Decimal → its exact text
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
