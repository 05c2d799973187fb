"""JSON Schemas (draft 2020-12) of what voucher-bridge reads and writes on Kafka.

One schema per command type and per result type (the whole CloudEvent, as structured mode
carries it), the `data` of each command (binary mode's record value), the headers of both
bindings, and the headers of a dead letter. `schema_files` makes the files of
`contracts/schemas/`; `asyncapi.py` puts the same schemas into the AsyncAPI document.

They say what the service really does. A command schema takes what `binding.decode_command`
and the command's data model take, and refuses what they refuse, as far as JSON Schema can
say it; a result schema says what the handlers write. What JSON Schema cannot say is in the
descriptions: JSON that the service refuses as not carriable (`NaN`, a repeated member name,
a lone surrogate escape, nesting deeper than 64), a JSON number with more decimal places than
an amount has, noncharacters beyond the Basic Multilingual Plane, and that `subject` must
equal the record key (otherwise: `rejected`, `validation_error`).

Patterns are ECMA-262, as JSON Schema says: `$` is the end of the string. Python's `re.search`
also takes `$` before a final newline; a Python validator should match patterns in full.

The parts are plain dicts whose `$ref`s point into `#/$defs/`: a file holds its event and the
definitions it uses; the AsyncAPI document holds them all as components. A `$ref` never has
sibling keywords but annotations, since AsyncAPI's schemas (draft-07) ignore such siblings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from voucher_contracts import deadletter as dlq
from voucher_contracts import replay
from voucher_contracts.coupon import COUPON_COMMAND_TYPES, COUPON_RESULT_FIELDS
from voucher_contracts.envelope import (
    JSON_CONTENT_TYPE,
    RESULT_SOURCE,
    SPEC_VERSION,
    STRUCTURED_CONTENT_TYPE,
    Outcome,
    ResultData,
    UpstreamReport,
    result_type,
)
from voucher_contracts.pos import POS_COMMAND_TYPES, POS_RESULT_FIELDS

Schema = dict[str, Any]

DIALECT = "https://json-schema.org/draft/2020-12/schema"

# What the record key (and so each command's subject) names, per domain.
KEY_NOUNS = {"pos": "terminal (POS machine name)", "coupon": "account name"}


def ref(name: str, description: str | None = None) -> Schema:
    schema: Schema = {"$ref": f"#/$defs/{name}"}
    if description:
        schema["description"] = description
    return schema


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _not_null(*names: str) -> Schema:
    return {"required": list(names), "properties": {n: {"not": {"type": "null"}} for n in names}}


# binding._NOT_IN_STRING as far as an ECMA-262 pattern without the `u` flag can name it: the
# C0 and C1 controls and the noncharacters of the Basic Multilingual Plane. (Surrogates cannot
# be in a JSON string the service takes at all.)
_NOT_IN_STRING = "[\\u0000-\\u001f\\u007f-\\u009f\\ufdd0-\\ufdef\\ufffe\\uffff]"
# binding._URI_REFERENCE's characters, less `#`: a URI-reference has at most one.
_URI_CHAR = "[A-Za-z0-9\\-._~:/?\\[\\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2}"
# binding._RFC3339.
_RFC3339 = (
    "^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\\.[0-9]+)?"
    "(?:[Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
_UUID = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_STRUCTURED = "^application/cloudevents\\+json"
_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}


def _no_nulls(schema: Any) -> Any:
    """A pydantic schema of a model dumped with `exclude_none`: no `null` branches."""
    if isinstance(schema, dict):
        branches = schema.get("anyOf")
        if isinstance(branches, list):
            kept = [b for b in branches if b != {"type": "null"}]
            if len(kept) == 1:
                rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
                return _no_nulls({**rest, **kept[0]})
        return {k: _no_nulls(v) for k, v in schema.items() if not (k == "default" and v is None)}
    if isinstance(schema, list):
        return [_no_nulls(item) for item in schema]
    return schema


def _untitled(properties: Mapping[str, Any]) -> dict[str, Any]:
    # pydantic titles every field ("Voucher Code"); code generators would make a type of each.
    return {name: {k: v for k, v in p.items() if k != "title"} for name, p in properties.items()}


def _upstream_report() -> Schema:
    schema = _no_nulls(UpstreamReport.model_json_schema(mode="serialization"))
    properties = _untitled(schema["properties"])
    for name in ("attempts", "elapsed_ms"):
        properties[name]["minimum"] = 0
    properties["attempts"]["description"] = "calls made to the upstream for this answer"
    properties["last_status"]["description"] = "the upstream's last HTTP status, if it answered"
    properties["elapsed_ms"]["description"] = "time spent on the upstream, in milliseconds"
    return {
        "type": "object",
        "description": schema["description"],
        "required": ["attempts", "elapsed_ms"],
        "properties": properties,
    }


def shared_definitions() -> dict[str, Schema]:
    """The definitions the events share."""
    outcome = ResultData.model_fields["outcome"]
    return {
        "CloudEventsString": {
            "type": "string",
            "not": {"pattern": _NOT_IN_STRING},
            "description": "a CloudEvents String: no control characters, surrogates or "
            "noncharacters (those beyond the Basic Multilingual Plane are refused too)",
        },
        "RequiredString": {
            "allOf": [ref("CloudEventsString")],
            "pattern": "\\S",
            "description": "a CloudEvents String, not empty and not only blanks",
        },
        "Source": {
            "type": "string",
            "format": "uri-reference",
            "minLength": 1,
            "pattern": f"^(?:{_URI_CHAR})*(?:#(?:{_URI_CHAR})*)?$",
            "description": "a URI-reference (RFC 3986), e.g. "
            "/stores/limassol-3/pos/1st_floor_machine_1",
        },
        "AbsoluteUri": {
            "type": "string",
            "format": "uri",
            "pattern": "^[A-Za-z][A-Za-z0-9+.\\-]*:"
            "(?:[A-Za-z0-9\\-._~:/?#\\[\\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*$",
            "description": "an absolute URI (RFC 3986)",
        },
        "Timestamp": {
            "type": "string",
            "format": "date-time",
            "pattern": _RFC3339,
            "description": "an RFC 3339 date-time, e.g. 2026-12-01T09:30:00.000Z",
        },
        "ExtensionValue": {
            "anyOf": [
                {"type": "boolean"},
                _INT32,
                ref("CloudEventsString"),
                {"type": "null"},
            ],
            "description": "a CloudEvents extension attribute: Boolean, Integer (32-bit) or "
            "String, kept with its JSON type; null leaves it unset",
        },
        "Outcome": {
            "type": "string",
            "enum": [o.value for o in Outcome],
            "description": outcome.description,
        },
        "UpstreamReport": _upstream_report(),
        "FieldErrors": {
            "type": "object",
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
            "description": "validation_error: each field (a dotted path) → its messages, the "
            "service's for a command's own data, else the upstream's",
        },
        "ResultId": {"type": "string", "format": "uuid", "pattern": _UUID},
        "TraceParent": {
            "type": "string",
            "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
            "description": "W3C Trace Context traceparent",
            "examples": ["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"],
        },
    }


# -- commands ---------------------------------------------------------------------------------


def command_types() -> dict[str, tuple[str, type[BaseModel]]]:
    """Every command type → its domain and data model."""
    return {
        **{t: ("pos", m) for t, m in POS_COMMAND_TYPES.items()},
        **{t: ("coupon", m) for t, m in COUPON_COMMAND_TYPES.items()},
    }


def data_is_required(model: type[BaseModel]) -> bool:
    """Whether a command of this model needs `data`: absent or null, it is read as `{}`."""
    return any(field.is_required() for field in model.model_fields.values())


def command_data(command_type: str, model: type[BaseModel]) -> Schema:
    """The command's `data`, from its pydantic model (whose annotated types carry their own
    schemas where a validator takes more than the type says, e.g. an amount)."""
    schema = model.model_json_schema()
    if "$defs" in schema:  # no model nests another today; a nested one would need its defs
        raise ValueError(f"{model.__name__}: nested models are not exported")
    required = schema.get("required", [])
    schema["properties"] = _untitled(schema.get("properties", {}))
    schema["title"] = f"{command_type} data"
    schema["description"] = "The command's fields; others are ignored." + (
        "" if required else " Absent or null: no fields."
    )
    return schema


def command_event(command_type: str, domain: str, model: type[BaseModel]) -> Schema:
    """The command as one CloudEvent (structured mode: the record value)."""
    data = ref(f"{command_type}.data")
    schema: Schema = {
        "title": command_type,
        "description": f"The {command_type} command, a CloudEvents 1.0 event in structured "
        f"mode: the record's value (content-type {STRUCTURED_CONTENT_TYPE}); the record key is "
        f"the {KEY_NOUNS[domain]}. In binary mode the attributes are ce_* headers and `data` is "
        "the value. A JSON null is an attribute left unset; any other attribute is an "
        "extension, kept. Refused whatever a schema says: JSON that cannot be passed on (NaN, "
        "a repeated member name, a lone surrogate escape, nesting deeper than 64) and records "
        "larger than MAX_RECORD_BYTES (dead letters); a subject other than the record key "
        "(rejected, validation_error).",
        "type": "object",
        "required": ["specversion", "id", "source", "type", "subject"],
        "properties": {
            "specversion": {"const": SPEC_VERSION},
            "id": ref(
                "RequiredString",
                "unique within source: (source, id) is the command's idempotency key",
            ),
            "source": ref("Source", "who sent it"),
            "type": {"const": command_type},
            "subject": ref("RequiredString", f"the {KEY_NOUNS[domain]}: equals the record key"),
            "time": nullable(ref("Timestamp", "when it happened")),
            "datacontenttype": nullable(ref("CloudEventsString")),
            "dataschema": nullable(ref("AbsoluteUri")),
            "data": nullable(data),
            "data_base64": nullable(
                {
                    "type": "string",
                    "contentEncoding": "base64",
                    "contentMediaType": JSON_CONTENT_TYPE,
                    "contentSchema": data,
                    "description": "`data` as base64 of its JSON text, instead of `data`",
                }
            ),
            "traceparent": nullable(
                ref("CloudEventsString", "W3C trace context (the traceparent header comes first)")
            ),
            "tracestate": nullable(ref("CloudEventsString")),
        },
        "propertyNames": {"pattern": "^(?:[a-z0-9]+|data_base64)$"},
        "additionalProperties": ref("ExtensionValue"),
        "not": _not_null("data", "data_base64"),
    }
    if data_is_required(model):
        schema["anyOf"] = [_not_null("data"), _not_null("data_base64")]
    return schema


def _trace_headers(required: bool = False) -> dict[str, Schema]:
    parent = (
        ref("TraceParent", "W3C Trace Context of the command's trace")
        if required
        else {
            "type": "string",
            "description": "W3C Trace Context; read before the event's traceparent attribute. "
            "One that is not valid starts a new trace.",
            "examples": ["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"],
        }
    )
    return {"traceparent": parent, "tracestate": {"type": "string", "description": "W3C"}}


def _replay_headers() -> dict[str, Schema]:
    return {
        replay.REPLAY_OF: {
            "type": "string",
            "description": "On a record replayed from a dead-letter topic: that dead letter's "
            "<topic>/<partition>/<offset>.",
            "examples": ["pos.commands.dlq/0/17"],
        },
        replay.REPLAY_COUNT: {
            "type": "string",
            "pattern": "^[1-9][0-9]*$",
            "description": "How many replays the record's chain has had, this one included.",
        },
    }


def structured_command_headers() -> Schema:
    return {
        "title": "command headers (structured mode)",
        "type": "object",
        "properties": {
            "content-type": {
                "type": "string",
                "description": f"{STRUCTURED_CONTENT_TYPE}. A record with no ce_* headers is "
                "read as structured whatever this says; one with ce_* headers only with it.",
                "examples": [STRUCTURED_CONTENT_TYPE],
            },
            **_trace_headers(),
            **_replay_headers(),
        },
        "anyOf": [
            {
                "required": ["content-type"],
                "properties": {"content-type": {"pattern": _STRUCTURED}},
            },
            {"propertyNames": {"not": {"pattern": "^ce_"}}},
        ],
    }


def binary_command_headers(command_type: str, domain: str) -> Schema:
    return {
        "title": f"{command_type} headers (binary mode)",
        "description": "Each attribute is a ce_<name> header, its value as UTF-8 text (every "
        "extension is a String here); the record value is `data`, empty for none.",
        "type": "object",
        "required": ["ce_specversion", "ce_id", "ce_source", "ce_type", "ce_subject"],
        "properties": {
            "ce_specversion": {"const": SPEC_VERSION},
            "ce_id": ref("RequiredString"),
            "ce_source": ref("Source"),
            "ce_type": {"const": command_type},
            "ce_subject": ref("RequiredString", f"the {KEY_NOUNS[domain]}: equals the record key"),
            "ce_time": ref("Timestamp"),
            "ce_dataschema": ref("AbsoluteUri"),
            "content-type": {
                "type": "string",
                "pattern": "[Jj][Ss][Oo][Nn]",
                "not": {"pattern": _STRUCTURED},
                "description": f"`datacontenttype`: a JSON media type, {JSON_CONTENT_TYPE}. "
                "Absent, the value is read as JSON too.",
                "examples": [JSON_CONTENT_TYPE],
            },
            **_trace_headers(),
            **_replay_headers(),
        },
        "patternProperties": {"^ce_": ref("CloudEventsString")},
        "propertyNames": {"anyOf": [{"not": {"pattern": "^ce_"}}, {"pattern": "^ce_[a-z0-9]+$"}]},
    }


# -- results ----------------------------------------------------------------------------------


def result_fields() -> dict[str, dict[str, Any]]:
    """Every command type → what its result's data adds to every result's fields."""
    return {**POS_RESULT_FIELDS, **COUPON_RESULT_FIELDS}


def result_data(command_type: str) -> Schema:
    """A result's `data`: every result's fields (ResultData, as pydantic describes it, dumped
    without nulls), and this type's own."""
    model = _no_nulls(ResultData.model_json_schema(mode="serialization"))
    common = _untitled(model["properties"])
    common["command_type"] = {"const": command_type}
    common["outcome"] = ref("Outcome")
    common["upstream"] = ref("UpstreamReport")
    common["supersedes"] = ref(
        "ResultId", "the id of the earlier result for the same command this one replaces"
    )
    common["truncated"]["description"] = (
        "true: cut to fit the largest record the broker takes; its lists hold only their "
        "first items, or (compact) only the fields every result has are kept"
    )
    common["message"]["description"] = "the upstream's own text, when it gave one"
    common["command_id"]["description"] = "the command's id"
    common["command_source"]["description"] = "the command's source"
    return {
        "title": f"{result_type(command_type)} data",
        "type": "object",
        "required": ["command_id", "command_source", "command_type", "outcome", "upstream"],
        "properties": {
            **common,
            "errors": ref("FieldErrors"),
            **result_fields()[command_type],
        },
    }


