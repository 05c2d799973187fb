"""Amounts in command data: one strict grammar for every amount, exact decimals, never floats.

An amount is ASCII digits with at most two decimal places: no sign, no exponent, no digit
separators, no surrounding blanks, no leading point (`"12"`, `"12.5"`, `"12.50"`, `"0.05"`).
A JSON number is held to the same: an integer, or a decimal with at most two places and no
exponent (JSON numbers are decoded to Decimal, never float: see binding.decode_json).
Python's own `Decimal()` would take `"+5"`, `"1_000"`, `" 5"`, `"1e2"` and Arabic-Indic
digits; none of them is an amount a till or a back office means to send.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

# At most 15 digits before the point: more than any till or wallet holds, and well inside
# Decimal's default 28-digit precision (so quantizing never raises).
_AMOUNT = re.compile(r"(?:0|[1-9][0-9]{0,14})(?:\.[0-9]{1,2})?")
_CENTS = Decimal("0.01")
_LIMIT = 10**15

# How the grammar reads in the JSON Schemas of the AsyncAPI document.
AMOUNT_JSON_SCHEMA = {
    "anyOf": [
        {"type": "string", "pattern": "^" + _AMOUNT.pattern + "$"},
        {"type": "number", "minimum": 0, "multipleOf": 0.01},
    ],
    "description": "an amount: ASCII digits, at most 2 decimal places; no sign, exponent, "
    "separators or blanks (a JSON number: the same, written without an exponent)",
}


def strict_amount(value: Any) -> Decimal:
    """A `BeforeValidator` for money fields: the amount, to the cent, or ValueError."""
    if isinstance(value, bool | float):
        raise ValueError("must be a decimal number or a decimal string, not a float")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        if value >= _LIMIT:
            raise ValueError("must be less than 10^15")
        return Decimal(value).quantize(_CENTS)
    if isinstance(value, Decimal):
        sign, _, exponent = value.as_tuple()
        if not value.is_finite() or sign or not isinstance(exponent, int):
            raise ValueError("must be a finite amount without a sign")
        if exponent > 0:
            raise ValueError("must be written without an exponent")
        if exponent < -2:
            raise ValueError("must have at most 2 decimal places")
        if value >= _LIMIT:
            raise ValueError("must be less than 10^15")
        return value.quantize(_CENTS)
    if isinstance(value, str):
        if not _AMOUNT.fullmatch(value):
            raise ValueError(
                "must be ASCII digits with at most 2 decimal places "
                "(no sign, exponent, separators or blanks)"
            )
        return Decimal(value).quantize(_CENTS)
    raise ValueError("must be a decimal number or a decimal string")


def amount_text(amount: Decimal) -> str:
    """How an amount goes upstream: a whole amount as an integer (`"25"`), any other with
    two places (`"5.50"`); never an exponent."""
    if amount == amount.to_integral_value():
        return format(amount.quantize(Decimal(1)), "f")
    return format(amount.quantize(_CENTS), "f")
