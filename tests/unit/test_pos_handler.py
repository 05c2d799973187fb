"""PosCommandHandler: validation, terminals, retries, and never resending a redeem that may have
arrived."""

from __future__ import annotations

import gzip
import json
import random
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, cast

import httpx
import pytest
from pydantic import SecretStr

from voucher_bridge.evoucher.client import EvoucherClient, InMemorySessions, Route
from voucher_bridge.evoucher.handler import PosCommandHandler
from voucher_bridge.once import SentCall
from voucher_bridge.upstream import Answer, CallNotSent, CallOutcomeUnknown, RetryPolicy
from voucher_contracts import CommandEnvelope, Outcome, ResultData, decode_command

TERMINAL = "1st_floor_machine_1"
SOURCE = "/stores/limassol-3/pos/1st_floor_machine_1"

OK = Answer(200, {"success": 1, "message": "ok"}, 5)
SCANNED = Answer(200, {"success": 1, "price": "50.00", "message": "The voucher is valid"}, 5)
NOT_FOUND = Answer(200, {"success": 0, "message": "Voucher with code 12345678 does not exist!"}, 5)
UNAVAILABLE = Answer(503, None, 5)

Step = Answer | Exception


@dataclass
class FakeClient:
    """Stands in for EvoucherClient: known terminals, scripted answers, recorded calls."""

    script: list[Step] = field(default_factory=list)
    terminals: frozenset[str] = frozenset({TERMINAL})
    calls: list[tuple[str, Route, dict[str, Any]]] = field(default_factory=list)

    def knows(self, terminal: str) -> bool:
        return terminal in self.terminals

    async def ready(self) -> None:
        return None  # no breaker: every call may go

    async def call(self, terminal: str, route: Route, body: dict[str, Any]) -> Answer:
        self.calls.append((terminal, route, body))
        step = self.script.pop(0) if self.script else OK
        if isinstance(step, Exception):
            raise step
        return step


@dataclass(frozen=True)
class RecordingPolicy(RetryPolicy):
    """No waiting in tests; records which attempts were followed by a backoff."""

    waited: list[int] = field(default_factory=list)

    def delay(self, attempt: int) -> float:
        self.waited.append(attempt)
        return 0.0


def handler_for(
    *script: Step, attempts: int = 3
) -> tuple[PosCommandHandler, FakeClient, RecordingPolicy]:
    client = FakeClient(list(script))
    policy = RecordingPolicy(attempts=attempts)
    return PosCommandHandler(cast(EvoucherClient, client), policy), client, policy


def indeterminate_of(command: CommandEnvelope) -> ResultData:
    return ResultData(
        command_id=command.id,
        command_source=command.source,
        command_type=command.type,
        outcome=Outcome.INDETERMINATE,
        reason="upstream_unavailable",
    )


def command(type_: str, data: Any, subject: str = TERMINAL, id_: str = "cmd-1") -> CommandEnvelope:
    return CommandEnvelope(id=id_, source=SOURCE, type=type_, subject=subject, data=data)


SCAN = command("pos.scan", {"voucher_code": "12345678"})
REDEEM = command("pos.redeem", {"voucher_codes": ["12345678", "12345679"]})


# What every POS result gains for the ledger (bill.py): tested on their own, below.
BOOKING = {"terminal", "store", "bill_id", "bill_unknown", "remaining_due", "vouchers"}
BOOKING |= {"vouchers_total", "bill_total"}


def extras(result: ResultData) -> dict[str, Any]:
    """What the decision put on the result, without the booking fields (bill.py)."""
    found = dict(result.model_extra or {})
    return {
        k: v
        for k, v in found.items()
        if k not in BOOKING or (k == "bill_total" and result.command_type == "pos.bill_total")
    }


# -- successes -----------------------------------------------------------------------------------


