"""The committed AsyncAPI document is what the code generates (`make asyncapi` rewrites it)."""

import json
from pathlib import Path

from voucher_bridge.app import Service
from voucher_bridge.settings import Settings

DOCUMENT = Path(__file__).resolve().parents[2] / "contracts" / "asyncapi.json"


async def test_committed_asyncapi_document_is_current() -> None:
    generated = Service(Settings.model_construct()).asyncapi_document()
    assert json.loads(DOCUMENT.read_text()) == json.loads(json.dumps(generated)), (
        "contracts/asyncapi.json is stale: run `make asyncapi`"
    )


async def test_asyncapi_documents_commands_and_results() -> None:
    document = Service(Settings.model_construct()).asyncapi_document()
    assert {
        "pos.commands:OnCommand",
        "coupon.commands:OnCommand",
        "pos.results",
        "coupon.results",
    } <= set(document["channels"])
    command = document["components"]["schemas"]["PosCommand"]
    assert set(command["properties"]["type"]["enum"]) == {
        "pos.bill_total",
        "pos.scan",
        "pos.remove",
        "pos.redeem",
        "pos.cancel",
    }
    coupon = document["components"]["schemas"]["CouponCommand"]
    assert "coupon.create" in coupon["properties"]["type"]["enum"]
