"""voucher_contracts: the CloudEvents Kafka binding, pos.* command data, result ids and hashes."""

from __future__ import annotations

import base64
import json
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from voucher_contracts import (
    CommandEnvelope,
    Outcome,
    ResultData,
    ResultEnvelope,
    UnusableRecord,
    content_hash,
    decode_command,
    encode_result,
    result_id,
    result_type,
)
from voucher_contracts.binding import decode_json, header_value
from voucher_contracts.envelope import STRUCTURED_CONTENT_TYPE
from voucher_contracts.pos import (
    MAX_BILL_TOTAL,
    POS_COMMAND_TYPES,
    BillTotal,
    Cancel,
    Redeem,
    Remove,
    Scan,
)

TERMINAL = "1st_floor_machine_1"
SOURCE = "/stores/limassol-3/pos/1st_floor_machine_1"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
CT = ("content-type", STRUCTURED_CONTENT_TYPE.encode())


def event(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "specversion": "1.0",
        "id": "cmd-1",
        "source": SOURCE,
        "type": "pos.bill_total",
        "subject": TERMINAL,
        "time": "2025-04-13T17:28:51Z",
        "datacontenttype": "application/json",
        "data": {"bill_total": "12.50"},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def structured(**overrides: Any) -> bytes:
    return json.dumps(event(**overrides)).encode()


def binary_headers(**overrides: str | None) -> list[tuple[str, bytes | None]]:
    attrs: dict[str, str | None] = {
        "specversion": "1.0",
        "id": "cmd-2",
        "source": SOURCE,
        "type": "pos.bill_total",
        "subject": TERMINAL,
        "time": "2025-04-13T17:28:51+03:00",
    }
    attrs.update(overrides)
    headers: list[tuple[str, bytes | None]] = [
        (f"ce_{k}", v.encode()) for k, v in attrs.items() if v is not None
    ]
    headers.append(("content-type", b"application/json"))
    return headers


def unusable(headers: list[tuple[str, bytes | None]], value: bytes | None, **kw: Any) -> str:
    with pytest.raises(UnusableRecord) as info:
        decode_command(headers, value, **kw)
    exc = info.value
    assert str(exc) == f"{exc.reason}: {exc.detail}"
    return exc.reason


# -- structured mode -------------------------------------------------------------------------


def test_structured_mode_reads_every_attribute() -> None:
    value = structured(
        traceparent=TRACEPARENT,
        tracestate="congo=t61rcWkgMzE",
        storeid="limassol-3",
        priority=5,
        urgent=True,
        dataschema="https://schemas.example.cy/pos/bill_total/1",
    )
    command = decode_command([CT], value)
    assert command.specversion == "1.0"
    assert command.id == "cmd-1"
    assert command.source == SOURCE
    assert command.type == "pos.bill_total"
    assert command.subject == TERMINAL
    assert command.time == datetime(2025, 4, 13, 17, 28, 51, tzinfo=UTC)
    assert command.datacontenttype == "application/json"
    assert command.data == {"bill_total": "12.50"}
    assert command.traceparent == TRACEPARENT
    assert command.tracestate == "congo=t61rcWkgMzE"
    assert command.dataschema == "https://schemas.example.cy/pos/bill_total/1"
    # Extension attributes are kept with their JSON types.
    assert command.extensions == {"storeid": "limassol-3", "priority": 5, "urgent": True}
    assert type(command.extensions["urgent"]) is bool
    assert command.idempotency_key == (SOURCE, "cmd-1")


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/cloudevents+json",
        b"application/cloudevents+json; charset=utf-8",
        b"Application/CloudEvents+JSON",
    ],
)
def test_structured_content_type_variants(content_type: bytes) -> None:
    command = decode_command([("Content-Type", content_type)], structured())
    assert command.id == "cmd-1"


def test_structured_content_type_wins_over_stray_ce_headers() -> None:
    headers = [CT, ("ce_id", b"from-header"), ("ce_specversion", b"0.3")]
    command = decode_command(headers, structured())
    assert command.id == "cmd-1"


def test_json_with_specversion_and_no_content_type_is_read_as_structured() -> None:
    command = decode_command([], structured())
    assert command.id == "cmd-1"
    command = decode_command([("other", b"x"), ("key", None)], structured())
    assert command.id == "cmd-1"


def test_structured_data_numbers_stay_exact_decimals() -> None:
    value = b"""{"specversion": "1.0", "id": "1", "source": "/s", "type": "pos.bill_total",
        "subject": "t", "data": {"a": 0.1, "b": 12.50, "c": 50, "d": [0.30, 1e2]}}"""
    data = decode_command([CT], value).data
    assert type(data["a"]) is Decimal and str(data["a"]) == "0.1"
    assert str(data["b"]) == "12.50"
    assert data["c"] == 50 and type(data["c"]) is int
    assert [str(x) for x in data["d"]] == ["0.30", "1E+2"]
    assert decode_json("0.1") == Decimal("0.1")


