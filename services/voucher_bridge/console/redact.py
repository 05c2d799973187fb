"""What the console never shows: secrets a record or a result may hold.

Commands from the back office may carry a mail token and its checksum (coupon.create), a
record's headers may carry credentials a client added, and results may hold PINs (shown only
where COUPON_RESULT_PINS=shown). Each is replaced by "****", wherever it sits in the JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

MASK = "****"

# Names of fields and headers whose values are secrets (matched case-blind, anywhere in the
# name: `mail_token`, `X-Token`, `api_key`, `password`, `checksum`, `authorization`, ...).
_SECRET = re.compile(r"token|passw|secret|api_?key|apikey|checksum|authoriz|cookie", re.I)
_PIN = re.compile(r"(^|_)pins?$", re.I)


def redact(value: Any, show_pins: bool = False) -> Any:
    """`value` (decoded JSON) with every secret field's value masked."""
    if isinstance(value, dict):
        return {
            k: MASK if _is_secret(k, show_pins) and v is not None else redact(v, show_pins)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v, show_pins) for v in value]
    return value


def _is_secret(name: str, show_pins: bool) -> bool:
    return bool(_SECRET.search(name)) or (not show_pins and bool(_PIN.search(name)))


def redact_headers(headers: Sequence[tuple[str, bytes]]) -> list[tuple[str, str]]:
    """Headers as text (hex where not UTF-8), secret ones masked."""
    shown = []
    for name, value in headers:
        if _SECRET.search(name):
            shown.append((name, MASK))
        else:
            shown.append((name, text_or_hex(value)[0]))
    return shown


def text_or_hex(raw: bytes | None, show_pins: bool = False) -> tuple[str, str]:
    """Bytes to show, and how they are shown: "json" (pretty, secrets masked), "text",
    "hex", or "none"."""
    if raw is None:
        return "", "none"
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return raw.hex(" "), "hex"
    try:
        decoded = json.loads(text)
    except (ValueError, RecursionError):
        return text, "text"
    return json.dumps(redact(decoded, show_pins), indent=2, ensure_ascii=False), "json"
