"""The Kafka protocol binding of CloudEvents 1.0, both modes, for commands and results.

Structured mode: the whole event is the record's value (`content-type:
application/cloudevents+json`). Binary mode: attributes are `ce_*` headers, the value is `data`.
A JSON value carrying `specversion` with neither marker is read as structured too, so that a
command typed by hand into a console producer still counts.

Decoding refuses at the door whatever could not be carried further: stored, hashed, serialised
again or sent upstream. A record that gets past `decode_command` can always be answered.
- JSON: numbers stay exact (Decimal, never float); `NaN`/`Infinity`, duplicate member names
  and strings that are not Unicode (a lone surrogate escape such as "\\ud800") are not JSON
  one can pass on (RFC 8259 §4, §8.2); nesting deeper than `MAX_JSON_DEPTH` is refused.
- Attributes: the CloudEvents type system (spec §"Type System"): names of lower-case ASCII
  letters and digits; String values without control characters, surrogates or noncharacters
  (which also keeps `source` and `id` free of the NUL that joins them into a result id);
  `source` a URI-reference, `dataschema` a URI, `time` an RFC 3339 timestamp; extension values
  Boolean, Integer (32-bit) or String, kept with their JSON types; a JSON `null` is an
  attribute left unset (JSON format §2.2).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from voucher_contracts.envelope import (
    SPEC_VERSION,
    STRUCTURED_CONTENT_TYPE,
    CommandEnvelope,
    ResultEnvelope,
)

Headers = Sequence[tuple[str, bytes | None]]

# Deeper than any command or upstream answer needs, well inside what pydantic's serialiser and
# Python's recursion limit take.
MAX_JSON_DEPTH = 64

_REQUIRED = ("id", "source", "type", "subject")
_STRING_ATTRIBUTES = ("id", "type", "subject", "datacontenttype", "traceparent", "tracestate")
_KNOWN = {
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "data_base64",
    "traceparent",
    "tracestate",
}
_INT32 = range(-(2**31), 2**31)
_NAME = re.compile(r"[a-z0-9]+")
# What a CloudEvents String may not hold: C0 and C1 controls, surrogates, noncharacters.
_NOT_IN_STRING = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(f"{chr(plane << 16 | 0xFFFE)}{chr(plane << 16 | 0xFFFF)}" for plane in range(17))
    + "]"
)
_SURROGATE = re.compile("[\ud800-\udfff]")
# RFC 3986: the characters of a URI-reference (unreserved, reserved, percent-encoded octets).
_URI_REFERENCE = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
# RFC 3339 §5.6 date-time: `T`/`t`, `Z`/`z`, a second of 60 (a leap second), any fraction.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,  # \d is [0-9] only
)


class UnusableRecord(Exception):
    """A record that is not a usable command: it goes to the dead-letter topic with `reason`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class JsonTooDeep(ValueError):
    """JSON nested deeper than `MAX_JSON_DEPTH`."""


def decode_json(raw: bytes | str, *, lenient: bool = False) -> Any:
    """JSON with every non-integer number kept as an exact Decimal, and nothing in it that could
    not be written out again: raises ValueError for anything that is not such JSON (not JSON,
    not UTF-8, `NaN`, a repeated member name, a lone surrogate, nesting past `MAX_JSON_DEPTH`).

    `lenient`, for what an upstream answered (its body is what it is, and may say a change was
    made): a repeated name keeps its last value, a byte-order mark is skipped, and a lone
    surrogate is read as U+FFFD, so that the answer can still be carried into a result.
    """
    if isinstance(raw, bytes | bytearray):
        # UTF-8 only (RFC 8259 §8.1): json.loads would guess UTF-16 or UTF-32 from bytes.
        raw = bytes(raw).decode("utf-8-sig" if lenient else "utf-8")
    try:
        value = json.loads(
            raw,
            parse_float=Decimal,
            parse_constant=_no_constant,
            object_pairs_hook=None if lenient else _object,
        )
    except RecursionError as exc:
        raise JsonTooDeep(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from exc
    if not _check_carriable(value):
        if not lenient:
            raise ValueError("a string holds a lone surrogate escape, which is not Unicode")
        value = _with_replacement_characters(value)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"member {name[:40]!r} appears more than once")
            seen.add(name)
    return value


def _check_carriable(value: Any) -> bool:
    """Raises JsonTooDeep past the depth bound; False when a string is not Unicode (holds a
    lone surrogate). Iterative, so that the bound and not the interpreter's stack decides."""
    unicode = True
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            unicode = unicode and _is_unicode(item)
        elif isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise JsonTooDeep(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(item, dict):
                for name, member in item.items():
                    unicode = unicode and _is_unicode(name)
                    pending.append((member, depth + 1))
            else:
                pending.extend((member, depth + 1) for member in item)
    return unicode


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _with_replacement_characters(value: Any) -> Any:
    # Depth is bounded already (`_check_carriable` passed that test), so recursion is safe.
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_with_replacement_characters(item) for item in value]
    if isinstance(value, dict):
        return {
            _with_replacement_characters(k): _with_replacement_characters(v)
            for k, v in value.items()
        }
    return value


