"""A reference ledger: books POS redeems from `pos.results` alone.

What a ledger team needs to get right, and nothing else:
- every result is read at least once, maybe more (a replay publishes the same result id again):
  deduplicate by the result's `id`;
- a result may be superseded (an `indeterminate` one settled later, by the service or an
  operator): the result whose `supersedes` names the one standing replaces it, and a copy of a
  superseded result read late changes nothing;
- only a standing `succeeded` `pos.redeem` moved money: book each of its `vouchers` with its
  `amount`, under its `bill_id`; an amount that is null (the service says why) is not guessed
  but set aside for a person.

It needs no other event of the till: no bill to rebuild from earlier scans.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any


@dataclass(frozen=True)
class Entry:
    voucher_code: str
    amount: Decimal
    bill_id: str | None
    terminal: str | None
    command_id: str


@dataclass
class Ledger:
    _seen: set[str] = field(default_factory=set)
    _superseded: set[str] = field(default_factory=set)
    # Per command (source, id): the result standing now, as (result id, its data).
    _standing: dict[tuple[str, str], tuple[str, dict[str, Any]]] = field(default_factory=dict)

    def take(self, event: dict[str, Any]) -> None:
        """One result event (the CloudEvent, structured mode) as read from the topic."""
        result_id, data = event["id"], event["data"]
        if result_id in self._seen or result_id in self._superseded:
            return
        self._seen.add(result_id)
        key = (data["command_source"], data["command_id"])
        if data.get("supersedes"):
            self._superseded.add(data["supersedes"])
        standing = self._standing.get(key)
        if standing is None or standing[0] in self._superseded:
            self._standing[key] = (result_id, data)

    @property
    def entries(self) -> list[Entry]:
        booked = []
        for _, data in self._standing.values():
            if data["command_type"] != "pos.redeem" or data["outcome"] != "succeeded":
                continue
            for voucher in data.get("vouchers") or []:
                if voucher.get("amount") is not None:
                    booked.append(
                        Entry(
                            voucher["code"],
                            Decimal(voucher["amount"]),
                            data.get("bill_id"),
                            data.get("terminal"),
                            data["command_id"],
                        )
                    )
        return booked

    @property
    def set_aside(self) -> list[dict[str, Any]]:
        """Vouchers of succeeded redeems whose amount the service could not know."""
        return [
            {**voucher, "command_id": data["command_id"]}
            for _, data in self._standing.values()
            if data["command_type"] == "pos.redeem" and data["outcome"] == "succeeded"
            for voucher in data.get("vouchers") or []
            if voucher.get("amount") is None
        ]

    def paid(self) -> dict[str, Decimal]:
        """What each voucher paid, as booked."""
        books: dict[str, Decimal] = {}
        for entry in self.entries:
            books[entry.voucher_code] = books.get(entry.voucher_code, Decimal(0)) + entry.amount
        return books
