"""The `data` of the eight `coupon.*` commands (design.md).

Only the shape is checked here (types, presence, no float money); what the Epin API itself
refuses comes back from it as a `rejected` result with its own field messages, so the back
office sees the vendor's words.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, WithJsonSchema

from voucher_contracts.money import amount_json_schema, strict_amount

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _text(value: Any) -> Any:
    # Ids and counts may come as JSON integers or strings; the API takes them as text. A
    # decimal (`1e2`, `10.5`) is no id: its text would not be the number the sender wrote.
    if isinstance(value, bool | float | Decimal):
        raise ValueError("must be a string or an integer")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and _CONTROL.search(value):
        raise ValueError("must not hold control characters")
    return value


_MAX_TEXT = 256
Text = Annotated[
    str,
    BeforeValidator(_text),
    Field(min_length=1, max_length=_MAX_TEXT),
    # What `_text` takes, which pydantic cannot see: an integer too.
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": _MAX_TEXT,
                    "not": {"pattern": "[\\u0000-\\u001f\\u007f-\\u009f]"},
                },
                {"type": "integer"},
            ],
            "description": "text without control characters, or an integer (sent as its "
            f"decimal text, at most {_MAX_TEXT} characters)",
        }
    ),
]
# Digits in all, as pydantic counts them (the fraction's trailing zeros do not count).
_MAX_DIGITS = 12
# The strict amount grammar (money.py); sent upstream as `money.amount_text` writes it.
Amount = Annotated[
    Decimal,
    BeforeValidator(strict_amount),
    Field(gt=0, max_digits=_MAX_DIGITS),
    WithJsonSchema(amount_json_schema(max_digits=_MAX_DIGITS, positive=True)),
]
# pydantic reads a boolean leniently (lax mode); the schema says what it takes, so that a
# sender validating against it is refused nothing the service accepts.
LaxBool = Annotated[
    bool,
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "boolean"},
                {"enum": [0, 1]},
                {
                    "type": "string",
                    "pattern": "^(?:[Tt](?:[Rr][Uu][Ee])?|[Ff](?:[Aa][Ll][Ss][Ee])?"
                    "|[Yy](?:[Ee][Ss])?|[Nn][Oo]?|[Oo](?:[Nn]|[Ff][Ff])|[01])$",
                },
            ],
            "description": "a JSON boolean; also taken as one: 0 and 1, and the strings "
            "true/false, t/f, yes/no, y/n, on/off, 1/0 in any case",
        }
    ),
]
# pydantic writes `format: password`, which is no JSON Schema format.
Secret = Annotated[
    SecretStr,
    WithJsonSchema(
        {"type": "string", "writeOnly": True, "description": "never in results, logs or traces"}
    ),
]


class _CouponData(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ListActive(_CouponData):
    wallet: Text | None = None
    code: Text | None = None


class Transfer(_CouponData):
    user: Text
    epin: Text


class Share(_CouponData):
    email: Text
    epin: Text
    share_amount: Amount


class Delete(_CouponData):
    epin: Text


class RefundStatus(_CouponData):
    epin: Text


class ListWallets(_CouponData):
    pass


class Create(_CouponData):
    wallet_type: Text
    epin_amount: Amount
    number_of_pins: Text
    transferable: LaxBool
    reusable: LaxBool
    # The mail token and its checksum authorise the creation: kept out of reprs and logs.
    token_field: Secret
    token_checksum_field: Secret
    form_key: Text


class History(_CouponData):
    wallet: Text | None = None


CouponCommandData = (
    ListActive | Transfer | Share | Delete | RefundStatus | ListWallets | Create | History
)

COUPON_COMMAND_TYPES: dict[str, type[_CouponData]] = {
    "coupon.list_active": ListActive,
    "coupon.transfer": Transfer,
    "coupon.share": Share,
    "coupon.delete": Delete,
    "coupon.refund_status": RefundStatus,
    "coupon.list_wallets": ListWallets,
    "coupon.create": Create,
    "coupon.history": History,
}


# What a `coupon.*` result's data carries beyond every result's fields (envelope.ResultData),
# as JSON Schema: the handler adds these as extras (epin/decisions.py, epin/handler.py). None is
# required: a compact result (cut to fit the broker) keeps none of them. What the Epin API
# answered is passed on as it came, but for its decimals, which are written as strings (the
# service never reads a number through float), and each coupon's `pin`, masked unless
# COUPON_RESULT_PINS=shown.
_AS_THE_API_SAID = "as the Epin API answered (a decimal number as a string)"
_COUPON = {
    "type": "object",
    "description": "a coupon as the Epin API lists it (id, pin, charge, balance, reusable, "
    "transferable, wallet_type, currency_code, ...); `pin` is `****` unless "
    "COUPON_RESULT_PINS=shown",
}
_EPIN_OUT = {"type": "string", "description": "the coupon's id, as text"}
_AMOUNT_OUT = {
    "type": "string",
    "pattern": "^(?:0|[1-9][0-9]*)\\.[0-9]{2}$",
    "description": "an amount, to the cent, as a decimal string",
}
_MOVES_VALUE = {
    "reconciled": {
        "type": "boolean",
        "description": "true: decided by reading the API after the call's answer was lost",
    },
    "seen": {
        "type": "string",
        "description": "indeterminate after a lost answer: what the reads showed so far",
    },
}
_COUNT = {
    "type": "integer",
    "minimum": 0,
    "description": "how many the API listed, all pages (more than the list holds when cut)",
}

COUPON_RESULT_FIELDS: dict[str, dict[str, object]] = {
    "coupon.list_active": {
        "coupons": {"type": "array", "items": _COUPON, "description": "every page, in order"},
        "count": _COUNT,
    },
    "coupon.transfer": {
        **_MOVES_VALUE,
        "epin": _EPIN_OUT,
        "user": {"type": "string", "description": "who the coupon went to"},
    },
    "coupon.share": {
        **_MOVES_VALUE,
        "epin": _EPIN_OUT,
        "share_amount": {**_AMOUNT_OUT, "description": "the amount shared"},
        "balance": {"description": "the coupon's balance after the share, " + _AS_THE_API_SAID},
    },
    "coupon.delete": {
        **_MOVES_VALUE,
        "epin": _EPIN_OUT,
        "refund_status": {"description": _AS_THE_API_SAID},
        "refunded_amount": {"description": _AS_THE_API_SAID},
    },
    "coupon.refund_status": {
        "epin": _EPIN_OUT,
        "refund_status": {"description": _AS_THE_API_SAID},
        "refunded_amount": {"description": _AS_THE_API_SAID},
    },
    "coupon.list_wallets": {
        "wallets": {
            "description": "the wallets the coupon facility is enabled for, " + _AS_THE_API_SAID
        },
        "form_key": {
            "description": "a fresh single-use key for the next coupon.create, " + _AS_THE_API_SAID
        },
    },
    "coupon.create": {
        **_MOVES_VALUE,
        "coupons": {"type": "array", "items": _COUPON, "description": "the coupons created"},
        "wallet_balance": {"description": "the wallet's balance after, " + _AS_THE_API_SAID},
    },
    "coupon.history": {
        "entries": {
            "type": "array",
            "items": {"type": "object", "description": "a history entry as the API lists it"},
            "description": "every page, in order",
        },
        "count": _COUNT,
    },
}
