"""The contract other teams generate from: contracts/asyncapi.json (AsyncAPI 3.0) and the JSON
Schemas of contracts/schemas/ are what the code makes (`make asyncapi` rewrites them), list
every channel, message and header, and say what the service really takes and writes: a record
fits the schemas exactly when the service takes it, and what the handlers and the pipeline
write fits them."""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from jsonschema.protocols import Validator
from opentelemetry.sdk.trace import TracerProvider
from pydantic import BaseModel, SecretStr, ValidationError

import tests.unit.test_coupon_handler as coupon_tests
import tests.unit.test_pipeline as pipeline_tests
import tests.unit.test_pos_handler as pos_tests
from tests.support import records
from tests.support.contract import (
    SCHEMAS,
    document,
    document_validator,
    matching_messages,
    message_pointers,
    resolve,
    service_accepts,
    validator,
)
from voucher_bridge.app import Service
from voucher_bridge.epin.client import EpinClient
from voucher_bridge.epin.handler import CouponCommandHandler
from voucher_bridge.kafka import pipeline as pipeline_module
from voucher_bridge.kafka.pipeline import CommandPipeline, Topics
from voucher_bridge.once import Answered, SentCall
from voucher_bridge.settings import Settings
from voucher_bridge.upstream import Answer, CallOutcomeUnknown
from voucher_contracts import (
    CommandEnvelope,
    Outcome,
    ResultData,
    ResultEnvelope,
    examples,
    result_id,
)
from voucher_contracts import deadletter as dlq
from voucher_contracts.coupon import COUPON_COMMAND_TYPES
from voucher_contracts.envelope import JSON_CONTENT_TYPE, STRUCTURED_CONTENT_TYPE, result_type
from voucher_contracts.pos import POS_COMMAND_TYPES
from voucher_contracts.schema import DIALECT, dumps, schema_files
from voucher_sandboxes import demo
from voucher_sandboxes.epin import EpinSandbox, create_app
from voucher_sandboxes.faults import FaultConfig
from voucher_sandboxes.localstack import CommandProducer

ROOT = Path(__file__).resolve().parents[2]
COMMAND_TYPES: dict[str, type[BaseModel]] = {**POS_COMMAND_TYPES, **COUPON_COMMAND_TYPES}
DOMAINS: dict[str, dict[str, type[BaseModel]]] = {
    "pos": dict(POS_COMMAND_TYPES),
    "coupon": dict(COUPON_COMMAND_TYPES),
}
CHANNELS = {
    "pos.commands": "pos.commands",
    "pos.results": "pos.results",
    "pos.commands.dlq": "pos.commands.dlq",
    "coupon.commands": "coupon.commands",
    "coupon.results": "coupon.results",
    "coupon.commands.dlq": "coupon.commands.dlq",
}


@pytest.fixture(scope="module")
def generated() -> dict[str, Any]:
    return Service(Settings.model_construct()).asyncapi_document()


def commands_channel(command_type: str) -> str:
    return f"{examples.domain_of(command_type)}.commands"