def test_structured_data_base64_is_decoded_as_json_with_decimals() -> None:
    payload = base64.b64encode(b'{"bill_total": 0.1}').decode()
    command = decode_command([CT], structured(data=None, data_base64=payload))
    assert command.data == {"bill_total": Decimal("0.1")}
    assert type(command.data["bill_total"]) is Decimal


def test_data_and_data_base64_both_are_refused() -> None:
    # JSON event format §3.1: `data_base64` MUST NOT be present when `data` is. Which one
    # did the sender mean?
    payload = base64.b64encode(b'{"bill_total": 1}').decode()
    assert unusable([CT], structured(data_base64=payload)) == "invalid_attribute"


def test_structured_without_data_has_none() -> None:
    command = decode_command([CT], structured(data=None, type="pos.cancel"))
    assert command.data is None


# -- binary mode -----------------------------------------------------------------------------


def test_binary_mode_reads_ce_headers_and_value_as_data() -> None:
    headers = binary_headers(traceparent=TRACEPARENT, storeid="limassol-3")
    command = decode_command(headers, b'{"bill_total": 12.50}')
    assert command.id == "cmd-2"
    assert command.source == SOURCE
    assert command.type == "pos.bill_total"
    assert command.subject == TERMINAL
    assert command.time is not None
    assert command.time.utcoffset() is not None
    assert command.time.astimezone(UTC) == datetime(2025, 4, 13, 14, 28, 51, tzinfo=UTC)
    assert command.datacontenttype == "application/json"
    assert command.data == {"bill_total": Decimal("12.50")}
    assert str(command.data["bill_total"]) == "12.50"
    assert command.traceparent == TRACEPARENT
    assert command.extensions == {"storeid": "limassol-3"}


def test_binary_header_names_are_case_insensitive() -> None:
    headers = [(k.upper(), v) for k, v in binary_headers()]
    command = decode_command(headers, b'{"bill_total": 0.1}')
    assert command.id == "cmd-2"
    assert command.data == {"bill_total": Decimal("0.1")}


def test_binary_without_content_type_decodes_json_value() -> None:
    headers = [h for h in binary_headers() if h[0] != "content-type"]
    command = decode_command(headers, b'{"voucher_code": "12345678"}')
    assert command.data == {"voucher_code": "12345678"}
    assert command.datacontenttype is None


def test_binary_without_value_has_no_data() -> None:
    command = decode_command(binary_headers(type="pos.cancel"), None)
    assert command.data is None
    command = decode_command(binary_headers(type="pos.cancel"), b"")
    assert command.data is None


def test_binary_none_valued_ce_header_is_ignored() -> None:
    headers = [*binary_headers(), ("ce_storeid", None)]
    assert decode_command(headers, b"{}").extensions == {}


# -- unusable records ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"not json", b"{", b"\xff\xfe\x00garbage", b"{'id': 1}"])
def test_not_json(value: bytes) -> None:
    assert unusable([CT], value) == "not_json"
    assert unusable([], value) == "not_json"


def test_binary_value_not_json() -> None:
    assert unusable(binary_headers(), b"{nope") == "not_json"


def test_binary_non_json_content_type_is_not_json() -> None:
    headers = [h for h in binary_headers() if h[0] != "content-type"]
    headers.append(("content-type", b"text/plain"))
    assert unusable(headers, b"12.50") == "not_json"


def test_data_base64_not_base64() -> None:
    assert unusable([CT], structured(data=None, data_base64="***")) == "not_json"
    not_json = base64.b64encode(b"hello").decode()
    assert unusable([CT], structured(data=None, data_base64=not_json)) == "not_json"


def test_data_base64_not_a_string_is_unusable() -> None:
    assert unusable([CT], structured(data=None, data_base64=12345)) == "not_json"


def test_deeply_nested_json_is_unusable() -> None:
    assert unusable([], b"[" * 100_000) == "too_deep"


@pytest.mark.parametrize("value", [None, b""])
def test_empty_value(value: bytes | None) -> None:
    assert unusable([], value) == "empty_value"
    assert unusable([CT], value) == "empty_value"


@pytest.mark.parametrize(
    "value",
    [b"[1, 2]", b'"text"', b"12.5", b"null", b'{"id": "1", "type": "pos.scan"}'],
)
def test_not_a_cloudevent(value: bytes) -> None:
    assert unusable([], value) == "not_a_cloudevent"


