"""eVOUCHER POS API sandbox: the upstream as its Postman collection records it.

`EvoucherSandbox` is the state machine (no HTTP: one method per route, each returning the JSON
body the upstream would answer); `create_app` puts it behind the upstream's URLs, headers,
session cookie and the shared fault injection, plus an admin API under `/_sandbox/`.

What the collection records is reproduced verbatim: the routes, the request bodies, every
message, HTTP 200 for failures too, `Set-Cookie: OCSESSID=<26 hex>; path=/`, the no-cache
headers and gzip. Where it is silent the choices are marked "sandbox choice" below.

Everything is in memory and single-threaded (one asyncio loop): every handler is synchronous,
so each call is atomic, and every lookup is a dict access. Locks expire lazily, when the
voucher or the bill is next touched, against an injectable clock.

Every call a terminal's handling sees (`handle`: authenticated, route known, a JSON object) is
logged per machine, so that tests can check the order in which a client called for one till:
`{"seq", "at", "route", "body"}`, `seq` increasing over all terminals and never reused (not
even across a reset), `at` the sandbox clock. Calls faulted with 503/504 never get there (they
are not applied); drop-after-apply and apply-late ones do. The last `max_logged_calls` calls of
each machine are kept.

Generated terminals and vouchers (seed option `generate`), for benchmarks; for i in
[0, terminals) and j in [0, vouchers_per_terminal):
  machine name  gen-till-{i:06d}
  token         {token_prefix}{i:06d}                (token_prefix defaults to "gen-token-")
  store         gen-store-{i // terminals_per_store:06d}
  voucher code  9{i:06d}{j:04d}                      (11 digits), of terminal i's store
  value         (10, 20, 50, 100)[j % 4] EUR, expiring on `expires` (default: never)
"""

from __future__ import annotations

import gzip
import itertools
import json
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from voucher_sandboxes.faults import (
    FaultConfig,
    FaultInjector,
    FaultKind,
    SandboxStarlette,
    add_items,
    drop_connection,
    error_response,
    faults_route,
    parse_json_object,
    settings_route,
)

CENT = Decimal("0.01")
ZERO = Decimal("0.00")
SESSION_COOKIE = "OCSESSID"
DEFAULT_LOCK_TTL_S = 300.0  # "If it is not unlocked ... within 5 minutes" (scan_voucher_api)

BILL_TOTAL = "bill_total_api"
SCAN_VOUCHER = "scan_voucher_api"
REMOVE_VOUCHER = "remove_voucher_api"
REDEEM_VOUCHER = "redeem_voucher_api"
CANCEL_PAYMENT = "cancel_payment_api"
ROUTE_NAMES = (BILL_TOTAL, SCAN_VOUCHER, REMOVE_VOUCHER, REDEEM_VOUCHER, CANCEL_PAYMENT)
# The `route` query parameter of /index.php -> route name.
_ROUTES = {f"account/{name}": name for name in ROUTE_NAMES}

GENERATED_VALUES = (Decimal("10.00"), Decimal("20.00"), Decimal("50.00"), Decimal("100.00"))

# Messages recorded in the collection, verbatim.
MSG_BILL_UPDATED = "Bill total has been updated successfully"
MSG_VALID = "The voucher is valid"
MSG_DELETED = "Voucher has been deleted."
MSG_CANCELED = "Payment has been canceled."
MSG_NOTHING_DUE = "Remaining bill total is 0, cannot redeem more vouchers."
# Not recorded (the collection has no call without a valid token): the sandbox's wording.
MSG_INVALID_TOKEN = "Invalid token!"


def msg_not_exist(code: str) -> str:
    return f"Voucher with code {code} does not exist!"


def msg_already_redeemed(code: str) -> str:
    return f"Voucher with code {code} has already been redeemed!"


def msg_expired(code: str, expired_on: date) -> str:
    return f"Voucher with code {code} expired on {expired_on:%d-%m-%Y}."


def msg_wrong_store(code: str) -> str:
    return f"Voucher with code {code} cannot be redeemed at your store!"


