"""The Kafka protocol binding of CloudEvents 1.0, both modes, for commands and results.

Structured mode: the whole event is the record's value (`content-type:
application/cloudevents+json`). Binary mode: attributes are `ce_*` headers, the value is `data`.
A JSON value carrying `specversion` with neither marker is read as structured too, so that a
command typed by hand into a console producer still counts.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import datetime
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

_REQUIRED = ("id", "source", "type", "subject")
_KNOWN = {
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "data",
    "data_base64",
    "traceparent",
    "tracestate",
    "dataschema",
}


class UnusableRecord(Exception):
    """A record that is not a usable command: it goes to the dead-letter topic with `reason`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_json(raw: bytes | str) -> Any:
    """JSON with every non-integer number kept as an exact Decimal.

    Raises ValueError for anything that is not JSON, including nesting too deep to decode.
    """
    try:
        return json.loads(raw, parse_float=Decimal)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


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
    try:
        event = decode_json(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnusableRecord("not_json", f"value is not JSON: {exc}") from exc
    if not isinstance(event, dict):
        raise UnusableRecord("not_a_cloudevent", "value is JSON but not an object")
    if "specversion" not in event:
        raise UnusableRecord("not_a_cloudevent", "no specversion attribute")
    if "data_base64" in event and "data" not in event:
        if not isinstance(event["data_base64"], str):
            raise UnusableRecord("not_json", "data_base64 is not a string")
        try:
            event["data"] = decode_json(base64.b64decode(event.pop("data_base64"), validate=True))
        except (ValueError, UnicodeDecodeError) as exc:
            raise UnusableRecord("not_json", f"data_base64 is not base64 JSON: {exc}") from exc
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
        try:
            attributes["data"] = decode_json(value)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UnusableRecord("not_json", f"data is not JSON: {exc}") from exc
    return attributes


def _envelope(attributes: dict[str, Any]) -> CommandEnvelope:
    if str(attributes.get("specversion")) != SPEC_VERSION:
        raise UnusableRecord(
            "unsupported_specversion", f"specversion {attributes.get('specversion')!r} is not 1.0"
        )
    missing = [name for name in _REQUIRED if not _is_text(attributes.get(name))]
    if missing:
        raise UnusableRecord("missing_attribute", "missing or empty: " + ", ".join(missing))
    extensions = {
        k: str(v) for k, v in attributes.items() if k not in _KNOWN and isinstance(v, str | int)
    }
    time = attributes.get("time")
    try:
        return CommandEnvelope(
            id=attributes["id"],
            source=attributes["source"],
            type=attributes["type"],
            subject=attributes["subject"],
            time=datetime.fromisoformat(time) if isinstance(time, str) else None,
            datacontenttype=attributes.get("datacontenttype"),
            data=attributes.get("data"),
            traceparent=_text_or_none(attributes.get("traceparent")),
            tracestate=_text_or_none(attributes.get("tracestate")),
            extensions=extensions,
        )
    except (ValueError, ValidationError) as exc:
        raise UnusableRecord("invalid_attribute", str(exc).splitlines()[0]) from exc


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def encode_result(result: ResultEnvelope) -> bytes:
    """A result event's record value (structured mode; content-type header is the caller's)."""
    return result.model_dump_json(exclude_none=True).encode()


RESULT_CONTENT_TYPE = STRUCTURED_CONTENT_TYPE
