"""One example of each command and of its result, as they travel: the AsyncAPI document's
message examples (which its parser checks against the schemas), and what the tests hold to the
decoder, the models and the schemas."""

from __future__ import annotations

from typing import Any

from voucher_contracts.envelope import (
    JSON_CONTENT_TYPE,
    RESULT_SOURCE,
    SPEC_VERSION,
    result_id,
    result_type,
)

TERMINAL = "1st_floor_machine_1"
ACCOUNT = "backoffice-cy"
SOURCES = {"pos": f"/stores/limassol-3/pos/{TERMINAL}", "coupon": "/backoffice/cy"}
SUBJECTS = {"pos": TERMINAL, "coupon": ACCOUNT}
TIME = "2026-12-01T09:30:00.000Z"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

# Each command type → its `data` (None: the command has none).
COMMAND_DATA: dict[str, dict[str, Any] | None] = {
    "pos.bill_total": {"bill_total": "120.00"},
    "pos.scan": {"voucher_code": "12345678"},
    "pos.remove": {"voucher_code": "12345678"},
    "pos.redeem": {"voucher_codes": ["12345678", "12345679"]},
    "pos.cancel": {"voucher_codes": ["12345678"]},
    "coupon.list_active": {"wallet": "wallet1"},
    "coupon.transfer": {"user": "shop-limassol", "epin": 1001},
    "coupon.share": {"email": "guest@example.cy", "epin": "1005", "share_amount": "5"},
    "coupon.delete": {"epin": "1003"},
    "coupon.refund_status": {"epin": "1003"},
    "coupon.list_wallets": None,
    "coupon.create": {
        "wallet_type": "wallet1",
        "epin_amount": "25",
        "number_of_pins": 2,
        "transferable": True,
        "reusable": False,
        "token_field": "MT-BCY-482917",
        "token_checksum_field": "5b2c9f0e7d1a3c48",
        "form_key": "fk-7c1e0b",
    },
    "coupon.history": {"wallet": "wallet1"},
}

# Each command type → what its result's data adds, succeeded.
RESULT_FIELDS: dict[str, dict[str, Any]] = {
    "pos.bill_total": {"bill_total": "120.00"},
    "pos.scan": {"voucher_code": "12345678", "amount": "50.00"},
    "pos.remove": {"voucher_code": "12345678"},
    "pos.redeem": {"voucher_codes": ["12345678", "12345679"]},
    "pos.cancel": {"voucher_codes": ["12345678"]},
    "coupon.list_active": {
        "coupons": [
            {
                "id": 1001,
                "pin": "****",
                "charge": "0.00",
                "balance": "20.00",
                "reusable": False,
                "transferable": True,
                "wallet_type": "wallet1",
                "currency_code": "EUR",
            }
        ],
        "count": 1,
    },
    "coupon.transfer": {"epin": "1001", "user": "shop-limassol"},
    "coupon.share": {"epin": "1005", "share_amount": "5.00", "balance": "15.00"},
    "coupon.delete": {"epin": "1003", "refund_status": "refunded", "refunded_amount": "20.00"},
    "coupon.refund_status": {"epin": "1003", "refund_status": "not_refunded"},
    "coupon.list_wallets": {
        "wallets": [{"wallet_type": "wallet1", "balance": "500.00"}],
        "form_key": "fk-7c1e0b",
    },
    "coupon.create": {
        "coupons": [{"id": 2004, "pin": "****"}, {"id": 2005, "pin": "****"}],
        "wallet_balance": "450.00",
    },
    "coupon.history": {
        "entries": [{"action": "share", "epin": 1005, "amount": "5.00"}],
        "count": 1,
    },
}


def domain_of(command_type: str) -> str:
    return command_type.split(".", 1)[0]


def command_event(command_type: str) -> dict[str, Any]:
    """The example command as a structured-mode event."""
    domain = domain_of(command_type)
    event: dict[str, Any] = {
        "specversion": SPEC_VERSION,
        "id": f"{command_type.replace('.', '-')}-0001",
        "source": SOURCES[domain],
        "type": command_type,
        "subject": SUBJECTS[domain],
        "time": TIME,
        "datacontenttype": JSON_CONTENT_TYPE,
    }
    data = COMMAND_DATA[command_type]
    if data is not None:
        event["data"] = data
    return event


def binary_headers(command_type: str) -> dict[str, str]:
    """The example command's headers in binary mode (its value: the data's JSON)."""
    event = command_event(command_type)
    headers = {f"ce_{name}": event[name] for name in ("specversion", "id", "source", "type")}
    headers |= {"ce_subject": event["subject"], "ce_time": event["time"]}
    return {**headers, "content-type": JSON_CONTENT_TYPE, "traceparent": TRACEPARENT}


def result_event(command_type: str) -> dict[str, Any]:
    """The example command's result, succeeded, as published."""
    command = command_event(command_type)
    return {
        "specversion": SPEC_VERSION,
        "id": result_id(command["source"], command["id"]),
        "source": RESULT_SOURCE,
        "type": result_type(command_type),
        "subject": command["subject"],
        "time": "2026-12-01T09:30:00.412Z",
        "datacontenttype": JSON_CONTENT_TYPE,
        "causationid": command["id"],
        "data": {
            "command_id": command["id"],
            "command_source": command["source"],
            "command_type": command_type,
            "outcome": "succeeded",
            "upstream": {"attempts": 1, "last_status": 200, "elapsed_ms": 38},
            **RESULT_FIELDS[command_type],
        },
    }