async def test_bill_total_succeeds() -> None:
    handler, client, policy = handler_for(
        Answer(200, {"success": 1, "bill_total": 50, "message": "Bill total has been updated"}, 7)
    )
    result = await handler.handle(command("pos.bill_total", {"bill_total": "50"}), TERMINAL)
    assert client.calls == [
        (TERMINAL, Route.BILL_TOTAL, {"bill_total": Decimal("50.00"), "machine_name": TERMINAL})
    ]
    assert result.command_id == "cmd-1"
    assert result.command_source == SOURCE
    assert result.command_type == "pos.bill_total"
    assert result.outcome is Outcome.SUCCEEDED
    assert result.reason is None
    assert result.message == "Bill total has been updated"
    assert extras(result) == {"bill_total": Decimal("50.00")}
    assert result.upstream.attempts == 1
    assert result.upstream.last_status == 200
    assert result.upstream.elapsed_ms >= 0
    assert policy.waited == []


async def test_scan_succeeds_with_the_amount() -> None:
    handler, client, _ = handler_for(SCANNED)
    result = await handler.handle(SCAN, TERMINAL)
    assert client.calls == [(TERMINAL, Route.SCAN, {"voucher_code": "12345678"})]
    assert result.outcome is Outcome.SUCCEEDED
    assert extras(result) == {"voucher_code": "12345678", "amount": Decimal("50.00")}
    assert result.model_dump(mode="json")["amount"] == "50.00"


@pytest.mark.parametrize(
    ("type_", "data", "route", "body"),
    [
        ("pos.remove", {"voucher_code": "1"}, Route.REMOVE, {"voucher_code": "1"}),
        ("pos.redeem", {"voucher_codes": ["1", "2"]}, Route.REDEEM, {"voucher_codes": "1;2"}),
        ("pos.cancel", {"voucher_codes": ["1"]}, Route.CANCEL, {"voucher_codes": "1"}),
        ("pos.cancel", {"voucher_codes": []}, Route.CANCEL, {}),
        ("pos.cancel", {}, Route.CANCEL, {}),
        ("pos.cancel", None, Route.CANCEL, {}),
    ],
)
async def test_each_command_calls_its_route(
    type_: str, data: Any, route: Route, body: dict[str, Any]
) -> None:
    handler, client, _ = handler_for(OK)
    result = await handler.handle(command(type_, data), TERMINAL)
    assert client.calls == [(TERMINAL, route, body)]
    assert result.outcome is Outcome.SUCCEEDED


async def test_record_key_none_is_accepted() -> None:
    handler, client, _ = handler_for(SCANNED)
    result = await handler.handle(SCAN, None)
    assert result.outcome is Outcome.SUCCEEDED
    assert len(client.calls) == 1


async def test_upstream_refusal_is_rejected_without_retry() -> None:
    handler, client, _ = handler_for(NOT_FOUND)
    result = await handler.handle(SCAN, TERMINAL)
    assert result.outcome is Outcome.REJECTED
    assert result.reason == "voucher_not_found"
    assert result.message == "Voucher with code 12345678 does not exist!"
    assert extras(result) == {"voucher_code": "12345678"}
    assert len(client.calls) == 1


# -- refused before any call -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "data", "fields"),
    [
        ("pos.bill_total", {"bill_total": "12.345"}, ["bill_total"]),
        ("pos.bill_total", {"bill_total": 12.5}, ["bill_total"]),
        ("pos.bill_total", {"bill_total": "-1"}, ["bill_total"]),
        ("pos.bill_total", {}, ["bill_total"]),
        ("pos.bill_total", None, ["bill_total"]),
        ("pos.scan", {"voucher_code": "1;2"}, ["voucher_code"]),
        ("pos.scan", {"voucher_code": 12345678}, ["voucher_code"]),
        ("pos.remove", {}, ["voucher_code"]),
        ("pos.redeem", {"voucher_codes": []}, ["voucher_codes"]),
        ("pos.redeem", {"voucher_codes": ["1", "1"]}, ["voucher_codes"]),
        ("pos.redeem", {"voucher_codes": ["ok", "a;b"]}, ["voucher_codes.1"]),
        ("pos.cancel", {"voucher_codes": ["1", "1"]}, ["voucher_codes"]),
        ("pos.scan", ["12345678"], ["data"]),
        ("pos.scan", "12345678", ["data"]),
    ],
)
async def test_invalid_data_is_a_validation_error_without_a_call(
    type_: str, data: Any, fields: list[str]
) -> None:
    handler, client, _ = handler_for()
    result = await handler.handle(command(type_, data), TERMINAL)
    assert result.outcome is Outcome.REJECTED
    assert result.reason == "validation_error"
    assert result.message
    errors = extras(result)["errors"]
    assert sorted(errors) == fields
    for messages in errors.values():
        assert messages and all(isinstance(m, str) and m for m in messages)
    assert client.calls == []
    assert result.upstream.attempts == 0
    assert result.upstream.last_status is None


