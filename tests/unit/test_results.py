"""What every command passes before any call (precheck), and what an upstream amount is."""

from __future__ import annotations

import pytest


def test_an_upstream_amount_that_is_not_finite_is_no_amount() -> None:
    from decimal import Decimal

    from voucher_bridge.upstream import money

    assert money("12.5") == Decimal("12.50") and money(7) == Decimal("7.00")
    for odd in ("NaN", "nan", "Infinity", "-Infinity", "sNaN", 1.5, True, "12,50", None):
        assert money(odd) is None, odd


@pytest.mark.parametrize("data", [[], "", 0, False])
def test_data_that_is_not_an_object_is_refused_even_where_no_fields_are_needed(
    data: object,
) -> None:
    from datetime import UTC, datetime

    from voucher_bridge.results import precheck
    from voucher_contracts import CommandEnvelope
    from voucher_contracts.coupon import COUPON_COMMAND_TYPES

    command = CommandEnvelope(
        id="c-1",
        source="/backoffice",
        type="coupon.list_wallets",
        subject="acct",
        time=datetime.now(UTC),
        data=data,
    )
    model = COUPON_COMMAND_TYPES["coupon.list_wallets"]
    _, answered = precheck(command, "acct", model, lambda _: True, "unknown_account")
    assert answered is not None and answered.reason == "validation_error"
    none = command.model_copy(update={"data": None})
    _, answered = precheck(none, "acct", model, lambda _: True, "unknown_account")
    assert answered is None