def msg_redeemed(codes: list[str]) -> str:
    if len(codes) == 1:
        return f"Voucher with code {codes[0]} have been successfully redeemed.!"
    return f"Vouchers with codes {','.join(codes)} have been successfully redeemed.!"


# --- seed -------------------------------------------------------------------------------------


class StoreSeed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    name: str = ""


class TerminalSeed(BaseModel):
    """One POS machine: its access token, the token's name (= machine_name) and its store."""

    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1)
    machine_name: str = Field(min_length=1)
    store: str = Field(min_length=1)


class VoucherSeed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(min_length=1)
    value: Decimal = Field(gt=0)
    store: str | None = None  # None: redeemable at any store
    expires: date | None = None  # last valid day; None: never expires
    redeemed: bool = False


class GenerateSpec(BaseModel):
    """Many deterministic terminals and vouchers (scheme in the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    terminals: int = Field(default=0, ge=0, le=999_999)
    vouchers_per_terminal: int = Field(default=0, ge=0, le=9_999)
    terminals_per_store: int = Field(default=1, ge=1)
    token_prefix: str = "gen-token-"
    expires: date | None = None


class EvoucherSeed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stores: list[StoreSeed] = Field(default_factory=list)
    terminals: list[TerminalSeed] = Field(default_factory=list)
    vouchers: list[VoucherSeed] = Field(default_factory=list)
    generate: GenerateSpec | None = None


def load_seed(path: Path) -> EvoucherSeed:
    return EvoucherSeed.model_validate_json(path.read_bytes())


def generated_machine_name(i: int) -> str:
    return f"gen-till-{i:06d}"


def generated_token(i: int, prefix: str = "gen-token-") -> str:
    return f"{prefix}{i:06d}"


def generated_store(i: int, terminals_per_store: int = 1) -> str:
    return f"gen-store-{i // terminals_per_store:06d}"


def generated_voucher_code(i: int, j: int) -> str:
    return f"9{i:06d}{j:04d}"


# --- state ------------------------------------------------------------------------------------

BillKey = tuple[str, str]  # (machine name, session id); the session is "" when not strict


@dataclass(slots=True, frozen=True)
class Terminal:
    token: str
    machine_name: str
    store: str


@dataclass(slots=True)
class Lock:
    machine: str
    bill_key: BillKey  # the bill that counted this voucher when it was scanned
    price: Decimal
    expires_at: float


@dataclass(slots=True)
class Voucher:
    code: str
    value: Decimal
    store: str | None
    expires: date | None
    redeemed: bool = False
    redeem_count: int = 0  # successful redemptions; more than 1 would be a double redemption
    # What it paid when redeemed (its lock's price: the scan's answer), and on which machine:
    # the sandbox's own record, for a ledger's books to be checked against.
    paid: Decimal | None = None
    redeemed_by: str | None = None
    lock: Lock | None = None


@dataclass(slots=True)
class Bill:
    machine: str
    session: str
    total: Decimal
    remaining: Decimal
    # Vouchers scanned into this bill -> the price each one pays of it.
    holds: dict[str, Decimal] = field(default_factory=dict)


def _ok(message: str, **fields: Any) -> dict[str, Any]:
    return {"success": 1, **fields, "message": message}


def _fail(message: str) -> dict[str, Any]:
    return {"success": 0, "message": message}


def _money(value: Decimal) -> str:
    return f"{value.quantize(CENT, rounding=ROUND_HALF_UP)}"


def _parse_amount(raw: object) -> Decimal | None:
    """A non-negative amount sent as a JSON number (or numeric string); never via float math."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        return None
    try:
        # str() of a float is its shortest repr, so 12.3 becomes Decimal("12.3"), not 12.29999...
        amount = Decimal(str(raw))
    except InvalidOperation:
        return None
    if not amount.is_finite() or amount < 0:
        return None
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


def _code_of(raw: object) -> str | None:
    # The collection sends codes as strings; PHP would take a number too, so the sandbox does.
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, str) and raw.strip():
        return raw.strip()
    return None


