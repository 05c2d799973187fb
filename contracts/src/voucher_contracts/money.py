"""Amounts in command data: exact decimals, never floats."""

from __future__ import annotations

from typing import Any


def exact_decimal(value: Any) -> Any:
    """A `BeforeValidator` for money fields: refuses floats (and booleans), strips strings.

    Money never goes through float: a JSON number is decoded to Decimal before it gets here
    (see binding.decode_json); a float here means a caller lost precision already.
    """
    if isinstance(value, bool | float):
        raise ValueError("must be a decimal number or a decimal string, not a float")
    if isinstance(value, str):
        value = value.strip()
    return value
