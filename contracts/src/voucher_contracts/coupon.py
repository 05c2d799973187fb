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

from voucher_contracts.money import AMOUNT_JSON_SCHEMA, strict_amount

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


Text = Annotated[str, BeforeValidator(_text), Field(min_length=1, max_length=256)]
# The strict amount grammar (money.py); sent upstream as `money.amount_text` writes it.
Amount = Annotated[
    Decimal,
    BeforeValidator(strict_amount),
    Field(gt=0, max_digits=12),
    WithJsonSchema({**AMOUNT_JSON_SCHEMA, "exclusiveMinimum": 0}),
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
    transferable: bool
    reusable: bool
    # The mail token and its checksum authorise the creation: kept out of reprs and logs.
    token_field: SecretStr
    token_checksum_field: SecretStr
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