@pytest.mark.parametrize(
    ("overrides", "missing"),
    [
        ({"id": None}, ["id"]),
        ({"source": None}, ["source"]),
        ({"type": None}, ["type"]),
        ({"subject": None}, ["subject"]),
        ({"id": "   "}, ["id"]),
        ({"subject": ""}, ["subject"]),
        ({"id": None, "subject": None}, ["id", "subject"]),
    ],
)
def test_missing_attribute(overrides: dict[str, Any], missing: list[str]) -> None:
    with pytest.raises(UnusableRecord) as info:
        decode_command([CT], structured(**overrides))
    assert info.value.reason == "missing_attribute"
    for name in missing:
        assert name in info.value.detail


def test_missing_attribute_binary() -> None:
    assert unusable(binary_headers(subject=None), b"{}") == "missing_attribute"


@pytest.mark.parametrize("specversion", ["0.3", "2.0", "", None])
def test_unsupported_specversion_structured(specversion: str | None) -> None:
    value = json.dumps({**event(), "specversion": specversion}).encode()
    assert unusable([CT], value) == "unsupported_specversion"


def test_structured_without_specversion_is_not_a_cloudevent() -> None:
    assert unusable([CT], structured(specversion=None)) == "not_a_cloudevent"


@pytest.mark.parametrize("specversion", ["0.3", None])
def test_unsupported_specversion_binary(specversion: str | None) -> None:
    assert unusable(binary_headers(specversion=specversion), b"{}") == "unsupported_specversion"


def test_invalid_header_non_utf8_ce_header() -> None:
    headers = [*binary_headers(), ("ce_source", b"\xff\xfe/stores")]
    assert unusable(headers, b"{}") == "invalid_header"
    # Even next to a structured value: a ce_ header that is not text is refused.
    assert unusable([CT, ("ce_id", b"\xc3\x28")], structured()) == "invalid_header"


def test_non_utf8_content_type_header_is_ignored() -> None:
    assert header_value([("content-type", b"\xff")], "content-type") is None
    assert decode_command([("content-type", b"\xff")], structured()).id == "cmd-1"


def test_header_value_takes_the_last_text_value() -> None:
    headers = [("content-type", b"a"), ("Content-Type", b"b"), ("content-type", None)]
    assert header_value(headers, "content-type") == "b"
    assert header_value(headers, "missing") is None


def test_too_large() -> None:
    value = structured()
    assert unusable([CT], value, max_bytes=len(value) - 1) == "too_large"
    assert decode_command([CT], value, max_bytes=len(value)).id == "cmd-1"
    # Checked before anything else: even a value that is not JSON.
    assert unusable([], b"x" * 11, max_bytes=10) == "too_large"


@pytest.mark.parametrize("time", ["yesterday", "2025-13-01T00:00:00Z", "13/04/2025"])
def test_invalid_attribute_bad_time(time: str) -> None:
    assert unusable([CT], structured(time=time)) == "invalid_attribute"
    assert unusable(binary_headers(time=time), b"{}") == "invalid_attribute"


def test_invalid_attribute_bad_datacontenttype() -> None:
    assert unusable([CT], structured(datacontenttype=5)) == "invalid_attribute"


def test_unusable_record_carries_reason_and_detail() -> None:
    exc = UnusableRecord("too_large", "value is 11 bytes, limit 10")
    assert exc.reason == "too_large"
    assert exc.detail == "value is 11 bytes, limit 10"
    assert str(exc) == "too_large: value is 11 bytes, limit 10"


# -- pos.* command data ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("12.50", "12.50"),
        ("12.5", "12.50"),
        (Decimal("12.5"), "12.50"),
        (Decimal("0.1"), "0.10"),
        (12, "12.00"),
        (0, "0.00"),
        ("0", "0.00"),
        ("0.05", "0.05"),
        (MAX_BILL_TOTAL, "99999999.99"),
    ],
)
def test_bill_total_accepts(given: Any, expected: str) -> None:
    total = BillTotal.model_validate({"bill_total": given}).bill_total
    assert type(total) is Decimal
    assert str(total) == expected