async def test_validation_error_does_not_echo_the_input() -> None:
    handler, _, _ = handler_for()
    result = await handler.handle(command("pos.scan", {"voucher_code": "SECRET;x"}), TERMINAL)
    assert "SECRET" not in json.dumps(result.model_dump(mode="json"))


async def test_validation_error_of_a_decoded_float_free_command() -> None:
    # A record as it arrives: JSON numbers come as Decimals, so 12.5 is accepted, 12.345 not.
    ce = b'{"specversion":"1.0","id":"1","source":"/s","type":"pos.bill_total","subject":"T",'
    handler, client, _ = handler_for(OK)
    client.terminals = frozenset({"T"})
    ok = await handler.handle(decode_command([], ce + b'"data":{"bill_total":12.5}}'), "T")
    assert ok.outcome is Outcome.SUCCEEDED
    assert client.calls[0][2] == {"bill_total": Decimal("12.50"), "machine_name": "T"}
    bad = await handler.handle(decode_command([], ce + b'"data":{"bill_total":12.345}}'), "T")
    assert bad.reason == "validation_error"
    assert len(client.calls) == 1


async def test_subject_other_than_the_record_key_is_a_validation_error() -> None:
    handler, client, _ = handler_for()
    result = await handler.handle(SCAN, "another_machine")
    assert result.outcome is Outcome.REJECTED
    assert result.reason == "validation_error"
    assert extras(result) == {"errors": {"subject": ["must equal the record key"]}}
    assert client.calls == []


async def test_unknown_terminal_is_rejected_without_a_call() -> None:
    handler, client, _ = handler_for()
    result = await handler.handle(command("pos.scan", {"voucher_code": "1"}, "nobody"), "nobody")
    assert result.outcome is Outcome.REJECTED
    assert result.reason == "unknown_terminal"
    assert "nobody" in (result.message or "")
    assert client.calls == []
    assert result.upstream.attempts == 0


async def test_data_is_validated_before_the_terminal_is_looked_up() -> None:
    handler, client, _ = handler_for()
    result = await handler.handle(command("pos.scan", {}, "nobody"), "nobody")
    assert result.reason == "validation_error"
    assert client.calls == []


# -- retries of safe calls -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [CallNotSent("scan_voucher_api: ConnectError"), CallOutcomeUnknown("x: ReadTimeout")],
    ids=["not_sent", "outcome_unknown"],
)
async def test_safe_call_is_retried_until_it_answers(failure: Exception) -> None:
    handler, client, policy = handler_for(failure, failure, SCANNED)
    result = await handler.handle(SCAN, TERMINAL)
    assert result.outcome is Outcome.SUCCEEDED
    assert len(client.calls) == 3
    assert all(call == client.calls[0] for call in client.calls)
    assert result.upstream.attempts == 3
    assert result.upstream.last_status == 200
    assert policy.waited == [1, 2]


async def test_safe_call_is_retried_after_5xx() -> None:
    handler, client, _ = handler_for(UNAVAILABLE, SCANNED)
    result = await handler.handle(SCAN, TERMINAL)
    assert result.outcome is Outcome.SUCCEEDED
    assert result.upstream.attempts == 2
    assert len(client.calls) == 2


