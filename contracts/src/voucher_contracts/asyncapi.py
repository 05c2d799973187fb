"""voucher-bridge's AsyncAPI 3.0 document: six channels, a message per event type.

FastStream writes the document's frame from the app itself: `asyncapi`, `info`, `servers` (with
the broker's security), and each channel's address, Kafka binding and servers. What FastStream
0.7.8 cannot say is written here, from the schemas of `schema.py`:
- one message per CloudEvents type on a channel, structured and binary mode apart (FastStream
  makes one message per subscriber or publisher, from one payload type);
- message headers, Kafka message bindings (the key) and examples (its message object has none);
- the dead-letter channels' messages (the pipeline writes them with its own producer; the app
  declares them to FastStream for the frame only);
- operations per channel, named for what a client does with them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from voucher_contracts import examples
from voucher_contracts import schema as schemas
from voucher_contracts.envelope import JSON_CONTENT_TYPE, STRUCTURED_CONTENT_TYPE, result_type

Document = dict[str, Any]

KAFKA_MESSAGE_BINDING = "0.5.0"
KAFKA_OPERATION_BINDING = "0.5.0"

DESCRIPTION = """\
POS machines and the back office put commands on Kafka as CloudEvents 1.0, in either Kafka
binding: structured (content-type `application/cloudevents+json`, the whole event in the value)
or binary (`ce_*` headers, `data` as the value). voucher-bridge applies each to the upstream
API that owns the money, at most once, and publishes one result event per command
(`<command type>.result`, structured mode), keyed like the command, with the W3C
`traceparent` of the command's trace.

A result's `outcome` is `succeeded`, `rejected` (nothing changed upstream), `failed` (known
not applied; it may be sent again) or `indeterminate` (it may have applied: a superseding
result follows, `data.supersedes` naming the one it replaces). Its `id` is derived from the
command's (`source`, `id`): a re-published result has the same `id`.

A record that is not a usable command goes to the commands topic's dead-letter topic byte for
byte, with `x-dlq-*` headers saying why; a usable command with bad fields gets a `rejected`
result (`validation_error`) instead. The JSON Schemas are also files of their own, in
`contracts/schemas/`."""


@dataclass(frozen=True)
class Domain:
    """One domain's topics (as configured) and command types."""

    name: str  # "pos" or "coupon"
    commands: str
    results: str
    dead_letters: str
    command_types: Mapping[str, type[BaseModel]]


def _components_ref(schema: Any) -> Any:
    """`#/$defs/X` → `#/components/schemas/X`: the same schemas, as the document's components."""
    if isinstance(schema, dict):
        return {
            k: (
                v.replace("#/$defs/", "#/components/schemas/", 1)
                if k == "$ref" and isinstance(v, str)
                else _components_ref(v)
            )
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_components_ref(item) for item in schema]
    return schema