def result_event(command_type: str, domain: str) -> Schema:
    name = result_type(command_type)
    return {
        "title": name,
        "description": f"The result of a {command_type} command: a CloudEvents 1.0 event in "
        f"structured mode (content-type {STRUCTURED_CONTENT_TYPE}), keyed like the command, "
        "one per command; a copy has the same id. More attributes may be added.",
        "type": "object",
        "required": [
            "specversion",
            "id",
            "source",
            "type",
            "subject",
            "time",
            "datacontenttype",
            "causationid",
            "data",
        ],
        "properties": {
            "specversion": {"const": SPEC_VERSION},
            "id": ref(
                "ResultId",
                "derived from the command's (source, id): a re-published result has the same "
                "id; a superseding one the next revision's",
            ),
            "source": {"const": RESULT_SOURCE},
            "type": {"const": name},
            "subject": {"type": "string", "description": f"the command's: the {KEY_NOUNS[domain]}"},
            "time": ref("Timestamp", "when the result was published"),
            "datacontenttype": {"const": JSON_CONTENT_TYPE},
            "causationid": {"type": "string", "description": "the command's id"},
            "data": ref(f"{name}.data"),
        },
    }


def result_headers() -> Schema:
    return {
        "title": "result headers",
        "type": "object",
        "required": ["content-type", "traceparent"],
        "properties": {
            "content-type": {"const": STRUCTURED_CONTENT_TYPE},
            **_trace_headers(required=True),
        },
    }