@pytest.mark.parametrize(
    "failure",
    [CallNotSent("x"), CallOutcomeUnknown("x"), UNAVAILABLE],
    ids=["not_sent", "outcome_unknown", "503"],
)
async def test_safe_call_fails_after_the_budget(failure: Step) -> None:
    handler, client, policy = handler_for(failure, failure, failure, SCANNED)
    result = await handler.handle(SCAN, TERMINAL)
    assert result.outcome is Outcome.FAILED
    assert result.reason == "upstream_unavailable"
    assert len(client.calls) == 3
    assert result.upstream.attempts == 3
    assert result.upstream.last_status == (503 if isinstance(failure, Answer) else None)
    assert policy.waited == [1, 2]


@pytest.mark.parametrize("attempts", [1, 2, 5])
async def test_budget_is_the_policy_attempts(attempts: int) -> None:
    handler, client, _ = handler_for(*[CallNotSent("x")] * 10, attempts=attempts)
    result = await handler.handle(SCAN, TERMINAL)
    assert result.outcome is Outcome.FAILED
    assert len(client.calls) == attempts


@pytest.mark.parametrize("status", [401, 403, 400, 404])
async def test_client_errors_are_not_retried(status: int) -> None:
    handler, client, _ = handler_for(Answer(status, {"message": "no"}, 1))
    result = await handler.handle(SCAN, TERMINAL)
    assert len(client.calls) == 1
    assert result.upstream.last_status == status
    if status in (401, 403):
        assert (result.outcome, result.reason) == (Outcome.FAILED, "unauthorized")
    else:
        assert result.outcome is Outcome.REJECTED


# -- the redeem: never resent once it may have arrived ---------------------------------------------


def redeems(client: FakeClient) -> list[tuple[str, Route, dict[str, Any]]]:
    return [call for call in client.calls if call[1] is Route.REDEEM]


async def test_redeem_is_not_resent_after_outcome_unknown() -> None:
    # The reconciling scan cannot reach the upstream either: the outcome stays unknown.
    handler, client, policy = handler_for(
        CallOutcomeUnknown("redeem_voucher_api: ReadTimeout"), *[CallNotSent("scan")] * 3
    )
    result = await handler.handle(REDEEM, TERMINAL)
    assert len(redeems(client)) == 1
    assert result.outcome is Outcome.INDETERMINATE
    assert result.reason == "upstream_unavailable"
    assert result.upstream.attempts == 1
    assert result.upstream.last_status is None
    assert policy.waited == [1, 2]  # the scans' backoffs; the redeem itself was not retried


async def test_reconciling_scan_is_retried_after_a_dropped_connection() -> None:
    # A scan is safe to repeat: a dropped connection on the way does not leave it unknown.
    handler, client, _ = handler_for(
        CallOutcomeUnknown("redeem"), CallOutcomeUnknown("scan"), REDEEMED, REDEEMED_2
    )
    result = await handler.handle(REDEEM, TERMINAL)
    assert len(redeems(client)) == 1
    assert (result.outcome, result.reason) == (Outcome.SUCCEEDED, None)
    assert [route for _, route, _ in client.calls] == [Route.REDEEM] + [Route.SCAN] * 3


async def test_redeem_is_retried_after_not_sent() -> None:
    handler, client, _ = handler_for(CallNotSent("x"), CallNotSent("x"), OK)
    result = await handler.handle(REDEEM, TERMINAL)
    assert result.outcome is Outcome.SUCCEEDED
    assert extras(result) == {"voucher_codes": ["12345678", "12345679"]}
    assert len(client.calls) == 3
    assert {call[2]["voucher_codes"] for call in client.calls} == {"12345678;12345679"}


async def test_redeem_never_sent_is_failed() -> None:
    handler, client, _ = handler_for(CallNotSent("x"), CallNotSent("x"), CallNotSent("x"), OK)
    result = await handler.handle(REDEEM, TERMINAL)
    assert len(client.calls) == 3
    assert (result.outcome, result.reason) == (Outcome.FAILED, "upstream_unavailable")