def _schema(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _message(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/messages/{name}"}


def _camel(*words: str) -> str:
    parts = [p for w in words for p in w.replace(".", "_").split("_") if p]
    return parts[0].lower() + "".join(p.capitalize() for p in parts[1:])


def _key_binding(key: str) -> Document:
    return {"kafka": {"key": _schema(key), "bindingVersion": KAFKA_MESSAGE_BINDING}}


def _command_messages(domain: Domain) -> dict[str, Document]:
    key = f"{domain.name}.key"
    messages: dict[str, Document] = {}
    for command_type, model in sorted(domain.command_types.items()):
        event = examples.command_event(command_type)
        payload: Document = _schema(f"{command_type}.data")
        if not schemas.data_is_required(model):
            payload = schemas.nullable(payload)
        messages[command_type] = {
            "name": _camel(command_type),
            "title": f"{command_type} (structured mode)",
            "summary": f"A {command_type} command, the whole CloudEvent in the record value.",
            "contentType": STRUCTURED_CONTENT_TYPE,
            "headers": _schema("command.headers"),
            "payload": _schema(command_type),
            "bindings": _key_binding(key),
            "examples": [
                {
                    "name": command_type.replace(".", "_"),
                    "headers": {
                        "content-type": STRUCTURED_CONTENT_TYPE,
                        "traceparent": examples.TRACEPARENT,
                    },
                    "payload": event,
                }
            ],
        }
        binary: Document = {
            "name": _camel(command_type, "binary"),
            "title": f"{command_type} (binary mode)",
            "summary": f"A {command_type} command, its attributes as ce_* headers and its "
            "`data` as the record value"
            + ("." if schemas.data_is_required(model) else " (empty, or null, for none)."),
            "contentType": JSON_CONTENT_TYPE,
            "headers": _schema(f"{command_type}.binary.headers"),
            "payload": payload,
            "bindings": _key_binding(key),
        }
        if "data" in event:
            binary["examples"] = [
                {
                    "name": command_type.replace(".", "_") + "_binary",
                    "headers": examples.binary_headers(command_type),
                    "payload": event["data"],
                }
            ]
        messages[f"{command_type}.binary"] = binary
    return messages


def _result_messages(domain: Domain) -> dict[str, Document]:
    messages: dict[str, Document] = {}
    for command_type in sorted(domain.command_types):
        name = result_type(command_type)
        messages[name] = {
            "name": _camel(name),
            "title": name,
            "summary": f"The result of a {command_type} command.",
            "contentType": STRUCTURED_CONTENT_TYPE,
            "headers": _schema("result.headers"),
            "payload": _schema(name),
            "bindings": _key_binding(f"{domain.name}.key"),
            "examples": [
                {
                    "name": name.replace(".", "_"),
                    "headers": {
                        "content-type": STRUCTURED_CONTENT_TYPE,
                        "traceparent": examples.TRACEPARENT,
                    },
                    "payload": examples.result_event(command_type),
                }
            ],
        }
    return messages


def _dead_letter_message(domain: Domain, group_id: str) -> Document:
    return {
        "name": _camel(domain.name, "dead_letter"),
        "title": f"a record of {domain.commands} that is not a usable command",
        "summary": "The record as it came, byte for byte (key, value, headers), with x-dlq-* "
        "headers added.",
        "description": "Not JSON, not a CloudEvent, no id/source/type/subject, an unknown "
        "type, too large, or a command whose result the broker refused. Its value is the "
        "original's, whatever it is (empty when x-dlq-omitted is set).",
        "contentType": "application/octet-stream",
        "headers": _schema("deadletter.headers"),
        "payload": {"description": "the original record's value, as it came"},
        "bindings": {
            "kafka": {
                "key": {"description": "the original record's key, as it came (may be absent)"},
                "bindingVersion": KAFKA_MESSAGE_BINDING,
            }
        },
        "examples": [
            {
                "name": f"{domain.name}_not_json",
                "headers": {
                    "content-type": STRUCTURED_CONTENT_TYPE,
                    "x-dlq-reason": "not_json",
                    "x-dlq-detail": "value is not JSON: Expecting value: line 1 column 1 (char 0)",
                    "x-dlq-failed-at": "2026-12-01T09:30:00.412345+00:00",
                    "x-dlq-original-topic": domain.commands,
                    "x-dlq-original-partition": "3",
                    "x-dlq-original-offset": "1207",
                    "x-dlq-original-timestamp": "1795944600000",
                    "x-dlq-original-group": group_id,
                },
                "payload": "till crashed mid-write",
            }
        ],
    }


def _frame_channel(frame: Document, address: str) -> Document:
    for channel in frame.get("channels", {}).values():
        if channel.get("address") == address:
            return dict(channel)
    raise ValueError(f"the app declares no channel for topic {address!r} to FastStream")


def asyncapi_document(
    frame: Mapping[str, Any], domains: Sequence[Domain], *, group_id: str
) -> Document:
    """The document: FastStream's `frame` (its own document of the app), with the channels,
    operations and components of the contract."""
    base: Document = copy.deepcopy(dict(frame))
    channels: dict[str, Document] = {}
    operations: dict[str, Document] = {}
    messages: dict[str, Document] = {}
    keys: dict[str, Document] = {}
    for domain in domains:
        noun = schemas.KEY_NOUNS[domain.name]
        keys[f"{domain.name}.key"] = {
            "type": "string",
            "description": f"the {noun}, UTF-8: the command's subject; a result has its "
            "command's key",
        }
        kinds = {
            "commands": (
                domain.commands,
                "receive",
                _command_messages(domain),
                f"{domain.name}.* commands, keyed by {noun}: one topic per domain, so that "
                f"each {noun.split(' ')[0]}'s commands stay in order.",
            ),
            "results": (
                domain.results,
                "send",
                _result_messages(domain),
                f"One result event per {domain.name} command, keyed like it.",
            ),
            "commands.dlq": (
                domain.dead_letters,
                "send",
                {f"{domain.name}.dead_letter": _dead_letter_message(domain, group_id)},
                f"Records of {domain.commands} that are not a usable command, as they came.",
            ),
        }
        for kind, (address, action, found, description) in kinds.items():
            channel_id = f"{domain.name}.{kind}"
            frame_channel = _frame_channel(base, address)
            channels[channel_id] = {
                "address": address,
                "title": channel_id,
                "description": description,
                "messages": {name: _message(name) for name in found},
                **{k: frame_channel[k] for k in ("bindings", "servers") if k in frame_channel},
            }
            operation: Document = {
                "action": action,
                "channel": {"$ref": f"#/channels/{channel_id}"},
                "summary": description,
                "messages": [{"$ref": f"#/channels/{channel_id}/messages/{n}"} for n in found],
            }
            if action == "receive":
                operation["bindings"] = {
                    "kafka": {
                        "groupId": {"type": "string", "enum": [group_id]},
                        "bindingVersion": KAFKA_OPERATION_BINDING,
                    }
                }
            words = {"commands": "commands", "results": "results", "commands.dlq": "dead_letters"}
            operations[_camel(action, domain.name, words[kind])] = operation
            messages.update(found)
    definitions = {name: _components_ref(s) for name, s in schemas.definitions().items()}
    document: Document = {
        "asyncapi": base["asyncapi"],
        "info": base["info"],
        "defaultContentType": STRUCTURED_CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": {"schemas": {**definitions, **keys}, "messages": messages},
    }
    if "servers" in base:
        document["servers"] = base["servers"]
    return document
