"""The `data` of the five `pos.*` commands (design.md), and what their results add."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from voucher_contracts.money import AMOUNT_JSON_SCHEMA, strict_amount

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
    WithJsonSchema({**AMOUNT_JSON_SCHEMA, "maximum": float(MAX_BILL_TOTAL)}),
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
    voucher_codes: Annotated[list[VoucherCode], Field(min_length=1), AfterValidator(_unique)]


class Cancel(_PosData):
    voucher_codes: Annotated[list[VoucherCode], AfterValidator(_unique)] = Field(
        default_factory=list
    )


PosCommandData = BillTotal | Scan | Remove | Redeem | Cancel

POS_COMMAND_TYPES: dict[str, type[_PosData]] = {
    "pos.bill_total": BillTotal,
    "pos.scan": Scan,
    "pos.remove": Remove,
    "pos.redeem": Redeem,
    "pos.cancel": Cancel,
}