def _split_codes(raw: str) -> list[str]:
    """`a;b` -> [a, b]; blanks dropped, duplicates kept once (so no code is redeemed twice)."""
    return list(dict.fromkeys(part.strip() for part in raw.split(";") if part.strip()))


class EvoucherSandbox:
    """The eVOUCHER upstream's state: vouchers, terminals, per-session bills, locks."""

    def __init__(
        self,
        seed: EvoucherSeed | None = None,
        *,
        strict_session: bool = True,
        lock_ttl_s: float = DEFAULT_LOCK_TTL_S,
        clock: Callable[[], float] = time.time,
        max_sessions: int = 100_000,
        max_logged_calls: int = 1_000,
    ) -> None:
        self.seed = seed or EvoucherSeed()
        # strict: a bill belongs to (machine, OCSESSID), so a client that loses its cookie jar
        # loses its bill; not strict: a bill belongs to the machine (the token) alone.
        self.strict_session = strict_session
        self.lock_ttl_s = lock_ttl_s
        self.clock = clock  # seconds since the epoch; also gives "today" (UTC) for expiry
        self.max_sessions = max_sessions
        self.max_logged_calls = max_logged_calls  # per machine, so a long benchmark stays bounded
        self._call_seq = itertools.count(1)  # not reset: a seq is never handed out twice
        self._handlers: dict[str, Callable[[Terminal, Mapping[str, Any], str], dict[str, Any]]] = {
            BILL_TOTAL: self.bill_total,
            SCAN_VOUCHER: self.scan_voucher,
            REMOVE_VOUCHER: self.remove_voucher,
            REDEEM_VOUCHER: self.redeem_vouchers,
            CANCEL_PAYMENT: self.cancel_payment,
        }
        self.reset()

    @classmethod
    def from_seed_file(cls, path: Path, **kwargs: Any) -> EvoucherSandbox:
        return cls(load_seed(path), **kwargs)

    # --- setup ----------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the seed: vouchers, terminals; no bills, locks, sessions, counts, call log."""
        self._vouchers: dict[str, Voucher] = {}
        self._terminals: dict[str, Terminal] = {}
        self._bills: dict[BillKey, Bill] = {}
        self._machine_bills: dict[str, set[BillKey]] = {}
        self._machine_locks: dict[str, set[str]] = {}  # machine -> codes it has locked
        self._sessions: dict[str, None] = {}  # issued OCSESSIDs, least recently used first
        self.calls: dict[str, int] = dict.fromkeys(ROUTE_NAMES, 0)
        self.failures: dict[str, int] = dict.fromkeys(ROUTE_NAMES, 0)
        self.redemptions = 0
        self._call_log: dict[str, deque[dict[str, Any]]] = {}  # machine name -> oldest first
        self.add_terminals(self.seed.terminals)
        self.add_vouchers(self.seed.vouchers)
        gen = self.seed.generate
        if gen is not None:
            # Built directly (no pydantic per item): a benchmark seed has ~10^5 vouchers.
            for i in range(gen.terminals):
                store = generated_store(i, gen.terminals_per_store)
                token = generated_token(i, gen.token_prefix)
                self._terminals[token] = Terminal(token, generated_machine_name(i), store)
                for j in range(gen.vouchers_per_terminal):
                    code = generated_voucher_code(i, j)
                    value = GENERATED_VALUES[j % len(GENERATED_VALUES)]
                    self._vouchers[code] = Voucher(code, value, store, gen.expires)

    def add_terminals(self, terminals: Iterable[TerminalSeed]) -> int:
        """Add or replace terminals by token."""
        count = 0
        for seed in terminals:
            self._terminals[seed.token] = Terminal(seed.token, seed.machine_name, seed.store)
            count += 1
        return count

    def add_vouchers(self, vouchers: Iterable[VoucherSeed]) -> int:
        """Add or replace vouchers by code (a replaced voucher starts unlocked, count 0)."""
        count = 0
        for seed in vouchers:
            old = self._vouchers.get(seed.code)
            if old is not None and old.lock is not None:
                self._release(old)
            self._vouchers[seed.code] = Voucher(
                code=seed.code,
                value=seed.value.quantize(CENT, rounding=ROUND_HALF_UP),
                store=seed.store,
                expires=seed.expires,
                redeemed=seed.redeemed,
            )
            count += 1
        return count

    # --- lookups --------------------------------------------------------------------------

    def terminal(self, token: str | None) -> Terminal | None:
        return self._terminals.get(token) if token else None

    def voucher(self, code: str) -> Voucher | None:
        """The voucher, with an expired lock already released."""
        voucher = self._vouchers.get(code)
        if voucher is not None:
            self._live_lock(voucher, self.clock())
        return voucher

    def bill(self, machine_name: str, session: str = "") -> Bill | None:
        bill = self._bills.get(self._key(machine_name, session))
        if bill is not None:
            self._expire_holds(bill, self.clock())
        return bill

    def known_machine(self, machine_name: str) -> bool:
        """A terminal has this machine name (now, or when it was called since the reset)."""
        return machine_name in self._call_log or any(
            t.machine_name == machine_name for t in self._terminals.values()
        )

    def call_log(self, machine_name: str) -> list[dict[str, Any]]:
        """The calls this machine's handling saw since the reset, oldest first."""
        return list(self._call_log.get(machine_name, ()))

    def session_id(self, cookie: str | None) -> str:
        """The client's OCSESSID when the sandbox issued it, else a new one (26 hex digits)."""
        sessions = self._sessions
        if cookie is not None and cookie in sessions:
            del sessions[cookie]  # move to the most recently used end
            sessions[cookie] = None
            return cookie
        sid = secrets.token_hex(13)
        sessions[sid] = None
        if len(sessions) > self.max_sessions:
            # Bounded for benchmarks whose clients drop cookies; the oldest session is forgotten.
            del sessions[next(iter(sessions))]
        return sid

    # --- routes ---------------------------------------------------------------------------

    def handle(
        self, route: str, terminal: Terminal, body: Mapping[str, Any], session: str = ""
    ) -> dict[str, Any]:
        """Run route `route` (e.g. "scan_voucher_api"): logged, counted, failures counted."""
        log = self._call_log.get(terminal.machine_name)
        if log is None:
            log = self._call_log[terminal.machine_name] = deque(maxlen=self.max_logged_calls)
        # Logged before the handler runs: the order of arrival, whatever the handler answers.
        log.append(
            {"seq": next(self._call_seq), "at": self.clock(), "route": route, "body": dict(body)}
        )
        payload = self._handlers[route](terminal, body, session)
        self.calls[route] += 1
        if not payload["success"]:
            self.failures[route] += 1
        return payload

    def bill_total(
        self, terminal: Terminal, body: Mapping[str, Any], session: str = ""
    ) -> dict[str, Any]:
        """Start a payment: a new bill, and every earlier lock of the machine released."""
        machine = terminal.machine_name
        sent_name = body.get("machine_name")
        if sent_name != machine:
            # Not recorded; the collection only says machine_name is the token's name.
            return _fail(f"Machine name {sent_name} does not match the token name {machine}!")
        raw_total = body.get("bill_total")
        total = _parse_amount(raw_total)
        if total is None:
            return _fail(f"Invalid bill total {raw_total}!")  # not recorded either
        # One POS machine takes one payment at a time: a new bill total abandons the previous
        # payment, whichever session it was in, and frees what it had scanned.
        self._release_machine(machine)
        key = self._key(machine, session)
        self._bills[key] = Bill(machine, key[1], total, total)
        self._machine_bills.setdefault(machine, set()).add(key)
        return _ok(MSG_BILL_UPDATED, bill_total=raw_total)

    def scan_voucher(
        self, terminal: Terminal, body: Mapping[str, Any], session: str = ""
    ) -> dict[str, Any]:
        """Validate a voucher, lock it to the machine, and count min(value, due) of the bill."""
        code = _code_of(body.get("voucher_code"))
        if code is None:
            return _fail(msg_not_exist(""))  # not recorded: an empty code simply does not exist
        now = self.clock()
        voucher = self._vouchers.get(code)
        failure = self._check_voucher(voucher, code, terminal, now)
        if failure is not None:
            return failure
        assert voucher is not None  # _check_voucher said so
        lock = self._live_lock(voucher, now)
        if lock is not None and lock.machine != terminal.machine_name:
            # Sandbox choice: the collection records no message for a voucher locked by another
            # machine; "cannot be redeemed at your store" is the recorded one that fits best.
            return _fail(msg_wrong_store(code))
        key = self._key(terminal.machine_name, session)
        bill = self._bills.get(key)
        if bill is not None:
            self._expire_holds(bill, now)
        if lock is not None and bill is not None and code in bill.holds:
            # Scanned again by the same machine in the same bill: the same price, counted once;
            # the scan renews the lock.
            lock.expires_at = now + self.lock_ttl_s
            return _ok(MSG_VALID, price=_money(bill.holds[code]))
        if bill is None or bill.remaining <= 0:
            return _fail(MSG_NOTHING_DUE)
        if lock is not None:
            # This machine's lock from another bill (an abandoned session): move it here.
            self._release(voucher)
        price = min(voucher.value, bill.remaining)
        bill.remaining -= price
        bill.holds[code] = price
        voucher.lock = Lock(terminal.machine_name, key, price, now + self.lock_ttl_s)
        self._machine_locks.setdefault(terminal.machine_name, set()).add(code)
        return _ok(MSG_VALID, price=_money(price))

    def remove_voucher(
        self, terminal: Terminal, body: Mapping[str, Any], session: str = ""
    ) -> dict[str, Any]:
        """Unlock a scanned voucher and give its price back to the bill's remaining due."""
        code = _code_of(body.get("voucher_code"))
        voucher = self._vouchers.get(code) if code is not None else None
        if voucher is None:
            return _fail(msg_not_exist(code or ""))
        lock = self._live_lock(voucher, self.clock())
        if lock is not None and lock.machine == terminal.machine_name:
            self._release(voucher)
        # Sandbox choice: removing a voucher this machine does not hold (never scanned, lock
        # expired, redeemed, or another machine's) changes nothing and still succeeds.
        return _ok(MSG_DELETED)

    def redeem_vouchers(
        self, terminal: Terminal, body: Mapping[str, Any], session: str = ""
    ) -> dict[str, Any]:
        """Redeem `voucher_codes` ("a;b"): all of them, or none (the first failure answers)."""
        raw = body.get("voucher_codes")
        codes = _split_codes(raw) if isinstance(raw, str) else []
        if not codes:
            return _fail(msg_not_exist(""))  # not recorded: no code is a code that doesn't exist
        now = self.clock()
        vouchers: list[Voucher] = []
        for code in codes:
            voucher = self._vouchers.get(code)
            failure = self._check_voucher(voucher, code, terminal, now)
            if failure is not None:
                return failure
            assert voucher is not None
            lock = self._live_lock(voucher, now)
            if lock is None:
                # Sandbox choice: a code this machine does not hold (never scanned, or its lock
                # expired) is answered as not existing, as a lookup of the machine's scanned
                # vouchers would; a client must scan within the lock TTL before redeeming.
                return _fail(msg_not_exist(code))
            if lock.machine != terminal.machine_name:
                return _fail(msg_wrong_store(code))  # locked by another machine: as in scan
            vouchers.append(voucher)
        # The lock may sit in another session's bill of this machine: the lock belongs to the
        # machine (the token), only the bill's arithmetic is per session. Sandbox choice: a
        # voucher is redeemed whole even when it paid less than its value (the collection
        # shows no remaining balance on a voucher).
        for voucher in vouchers:
            assert voucher.lock is not None
            voucher.paid, voucher.redeemed_by = voucher.lock.price, terminal.machine_name
            self._release(voucher, restore=False)  # paid: its price stays off the remaining due
            voucher.redeemed = True
            voucher.redeem_count += 1
        self.redemptions += len(vouchers)
        return _ok(msg_redeemed(codes))

    def cancel_payment(
        self, terminal: Terminal, body: Mapping[str, Any], session: str = ""
    ) -> dict[str, Any]:
        """Abandon the payment: unlock the listed codes (all of the machine's for `{}`)."""
        machine = terminal.machine_name
        raw = body.get("voucher_codes")
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            for code in list(self._machine_locks.get(machine, ())):
                self._release(self._vouchers[code])
        elif isinstance(raw, str):
            now = self.clock()
            for code in _split_codes(raw):
                voucher = self._vouchers.get(code)
                if voucher is None:
                    continue  # sandbox choice: cancel always succeeds, as both recordings do
                lock = self._live_lock(voucher, now)
                if lock is not None and lock.machine == machine:
                    self._release(voucher)
        else:
            return _fail(f"Invalid voucher codes {raw}!")  # not recorded
        # Sandbox choice: codes scanned but not listed stay locked until their TTL (or the next
        # bill total), though the bill is gone: a client must list everything it scanned.
        key = self._key(machine, session)
        if self._bills.pop(key, None) is not None:
            self._machine_bills.get(machine, set()).discard(key)
        return _ok(MSG_CANCELED)

    # --- admin view -----------------------------------------------------------------------

    def expire_locks(self) -> None:
        """Release every lock whose TTL has passed (they are otherwise released lazily)."""
        now = self.clock()
        for codes in list(self._machine_locks.values()):
            for code in list(codes):
                self._live_lock(self._vouchers[code], now)

    def snapshot(
        self, codes: Iterable[str] | None = None, with_vouchers: bool = True
    ) -> dict[str, Any]:
        """State as JSON-able data: vouchers (all, or `codes`), bills, totals. Money as strings."""
        self.expire_locks()
        now = self.clock()
        if codes is None:
            selected: Iterable[Voucher] = self._vouchers.values() if with_vouchers else ()
        else:
            selected = (v for c in codes if (v := self._vouchers.get(c)) is not None)
        vouchers = [
            {
                "code": v.code,
                "value": _money(v.value),
                "store": v.store,
                "expires": v.expires.isoformat() if v.expires else None,
                "redeemed": v.redeemed,
                "redeem_count": v.redeem_count,
                "paid": _money(v.paid) if v.paid is not None else None,
                "redeemed_by": v.redeemed_by,
                "locked_by": v.lock.machine if v.lock else None,
                "lock_expires_in_s": round(v.lock.expires_at - now, 3) if v.lock else None,
            }
            for v in selected
        ]
        bills = [
            {
                "machine": b.machine,
                "session": b.session,
                "total": _money(b.total),
                "remaining": _money(b.remaining),
                "holds": {code: _money(price) for code, price in b.holds.items()},
            }
            for b in self._bills.values()
        ]
        locked = sum(len(codes) for codes in self._machine_locks.values())
        return {
            "strict_session": self.strict_session,
            "lock_ttl_s": self.lock_ttl_s,
            "vouchers": vouchers,
            "bills": bills,
            "totals": {
                "vouchers": len(self._vouchers),
                "terminals": len(self._terminals),
                "redeemed": sum(1 for v in self._vouchers.values() if v.redeemed),
                "redemptions": self.redemptions,
                "double_redemptions": sum(1 for v in self._vouchers.values() if v.redeem_count > 1),
                "locked": locked,
                "bills": len(self._bills),
                "sessions": len(self._sessions),
                "calls": dict(self.calls),
                "failures": dict(self.failures),
            },
        }

    # --- internals ------------------------------------------------------------------------

    def _key(self, machine: str, session: str) -> BillKey:
        return (machine, session if self.strict_session else "")

    def _check_voucher(
        self, voucher: Voucher | None, code: str, terminal: Terminal, now: float
    ) -> dict[str, Any] | None:
        """The recorded scan failures, in the collection's order; None when the voucher is ok."""
        if voucher is None:
            return _fail(msg_not_exist(code))
        if voucher.redeemed:
            return _fail(msg_already_redeemed(code))
        if voucher.expires is not None and voucher.expires < _today(now):
            return _fail(msg_expired(code, voucher.expires))
        if voucher.store is not None and voucher.store != terminal.store:
            return _fail(msg_wrong_store(code))
        return None

    def _live_lock(self, voucher: Voucher, now: float) -> Lock | None:
        lock = voucher.lock
        if lock is not None and lock.expires_at <= now:
            self._release(voucher)  # the upstream unlocks by itself after the TTL
            return None
        return lock

    def _expire_holds(self, bill: Bill, now: float) -> None:
        expired = [
            code
            for code in bill.holds
            if (lock := self._vouchers[code].lock) is not None and lock.expires_at <= now
        ]
        for code in expired:
            self._release(self._vouchers[code])

    def _release(self, voucher: Voucher, restore: bool = True) -> None:
        """Unlock; with `restore`, its price goes back to the remaining due of its bill."""
        lock = voucher.lock
        if lock is None:
            return
        voucher.lock = None
        codes = self._machine_locks.get(lock.machine)
        if codes is not None:
            codes.discard(voucher.code)
        bill = self._bills.get(lock.bill_key)
        if bill is not None and voucher.code in bill.holds:
            price = bill.holds.pop(voucher.code)
            if restore:
                bill.remaining += price

    def _release_machine(self, machine: str) -> None:
        for code in list(self._machine_locks.get(machine, ())):
            self._release(self._vouchers[code])
        for key in self._machine_bills.pop(machine, set()):
            self._bills.pop(key, None)