@pytest.mark.parametrize(
    "given",
    [
        12.5,
        0.1,
        True,
        False,
        "-0.01",
        Decimal("-1"),
        -5,
        "12.345",
        Decimal("0.001"),
        "NaN",
        Decimal("NaN"),
        "Infinity",
        Decimal("-Infinity"),
        "abc",
        "",
        None,
        MAX_BILL_TOTAL + Decimal("0.01"),
        [12],
        # The strict grammar: no sign, exponent, separators, blanks, leading point, 3 places,
        # and only ASCII digits.
        "-0",
        "+50",
        "1_000",
        "1,000",
        ".5",
        "5.",
        " 12.5 ",
        "1e2",
        "12.340",
        "007",
        "\u0661\u0662",  # Arabic-Indic digits, which Decimal() itself takes
        "\uff11\uff12",  # full-width digits
        Decimal("1E+2"),
        Decimal("-0"),
        Decimal("12.340"),
        10**20,
    ],
)
def test_bill_total_rejects(given: Any) -> None:
    with pytest.raises(ValidationError) as info:
        BillTotal.model_validate({"bill_total": given})
    assert info.value.errors()[0]["loc"] == ("bill_total",)


def test_bill_total_float_error_says_why() -> None:
    with pytest.raises(ValidationError, match="not a float"):
        BillTotal.model_validate({"bill_total": 12.5})


def test_bill_total_from_decoded_json_number() -> None:
    data = decode_json(b'{"bill_total": 12.5, "ignored": true}')
    assert BillTotal.model_validate(data).bill_total == Decimal("12.50")


@pytest.mark.parametrize("model", [Scan, Remove])
@pytest.mark.parametrize("code", ["12345678", "ABC-def_09", "x" * 64])
def test_voucher_code_accepts(model: type[Scan] | type[Remove], code: str) -> None:
    assert model.model_validate({"voucher_code": code}).voucher_code == code


@pytest.mark.parametrize("model", [Scan, Remove])
@pytest.mark.parametrize(
    "code", ["1234;5678", "", "12 34", "x" * 65, 12345678, None, "code\n", "ΑΒΓ"]
)
def test_voucher_code_rejects(model: type[Scan] | type[Remove], code: Any) -> None:
    with pytest.raises(ValidationError):
        model.model_validate({"voucher_code": code})


def test_scan_needs_a_code() -> None:
    with pytest.raises(ValidationError):
        Scan.model_validate({})


def test_redeem() -> None:
    assert Redeem.model_validate({"voucher_codes": ["1", "2"]}).voucher_codes == ["1", "2"]
    bad_data: list[dict[str, Any]] = [
        {},
        {"voucher_codes": []},
        {"voucher_codes": ["1", "1"]},
        {"voucher_codes": ["1;2"]},
        {"voucher_codes": "1;2"},
        {"voucher_codes": [1]},
        {"voucher_codes": None},
    ]
    for bad in bad_data:
        with pytest.raises(ValidationError):
            Redeem.model_validate(bad)


def test_cancel_may_be_empty_or_absent() -> None:
    assert Cancel.model_validate({}).voucher_codes == []
    assert Cancel.model_validate({"voucher_codes": []}).voucher_codes == []
    assert Cancel.model_validate({"voucher_codes": ["1", "2"]}).voucher_codes == ["1", "2"]
    for bad in ({"voucher_codes": ["1", "1"]}, {"voucher_codes": ["a;b"]}):
        with pytest.raises(ValidationError):
            Cancel.model_validate(bad)


def test_unknown_fields_are_ignored_and_models_are_frozen() -> None:
    scan = Scan.model_validate({"voucher_code": "1", "future_field": 1})
    assert not hasattr(scan, "future_field")
    with pytest.raises(ValidationError):
        scan.voucher_code = "2"  # type: ignore[misc]


def test_pos_command_types() -> None:
    expected: dict[str, type[Any]] = {
        "pos.bill_total": BillTotal,
        "pos.scan": Scan,
        "pos.remove": Remove,
        "pos.redeem": Redeem,
        "pos.cancel": Cancel,
    }
    assert expected == POS_COMMAND_TYPES


# -- results: ids, hashes, encoding ----------------------------------------------------------


def test_result_id_is_stable_and_per_command() -> None:
    first = result_id(SOURCE, "cmd-1")
    assert first == result_id(SOURCE, "cmd-1")
    assert first == result_id(SOURCE, "cmd-1", 0)
    assert len(first) == 36
    assert result_id(SOURCE, "cmd-2") != first
    assert result_id("/other", "cmd-1") != first
    # The separator keeps ("a", "bc") and ("ab", "c") apart.
    assert result_id("a", "bc") != result_id("ab", "c")


def test_result_id_differs_per_revision() -> None:
    ids = {result_id(SOURCE, "cmd-1", revision) for revision in range(4)}
    assert len(ids) == 4
    assert result_id(SOURCE, "cmd-1", 1) == result_id(SOURCE, "cmd-1", 1)


