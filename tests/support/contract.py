"""Holding records to the contract: JSON Schema validation as the JSON Schema spec reads it, and
the service's own verdict on a command record, so that tests can compare the two."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.protocols import Validator
from pydantic import BaseModel
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from voucher_bridge.results import precheck
from voucher_contracts import UnusableRecord, decode_command
from voucher_contracts.binding import decode_json

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "contracts" / "asyncapi.json"
SCHEMAS = ROOT / "contracts" / "schemas"
DOCUMENT_URI = "urn:voucher-bridge:asyncapi"

Headers = Sequence[tuple[str, bytes | None]]


@functools.lru_cache(maxsize=512)
def _ecma(pattern: str) -> re.Pattern[str]:
    """An ECMA-262 pattern as Python reads it: `$` (outside a class) is the end of the string.
    Python's `$` also matches before a final newline, so `^[0-9]+$` would take "12\\n", which
    no ECMA validator (nor the service) takes."""
    out, in_class, escaped = [], False, False
    for char in pattern:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            out.append(char)
            escaped = True
        elif char == "[":
            in_class = True
            out.append(char)
        elif char == "]":
            in_class = False
            out.append(char)
        elif char == "$" and not in_class:
            out.append(r"\Z")
        else:
            out.append(char)
    return re.compile("".join(out))


def _pattern(
    validator: Validator, pattern: str, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _ecma(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


# Draft 2020-12, with `pattern` read as ECMA-262 (the spec's dialect) rather than Python's.
EcmaValidator = validators.extend(Draft202012Validator, {"pattern": _pattern})


def validator(schema: Mapping[str, Any]) -> Validator:
    """A validator of a standalone schema (a file of contracts/schemas/)."""
    Draft202012Validator.check_schema(schema)
    return EcmaValidator(schema)


@functools.lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    """The committed AsyncAPI document (test_asyncapi checks it is what the code makes)."""
    found: dict[str, Any] = json.loads(DOCUMENT.read_text())
    return found


@functools.lru_cache(maxsize=1)
def _registry() -> Registry[Any]:
    registry: Registry[Any] = Registry().with_resource(
        DOCUMENT_URI, DRAFT202012.create_resource(document())
    )
    return registry


@functools.lru_cache(maxsize=1024)
def document_validator(pointer: str) -> Validator:
    """A validator of the schema at `pointer` (e.g. `/components/schemas/pos.scan`) in the
    AsyncAPI document, its `$ref`s resolved in the document."""
    return EcmaValidator({"$ref": f"{DOCUMENT_URI}#{pointer}"}, registry=_registry())


def resolve(node: Any) -> Any:
    """A `$ref` within the document, followed (to any depth)."""
    while isinstance(node, dict) and "$ref" in node:
        found: Any = document()
        for part in node["$ref"].removeprefix("#/").split("/"):
            found = found[part]
        node = found
    return node


def message_pointers(reference: Mapping[str, str]) -> tuple[str, str, str]:
    """Where a channel's message (a `$ref`) has its headers, payload and key schemas."""
    base = reference["$ref"].removeprefix("#")
    return f"{base}/headers", f"{base}/payload", f"{base}/bindings/kafka/key"


def matching_messages(
    channel_id: str, key: bytes | None, headers: Headers, value: bytes | None
) -> list[str]:
    """The channel's messages that a record fits (headers, key and payload valid): what a
    consumer validating against the document would take it for."""
    texts: dict[str, str] = {}
    for name, raw in headers:
        if raw is None:
            continue
        try:
            texts[name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            return []  # no JSON Schema takes a header that is not text
    try:
        payload = None if not value else decode_json(value)
    except ValueError:
        return []  # not JSON a JSON Schema could be applied to
    key_text = None if key is None else key.decode("utf-8", "replace")
    fits = []
    for name, reference in document()["channels"][channel_id]["messages"].items():
        headers_at, payload_at, key_at = message_pointers(reference)
        if (
            document_validator(headers_at).is_valid(texts)
            and document_validator(payload_at).is_valid(payload)
            and document_validator(key_at).is_valid(key_text)
        ):
            fits.append(name)
    return fits


def service_accepts(
    headers: Headers,
    value: bytes | None,
    key: str | None,
    command_types: Mapping[str, type[BaseModel]],
) -> bool:
    """Whether the service takes the record as a command it carries out: not a dead letter,
    and not refused for its fields (`validation_error`) before any call."""
    try:
        command = decode_command(headers, value)
    except UnusableRecord:
        return False
    if command.type not in command_types:
        return False  # unknown_type: a dead letter (pipeline)
    _, answered = precheck(command, key, command_types[command.type], lambda _: True, "unknown")
    return answered is None