def header_value(headers: Headers, name: str) -> str | None:
    """The last header of that name, decoded as UTF-8; None when absent or not text."""
    found: str | None = None
    for key, value in headers:
        if key.lower() == name and value is not None:
            try:
                found = value.decode("utf-8")
            except UnicodeDecodeError:
                found = None
    return found


def decode_command(
    headers: Headers, value: bytes | None, *, max_bytes: int = 1_048_576
) -> CommandEnvelope:
    """Read a command from a Kafka record, or raise UnusableRecord saying why not."""
    if value is not None and len(value) > max_bytes:
        raise UnusableRecord("too_large", f"value is {len(value)} bytes, limit {max_bytes}")
    content_type = (header_value(headers, "content-type") or "").lower()
    ce_headers = _ce_headers(headers)
    if content_type.startswith(STRUCTURED_CONTENT_TYPE) or not ce_headers:
        attributes = _structured_attributes(value)
    else:
        attributes = _binary_attributes(ce_headers, content_type, value)
    return _envelope(attributes)


def _json(raw: bytes | str, what: str) -> Any:
    try:
        return decode_json(raw)
    except JsonTooDeep as exc:
        raise UnusableRecord("too_deep", f"{what}: {exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnusableRecord("not_json", f"{what} is not JSON: {exc}") from exc


def _ce_headers(headers: Headers) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, raw in headers:
        name = key.lower()
        if not name.startswith("ce_") or raw is None:
            continue
        try:
            found[name[3:]] = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnusableRecord("invalid_header", f"header {key} is not UTF-8") from exc
    return found


def _structured_attributes(value: bytes | None) -> dict[str, Any]:
    if not value:
        raise UnusableRecord("empty_value", "the record has no value and no ce_ headers")
    event = _json(value, "value")
    if not isinstance(event, dict):
        raise UnusableRecord("not_a_cloudevent", "value is JSON but not an object")
    if "specversion" not in event:
        raise UnusableRecord("not_a_cloudevent", "no specversion attribute")
    # A JSON null is an attribute left unset (JSON event format §2.2).
    event = {name: v for name, v in event.items() if v is not None}
    if "data_base64" in event and "data" in event:
        raise UnusableRecord("invalid_attribute", "data and data_base64 are both present")
    if "data_base64" in event:
        if not isinstance(event["data_base64"], str):
            raise UnusableRecord("not_json", "data_base64 is not a string")
        try:
            raw = base64.b64decode(event.pop("data_base64"), validate=True)
        except ValueError as exc:
            raise UnusableRecord("not_json", f"data_base64 is not base64: {exc}") from exc
        event["data"] = _json(raw, "data_base64")
    return event


def _binary_attributes(
    ce_headers: dict[str, str], content_type: str, value: bytes | None
) -> dict[str, Any]:
    attributes: dict[str, Any] = dict(ce_headers)
    if content_type:
        attributes["datacontenttype"] = content_type
    if value:
        if content_type and "json" not in content_type:
            raise UnusableRecord("not_json", f"data content type {content_type!r} is not JSON")
        attributes["data"] = _json(value, "data")
    return attributes


def _envelope(attributes: dict[str, Any]) -> CommandEnvelope:
    specversion = attributes.get("specversion")
    if specversion != SPEC_VERSION:
        raise UnusableRecord("unsupported_specversion", f"specversion {specversion!r} is not 1.0")
    missing = [name for name in _REQUIRED if _is_blank(attributes.get(name))]
    if missing:
        raise UnusableRecord("missing_attribute", "missing or empty: " + ", ".join(missing))
    for name in attributes:
        if name != "data_base64" and not _NAME.fullmatch(name):
            raise _invalid(name, "is not an attribute name (lower-case ASCII letters and digits)")
    for name in _STRING_ATTRIBUTES:
        if name in attributes:
            _string(name, attributes[name])
    source = _string("source", attributes["source"])
    if not _URI_REFERENCE.fullmatch(source) or source.count("#") > 1:
        raise _invalid("source", "is not a URI-reference (RFC 3986)")
    dataschema = attributes.get("dataschema")
    if dataschema is not None:
        dataschema = _string("dataschema", dataschema)
        if not (_SCHEME.match(dataschema) and _URI_REFERENCE.fullmatch(dataschema)):
            raise _invalid("dataschema", "is not an absolute URI (RFC 3986)")
    time = attributes.get("time")
    extensions = {name: _extension(name, v) for name, v in attributes.items() if name not in _KNOWN}
    try:
        return CommandEnvelope(
            id=attributes["id"],
            source=source,
            type=attributes["type"],
            subject=attributes["subject"],
            time=None if time is None else parse_timestamp(_string("time", time)),
            datacontenttype=attributes.get("datacontenttype"),
            dataschema=dataschema,
            data=attributes.get("data"),
            traceparent=attributes.get("traceparent") or None,
            tracestate=attributes.get("tracestate") or None,
            extensions=extensions,
        )
    except ValueError as exc:  # ValidationError is one
        message = str(exc) if not isinstance(exc, ValidationError) else str(exc).splitlines()[0]
        raise UnusableRecord("invalid_attribute", message) from exc


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 date-time (§5.6), as an aware datetime. A leap second (`:60`) is the
    first instant of the next second, as POSIX time counts it."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise _invalid("time", "is not an RFC 3339 timestamp")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, zulu, sign, offset_h, offset_m = match.groups()[6:]
    if second > 60 or int(offset_h or 0) > 23 or int(offset_m or 0) > 59:
        raise _invalid("time", "is not an RFC 3339 timestamp")
    offset = timedelta(hours=int(offset_h or 0), minutes=int(offset_m or 0))
    zone = UTC if zulu else timezone(-offset if sign == "-" else offset)
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        moment = datetime(year, month, day, hour, minute, min(second, 59), micros, zone)
        if second != 60:
            return moment
        utc = moment.astimezone(UTC)
        if (utc.hour, utc.minute) != (23, 59):  # a leap second ends a UTC day
            raise ValueError("a leap second is 23:59:60 UTC")
        return moment + timedelta(seconds=1)
    except (ValueError, OverflowError) as exc:
        raise _invalid("time", f"is not a valid date-time ({exc})") from exc


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _invalid(name, "must be a string")
    bad = _NOT_IN_STRING.search(value)
    if bad is not None:
        raise _invalid(name, f"holds U+{ord(bad.group()):04X}, which a CloudEvents String may not")
    return value


def _extension(name: str, value: Any) -> str | int | bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if value not in _INT32:
            raise _invalid(name, "is an Integer outside the 32-bit range")
        return value
    if isinstance(value, str):
        return _string(name, value)
    raise _invalid(name, "must be a Boolean, an Integer or a String")


def _invalid(name: str, problem: str) -> UnusableRecord:
    return UnusableRecord("invalid_attribute", f"{name} {problem}")


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def encode_result(result: ResultEnvelope, max_bytes: int | None = None) -> bytes:
    """A result event's record value (structured mode; content-type header is the caller's),
    at most `max_bytes` long when given (see `fit_result`)."""
    return fit_result(result, max_bytes)[0]


def fit_result(result: ResultEnvelope, max_bytes: int | None) -> tuple[bytes, bool]:
    """The record value, and whether it was cut: a result longer than `max_bytes` keeps the
    first items of its lists, as many as fit, with `truncated: true`; failing that, it is
    `compact_result`."""
    value = result.model_dump_json(exclude_none=True).encode()
    if max_bytes is None or len(value) <= max_bytes:
        return value, False
    extras = result.data.model_extra or {}
    lists = {name: v for name, v in extras.items() if isinstance(v, list) and v}
    fitting: bytes | None = None
    low, high = 0, max((len(v) for v in lists.values()), default=0) - 1
    while low <= high:  # the most items per list that fit
        keep = (low + high) // 2
        data = result.data.model_copy(
            update={**{name: v[:keep] for name, v in lists.items()}, "truncated": True}
        )
        candidate = result.model_copy(update={"data": data}).model_dump_json(exclude_none=True)
        if len(candidate.encode()) <= max_bytes:
            fitting, low = candidate.encode(), keep + 1
        else:
            high = keep - 1
    return (fitting if fitting is not None else compact_result(result)), True


# A message is the upstream's own text; a compact result keeps the start of it.
_COMPACT_MESSAGE_CHARS = 500


def compact_result(result: ResultEnvelope) -> bytes:
    """The result with only the fields every result has (no per-type fields), `truncated:
    true`: a few hundred bytes, whatever the upstream answered."""
    data = result.data
    fields = {name: getattr(data, name) for name in type(data).model_fields}
    if data.message is not None:
        fields["message"] = data.message[:_COMPACT_MESSAGE_CHARS]
    compact = type(data).model_validate({**fields, "truncated": True})
    return result.model_copy(update={"data": compact}).model_dump_json(exclude_none=True).encode()


RESULT_CONTENT_TYPE = STRUCTURED_CONTENT_TYPE
