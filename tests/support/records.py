"""Hypothesis strategies for Kafka records a command topic may carry: valid commands in both
bindings, the same mutated field by field, JSON that is hard to carry further, and arbitrary
bytes and headers. Used by the unit property test of decoding and by the property test that
drives the real pipeline on the real broker."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

Headers = list[tuple[str, bytes]]

CT_STRUCTURED = ("content-type", b"application/cloudevents+json")
CT_JSON = ("content-type", b"application/json")

POS_DATA: dict[str, dict[str, Any]] = {
    "pos.bill_total": {"bill_total": "12.50"},
    "pos.scan": {"voucher_code": "12345678"},
    "pos.remove": {"voucher_code": "12345678"},
    "pos.redeem": {"voucher_codes": ["12345678"]},
    "pos.cancel": {"voucher_codes": []},
}

# JSON text that decodes (or nearly does) but is hard to carry further: each is dropped into
# an otherwise valid command, in place of one value.
NASTY_FRAGMENTS = [
    '"\\ud800"',  # a lone surrogate escape
    '"\\udfff\\ud800"',
    '"a\\u0000b"',  # NUL (fine in data, refused in an attribute)
    '"\\u0085\\u009f"',  # C1 controls
    '"\\uffff"',  # a noncharacter
    "[" * 254 + "1" + "]" * 254,  # nested deeper than anything can serialise again
    "[" * 64 + "1" + "]" * 64,
    '{"a":' * 100 + "1" + "}" * 100,
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",  # a Decimal that is not a float
    "-0",
    "-0.0",
    "1" * 5000,  # more digits than Python's int() takes by default
    "1E+2",
    "0.000000000000000000000000000001",
    '{"k":1,"k":2}',  # a repeated member name
    '"' + "x" * 200_000 + '"',
    "true",
    "null",
    "[]",
    "{}",
]


@dataclass(frozen=True)
class GeneratedRecord:
    """A record to produce: its value and headers (the key is the test's)."""

    value: bytes | None
    headers: Headers
    why: str  # what was generated, for the failure report


def json_values() -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.text(max_size=20)
        | st.sampled_from(["12.50", "-0", "+5", "1_000", ".5", "1e2", "5.000", "\u0661"])
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=8), children, max_size=3)
        ),
        max_leaves=8,
    )


def valid_event(subject: str, type_: str, command_id: str | None = None) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": command_id or uuid.uuid4().hex,
        "source": f"/stores/property/pos/{subject}",
        "type": type_,
        "subject": subject,
        # Now: a command older than the store's retention would be refused unsent.
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
        "data": dict(POS_DATA[type_]),
    }


def encode(event: dict[str, Any], binary: bool) -> tuple[bytes | None, Headers]:
    if not binary:
        return json.dumps(event).encode(), [CT_STRUCTURED]
    headers: Headers = [
        (f"ce_{name}", value.encode() if isinstance(value, str) else json.dumps(value).encode())
        for name, value in event.items()
        if name not in ("data", "datacontenttype") and value is not None
    ]
    headers.append(CT_JSON)
    data = event.get("data")
    return (None if data is None else json.dumps(data).encode()), headers


@st.composite
def mutated_commands(draw: st.DrawFn, subject: str) -> GeneratedRecord:
    """A valid command with one of its fields (an attribute or a data field) changed."""
    type_ = draw(st.sampled_from(sorted(POS_DATA)))
    event = valid_event(subject, type_)
    binary = draw(st.booleans())
    fields = [*event, *(f"data.{k}" for k in event["data"]), "newattribute", "data.extra"]
    where = draw(st.sampled_from(fields))
    how = draw(st.sampled_from(["replace", "delete", "text"]))
    target, name = (event["data"], where[5:]) if where.startswith("data.") else (event, where)
    if how == "delete":
        target.pop(name, None)
    elif how == "text":
        target[name] = draw(st.text(max_size=30))
    else:
        target[name] = draw(json_values())
    try:
        value, headers = encode(event, binary)
    except (TypeError, ValueError):
        value, headers = encode(valid_event(subject, type_), binary)
    return GeneratedRecord(
        value, headers, f"{type_} with {where} {how}d ({'binary' if binary else 'structured'})"
    )


@st.composite
def nasty_json_commands(draw: st.DrawFn, subject: str) -> GeneratedRecord:
    """A structured command with one value replaced by JSON that is hard to carry further."""
    type_ = draw(st.sampled_from(sorted(POS_DATA)))
    event = valid_event(subject, type_)
    where = draw(st.sampled_from(["id", "source", "time", "subject", "extension", "data", "field"]))
    fragment = draw(st.sampled_from(NASTY_FRAGMENTS))
    marker = "\u2603MARKER\u2603"
    if where == "data":
        event["data"] = marker
    elif where == "field":
        event["data"] = {**event["data"], "x": marker}
    elif where == "extension":
        event["storeid"] = marker
    else:
        event[where] = marker
    value = json.dumps(event).replace(json.dumps(marker), fragment).encode()
    return GeneratedRecord(value, [CT_STRUCTURED], f"{type_} with {where} = {fragment[:30]}")


def arbitrary_records() -> st.SearchStrategy[GeneratedRecord]:
    header_values = st.binary(max_size=40) | st.sampled_from(
        [b"application/cloudevents+json", b"application/json", b"1.0", b"\xff\xfe"]
    )
    headers = st.lists(
        st.tuples(
            st.sampled_from(["content-type", "ce_id", "ce_type", "ce_specversion", "x"])
            | st.text(max_size=10),
            header_values,
        ),
        max_size=4,
    )
    values = st.none() | st.binary(max_size=200) | st.text(max_size=100).map(str.encode)
    return st.builds(lambda v, h: GeneratedRecord(v, h, "arbitrary bytes"), values, headers)


def any_record(subject: str) -> st.SearchStrategy[GeneratedRecord]:
    return (
        mutated_commands(subject)
        | nasty_json_commands(subject)
        | arbitrary_records()
        | st.sampled_from(reproducers(subject))
    )


def reproducers(subject: str) -> list[GeneratedRecord]:
    """The records issue 10 found leaving a record retried for ever, and their kin."""
    lone_surrogate = (
        '{"specversion":"1.0","id":"ID","source":"/s","type":"pos.scan","subject":"SUBJECT",'
        '"data":{"voucher_code":"A1","x":"\\ud800"}}'
    )
    deep = "[" * 260 + "]" * 260
    records = [
        GeneratedRecord(lone_surrogate.encode(), [CT_STRUCTURED], "lone surrogate in data"),
        GeneratedRecord(
            json.dumps(valid_event("SUBJECT", "pos.scan")).replace('"12345678"', deep).encode(),
            [CT_STRUCTURED],
            "data nested 260 deep",
        ),
    ]
    for source, command_id in [("/a\x00x", "c9"), ("/a", "x\x00c9")]:
        event = {**valid_event("SUBJECT", "pos.scan"), "source": source, "id": command_id}
        records.append(
            GeneratedRecord(json.dumps(event).encode(), [CT_STRUCTURED], "NUL in source or id")
        )
    return [
        GeneratedRecord(
            r.value.replace(b"SUBJECT", subject.encode()).replace(
                b'"ID"', json.dumps(uuid.uuid4().hex).encode()
            )
            if r.value
            else r.value,
            r.headers,
            r.why,
        )
        for r in records
    ]