def _today(now: float) -> date:
    return datetime.fromtimestamp(now, tz=UTC).date()


# --- HTTP -------------------------------------------------------------------------------------

# As recorded (Content-Type without charset); Vary because the body is gzip-encoded on request.
_API_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"application/json"),
    (b"vary", b"Accept-Encoding"),
    (b"cache-control", b"no-cache, no-store, must-revalidate"),
    (b"pragma", b"no-cache"),
    (b"expires", b"0"),
]


def _api_response(payload: Mapping[str, Any], status: int, session: str, gzipped: bool) -> Response:
    # Pretty-printed with 4 spaces like the recorded bodies (PHP's JSON_PRETTY_PRINT).
    body = json.dumps(payload, indent=4).encode()
    headers = [*_API_HEADERS, (b"set-cookie", f"{SESSION_COOKIE}={session}; path=/".encode())]
    if gzipped:
        body = gzip.compress(body, compresslevel=6, mtime=0)
        headers.append((b"content-encoding", b"gzip"))
    response = Response(status_code=status)
    response.body = body
    # No Content-Length, so uvicorn answers chunked, as the recorded responses are.
    response.raw_headers = headers
    return response


_VOUCHERS_ADAPTER = TypeAdapter(list[VoucherSeed])
_TERMINALS_ADAPTER = TypeAdapter(list[TerminalSeed])


class SandboxSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strict_session: bool | None = None
    lock_ttl_s: float | None = Field(default=None, gt=0)


def create_app(sandbox: EvoucherSandbox, faults: FaultConfig | None = None) -> Starlette:
    """The sandbox behind the upstream's URL (`POST /index.php?route=account/<name>`).

    Admin API (no token): GET /_sandbox/health; GET /_sandbox/state (`?codes=a,b` to select
    vouchers, `?vouchers=0` to leave them out); GET|POST /_sandbox/faults (POST merges fields
    into the fault config); POST /_sandbox/reset; POST /_sandbox/vouchers and
    /_sandbox/terminals (a list, or {"vouchers": [...]} / {"terminals": [...]});
    GET|POST /_sandbox/settings (strict_session, lock_ttl_s);
    GET /_sandbox/calls?terminal=<machine_name> (that till's call log, oldest first).
    `app.state.sandbox` and `app.state.faults` (the `FaultInjector`) are there for in-process
    tests.
    """
    injector = FaultInjector(faults or FaultConfig())

    async def api(request: Request) -> Response:
        gzipped = "gzip" in request.headers.get("accept-encoding", "")
        route = _ROUTES.get(request.query_params.get("route", ""))
        if request.method != "POST":
            session = sandbox.session_id(request.cookies.get(SESSION_COOKIE))
            response = _api_response(_fail("Method not allowed!"), 405, session, gzipped)
            response.raw_headers.append((b"allow", b"POST"))
            return response
        if route is None:
            session = sandbox.session_id(request.cookies.get(SESSION_COOKIE))
            return _api_response(_fail("Route not found!"), 404, session, gzipped)
        raw = await request.body()
        fault = await injector.inject(route)
        if fault is FaultKind.ERROR:
            return error_response(503)  # nothing applied
        if fault is FaultKind.TIMEOUT:
            return error_response(504)  # after timeout_sleep_s; nothing applied
        session = sandbox.session_id(request.cookies.get(SESSION_COOKIE))
        terminal = sandbox.terminal(request.headers.get("x-token"))
        if terminal is None:
            # Not recorded in the collection (it has no unauthenticated call): HTTP 401 and a
            # body in the API's own shape.
            return _api_response(_fail(MSG_INVALID_TOKEN), 401, session, gzipped)
        # An empty body is {}: "leave body empty if no eVOUCHERs were scanned" (cancel_payment_api)
        body = parse_json_object(raw)
        if body is None:
            return _api_response(_fail("Invalid JSON body!"), 400, session, gzipped)
        payload = sandbox.handle(route, terminal, body, session)
        if fault is FaultKind.DROP_AFTER_APPLY or fault is FaultKind.APPLY_LATE:
            await drop_connection(request.scope)  # applied above; the answer is lost
        return _api_response(payload, 200, session, gzipped)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def state(request: Request) -> Response:
        codes_param = request.query_params.get("codes")
        codes = [c for c in codes_param.split(",") if c] if codes_param is not None else None
        with_vouchers = request.query_params.get("vouchers", "1") not in ("0", "false")
        snapshot = sandbox.snapshot(codes, with_vouchers=with_vouchers)
        snapshot["faults"] = injector.snapshot()
        return JSONResponse(snapshot)

    faults_endpoint = faults_route(injector)

    async def calls(request: Request) -> Response:
        machine = request.query_params.get("terminal")
        if not machine:
            return JSONResponse({"error": "expected ?terminal=<machine name>"}, status_code=400)
        if not sandbox.known_machine(machine):
            return JSONResponse({"error": f"unknown terminal: {machine}"}, status_code=404)
        return JSONResponse({"calls": sandbox.call_log(machine)})

    async def reset(request: Request) -> Response:
        sandbox.reset()
        return JSONResponse(
            {"status": "ok", "totals": sandbox.snapshot(with_vouchers=False)["totals"]}
        )

    async def add_vouchers(request: Request) -> Response:
        return await add_items(request, "vouchers", _VOUCHERS_ADAPTER, sandbox.add_vouchers)

    async def add_terminals(request: Request) -> Response:
        return await add_items(request, "terminals", _TERMINALS_ADAPTER, sandbox.add_terminals)

    def current_settings() -> dict[str, Any]:
        return {"strict_session": sandbox.strict_session, "lock_ttl_s": sandbox.lock_ttl_s}

    def apply_settings(changes: dict[str, Any]) -> None:
        update = SandboxSettings.model_validate(changes)
        if update.strict_session is not None:
            sandbox.strict_session = update.strict_session
        if update.lock_ttl_s is not None:
            sandbox.lock_ttl_s = update.lock_ttl_s

    settings = settings_route(current_settings, apply_settings)

    app = SandboxStarlette(
        routes=[
            # Every method reaches `api`, which answers 405 in the API's own JSON shape.
            Route("/index.php", api, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]),
            Route("/_sandbox/health", health, methods=["GET"]),
            Route("/_sandbox/state", state, methods=["GET"]),
            Route("/_sandbox/faults", faults_endpoint, methods=["GET", "POST"]),
            Route("/_sandbox/reset", reset, methods=["POST"]),
            Route("/_sandbox/vouchers", add_vouchers, methods=["POST"]),
            Route("/_sandbox/terminals", add_terminals, methods=["POST"]),
            Route("/_sandbox/settings", settings, methods=["GET", "POST"]),
            Route("/_sandbox/calls", calls, methods=["GET"]),
        ]
    )
    app.state.sandbox = sandbox
    app.state.faults = injector
    return app
