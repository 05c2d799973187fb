"""The `data` of the five `pos.*` commands (design.md), and what their results add."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from voucher_contracts.money import amount_json_schema, strict_amount

MAX_BILL_TOTAL = Decimal("99999999.99")


def _at_most_max(value: Decimal) -> Decimal:
    if value > MAX_BILL_TOTAL:
        raise ValueError(f"must be at most {MAX_BILL_TOTAL}")
    return value


# The strict amount grammar (money.py), to the cent: `"12.5"` is Decimal("12.50").
Money = Annotated[
    Decimal,
    BeforeValidator(strict_amount),
    AfterValidator(_at_most_max),
    # At most MAX_BILL_TOTAL: as many digits before the point as it has.
    WithJsonSchema(amount_json_schema(integer_digits=len(str(int(MAX_BILL_TOTAL))))),
]

# Codes travel joined by ';' to the upstream, so a code may not contain one.
VoucherCode = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$", strict=True)
]


def _unique(codes: list[str]) -> list[str]:
    if len(set(codes)) != len(codes):
        raise ValueError("must not repeat a voucher code")
    return codes


class _PosData(BaseModel):
    # Unknown fields are ignored so that senders can add fields before we read them.
    model_config = ConfigDict(extra="ignore", frozen=True)


class BillTotal(_PosData):
    bill_total: Money


class Scan(_PosData):
    voucher_code: VoucherCode


class Remove(_PosData):
    voucher_code: VoucherCode


class Redeem(_PosData):
    voucher_codes: Annotated[
        list[VoucherCode],
        Field(min_length=1, json_schema_extra={"uniqueItems": True}),
        AfterValidator(_unique),
    ]


class Cancel(_PosData):
    voucher_codes: Annotated[list[VoucherCode], AfterValidator(_unique)] = Field(
        default_factory=list, json_schema_extra={"uniqueItems": True}
    )


PosCommandData = BillTotal | Scan | Remove | Redeem | Cancel

POS_COMMAND_TYPES: dict[str, type[_PosData]] = {
    "pos.bill_total": BillTotal,
    "pos.scan": Scan,
    "pos.remove": Remove,
    "pos.redeem": Redeem,
    "pos.cancel": Cancel,
}


# What a `pos.*` result's data carries beyond every result's fields (envelope.ResultData), as
# JSON Schema: the handlers add these as extras (evoucher/decisions.py, evoucher/handler.py).
# None is required: a compact result (cut to fit the broker) keeps none of them.
_AMOUNT_OUT = {
    "type": "string",
    "pattern": "^(?:0|[1-9][0-9]*)\\.[0-9]{2}$",
    "description": "an amount, to the cent, as a decimal string",
}
_ANY_POS = {
    "voucher_code": {
        "type": "string",
        "description": "the voucher: the command's, or the one the upstream's refusal names",
    },
    "expires_on": {
        "type": "string",
        "format": "date",
        "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$",
        "description": "voucher_expired: the day it expired",
    },
}
_CODES_OUT = {
    "type": "array",
    "items": {"type": "string"},
    "description": "the vouchers, as the command named them",
}

# What a ledger books from (the service's record of the till's bill; additive): on every
# `pos.*` result.
_NULLABLE_AMOUNT = {
    "anyOf": [_AMOUNT_OUT, {"type": "null"}],
    "description": "null where the service cannot know it (see `bill_unknown`, `amount_unknown`)",
}
_BOOKING = {
    "terminal": {"type": "string", "description": "the till (the command's subject)"},
    "store": {
        "type": "string",
        "description": "the till's shop, where the command's source (/stores/<store>/…) or the "
        "TERMINAL_STORES setting names it",
    },
    "bill_id": {
        "type": ["string", "null"],
        "description": "the bill the command belongs to, stable for the bill (from its "
        "pos.bill_total command); null when the service did not see the bill begin",
    },
    "bill_unknown": {
        "type": "string",
        "enum": ["bill_not_seen"],
        "description": "why bill_id is null",
    },
    "remaining_due": {
        **_NULLABLE_AMOUNT,
        "description": "what remains due on the bill after this command: its total less what "
        "the vouchers on it take off (null when either is unknown)",
    },
}
_VOUCHERS_BOOKED = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["code", "amount"],
        "properties": {
            "code": {"type": "string"},
            "amount": {
                **_NULLABLE_AMOUNT,
                "description": "what this voucher paid of the bill, as its scan in this bill "
                "priced it; null with `amount_unknown` when the service cannot know",
            },
            "amount_unknown": {
                "type": "string",
                "enum": ["not_scanned_in_this_bill", "scan_answer_had_no_price"],
            },
        },
    },
}

POS_RESULT_FIELDS: dict[str, dict[str, object]] = {
    "pos.bill_total": {
        **_ANY_POS,
        **_BOOKING,
        "bill_total": {**_AMOUNT_OUT, "description": "succeeded: the bill total now set"},
    },
    "pos.scan": {
        **_ANY_POS,
        **_BOOKING,
        "amount": {
            **_AMOUNT_OUT,
            "pattern": "^-?(?:0|[1-9][0-9]*)\\.[0-9]{2}$",
            "description": "succeeded: what the voucher takes off the bill, as the upstream "
            "priced it (absent when it sent no readable price)",
        },
    },
    "pos.remove": {**_ANY_POS, **_BOOKING},
    "pos.redeem": {
        **_ANY_POS,
        **_BOOKING,
        "vouchers": {
            **_VOUCHERS_BOOKED,
            "description": "the vouchers redeemed, each with what it paid: book a succeeded "
            "redeem from these (a superseding or reconciled result carries the same)",
        },
        "vouchers_total": {**_NULLABLE_AMOUNT, "description": "the sum of the amounts"},
        "bill_total": {**_NULLABLE_AMOUNT, "description": "the bill's total"},
        "voucher_codes": {**_CODES_OUT, "description": "succeeded, or failed when reconciled"},
        "reconciled": {
            "type": "boolean",
            "description": "true: decided by scanning the vouchers after the redeem's answer "
            "was lost, not by the redeem's own answer",
        },
        "voucher_states": {
            "type": "object",
            "additionalProperties": {"enum": ["redeemed", "not_redeemed"]},
            "description": "indeterminate after a lost answer: what each voucher's scan showed",
        },
    },
    "pos.cancel": {
        **_ANY_POS,
        **_BOOKING,
        "voucher_codes": _CODES_OUT,
        "vouchers": {
            **_VOUCHERS_BOOKED,
            "description": "the vouchers released, each with what it would have paid",
        },
    },
}
