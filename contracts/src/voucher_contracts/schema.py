"""JSON Schemas of the commands as they travel (structured mode), for the AsyncAPI document."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from voucher_contracts.envelope import CommandEnvelope


def command_schema(title: str, data_models: Mapping[str, type[BaseModel]]) -> dict[str, Any]:
    """A command event: the CloudEvents attributes, and `data` chosen by `type`."""
    envelope = CommandEnvelope.model_json_schema()
    properties = {
        k: v for k, v in envelope["properties"].items() if k not in ("data", "extensions")
    }
    properties["type"] = {"type": "string", "enum": sorted(data_models)}
    properties["data"] = {"description": "the command's fields; see the variants by type"}
    variants = []
    for type_, model in sorted(data_models.items()):
        data = model.model_json_schema()
        data.setdefault("title", model.__name__)
        variants.append(
            {
                "if": {"properties": {"type": {"const": type_}}},
                "then": {"properties": {"data": data}},
            }
        )
    return {
        "title": title,
        "description": "CloudEvents 1.0. Structured mode: this object is the record value "
        "(content-type application/cloudevents+json). Binary mode: the attributes are ce_* "
        "headers and `data` is the value (content-type application/json). The record key is "
        "the subject.",
        "type": "object",
        "required": ["specversion", "id", "source", "type", "subject"],
        "properties": properties,
        "allOf": variants,
    }