def test_result_id_is_a_known_value() -> None:
    # Fixed namespace: every instance, every release derives the same id. Pinned so that a
    # change of namespace or of the name layout (which would break consumers' dedupe) shows.
    assert result_id("/s", "1") == "413f11fc-4271-5d3a-a07b-7b64db15d322"
    assert result_id("/s", "1", 1) == "9e651787-0d9d-5c84-ba62-eba7c525489d"


def command(data: Any, **overrides: Any) -> CommandEnvelope:
    fields: dict[str, Any] = {
        "id": "cmd-1",
        "source": SOURCE,
        "type": "pos.redeem",
        "subject": TERMINAL,
        "data": data,
    }
    fields.update(overrides)
    return CommandEnvelope(**fields)


def test_content_hash_ignores_key_order() -> None:
    a = command({"voucher_codes": ["1", "2"], "extra": {"x": 1, "y": Decimal("0.1")}})
    b = command({"extra": {"y": Decimal("0.1"), "x": 1}, "voucher_codes": ["1", "2"]})
    assert content_hash(a) == content_hash(b)
    # The envelope's id/source/time are not content.
    c = command(
        {"voucher_codes": ["1", "2"], "extra": {"y": Decimal("0.1"), "x": 1}},
        id="other",
        source="/other",
        time=datetime(2025, 1, 1, tzinfo=UTC),
    )
    assert content_hash(c) == content_hash(a)


def test_content_hash_differs_for_different_content() -> None:
    base = content_hash(command({"voucher_codes": ["1", "2"]}))
    assert content_hash(command({"voucher_codes": ["2", "1"]})) != base
    assert content_hash(command({"voucher_codes": ["1"]})) != base
    assert content_hash(command({"voucher_codes": ["1", "2"]}, type="pos.cancel")) != base
    assert content_hash(command({"voucher_codes": ["1", "2"]}, subject="other")) != base


def test_content_hash_same_for_both_bindings_and_any_key_order() -> None:
    a = decode_command(
        [CT],
        b'{"specversion": "1.0", "id": "1", "source": "/a", '
        b'"type": "pos.bill_total", "subject": "t", '
        b'"data": {"bill_total": 12.50, "z": 1}}',
    )
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"2"),
        ("ce_source", b"/b"),
        ("ce_type", b"pos.bill_total"),
        ("ce_subject", b"t"),
    ]
    b = decode_command(headers, b'{"z": 1, "bill_total": 12.50}')
    assert content_hash(a) == content_hash(b)
    assert len(content_hash(a)) == 64
    # Decimals hash by their exact text: 12.5 and 12.50 are different content.
    c = decode_command(headers, b'{"z": 1, "bill_total": 12.5}')
    assert content_hash(c) != content_hash(a)


def test_result_envelope_encoding() -> None:
    data = ResultData(
        command_id="cmd-1",
        command_source=SOURCE,
        command_type="pos.scan",
        outcome=Outcome.REJECTED,
        reason="voucher_expired",
        message="Voucher with code 12345678 expired on 30-11-2024.",
        voucher_code="12345678",
        expires_on=date(2024, 11, 30),
        amount=Decimal("50.00"),
    )
    envelope = ResultEnvelope(
        id=result_id(SOURCE, "cmd-1"),
        type=result_type("pos.scan"),
        subject=TERMINAL,
        time=datetime(2025, 4, 13, tzinfo=UTC),
        causationid="cmd-1",
        data=data,
    )
    decoded = json.loads(encode_result(envelope))
    assert decoded["specversion"] == "1.0"
    assert decoded["type"] == "pos.scan.result"
    assert decoded["source"] == "/services/voucher-bridge"
    assert decoded["datacontenttype"] == "application/json"
    assert decoded["causationid"] == "cmd-1"
    assert decoded["data"]["outcome"] == "rejected"
    assert decoded["data"]["expires_on"] == "2024-11-30"
    # Money is a decimal string, never a JSON float.
    assert decoded["data"]["amount"] == "50.00"
    # None fields are left out.
    assert "supersedes" not in decoded["data"]


# -- what cannot be carried further is refused at the door (issue 10) --------------------------


LONE_SURROGATE = b'"\\ud800"'


@pytest.mark.parametrize(
    "value",
    [
        # The reproducer: a lone surrogate escape anywhere in `data`.
        b'{"specversion":"1.0","id":"1","source":"/s","type":"pos.scan","subject":"till-1",'
        b'"data":{"voucher_code":"A1","x":"\\ud800"}}',
        structured(data={"voucher_code": "A1"}).replace(b'"A1"', LONE_SURROGATE),
        structured().replace(b'"cmd-1"', LONE_SURROGATE),  # in an attribute
        structured(data={"k": ["x"]}).replace(b'"x"', b'"\\udfff"'),
        structured(data={"k": 1}).replace(b'"k"', LONE_SURROGATE),  # in a member name
    ],
)
def test_a_lone_surrogate_is_not_json(value: bytes) -> None:
    assert unusable([CT], value) == "not_json"