def file_schema(name: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads((SCHEMAS / f"{name}.json").read_text())
    return found


@functools.lru_cache
def data_validator(command_type: str) -> Validator:
    """A validator of the command's `data` alone (binary mode's value), from its file."""
    schema = file_schema(command_type)
    return validator({**schema["$defs"][f"{command_type}.data"], "$defs": schema["$defs"]})


# -- the committed files are what the code makes -------------------------------------------------


def test_committed_asyncapi_document_is_current(generated: dict[str, Any]) -> None:
    assert json.loads((ROOT / "contracts" / "asyncapi.json").read_text()) == json.loads(
        dumps(generated)
    ), "contracts/asyncapi.json is stale: run `make asyncapi`"


def test_committed_schema_files_are_current() -> None:
    made = schema_files()
    committed = {p.name: json.loads(p.read_text()) for p in SCHEMAS.glob("*.json")}
    assert sorted(committed) == sorted(made), "contracts/schemas/ is stale: run `make asyncapi`"
    for name, schema in made.items():
        assert committed[name] == json.loads(dumps(schema)), f"{name} is stale: `make asyncapi`"


def test_there_is_a_schema_file_per_command_and_result_type_and_the_dead_letter_headers() -> None:
    names = {p.stem for p in SCHEMAS.glob("*.json")}
    assert names == {
        *COMMAND_TYPES,
        *(result_type(t) for t in COMMAND_TYPES),
        "deadletter.headers",
    }
    for path in SCHEMAS.glob("*.json"):
        schema = json.loads(path.read_text())
        assert schema["$schema"] == DIALECT
        validator(schema)  # a valid draft 2020-12 schema, its $refs all resolvable
        refs = re.findall(r'"\$ref": "#/\$defs/([^"]+)"', path.read_text())
        assert set(refs) <= set(schema.get("$defs", {})), path.name


# -- what the document lists ---------------------------------------------------------------------


def test_the_document_lists_the_six_channels_with_their_operations(
    generated: dict[str, Any],
) -> None:
    assert generated["asyncapi"].startswith("3.0")
    assert {k: v["address"] for k, v in generated["channels"].items()} == CHANNELS
    for channel_id, channel in generated["channels"].items():
        assert channel["bindings"]["kafka"]["topic"] == channel["address"]  # FastStream's
        operations = [
            op
            for op in generated["operations"].values()
            if op["channel"] == {"$ref": f"#/channels/{channel_id}"}
        ]
        assert len(operations) == 1, channel_id
        (operation,) = operations
        assert operation["action"] == ("receive" if channel_id.endswith(".commands") else "send")
        assert operation["messages"] == [
            {"$ref": f"#/channels/{channel_id}/messages/{name}"} for name in channel["messages"]
        ]
    receive = generated["operations"]["receivePosCommands"]
    assert receive["bindings"]["kafka"]["groupId"] == {"type": "string", "enum": ["voucher-bridge"]}


def test_every_command_and_result_type_has_its_own_messages_and_payloads(
    generated: dict[str, Any],
) -> None:
    components = generated["components"]
    for domain, types in DOMAINS.items():
        commands = generated["channels"][f"{domain}.commands"]["messages"]
        results = generated["channels"][f"{domain}.results"]["messages"]
        assert set(commands) == {*types, *(f"{t}.binary" for t in types)}
        assert set(results) == {result_type(t) for t in types}
        assert set(generated["channels"][f"{domain}.commands.dlq"]["messages"]) == {
            f"{domain}.dead_letter"
        }
        for command_type in types:
            structured = components["messages"][command_type]
            assert structured["payload"] == {"$ref": f"#/components/schemas/{command_type}"}
            event = components["schemas"][command_type]
            assert event["properties"]["type"] == {"const": command_type}
            assert event["properties"]["data"]["anyOf"][0] == {
                "$ref": f"#/components/schemas/{command_type}.data"
            }
            binary = json.dumps(components["messages"][f"{command_type}.binary"]["payload"])
            assert f"#/components/schemas/{command_type}.data" in binary
            result = components["messages"][result_type(command_type)]
            assert result["payload"] == {
                "$ref": f"#/components/schemas/{result_type(command_type)}"
            }
            data = components["schemas"][f"{result_type(command_type)}.data"]
            assert data["properties"]["command_type"] == {"const": command_type}


def test_messages_carry_headers_key_bindings_and_their_content_types_as_on_the_wire(
    generated: dict[str, Any],
) -> None:
    messages = generated["components"]["messages"]
    schemas = generated["components"]["schemas"]
    for name, message in messages.items():
        assert message["bindings"]["kafka"]["bindingVersion"] == "0.5.0"
        assert "key" in message["bindings"]["kafka"], name
        assert resolve(message["headers"])["type"] == "object", name
        if name.endswith(".binary"):
            assert message["contentType"] == JSON_CONTENT_TYPE
        elif name.endswith(".dead_letter"):
            assert message["contentType"] == "application/octet-stream"
        else:
            assert message["contentType"] == STRUCTURED_CONTENT_TYPE
    for domain in DOMAINS:
        key = schemas[f"{domain}.key"]
        assert key["type"] == "string"
        assert messages[f"{domain}.dead_letter"]["headers"] == {
            "$ref": "#/components/schemas/deadletter.headers"
        }
    structured = schemas["command.headers"]["properties"]
    assert {"content-type", "traceparent", "tracestate"} <= set(structured)
    binary = schemas["pos.scan.binary.headers"]
    assert set(binary["required"]) == {
        "ce_specversion",
        "ce_id",
        "ce_source",
        "ce_type",
        "ce_subject",
    }
    assert {"ce_time", "ce_dataschema", "content-type", "traceparent", "tracestate"} <= set(
        binary["properties"]
    )
    assert set(schemas["result.headers"]["required"]) == {"content-type", "traceparent"}
    dead = schemas["deadletter.headers"]
    names = {v for k, v in vars(dlq).items() if k.isupper() and isinstance(v, str)}
    assert names == set(dead["properties"])
    assert set(dead["required"]) == names - {dlq.OMITTED}


# Keywords a code generator or a standard validator does not know: pydantic's own, and formats
# outside JSON Schema's list.
PYDANTIC_ONLY = {"decimal_places", "max_digits", "decimalPlaces", "maxDigits", "discriminator"}
FORMATS = {
    "date-time", "date", "time", "duration", "email", "idn-email", "hostname", "idn-hostname",
    "ipv4", "ipv6", "uri", "uri-reference", "iri", "iri-reference", "uuid", "uri-template",
    "json-pointer", "relative-json-pointer", "regex",
}  # fmt: skip


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            if key not in ("examples", "const", "enum", "default"):
                yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk(item, f"{path}/{i}")


def test_no_keyword_a_generator_would_choke_on() -> None:
    everything = {"asyncapi.json": document()["components"]["schemas"]}
    everything |= {p.name: json.loads(p.read_text()) for p in SCHEMAS.glob("*.json")}
    for name, schemas in everything.items():
        for path, key, value in _walk(schemas):
            where = f"{name}{path}/{key}"
            assert key not in PYDANTIC_ONLY, where
            if key == "format":
                assert value in FORMATS, where
            if key == "multipleOf":  # 0.01 fails floating-point validators on 0.07
                assert isinstance(value, int), where
            if key == "pattern":
                re.compile(value)  # and an ECMA-262 one: no Python-only syntax
                assert "(?P" not in value and "\\Z" not in value and "\\A" not in value, where


# -- what the schemas take is what the service takes --------------------------------------------


def _key(subject: Any) -> bytes:
    return subject.encode() if isinstance(subject, str) else b"key"


def _agree(command_type: str, key: bytes, headers: records.Headers, value: bytes | None) -> None:
    """The record fits its command type's message exactly when the service takes it."""
    accepted = service_accepts(headers, value, key.decode(), COMMAND_TYPES)
    channel = commands_channel(command_type)
    fits = matching_messages(channel, key, headers, value)
    assert len(fits) <= 1, fits  # structured and binary mode never both
    assert bool(fits) == accepted, (
        f"schemas {'take' if fits else 'refuse'} what the service "
        f"{'takes' if accepted else 'refuses'}: {headers!r} {value!r}"
    )
    if fits:
        assert fits[0] in (command_type, f"{command_type}.binary")


class _Captured:
    """Stands in for aiokafka's producer: keeps what was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []

    async def send_and_wait(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Any, **_: Any
    ) -> None:
        self.sent.append((key, value, list(headers)))


async def _as_the_demo_sends(
    type_: str, subject: str, data: Any, binary: bool
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    producer = CommandProducer("unused:9092", commands_channel(type_), source="/stores/demo")
    captured = _Captured()
    producer._producer = cast(Any, captured)
    await producer.send(type_, subject, data, binary=binary)
    return captured.sent[0]


def _fixture_commands() -> list[tuple[str, Any]]:
    """The commands the tests, the demo and the examples use: (type, data)."""
    found: list[tuple[str, Any]] = []
    found += [(t, d) for t, d in examples.COMMAND_DATA.items()]
    found += [(t, d) for t, d in records.POS_DATA.items()]
    found += [(t, d) for _, t, d in demo.SESSIONS]  # one of them is refused, on purpose
    found += [(c.type, c.data) for c in (pos_tests.SCAN, pos_tests.REDEEM)]
    found += [("coupon.create", coupon_tests.create_data("fk-1"))]
    for test in (
        pos_tests.test_invalid_data_is_a_validation_error_without_a_call,
        coupon_tests.test_invalid_data_is_rejected_without_any_call,
    ):
        (mark,) = [m for m in test.pytestmark if m.name == "parametrize"]
        found += [(type_, data) for type_, data, _ in mark.args[1]]
    return found


@pytest.mark.parametrize("binary", [False, True], ids=["structured", "binary"])
async def test_every_fixture_command_fits_its_schema_exactly_when_the_service_takes_it(
    binary: bool,
) -> None:
    taken = refused = 0
    for type_, data in _fixture_commands():
        key, value, headers = await _as_the_demo_sends(type_, "till-1", data, binary)
        assert key is not None
        _agree(type_, key, headers, value)
        if service_accepts(headers, value, key.decode(), COMMAND_TYPES):
            taken += 1
        else:
            refused += 1
    assert taken >= 25 and refused >= 15  # both sides of the claim were tried


@pytest.mark.parametrize("command_type", sorted(COMMAND_TYPES))
def test_each_example_command_fits_its_schema_file(command_type: str) -> None:
    event = examples.command_event(command_type)
    validator(file_schema(command_type)).validate(event)
    data_schema = file_schema(command_type)["$defs"][f"{command_type}.data"]
    assert data_schema["title"] == f"{command_type} data"
    # ... and another type's does not.
    other = "pos.scan" if command_type != "pos.scan" else "pos.remove"
    assert not validator(file_schema(other)).is_valid(event)


@pytest.mark.parametrize(
    "how",
    ["data null", "data absent", "binary, no value", "binary, null value", "data {}"],
)
def test_list_wallets_without_data_is_a_command_the_schemas_take(how: str) -> None:
    event = examples.command_event("coupon.list_wallets")
    event.pop("data", None)
    if how == "data null":
        event["data"] = None
    if how == "data {}":
        event["data"] = {}
    key = examples.ACCOUNT.encode()
    if how.startswith("binary"):
        headers = [(k, v.encode()) for k, v in examples.binary_headers(event["type"]).items()]
        value = b"null" if how.endswith("null value") else None
    else:
        headers = [("content-type", STRUCTURED_CONTENT_TYPE.encode())]
        value = json.dumps(event).encode()
        validator(file_schema("coupon.list_wallets")).validate(event)
    assert service_accepts(headers, value, key.decode(), COMMAND_TYPES)
    expected = "coupon.list_wallets.binary" if how.startswith("binary") else "coupon.list_wallets"
    assert matching_messages("coupon.commands", key, headers, value) == [expected]


def test_a_command_that_needs_data_is_refused_without_it() -> None:
    event = examples.command_event("pos.scan")
    del event["data"]
    assert not validator(file_schema("pos.scan")).is_valid(event)
    headers = [("content-type", STRUCTURED_CONTENT_TYPE.encode())]
    _agree("pos.scan", b"till-1", headers, json.dumps({**event, "subject": "till-1"}).encode())


def _no_astral_noncharacters(value: Any) -> bool:
    text = json.dumps(value, ensure_ascii=False)
    return not any((ord(c) & 0xFFFE) == 0xFFFE and ord(c) > 0xFFFF for c in text)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes, bytes | None, records.Headers]:
    """An example command of any type with one attribute or data field changed (as
    tests/support/records.mutated_commands does for pos commands), in either binding."""
    command_type = draw(st.sampled_from(sorted(COMMAND_TYPES)))
    event = examples.command_event(command_type)
    event["data"] = dict(event.get("data") or {})
    # An extension's name: lower-case letters and digits only, or a dead letter.
    extension = draw(st.sampled_from(["newattribute", "x9"]) | st.text("abcXY_9-.", min_size=1))
    fields = [*event, *(f"data.{k}" for k in event["data"]), extension, "data.extra"]
    where = draw(st.sampled_from(fields))
    how = draw(st.sampled_from(["replace", "delete", "text"]))
    target, name = (event["data"], where[5:]) if where.startswith("data.") else (event, where)
    if how == "delete":
        target.pop(name, None)
    elif how == "text":
        target[name] = draw(st.text(max_size=30))
    else:
        target[name] = draw(records.json_values())
    # What JSON Schema cannot say (schema.py): a noncharacter beyond the BMP.
    assume(_no_astral_noncharacters(target.get(name)))
    # The service reads an absent or *falsy* `data` as `{}` (results.precheck: `data or {}`),
    # so `[]`, `""`, `0` and `false` pass for a type whose fields are all optional. The
    # contract says null or absent; that leniency is not advertised.
    data = event.get("data")
    assume(data is None or isinstance(data, dict) or bool(data))
    binary = draw(st.booleans())
    value, headers = records.encode(event, binary)
    subject = dict(headers).get("ce_subject", b"").decode() if binary else event.get("subject")
    return command_type, _key(subject), value, headers


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(mutated())
def test_the_schemas_take_a_changed_command_exactly_when_the_service_does(
    case: tuple[str, bytes, bytes | None, records.Headers],
) -> None:
    command_type, key, value, headers = case
    _agree(command_type, key, headers, value)


AMOUNT_TEXT = st.one_of(
    st.from_regex(r"\A[0-9]{0,16}(\.[0-9]{0,4})?\Z"),
    st.text(alphabet="0123456789.+-eE_ \n\u0661", max_size=8),
)


@given(st.one_of(AMOUNT_TEXT, st.integers(min_value=-(10**17), max_value=10**17)))
@example("0.00")
@example("0.05")
@example("99999999.99")
@example("100000000")
@example("12345678901.5")
@example("12345678901.55")
@example("123456789012.0")
@example("123456789012.5")
@example(10**12)
@example("12\n")
@settings(max_examples=600, derandomize=True, deadline=None)
def test_the_amount_grammar_reads_the_same_in_the_schema_as_in_the_models(amount: Any) -> None:
    cases = [
        ("pos.bill_total", "bill_total", POS_COMMAND_TYPES["pos.bill_total"], {}),
        (
            "coupon.share",
            "share_amount",
            COUPON_COMMAND_TYPES["coupon.share"],
            {"email": "a@b.cy", "epin": "1"},
        ),
    ]
    for command_type, field, model, rest in cases:
        data = {**rest, field: amount}
        check = data_validator(command_type)
        try:
            model.model_validate(data)
            taken = True
        except ValidationError:
            taken = False
        assert check.is_valid(data) == taken, (command_type, amount)


def _spellings(word: str) -> Iterator[str]:
    for mask in range(2 ** len(word)):
        yield "".join(c.upper() if mask >> i & 1 else c for i, c in enumerate(word))


@pytest.mark.parametrize(
    "word", ["true", "false", "yes", "no", "on", "off", "t", "f", "y", "n", "1", "0", "ok", "2"]
)
def test_booleans_read_the_same_in_the_schema_as_in_the_model(word: str) -> None:
    model = COUPON_COMMAND_TYPES["coupon.create"]
    check = data_validator("coupon.create")
    base = coupon_tests.create_data("fk-1")
    values: list[Any] = [*_spellings(word), f" {word}", int(word) if word.isdigit() else True]
    for value in values:
        data = {**base, "transferable": value}
        try:
            model.model_validate(data)
            taken = True
        except ValidationError:
            taken = False
        assert check.is_valid(data) == taken, repr(value)


def test_each_message_example_fits_its_message_and_is_what_the_service_takes_and_writes() -> None:
    doc = document()
    for channel_id, channel in doc["channels"].items():
        for name, reference in channel["messages"].items():
            message = resolve(reference)
            headers_at, payload_at, _ = message_pointers(reference)
            assert message.get("examples") or name.endswith(".binary"), name
            for shown in message.get("examples", []):
                document_validator(headers_at).validate(shown["headers"])
                document_validator(payload_at).validate(shown["payload"])
                if channel_id.endswith(".commands"):
                    payload = shown["payload"]
                    value = json.dumps(payload).encode()
                    headers = [(k, v.encode()) for k, v in shown["headers"].items()]
                    subject = shown["headers"].get("ce_subject") or payload["subject"]
                    assert service_accepts(headers, value, subject, COMMAND_TYPES), name
                if channel_id.endswith(".results"):
                    ResultEnvelope.model_validate(shown["payload"])


# -- what the service writes fits the schemas ----------------------------------------------------


class _Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []

    async def send(self, topic: str, key: bytes | None, value: bytes | None, headers: Any) -> None:
        self.sent.append((topic, key, value, list(headers)))


class _Answers:
    """An executor that answers with the results handlers produced."""

    money_moving = frozenset({"pos.redeem", "coupon.transfer", "coupon.share"})

    def __init__(self, answers: dict[str, ResultData]) -> None:
        self._answers = answers

    async def execute(
        self, command: CommandEnvelope, key: bytes | None, origin: Any = None
    ) -> Answered:
        return Answered(self._answers[command.id], result_id(command.source, command.id))

    def unrecorded(self, command: CommandEnvelope, why: str) -> Answered:
        raise AssertionError(why)


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> None:
    # As the service runs (telemetry.configure_tracing): the SDK's tracer, so results carry
    # the command's trace context.
    monkeypatch.setattr(pipeline_module, "tracer", TracerProvider().get_tracer("test"))


async def _pos_results() -> list[tuple[CommandEnvelope, ResultData]]:
    terminal = pos_tests.TERMINAL
    expired = Answer(
        200, {"success": 0, "message": "Voucher with code 20000002 expired on 30-11-2024."}, 5
    )
    found: list[tuple[CommandEnvelope, ResultData]] = []
    cases: list[tuple[str, Any, list[Any], str]] = [
        ("pos.bill_total", {"bill_total": "50"}, [pos_tests.OK], "succeeded"),
        ("pos.scan", {"voucher_code": "12345678"}, [pos_tests.SCANNED], "succeeded"),
        ("pos.scan", {"voucher_code": "12345678"}, [pos_tests.NOT_FOUND], "rejected"),
        ("pos.scan", {"voucher_code": "20000002"}, [expired], "rejected"),
        ("pos.scan", {"voucher_code": "1;2"}, [], "rejected"),
        ("pos.scan", {"voucher_code": "12345678"}, [pos_tests.UNAVAILABLE] * 3, "failed"),
        ("pos.remove", {"voucher_code": "12345678"}, [pos_tests.OK], "succeeded"),
        ("pos.cancel", None, [pos_tests.OK], "succeeded"),
        ("pos.redeem", {"voucher_codes": ["12345678", "12345679"]}, [pos_tests.OK], "succeeded"),
        (
            "pos.redeem",
            {"voucher_codes": ["12345678", "12345679"]},
            [CallOutcomeUnknown("x"), pos_tests.HELD, pos_tests.HELD],
            "indeterminate",
        ),
        (
            "pos.redeem",
            {"voucher_codes": ["12345678", "12345679"]},
            [CallOutcomeUnknown("x"), pos_tests.REDEEMED, pos_tests.REDEEMED_2],
            "succeeded",
        ),
    ]
    for i, (type_, data, script, outcome) in enumerate(cases):
        handler, _, _ = pos_tests.handler_for(*script)
        command = pos_tests.command(type_, data, id_=f"pos-{i}")
        result = await handler.handle(command, terminal)
        assert result.outcome.value == outcome, (type_, result)
        found.append((command, result))
    handler, _, _ = pos_tests.handler_for(pos_tests.HELD, pos_tests.HELD)
    redeem = pos_tests.REDEEM
    settled = await handler.settle(
        redeem, pos_tests.indeterminate_of(redeem), SentCall(time.time() - 1000, later=())
    )
    assert settled is not None and settled.outcome.value == "failed"
    found.append((redeem, settled))
    unknown = pos_tests.command("pos.scan", {"voucher_code": "1"}, subject="nobody", id_="pos-x")
    handler, _, _ = pos_tests.handler_for()
    found.append((unknown, await handler.handle(unknown, "nobody")))
    return found


async def _coupon_results() -> AsyncIterator[tuple[CommandEnvelope, ResultData]]:
    state = EpinSandbox.from_seed_file(coupon_tests.SEED_PATH)
    upstream = coupon_tests.Upstream(create_app(state, FaultConfig()))
    client = EpinClient(
        coupon_tests.BASE,
        SecretStr(coupon_tests.API_KEY),
        coupon_tests.ACCOUNTS,
        transport=upstream,
    )
    handler = CouponCommandHandler(client, coupon_tests.NoWait(attempts=3))
    account, nic = coupon_tests.ACCOUNT, coupon_tests.NIC
    try:
        counter = 0

        async def run(type_: str, data: Any, subject: str = account) -> tuple[Any, ResultData]:
            nonlocal counter
            counter += 1
            command = coupon_tests.command(type_, data, subject=subject, id_=f"coupon-{counter}")
            return command, await handler.handle(command, subject)

        yield await run("coupon.list_active", {})
        yield await run("coupon.history", {"wallet": "wallet1"})
        yield await run("coupon.transfer", {"user": nic, "epin": 1001})
        yield await run("coupon.share", {"email": "a@b.cy", "epin": "1003", "share_amount": "1"})
        yield await run("coupon.share", {"email": "a@b.cy", "epin": "1003", "share_amount": "9999"})
        yield await run("coupon.refund_status", {"epin": "1005"})
        yield await run("coupon.delete", {"epin": "1005"})
        wallets = await run("coupon.list_wallets", None)
        yield wallets
        form_key = (wallets[1].model_extra or {})["form_key"]
        yield await run("coupon.create", coupon_tests.create_data(form_key))
        yield await run("coupon.transfer", {"user": nic}, subject=account)  # validation_error
        yield await run("coupon.list_wallets", None, subject="wrong-password")  # unauthorized
        yield await run("coupon.list_active", {}, subject="nobody")  # unknown_account
        upstream.fault(coupon_tests.TRANSFER, "lose")
        yield await run("coupon.transfer", {"user": nic, "epin": "1002"})  # reconciled
        upstream.fault(coupon_tests.SHARE, "vanish")
        yield await run("coupon.share", {"email": "a@b.cy", "epin": "1004", "share_amount": "1"})
        upstream.fault(coupon_tests.ACTIVE, "503", "503", "503")
        yield await run("coupon.list_active", {})  # failed
    finally:
        await client.aclose()


async def test_results_the_handlers_produce_fit_their_schemas_as_the_pipeline_writes_them(
    traced: None,
) -> None:
    produced = await _pos_results()
    produced += [pair async for pair in _coupon_results()]
    outcomes = {(c.type.split(".")[0], r.outcome.value) for c, r in produced}
    assert outcomes == {
        (d, o) for d in DOMAINS for o in ("succeeded", "rejected", "failed", "indeterminate")
    }
    assert {c.type for c, _ in produced} == set(COMMAND_TYPES)
    for command, answered in produced:
        domain = command.type.split(".")[0]
        producer = _Producer()
        lane = CommandPipeline(
            Topics(f"{domain}.commands", f"{domain}.results", f"{domain}.commands.dlq"),
            COMMAND_TYPES,
            _Answers({command.id: answered}),
            cast(Any, producer),
            group_id="voucher-bridge",
            max_record_bytes=1_048_576,
        )
        answer = Answered(answered, result_id(command.source, command.id))
        await lane.publish_result(command.subject.encode(), command, answer)
        ((topic, key, value, headers),) = producer.sent
        assert value is not None
        fits = matching_messages(topic, key, headers, value)
        assert fits == [result_type(command.type)], (command.type, answered, fits)
        event = json.loads(value)
        validator(file_schema(result_type(command.type))).validate(event)
        # ... and no other type's.
        other = "pos.scan" if command.type != "pos.scan" else "pos.remove"
        assert not validator(file_schema(result_type(other))).is_valid(event)


async def test_a_compact_result_fits_its_schema(traced: None) -> None:
    command = pos_tests.command("pos.scan", {"voucher_code": "12345678"})
    data = ResultData(
        command_id=command.id,
        command_source=command.source,
        command_type=command.type,
        outcome=Outcome.SUCCEEDED,
        voucher_code="12345678",
        amount=Decimal("50.00"),
        message="x" * 5000,
    )
    producer = _Producer()
    lane = CommandPipeline(
        Topics("pos.commands", "pos.results", "pos.commands.dlq"),
        COMMAND_TYPES,
        _Answers({}),
        cast(Any, producer),
        group_id="voucher-bridge",
        max_record_bytes=1_048_576,
        max_result_bytes=1000,
    )
    await lane.publish_result(b"till", command, Answered(data, result_id(command.source, "c")))
    ((topic, key, value, headers),) = producer.sent
    assert value is not None and json.loads(value)["data"]["truncated"] is True
    assert matching_messages(topic, key, headers, value) == ["pos.scan.result"]


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [
        (
            b"till crashed mid-write",
            [("content-type", b"application/cloudevents+json")],
            "not_json",
        ),
        (
            json.dumps({**examples.command_event("pos.scan"), "type": "pos.refund"}).encode(),
            [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")],
            "unknown_type",
        ),
        (None, [("x-anything", b"\xff\xfe")], "empty_value"),
    ],
)
async def test_dead_letters_as_the_pipeline_writes_them_fit_their_schema(
    value: bytes | None, headers: list[tuple[str, bytes]], reason: str
) -> None:
    producer = _Producer()
    lane = CommandPipeline(
        Topics("pos.commands", "pos.results", "pos.commands.dlq"),
        POS_COMMAND_TYPES,
        _Answers({}),
        cast(Any, producer),
        group_id="voucher-bridge",
        max_record_bytes=1_048_576,
    )
    record = pipeline_tests.FakeRecord(value, key=b"till-1", headers=tuple(headers))
    await lane.process(record)
    ((topic, key, sent_value, sent_headers),) = producer.sent
    assert topic == "pos.commands.dlq" and sent_value == value and key == record.key
    texts = {k: v.decode("utf-8", "replace") for k, v in sent_headers}
    assert texts[dlq.REASON] == reason
    validator(file_schema("deadletter.headers")).validate(texts)
    channel = document()["channels"]["pos.commands.dlq"]["messages"]
    (reference,) = channel.values()
    headers_at, _, _ = message_pointers(reference)
    document_validator(headers_at).validate(texts)


def test_every_dead_letter_reason_the_code_gives_is_listed() -> None:
    sources = [
        ROOT / "contracts" / "src" / "voucher_contracts" / "binding.py",
        ROOT / "services" / "voucher_bridge" / "kafka" / "pipeline.py",
    ]
    given_ = {
        r for p in sources for r in re.findall(r'UnusableRecord\(\s*"([a-z_]+)"', p.read_text())
    }
    assert given_ and given_ <= set(dlq.REASONS), given_ - set(dlq.REASONS)
    listed = document()["components"]["schemas"]["deadletter.headers"]["properties"]
    assert listed[dlq.REASON]["examples"] == list(dlq.REASONS)
