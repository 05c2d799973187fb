"""Property: whatever a record holds, decoding either refuses it (a dead letter, with a reason)
or gives a command that can be carried all the way: stored (no NUL in a text column), read back
from the store, hashed, validated, sent upstream and answered with a result that serialises."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.records import GeneratedRecord, any_record, reproducers
from voucher_bridge.evoucher.client import encode_json
from voucher_bridge.evoucher.decisions import request_for
from voucher_bridge.results import precheck
from voucher_contracts import (
    CommandEnvelope,
    ResultEnvelope,
    UnusableRecord,
    content_hash,
    decode_command,
    encode_result,
    result_id,
)
from voucher_contracts.pos import POS_COMMAND_TYPES

SUBJECT = "till-1"
REASONS = {
    "not_json",
    "empty_value",
    "not_a_cloudevent",
    "missing_attribute",
    "unsupported_specversion",
    "invalid_header",
    "invalid_attribute",
    "too_large",
    "too_deep",
}


def carries_all_the_way(record: GeneratedRecord) -> None:
    try:
        command = decode_command(record.headers, record.value)
    except UnusableRecord as exc:
        assert exc.reason in REASONS, exc
        str(exc).encode("utf-8")  # the detail goes into a header
        return
    for text in (command.source, command.id, command.type, command.subject):
        assert "\x00" not in text
        text.encode("utf-8")
    stored = command.model_dump_json()
    again = CommandEnvelope.model_validate_json(stored)  # what settling reads back
    assert content_hash(again) == content_hash(command)
    result_id(command.source, command.id)
    model = POS_COMMAND_TYPES.get(command.type)
    if model is None:
        return  # an unknown type: a dead letter in the pipeline
    data, answered = precheck(command, SUBJECT, model, lambda _: True, "unknown_terminal")
    if answered is None:
        _, body = request_for(command.subject, data)
        encode_json(body).decode("utf-8")
        answered = _succeeded(command)
    from datetime import UTC, datetime

    envelope = ResultEnvelope(
        id=result_id(command.source, command.id),
        type=command.type + ".result",
        subject=command.subject,
        time=datetime.now(UTC),
        causationid=command.id,
        data=answered,
    )
    encode_result(envelope, 1_000_000)


def _succeeded(command: CommandEnvelope) -> Any:
    from voucher_contracts import Outcome, ResultData

    return ResultData(
        command_id=command.id,
        command_source=command.source,
        command_type=command.type,
        outcome=Outcome.SUCCEEDED,
    )


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_record(SUBJECT))
def test_every_record_is_refused_or_carried_all_the_way(record: GeneratedRecord) -> None:
    carries_all_the_way(record)


@given(st.sampled_from(reproducers(SUBJECT)))
def test_the_reproducers_are_refused(record: GeneratedRecord) -> None:
    carries_all_the_way(record)
    try:
        decode_command(record.headers, record.value)
    except UnusableRecord:
        return
    raise AssertionError(f"{record.why} was accepted")