def test_a_proper_surrogate_pair_is_fine() -> None:
    value = structured(data={"voucher_code": "A1", "x": "y"}).replace(b'"y"', b'"\\ud83d\\ude00"')
    assert decode_command([CT], value).data["x"] == "\U0001f600"


def test_a_lone_surrogate_in_binary_data_is_not_json() -> None:
    assert unusable(binary_headers(), b'{"voucher_code":"\\ud800"}') == "not_json"


@pytest.mark.parametrize("depth", [63, 64])
def test_nesting_up_to_the_limit_is_kept(depth: int) -> None:
    # `data` is level 2 of the event (the event object itself is level 1).
    data: Any = 1
    for _ in range(depth - 1):
        data = [data]
    decode_command([CT], structured(data=data))


@pytest.mark.parametrize("depth", [65, 254, 300, 5000])
def test_nesting_past_the_limit_is_too_deep(depth: int) -> None:
    nested = b"[" * (depth - 1) + b"1" + b"]" * (depth - 1)
    value = structured(data={"x": "PLACEHOLDER"}).replace(b'"PLACEHOLDER"', nested)
    assert unusable([CT], value) == "too_deep"
    assert unusable(binary_headers(), b'{"x":' + nested + b"}") == "too_deep"


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_not_json(constant: bytes) -> None:
    value = structured(data={"bill_total": "X"}).replace(b'"X"', constant)
    assert unusable([CT], value) == "not_json"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_json_in_another_encoding_than_utf8_is_not_json(encoding: str) -> None:
    assert unusable([CT], structured().decode().encode(encoding)) == "not_json"


def test_a_wide_object_is_checked_for_repeated_names_in_linear_time() -> None:
    import time

    members = ",".join(f'"k{n}":{n}' for n in range(80_000))  # about 1 MB
    value = f'{{"specversion":"1.0",{members},"k7":1}}'.encode()
    started = time.perf_counter()
    assert unusable([CT], value, max_bytes=len(value)) == "not_json"
    assert time.perf_counter() - started < 2  # a quadratic check took minutes


def test_upstream_answers_are_read_leniently() -> None:
    # What an upstream said is what it said: a repeated name keeps its last value, a lone
    # surrogate becomes U+FFFD, so the answer can be carried into a result.
    raw = b'{"success": 0, "success": 1, "message": "a\\ud800b"}'
    assert decode_json(raw, lenient=True) == {"success": 1, "message": "a\ufffdb"}
    with pytest.raises(ValueError):
        decode_json(raw)


def test_a_repeated_member_name_is_not_json() -> None:
    # Two parsers may keep different copies: which id or amount did the sender mean?
    value = structured().replace(b'"id": "cmd-1"', b'"id": "cmd-1", "id": "cmd-2"')
    assert unusable([CT], value) == "not_json"
    assert unusable(binary_headers(), b'{"bill_total":"1","bill_total":"2"}') == "not_json"


@pytest.mark.parametrize("name", ["id", "source", "type", "subject"])
@pytest.mark.parametrize("char", ["\x00", "\n", "\x1f", "\x7f", "\x85", "\x9f", "\ufffe", "\ufdd0"])
def test_attribute_strings_refuse_control_characters_and_noncharacters(
    name: str, char: str
) -> None:
    value = event()
    value[name] = f"a{char}b"
    assert unusable([CT], json.dumps(value).encode()) == "invalid_attribute"
    headers = [(k, v) for k, v in binary_headers() if k != f"ce_{name}"]
    headers.append((f"ce_{name}", f"a{char}b".encode()))
    assert unusable(headers, b'{"bill_total":"1"}') == "invalid_attribute"


def test_the_colliding_result_id_pairs_cannot_both_be_accepted() -> None:
    # Joined with NUL, (`/a\x00x`, `c9`) and (`/a`, `x\x00c9`) would name the same result id.
    assert result_id("/a\x00x", "c9") == result_id("/a", "x\x00c9")
    for source, id_ in [("/a\x00x", "c9"), ("/a", "x\x00c9")]:
        value = json.dumps(event(source=source, id=id_)).encode()
        assert unusable([CT], value) == "invalid_attribute"


def test_unrecorded_result_id_is_neither_the_result_id_nor_a_revision() -> None:
    from voucher_contracts.envelope import unrecorded_result_id

    unrecorded = unrecorded_result_id(SOURCE, "cmd-1")
    assert unrecorded == unrecorded_result_id(SOURCE, "cmd-1")
    assert unrecorded not in {result_id(SOURCE, "cmd-1", revision) for revision in range(5)}


