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
_INTEGER_DIGITS = 15
_CENTS = Decimal("0.01")
_LIMIT = 10**_INTEGER_DIGITS


def _grammar(integer_digits: int, positive: bool = False, max_digits: int | None = None) -> str:
    """The grammar as a regular expression, for at most `integer_digits` digits before the
    point; `positive`: more than zero; `max_digits`: pydantic's `max_digits` too, which counts
    the digits of the amount without its fraction's trailing zeros."""
    if max_digits is None and not positive:
        return f"(?:0|[1-9][0-9]{{0,{integer_digits - 1}}})(?:\\.[0-9]{{1,2}})?"
    fractions = {2: "\\.[0-9]{1,2}", 1: "\\.[0-9]0?", 0: "\\.00?"}
    # A whole part of `k` digits leaves `max_digits - k` for the fraction's significant ones.
    by_places: dict[int, list[int]] = {}
    for k in range(1, integer_digits + 1):
        places = 2 if max_digits is None else min(2, max_digits - k)
        if places >= 0:
            by_places.setdefault(places, []).append(k)
    zero = "0\\.(?:[1-9][0-9]?|0[1-9])" if positive else "0(?:\\.[0-9]{1,2})?"
    branches = [zero]
    for places, ks in sorted(by_places.items(), reverse=True):
        branches.append(f"[1-9][0-9]{{{ks[0] - 1},{ks[-1] - 1}}}(?:{fractions[places]})?")
    return "(?:" + "|".join(branches) + ")"


_AMOUNT = re.compile(_grammar(_INTEGER_DIGITS))


def amount_json_schema(
    *, integer_digits: int = _INTEGER_DIGITS, positive: bool = False, max_digits: int | None = None
) -> dict[str, Any]:
    """The grammar in JSON Schema, for an amount of at most `integer_digits` digits before the
    point (`positive`: more than zero; `max_digits`: as pydantic's, see `_grammar`).

    A string is held to the grammar by `pattern`. A number gets its bounds only: "at most two
    places" has no portable JSON Schema form (`multipleOf: 0.01` fails validators that divide
    in binary floating point, on amounts as plain as 0.07), so a number with more places (or
    more digits than `max_digits`) passes the schema and is refused by the service (`rejected`,
    `validation_error`).
    """
    if max_digits is not None:
        integer_digits = min(integer_digits, max_digits)
    number: dict[str, Any] = {"type": "number", "exclusiveMaximum": 10**integer_digits}
    number["exclusiveMinimum" if positive else "minimum"] = 0
    return {
        "anyOf": [
            {"type": "string", "pattern": f"^{_grammar(integer_digits, positive, max_digits)}$"},
            number,
        ],
        "description": "an amount: a string of ASCII digits with at most 2 decimal places "
        "(no sign, exponent, separators or blanks), or a JSON number written so",
        "examples": ["12.50", "12"],
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