# -- dead letters -----------------------------------------------------------------------------


def dead_letter_headers() -> Schema:
    count = {"type": "string", "pattern": "^(?:0|[1-9][0-9]*)$"}
    return {
        "title": "dead-letter headers",
        "description": "What a dead letter's headers add to the original record's, which it "
        "keeps as they were (unless x-dlq-omitted says they were left out).",
        "type": "object",
        "required": [
            dlq.REASON,
            dlq.DETAIL,
            dlq.FAILED_AT,
            dlq.ORIGINAL_TOPIC,
            dlq.ORIGINAL_PARTITION,
            dlq.ORIGINAL_OFFSET,
            dlq.ORIGINAL_TIMESTAMP,
            dlq.ORIGINAL_GROUP,
        ],
        "properties": {
            dlq.REASON: {
                "type": "string",
                "pattern": "^[a-z_]+$",
                "description": "why the record is not a usable command, machine-readable; more "
                "may be added",
                "examples": list(dlq.REASONS),
            },
            dlq.DETAIL: {"type": "string", "maxLength": 1000, "description": "for people"},
            dlq.FAILED_AT: {
                "type": "string",
                "format": "date-time",
                "pattern": _RFC3339,
                "description": "when, in UTC",
            },
            dlq.ORIGINAL_TOPIC: {"type": "string"},
            dlq.ORIGINAL_PARTITION: count,
            dlq.ORIGINAL_OFFSET: count,
            dlq.ORIGINAL_TIMESTAMP: {
                "type": "string",
                "pattern": "^-?[0-9]+$",
                "description": "the record's timestamp, milliseconds since the epoch",
            },
            dlq.ORIGINAL_GROUP: {"type": "string", "description": "the group that read it"},
            dlq.OMITTED: {
                "type": "string",
                "description": "set when the record was more than the broker takes: the dead "
                "letter then has an empty value and none of the original headers; this says "
                "what was left out",
            },
        },
    }