@pytest.mark.parametrize("number", [7, 1.5, 0])
def test_a_non_string_id_is_an_invalid_attribute(number: float) -> None:
    assert unusable([CT], structured(id=number)) == "invalid_attribute"


@pytest.mark.parametrize(
    "source", ["/stores/limassol 3", "/stores/λεμεσός", "/a#b#c", "/a%zz", "/a\\b", "/a<b>"]
)
def test_source_must_be_a_uri_reference(source: str) -> None:
    assert unusable([CT], structured(source=source)) == "invalid_attribute"


@pytest.mark.parametrize(
    "source",
    [
        "/stores/limassol-3/pos/1st_floor_machine_1",
        "https://pos.example.cy/stores/3?till=1#x",
        "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66",
        "mailto:pos@example.cy",
        "/stores/lemes%CF%8C%CF%82",
        "till-1",
    ],
)
def test_source_uri_references_are_accepted(source: str) -> None:
    assert decode_command([CT], structured(source=source)).source == source


@pytest.mark.parametrize(
    ("time", "expected"),
    [
        ("2025-04-13T17:28:51Z", datetime(2025, 4, 13, 17, 28, 51, tzinfo=UTC)),
        ("2025-04-13t17:28:51z", datetime(2025, 4, 13, 17, 28, 51, tzinfo=UTC)),
        ("2025-04-13T17:28:51.123456789Z", datetime(2025, 4, 13, 17, 28, 51, 123456, UTC)),
        ("2025-04-13T20:28:51+03:00", datetime(2025, 4, 13, 17, 28, 51, tzinfo=UTC)),
        ("2025-04-13T17:28:51-00:00", datetime(2025, 4, 13, 17, 28, 51, tzinfo=UTC)),
        # A leap second: the first instant of the next second, as POSIX time counts it.
        ("2016-12-31T23:59:60Z", datetime(2017, 1, 1, tzinfo=UTC)),
        ("2016-12-31T23:59:60.5Z", datetime(2017, 1, 1, 0, 0, 0, 500000, UTC)),
        ("2016-12-31T15:59:60-08:00", datetime(2017, 1, 1, tzinfo=UTC)),
    ],
)
def test_time_accepts_rfc3339(time: str, expected: datetime) -> None:
    assert decode_command([CT], structured(time=time)).time == expected
    assert decode_command(binary_headers(time=time), b"{}").time == expected


@pytest.mark.parametrize(
    "time",
    [
        "2025-04-13T17:28:51",  # no offset
        "2025-04-13",  # a date only
        "2025-W15-7T17:28:51Z",  # an ISO week date
        "2025-04-13 17:28:51Z",  # a space for T
        "20250413T172851Z",  # ISO 8601 basic format
        "2025-04-13T17:28Z",  # no seconds
        "2025-04-13T17:28:61Z",
        "2025-04-13T24:00:00Z",
        "2025-02-30T00:00:00Z",
        "2025-04-13T17:28:51+24:00",
        "2025-04-13T17:28:51.Z",
        "2025-04-13T17:28:51+0300",
        "\u0662025-04-13T17:28:51Z",  # a non-ASCII digit
        "2016-12-31T12:30:60Z",  # a leap second only ends a UTC day
        "9999-12-31T23:59:60Z",  # past the last representable instant
    ],
)
def test_time_refuses_what_is_not_rfc3339(time: str) -> None:
    assert unusable([CT], structured(time=time)) == "invalid_attribute"
    assert unusable(binary_headers(time=time), b"{}") == "invalid_attribute"


@pytest.mark.parametrize("time", [1744565331, 1744565331.5, True, ["2025-04-13T17:28:51Z"]])
def test_a_time_that_is_not_a_string_is_refused_not_dropped(time: Any) -> None:
    value = json.dumps(event(time="X")).replace('"X"', json.dumps(time)).encode()
    assert unusable([CT], value) == "invalid_attribute"


def test_a_null_attribute_is_an_unset_one() -> None:
    value = json.dumps({**event(), "time": None, "tracestate": None, "storeid": None}).encode()
    command = decode_command([CT], value)
    assert command.time is None and command.tracestate is None and command.extensions == {}


@pytest.mark.parametrize(
    "extension",
    [{"nested": {"not": "an attribute"}}, {"list": [1]}, {"big": 2**31}, {"small": -(2**31) - 1}],
)
def test_extension_values_outside_the_type_system_are_refused(extension: dict[str, Any]) -> None:
    value = json.dumps({**event(), **extension}).encode()
    assert unusable([CT], value) == "invalid_attribute"