async def test_redeem_not_sent_then_unknown_is_indeterminate_and_stops() -> None:
    handler, client, _ = handler_for(
        CallNotSent("x"), CallOutcomeUnknown("x"), *[CallNotSent("s")] * 3
    )
    result = await handler.handle(REDEEM, TERMINAL)
    assert len(redeems(client)) == 2
    assert result.outcome is Outcome.INDETERMINATE
    assert result.upstream.attempts == 2


async def test_redeem_5xx_is_not_resent_and_is_indeterminate() -> None:
    handler, client, _ = handler_for(
        Answer(500, {"message": "Fatal error"}, 1), *[CallNotSent("scan")] * 3
    )
    result = await handler.handle(REDEEM, TERMINAL)
    assert len(redeems(client)) == 1
    assert result.outcome is Outcome.INDETERMINATE
    assert result.message == "Fatal error"
    assert result.upstream.last_status == 500


async def test_redeem_refused_is_rejected() -> None:
    refusal = Answer(
        200, {"success": 0, "message": "Voucher with code 12345678 has already been redeemed!"}, 1
    )
    handler, client, _ = handler_for(refusal)
    result = await handler.handle(REDEEM, TERMINAL)
    assert (result.outcome, result.reason) == (Outcome.REJECTED, "voucher_already_redeemed")
    assert len(client.calls) == 1


async def test_scan_outcome_unknown_then_answer_is_decided_by_the_answer() -> None:
    handler, client, _ = handler_for(CallOutcomeUnknown("x"), NOT_FOUND)
    result = await handler.handle(SCAN, TERMINAL)
    assert (result.outcome, result.reason) == (Outcome.REJECTED, "voucher_not_found")
    assert len(client.calls) == 2


# -- retry policy --------------------------------------------------------------------------------


def test_retry_policy_delay_is_full_jitter_within_the_cap() -> None:
    random.seed(1234)
    policy = RetryPolicy(attempts=5, base_delay_s=0.2, max_delay_s=1.0)
    for attempt, cap in [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (10, 1.0)]:
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap / 2  # jitter spreads over the range


def test_retry_policy_defaults() -> None:
    policy = RetryPolicy()
    assert policy.attempts >= 1
    assert policy.base_delay_s > 0
    assert policy.max_delay_s >= policy.base_delay_s


# -- with the real client over MockTransport -------------------------------------------------------