# -- all of it --------------------------------------------------------------------------------


def definitions() -> dict[str, Schema]:
    """Every schema by name: what the events share, and each event, its data and headers."""
    found = shared_definitions()
    for command_type, (domain, model) in command_types().items():
        found[command_type] = command_event(command_type, domain, model)
        found[f"{command_type}.data"] = command_data(command_type, model)
        found[f"{command_type}.binary.headers"] = binary_command_headers(command_type, domain)
        found[result_type(command_type)] = result_event(command_type, domain)
        found[f"{result_type(command_type)}.data"] = result_data(command_type)
    found["command.headers"] = structured_command_headers()
    found["result.headers"] = result_headers()
    found["deadletter.headers"] = dead_letter_headers()
    return found


def _refs(schema: Any) -> Iterator[str]:
    if isinstance(schema, dict):
        target = schema.get("$ref")
        if isinstance(target, str) and target.startswith("#/$defs/"):
            yield target.removeprefix("#/$defs/")
        for value in schema.values():
            yield from _refs(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from _refs(item)


def standalone(name: str, every: Mapping[str, Schema] | None = None) -> Schema:
    """One schema as a file of its own: the dialect, and the definitions it uses."""
    every = definitions() if every is None else every
    used: dict[str, Schema] = {}
    pending = list(_refs(every[name]))
    while pending:
        found = pending.pop()
        if found not in used:
            used[found] = every[found]
            pending.extend(_refs(every[found]))
    schema = {"$schema": DIALECT, **every[name]}
    if used:
        schema["$defs"] = dict(sorted(used.items()))
    return schema


# The files of contracts/schemas/: each command and result event, and the dead-letter headers.
def schema_files() -> dict[str, Schema]:
    every = definitions()
    names = [
        *command_types(),
        *(result_type(t) for t in command_types()),
        "deadletter.headers",
    ]
    return {f"{name}.json": standalone(name, every) for name in names}


def dumps(document: Any) -> str:
    """How the generated files are written: stable, so that a diff shows only real changes."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schema_files(directory: Path) -> list[Path]:
    """Write `schema_files` into `directory`, and remove the JSON files there it no longer
    makes (a command type gone must not leave its schema behind)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = schema_files()
    for stale in directory.glob("*.json"):
        if stale.name not in files:
            stale.unlink()
    written = []
    for name, schema in files.items():
        path = directory / name
        path.write_text(dumps(schema))
        written.append(path)
    return written