def test_a_decimal_extension_is_refused() -> None:
    assert unusable([CT], structured(weight=1.5)) == "invalid_attribute"


@pytest.mark.parametrize("name", ["storeId", "store_id", "store-id", "ünicode", ""])
def test_extension_names_must_be_lower_case_ascii_letters_and_digits(name: str) -> None:
    value = json.dumps({**event(), name: "x"}).encode()
    assert unusable([CT], value) == "invalid_attribute"


def test_binary_extensions_are_kept_as_their_header_text() -> None:
    command = decode_command([*binary_headers(), ("ce_priority", b"5")], b"{}")
    assert command.extensions == {"priority": "5"}


def test_integer_extension_bounds_are_kept() -> None:
    command = decode_command([CT], structured(low=-(2**31), high=2**31 - 1))
    assert command.extensions == {"low": -(2**31), "high": 2**31 - 1}


@pytest.mark.parametrize("dataschema", ["/relative/schema", "not a uri", "", 5])
def test_dataschema_must_be_an_absolute_uri(dataschema: Any) -> None:
    value = json.dumps({**event(), "dataschema": dataschema}).encode()
    assert unusable([CT], value) in {"invalid_attribute", "missing_attribute"}


def test_dataschema_is_kept_in_both_bindings_and_through_the_store() -> None:
    schema = "https://schemas.example.cy/pos/scan/1"
    structured_command = decode_command([CT], structured(dataschema=schema))
    binary_command = decode_command(binary_headers(dataschema=schema), b"{}")
    assert structured_command.dataschema == binary_command.dataschema == schema
    again = CommandEnvelope.model_validate_json(structured_command.model_dump_json())
    assert again == structured_command


def test_typed_extensions_survive_the_stores_round_trip() -> None:
    command = decode_command([CT], structured(urgent=True, priority=1, note="1"))
    again = CommandEnvelope.model_validate_json(command.model_dump_json())
    assert again.extensions == {"urgent": True, "priority": 1, "note": "1"}
    assert type(again.extensions["urgent"]) is bool and type(again.extensions["priority"]) is int


@pytest.mark.parametrize("specversion", [1.0, 1])
def test_a_numeric_specversion_is_unsupported(specversion: float) -> None:
    value = json.dumps({**event(), "specversion": specversion}).encode()
    assert unusable([CT], value) == "unsupported_specversion"


# -- coupon amounts and ids: the same strict grammar ---------------------------------------------


def _coupon(model: str, **data: Any) -> Any:
    from voucher_contracts.coupon import COUPON_COMMAND_TYPES

    return COUPON_COMMAND_TYPES[model].model_validate(data)


CREATE = {
    "wallet_type": "wallet1",
    "number_of_pins": "2",
    "transferable": True,
    "reusable": False,
    "token_field": "t",
    "token_checksum_field": "c",
    "form_key": "k",
}


@pytest.mark.parametrize("amount", ["5.000", "-0", "+5", "1_000", ".5", "\u0665", "1e2", " 5"])
def test_share_amount_follows_the_strict_grammar(amount: str) -> None:
    with pytest.raises(ValidationError):
        _coupon("coupon.share", email="a@example.cy", epin="1", share_amount=amount)


@pytest.mark.parametrize(
    "amount", [Decimal("1E+2"), Decimal("5.000"), "1e2", "25.5.0", 0, "0", "0.00"]
)
def test_epin_amount_follows_the_strict_grammar(amount: Any) -> None:
    with pytest.raises(ValidationError):
        _coupon("coupon.create", epin_amount=amount, **CREATE)


@pytest.mark.parametrize(
    ("given", "sent"),
    [("25", "25"), ("25.00", "25"), (25, "25"), (Decimal("25.0"), "25"), ("5.5", "5.50")],
)
def test_amounts_go_upstream_normalised(given: Any, sent: str) -> None:
    from voucher_bridge.epin.decisions import request_for

    create = request_for(_coupon("coupon.create", epin_amount=given, **CREATE))
    assert create.form is not None and create.form["epin_amount"] == sent
    share = request_for(_coupon("coupon.share", email="a@example.cy", epin="1", share_amount=given))
    assert share.form is not None and share.form["share_amount"] == sent


@pytest.mark.parametrize("epin", [Decimal("1E+2"), Decimal("10.5"), "10\x00", "1\n2", 1.5, True])
def test_coupon_ids_are_text_or_integers_without_control_characters(epin: Any) -> None:
    with pytest.raises(ValidationError):
        _coupon("coupon.delete", epin=epin)
    assert _coupon("coupon.delete", epin=1001).epin == "1001"