async def test_end_to_end_with_mock_transport() -> None:
    seen: list[httpx.Request] = []
    answers: list[httpx.Response | Exception] = [
        httpx.ConnectError("refused"),
        httpx.Response(
            200,
            headers={"Content-Encoding": "gzip", "Set-Cookie": "OCSESSID=abc; path=/"},
            stream=httpx.ByteStream(gzip.compress(json.dumps(SCANNED.body).encode())),
        ),
        httpx.ReadTimeout("slow"),
    ]

    def transport(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    client = EvoucherClient(
        "https://evoucher.cy",
        {TERMINAL: SecretStr("tok")},
        InMemorySessions(),
        transport=httpx.MockTransport(transport),
    )
    handler = PosCommandHandler(client, RetryPolicy(attempts=3, base_delay_s=0))
    try:
        scan = await handler.handle(SCAN, TERMINAL)
        assert scan.outcome is Outcome.SUCCEEDED
        assert extras(scan)["amount"] == Decimal("50.00")
        assert scan.upstream.attempts == 2
        answers.extend([httpx.ConnectError("refused")] * 3)  # the reconciling scans
        redeem = await handler.handle(REDEEM, TERMINAL)
        assert redeem.outcome is Outcome.INDETERMINATE
        assert redeem.upstream.attempts == 1
    finally:
        await client.aclose()
    assert len(seen) == 6
    assert seen[2].headers["cookie"] == "OCSESSID=abc"
    assert seen[2].content == b'{"voucher_codes":"12345678;12345679"}'


REDEEMED = Answer(
    200, {"success": 0, "message": "Voucher with code 12345678 has already been redeemed!"}, 1
)
REDEEMED_2 = Answer(
    200, {"success": 0, "message": "Voucher with code 12345679 has already been redeemed!"}, 1
)
HELD = Answer(200, {"success": 1, "price": "20.00", "message": "The voucher is valid"}, 1)


async def test_lost_redeem_answer_reconciled_as_redeemed_is_succeeded() -> None:
    handler, client, _ = handler_for(CallOutcomeUnknown("x"), REDEEMED, REDEEMED_2)
    result = await handler.handle(REDEEM, TERMINAL)
    assert (result.outcome, result.reason) == (Outcome.SUCCEEDED, None)
    assert [call[1] for call in client.calls] == [Route.REDEEM, Route.SCAN, Route.SCAN]


async def test_lost_redeem_answer_not_redeemed_yet_is_indeterminate_not_failed() -> None:
    # The shop may still be applying the redeem that timed out: no `failed` on one read.
    handler, client, _ = handler_for(CallOutcomeUnknown("x"), HELD, HELD)
    result = await handler.handle(REDEEM, TERMINAL)
    assert (result.outcome, result.reason) == (Outcome.INDETERMINATE, "upstream_unavailable")
    assert extras(result)["voucher_states"] == {
        "12345678": "not_redeemed",
        "12345679": "not_redeemed",
    }
    assert len(redeems(client)) == 1


async def test_not_redeemed_past_the_grace_is_failed() -> None:
    handler, client, _ = handler_for(HELD, HELD, HELD, HELD)
    handler._apply_grace_s = 120.0
    young = await handler.settle(REDEEM, indeterminate_of(REDEEM), SentCall(time.time() - 60))
    assert young is None  # still may be under way at the shop
    old = await handler.settle(
        REDEEM, indeterminate_of(REDEEM), SentCall(time.time() - 121, later=())
    )
    assert old is not None and (old.outcome, old.reason) == (
        Outcome.FAILED,
        "upstream_unavailable",
    )
    assert extras(old)["reconciled"] is True
    assert redeems(client) == []  # never sent again


async def test_settling_within_the_grace_reads_only_while_the_till_is_at_that_bill() -> None:
    # The till has moved on: a scan would lock the old vouchers into its newer bill; wait.
    handler, client, _ = handler_for(REDEEMED, REDEEMED_2)
    young = SentCall(time.time() - 5, later=(REDEEM,))  # any later command
    assert await handler.settle(REDEEM, indeterminate_of(REDEEM), young) is None
    assert client.calls == []
    # Still at the redeem's bill: the scans are read as they are (and nothing is removed).
    at_the_bill = SentCall(time.time() - 5, later=())
    settled = await handler.settle(REDEEM, indeterminate_of(REDEEM), at_the_bill)
    assert settled is not None and settled.outcome is Outcome.SUCCEEDED
    assert [route for _, route, _ in client.calls] == [Route.SCAN, Route.SCAN]


async def test_redeemed_vouchers_a_later_command_used_prove_nothing() -> None:
    # The cashier saw `indeterminate`, scanned the same vouchers into a new bill and redeemed
    # them with a new command: their being redeemed may be that command's doing.
    handler, _, _ = handler_for(REDEEMED, REDEEMED_2)
    rescanned = command("pos.scan", {"voucher_code": "12345678"}, id_="later")
    sent = SentCall(time.time() - 200, later=(rescanned,))
    assert await handler.settle(REDEEM, indeterminate_of(REDEEM), sent) is None
    # A later command of other vouchers does not cast doubt on these.
    handler, _, _ = handler_for(REDEEMED, REDEEMED_2)
    other = command("pos.scan", {"voucher_code": "55555555"}, id_="other")
    settled = await handler.settle(
        REDEEM, indeterminate_of(REDEEM), SentCall(time.time() - 200, later=(other,))
    )
    assert settled is not None and settled.outcome is Outcome.SUCCEEDED


async def test_settling_within_the_grace_never_removes_what_the_redeem_may_still_take() -> None:
    handler, client, _ = handler_for(HELD, HELD)
    at_the_bill = SentCall(time.time() - 5, later=())
    assert await handler.settle(REDEEM, indeterminate_of(REDEEM), at_the_bill) is None
    assert Route.REMOVE not in [route for _, route, _ in client.calls]


async def test_lost_redeem_answer_half_redeemed_stays_indeterminate() -> None:
    handler, _, _ = handler_for(CallOutcomeUnknown("x"), REDEEMED, HELD)
    result = await handler.handle(REDEEM, TERMINAL)
    assert result.outcome is Outcome.INDETERMINATE
    assert extras(result)["voucher_states"] == {"12345678": "redeemed", "12345679": "not_redeemed"}


async def test_recover_never_sends_the_redeem_again() -> None:
    handler, client, _ = handler_for(REDEEMED, REDEEMED_2)
    result = await handler.recover(REDEEM, TERMINAL, SentCall(time.time() - 5))
    assert result.outcome is Outcome.SUCCEEDED
    assert redeems(client) == []


# -- what a ledger books from (bill.py) ----------------------------------------------------------


async def test_a_redeem_result_carries_the_bill_as_the_till_ran_it() -> None:
    handler, _, _ = handler_for(
        Answer(200, {"success": 1, "bill_total": 120, "message": "Bill total has been updated"}, 5),
        SCANNED,
        Answer(200, {"success": 1, "price": "30.00", "message": "The voucher is valid"}, 5),
        OK,  # redeem
    )
    total = await handler.handle(
        command("pos.bill_total", {"bill_total": "120"}, id_="b-1"), TERMINAL
    )
    first = await handler.handle(
        command("pos.scan", {"voucher_code": "12345678"}, id_="s-1"), TERMINAL
    )
    second = await handler.handle(
        command("pos.scan", {"voucher_code": "12345679"}, id_="s-2"), TERMINAL
    )
    redeemed = await handler.handle(command(REDEEM.type, REDEEM.data, id_="r-1"), TERMINAL)
    bill_id = total.model_extra["bill_id"]  # type: ignore[index]
    assert bill_id.startswith("bill-")
    assert total.model_extra["store"] == "limassol-3"  # type: ignore[index]
    assert total.model_extra["terminal"] == TERMINAL  # type: ignore[index]
    assert [r.model_extra["remaining_due"] for r in (total, first, second)] == [  # type: ignore[index]
        "120.00",
        "70.00",
        "40.00",
    ]
    booked = redeemed.model_dump(mode="json")
    assert booked["outcome"] == "succeeded" and booked["bill_id"] == bill_id
    assert booked["vouchers"] == [
        {"code": "12345678", "amount": "50.00"},
        {"code": "12345679", "amount": "30.00"},
    ]
    assert (booked["vouchers_total"], booked["bill_total"], booked["remaining_due"]) == (
        "80.00",
        "120.00",
        "40.00",
    )


async def test_a_superseding_redeem_carries_what_the_first_result_did() -> None:
    previous = indeterminate_of(REDEEM).model_copy(
        update={"bill_id": "bill-x", "vouchers": [{"code": "12345678", "amount": "50.00"}]}
    )
    already = Answer(
        200, {"success": 0, "message": "Voucher with code 12345678 has already been redeemed!"}, 5
    )
    handler, _, _ = handler_for(already, already)
    settled = await handler.settle(REDEEM, previous, SentCall(0.0, None, later=()))
    assert settled is not None and settled.outcome is Outcome.SUCCEEDED
    extra = settled.model_extra or {}
    assert extra["bill_id"] == "bill-x" and extra["vouchers"][0]["amount"] == "50.00"
    assert extra["terminal"] == TERMINAL
