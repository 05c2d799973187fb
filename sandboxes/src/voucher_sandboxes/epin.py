"""Epixel "Prepaid Coupons (Epin)" API sandbox: the upstream as its documentation describes it.

`EpinSandbox` is the state machine (no HTTP: one method per endpoint, each returning
`(http_status, json_body)`); `create_app` puts it behind the upstream's URLs and headers and the
shared fault injection, plus an admin API under `/_sandbox/`; `build_epin_server` runs it
with uvicorn (`python -m voucher_sandboxes.epin_server`).

FROM THE VENDOR'S FILES (/work/shared/upstream/epin-coupons-api.txt and the vendor's
authentication page as summarised in NOTES.md): the endpoint paths and methods, the `apikey` and
`Authorization: Bearer` headers, the request fields, the success envelope
`{"status_code": 200, "errors": {}, "data": {...}}`, the active-coupon JSON (including the
vendor's misspelling `currecy_data`), the paginated list shape (`count`, `previous`, `next`),
every validation message (verbatim, `MSG_*` below), HTTP 400 "Validation Error" and HTTP 401
"Request Failed" for a disabled coupon facility on the generate endpoints, the login answer
`{"refresh", "access"}` and its 401 "Authentication failed" / "Inactive Account", form-data
request bodies, and that create needs a mail token, its checksum and a single-use `form_key`.

NOT IN THE VENDOR'S FILES (the project's wire decisions, implemented exactly):
  * base path `/api/v1/` (configurable), refresh path `user/token/refresh/` (configurable);
  * 403 `{"status_code": 403, "errors": {"detail": "Invalid API key."}, "data": {}}` for a
    missing or wrong `apikey` (checked first, on every endpoint, login included);
  * the exact 401 bodies of login and refresh (SimpleJWT `token_not_valid`); the TTLs (access
    300 s, refresh 1 day, both configurable);
  * the body of a refused access token (missing, unknown, expired or revoked): the vendor does
    not document it. By default the API's own envelope, `{"status_code": 401, "errors":
    {"detail": "Given token not valid for any token type"}}` (no `code` member); with the
    setting `refused_token_shape` "simplejwt", SimpleJWT's body (`"code": "token_not_valid"`
    and its `messages` list). A client must recognise both;
  * the envelope of a validation error (`"message": "Validation Error"`, per-field lists);
  * the shape of every success `data` except the active-coupon list: transfer, share, delete,
    refund status, wallet list, create and history;
  * the mail-token checksum: `token_checksum_field == sha256(token_field as UTF-8).hexdigest()
    [:16]` (lower-case hex; compared case-insensitively); the wallet list also answers
    `token_checksum` for the user's current mail token;
  * pagination: `page` (1-based, or "last") and `page_size` (default 10, capped at
    `max_page_size`, default 100); `next`/`previous` are absolute URLs built from the request
    URL (`previous` of page 2 drops `page`, as Django REST framework does).

SANDBOX CHOICES (where neither the files nor the project say; search "sandbox choice"):
  * a disabled facility (global switch, or the user's) answers the 401 "Request Failed" body on
    every coupon endpoint, not only on the two generate endpoints; login and refresh still work;
  * the access-token JWT is HS256-signed with a per-run secret, but it is checked against the
    sandbox's token table (so `POST /_sandbox/expire-tokens` can expire it early and `POST
    /_sandbox/revoke` revoke a user's tokens before their `exp`); its `exp` claim is
    informative only. Refresh does not rotate the refresh token (SimpleJWT default). A revoked
    refresh token that has not expired answers SimpleJWT's blacklist refusal `{"detail":
    "Token is blacklisted", "code": "token_not_valid"}` (401);
  * an access token of a user made inactive since login answers SimpleJWT's
    `{"detail": "User is inactive", "code": "user_inactive"}` (401); a refresh of such a user
    `{"detail": "No active account found for the given credentials", "code":
    "no_active_account"}` (401), as SimpleJWT does;
  * login without `username`/`password`: 400 validation envelope, "This field is required." /
    "This field may not be blank."; refresh without `refresh`: 400 `{"refresh": [...]}`
    (SimpleJWT's shape, no envelope);
  * a page out of range: 404 `{"status_code": 404, "errors": {"detail": "Invalid page."},
    "data": {}}`; an unknown path: 404 `{"detail": "Not found."}`; a wrong method on a known
    path: 405 `{"detail": "Method \"PUT\" not allowed."}`; paths need the trailing slash;
  * a body that cannot be parsed: 400 `{"status_code": 400, "errors": {"detail": "Malformed
    request body."}, "data": {}}` (after the api-key and token checks);
  * transfer: a missing `user` answers "Field may not be blank." and a missing or blank `epin`
    "Invalid coupon."; an inactive target user is "User is not found."; the epin checks run in
    the order not found (not the caller's, deleted, or no such id), zero balance ("Invalid
    coupon."), not transferable;
  * share: `share_amount` is digits with an optional single '.' and 1-2 decimals ("10", "10.5",
    "10.50"), anything else "Only numeric characters are allowed."; a zero amount answers
    "Invalid or empty Amount." (the create message that fits); the shared amount becomes a new
    coupon (same wallet type and flags) owned by nobody, kept with the recipient's email;
  * delete: `status` other than empty or "1" answers 400 `{"status": ["\"<v>\" is not a valid
    choice."]}`; deleting zeroes the coupon's balance, refunds it into the owner's wallet of the
    coupon's wallet type (created if the owner has none), and a zero-balance coupon can be
    deleted (refund 0.00); the refund-status query finds deleted coupons of the caller too;
  * create: the `form_key` is checked first and alone: an unknown, another user's or a used key
    answers only the form_key error and nothing is validated; a valid key is burnt as soon as
    the request is accepted, also when the other fields then fail validation (the client must
    GET a new one). An unknown wallet type, or one whose facility is off, answers "You don't
    have sufficient balance to continue with this operation." on wallet_type. epin_amount
    checks, in order: required, blank, more than 7 characters, a decimal number ("Only integers
    are allowed."), anything else non-numeric ("Invalid or empty Amount."), out of
    [min, max] ("Please enter an amount between <min> and <max>.", whole numbers without
    decimals, e.g. "between 5 and 1000"). number_of_pins: non-digits "Only numeric characters
    are allowed.", 0 "Invalid number of Coupon.", active + n > max "This operation exceeds the
    maximum number of active Coupons.". transferable/reusable: exactly "True" or "False" (a
    JSON boolean is taken as those). The mail-token mismatch (wrong token, or checksum not
    sha256(token)[:16]) is reported on token_field. The mail token does not rotate;
  * the active list and history are ordered by coupon id ascending and newest first
    respectively; history records the caller's own actions only (a transfer is not recorded
    for the receiver);
  * pins of created coupons: 12 characters of A-Z/2-9 without I, O, 0, 1, unique.

Every call that names a known user is logged per user, whatever its answer, so that tests can
check the order of a client's calls (log in, refresh, the call refused for its token, the
resend): login by its `username` (the password is logged as "***": a client pointed here by
mistake may send a real one), refresh by the user of the refresh token, every other call by
the user of the bearer token (accepted or refused), as long as the sandbox issued that token.
An entry is `{"seq", "at", "route" (the request's path), "method", "form", "query", "status"}`,
`seq` increasing over all users and never reused, `at` the sandbox clock. Calls faulted with
503/504 are not logged (nothing was applied); drop-after-apply and apply-late ones are.

Everything is in memory and single-threaded (one asyncio loop, synchronous handlers), so each
call is atomic. Money is `Decimal` throughout, strings with two decimals on the wire.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import itertools
import json
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from email.message import Message
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from voucher_sandboxes.faults import (
    FaultConfig,
    FaultInjector,
    FaultKind,
    SandboxStarlette,
    SettingRefused,
    add_items,
    drop_connection,
    error_response,
    faults_route,
    json_object,
    sandbox_server,
    settings_route,
    validation_errors,
)

if TYPE_CHECKING:
    import uvicorn

CENT = Decimal("0.01")
ZERO = Decimal("0.00")

DEFAULT_PREFIX = "/api/v1/"
DEFAULT_REFRESH_PATH = "user/token/refresh/"
DEFAULT_ACCESS_TTL_S = 300.0
DEFAULT_REFRESH_TTL_S = 86_400.0
DEFAULT_PAGE_SIZE = 10
DEFAULT_MAX_PAGE_SIZE = 100

# Route names, for fault injection (`FaultConfig.routes`) and the counters.
LOGIN = "login"
REFRESH = "refresh"
ACTIVE = "active"
TRANSFER = "transfer"
SHARE = "share"
DELETE = "delete"
REFUND_STATUS = "refund_status"  # DELETE user/delete/epin/ without `status`, for faults only
WALLETS = "wallets"
CREATE = "create"
HISTORY = "history"
ROUTE_NAMES = (LOGIN, REFRESH, ACTIVE, TRANSFER, SHARE, DELETE, WALLETS, CREATE, HISTORY)

# Validation messages of the vendor's file, verbatim.
MSG_USER_NOT_FOUND = "User is not found."
MSG_FIELD_BLANK = "Field may not be blank."
MSG_SELF_TRANSFER = "Self transfer not allowed."
MSG_USER_MAX_COUPONS = "User already has the maximum number of active coupons."
MSG_COUPON_NOT_FOUND = "Coupon is not found."
MSG_NOT_TRANSFERABLE = "Coupon is not transferable."
MSG_INVALID_COUPON = "Invalid coupon."
MSG_REQUIRED = "This field is required."
MSG_BLANK = "This field may not be blank."
MSG_INVALID_EMAIL = "Enter a valid email address."
MSG_NUMERIC_ONLY = "Only numeric characters are allowed."
MSG_INSUFFICIENT = "Insufficient Balance."
MSG_WALLET_INSUFFICIENT = "You don't have sufficient balance to continue with this operation."
MSG_INVALID_AMOUNT = "Invalid or empty Amount."
MSG_AMOUNT_RANGE = "Please enter an amount between {min} and {max}."
MSG_INTEGERS_ONLY = "Only integers are allowed."
MSG_MAX_7_CHARS = "Ensure this field has no more than 7 characters."
MSG_EXCEEDS_MAX_ACTIVE = "This operation exceeds the maximum number of active Coupons."
MSG_INVALID_PIN_COUNT = "Invalid number of Coupon."
MSG_TRUE_FALSE = "Select True or False"
MSG_TOKEN_MISMATCH = "Token is not matching."
MSG_FORM_RUNNING = "You have another form running, Please reload."
MSG_FACILITY_DISABLED = "Coupon facility is disabled, Please contact your administrator."
# The vendor's authentication page (per NOTES.md).
MSG_AUTH_FAILED = "Authentication failed"
MSG_INACTIVE = "Inactive Account"

VALIDATION_MESSAGES = (
    MSG_USER_NOT_FOUND,
    MSG_FIELD_BLANK,
    MSG_SELF_TRANSFER,
    MSG_USER_MAX_COUPONS,
    MSG_COUPON_NOT_FOUND,
    MSG_NOT_TRANSFERABLE,
    MSG_INVALID_COUPON,
    MSG_REQUIRED,
    MSG_BLANK,
    MSG_INVALID_EMAIL,
    MSG_NUMERIC_ONLY,
    MSG_INSUFFICIENT,
    MSG_WALLET_INSUFFICIENT,
    MSG_INVALID_AMOUNT,
    MSG_AMOUNT_RANGE,
    MSG_INTEGERS_ONLY,
    MSG_MAX_7_CHARS,
    MSG_EXCEEDS_MAX_ACTIVE,
    MSG_INVALID_PIN_COUNT,
    MSG_TRUE_FALSE,
    MSG_TOKEN_MISMATCH,
    MSG_FORM_RUNNING,
)

# Project decisions (not in the vendor's files).
MSG_INVALID_API_KEY = "Invalid API key."
TOKEN_NOT_VALID_REFRESH: dict[str, Any] = {
    "detail": "Token is invalid or expired",
    "code": "token_not_valid",
}
TOKEN_BLACKLISTED_REFRESH: dict[str, Any] = {
    "detail": "Token is blacklisted",
    "code": "token_not_valid",
}
MSG_TOKEN_NOT_VALID = "Given token not valid for any token type"
# A refused access token, in the API's own envelope (the default) and in SimpleJWT's shape.
TOKEN_NOT_VALID_ENVELOPE: dict[str, Any] = {
    "status_code": 401,
    "errors": {"detail": MSG_TOKEN_NOT_VALID},
}
TOKEN_NOT_VALID_ACCESS: dict[str, Any] = {
    "detail": MSG_TOKEN_NOT_VALID,
    "code": "token_not_valid",
    "messages": [
        {
            "token_class": "AccessToken",
            "token_type": "access",
            "message": "Token is invalid or expired",
        }
    ],
}
# Sandbox choices, as SimpleJWT answers them.
USER_INACTIVE: dict[str, Any] = {"detail": "User is inactive", "code": "user_inactive"}
NO_ACTIVE_ACCOUNT: dict[str, Any] = {
    "detail": "No active account found for the given credentials",
    "code": "no_active_account",
}
MSG_INVALID_PAGE = "Invalid page."
MSG_MALFORMED = "Malformed request body."

PIN_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
PIN_LENGTH = 12

_DIGITS = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]*\.[0-9]+|[0-9]+\.[0-9]*")
_SHARE_AMOUNT = re.compile(r"[0-9]+(?:\.[0-9]{1,2})?")
_EMAIL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)

Result = tuple[int, dict[str, Any]]
RefusedTokenShape = Literal["envelope", "simplejwt"]
TokenKind = Literal["access", "refresh", "all"]


def token_checksum(token: str) -> str:
    """The `token_checksum_field` of a mail token: sha256 of its UTF-8 bytes, first 16 hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]


# --- seed -------------------------------------------------------------------------------------


class CurrencySeed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = "EUR"
    symbol: str = "€"
    symbol_placement: str = "before"
    decimals: int = 2
    rate: int | float = 1


class LimitsSeed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_active_coupons: int = Field(default=50, ge=0)
    min_amount: Decimal = Field(default=Decimal(5), ge=0)
    max_amount: Decimal = Field(default=Decimal(1000), ge=0)


class WalletSeed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    wallet_type: str = Field(min_length=1)
    name: str = ""
    balance: Decimal = Field(default=ZERO, ge=0)
    # Per-wallet limits of epin_amount; None: the global limits.
    min_amount: Decimal | None = Field(default=None, ge=0)
    max_amount: Decimal | None = Field(default=None, ge=0)
    # The coupon facility is enabled for this wallet (it is listed by the wallet list).
    epin_enabled: bool = True


class CouponSeed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int | None = Field(default=None, ge=1)  # None: the next free id
    pin: str | None = None  # None: a random pin
    charge: Decimal | None = Field(default=None, ge=0)  # None: the balance
    balance: Decimal = Field(ge=0)
    reusable: bool = False
    transferable: bool = True
    wallet_type: str = "wallet1"
    deleted: bool = False  # deleted (refunded) already: its balance is taken as 0
    refunded_amount: Decimal | None = Field(default=None, ge=0)


class UserSeed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(min_length=1)
    password: str = Field(min_length=1)
    email: str = ""
    active: bool = True
    facility_enabled: bool = True
    mail_token: str = Field(min_length=1)
    wallets: list[WalletSeed] = Field(default_factory=list)
    coupons: list[CouponSeed] = Field(default_factory=list)


class EpinSeed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    api_key: str = Field(default="sandbox-epin-api-key", min_length=1)
    currency: CurrencySeed = Field(default_factory=CurrencySeed)
    limits: LimitsSeed = Field(default_factory=LimitsSeed)
    access_ttl_s: float = Field(default=DEFAULT_ACCESS_TTL_S, gt=0)
    refresh_ttl_s: float = Field(default=DEFAULT_REFRESH_TTL_S, gt=0)
    page_size: int = Field(default=DEFAULT_PAGE_SIZE, ge=1)
    max_page_size: int = Field(default=DEFAULT_MAX_PAGE_SIZE, ge=1)
    facility_enabled: bool = True
    users: list[UserSeed] = Field(default_factory=list)


def load_seed(path: Path) -> EpinSeed:
    return EpinSeed.model_validate_json(path.read_bytes())


class SettingsUpdate(BaseModel):
    """`POST /_sandbox/settings`: the fields to change; `facility` switches users by name."""

    model_config = ConfigDict(extra="forbid")
    access_ttl_s: float | None = Field(default=None, gt=0)
    refresh_ttl_s: float | None = Field(default=None, gt=0)
    page_size: int | None = Field(default=None, ge=1)
    max_page_size: int | None = Field(default=None, ge=1)
    facility_enabled: bool | None = None
    facility: dict[str, bool] | None = None
    max_active_coupons: int | None = Field(default=None, ge=0)
    min_amount: Decimal | None = Field(default=None, ge=0)
    max_amount: Decimal | None = Field(default=None, ge=0)
    refused_token_shape: RefusedTokenShape | None = None


class RevokeRequest(BaseModel):
    """`POST /_sandbox/revoke`: which user's tokens, of which kind."""

    model_config = ConfigDict(extra="forbid")
    username: str
    kind: TokenKind = "all"


# --- state ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Settings:
    access_ttl_s: float
    refresh_ttl_s: float
    page_size: int
    max_page_size: int
    facility_enabled: bool  # the global switch
    max_active_coupons: int
    min_amount: Decimal
    max_amount: Decimal
    refused_token_shape: RefusedTokenShape = "envelope"

    def as_json(self) -> dict[str, Any]:
        return {
            "access_ttl_s": self.access_ttl_s,
            "refresh_ttl_s": self.refresh_ttl_s,
            "page_size": self.page_size,
            "max_page_size": self.max_page_size,
            "facility_enabled": self.facility_enabled,
            "max_active_coupons": self.max_active_coupons,
            "min_amount": _money(self.min_amount),
            "max_amount": _money(self.max_amount),
            "refused_token_shape": self.refused_token_shape,
        }


@dataclass(slots=True)
class Wallet:
    wallet_type: str
    name: str
    balance: Decimal
    min_amount: Decimal | None
    max_amount: Decimal | None
    epin_enabled: bool


@dataclass(slots=True)
class User:
    id: int
    username: str
    password: str
    email: str
    active: bool
    facility_enabled: bool
    mail_token: str
    wallets: dict[str, Wallet]
    coupon_ids: set[int] = field(default_factory=set)  # owned and not deleted
    history: list[HistoryEntry] = field(default_factory=list)  # oldest first


@dataclass(slots=True)
class Coupon:
    id: int
    pin: str
    charge: Decimal
    balance: Decimal
    reusable: bool
    transferable: bool
    wallet_type: str
    owner: str | None  # username; None for the coupon a share created
    email: str | None = None  # the anonymous recipient of a share
    source: int | None = None  # the coupon a share took this one's value from
    deleted: bool = False
    refunded_amount: Decimal | None = None
    # Effects applied to this coupon, for exactly-once tests.
    transfers: int = 0
    shares: int = 0
    deletes: int = 0


@dataclass(slots=True)
class Token:
    kind: str  # "access" | "refresh"
    username: str
    expires_at: float
    revoked: bool = False


@dataclass(slots=True)
class FormKey:
    key: str
    username: str
    issued_at: float
    uses: int = 0  # create calls that presented it (the first burns it)
    burnt: bool = False


@dataclass(slots=True)
class HistoryEntry:
    id: int
    epin: int
    action: str  # "create" | "transfer" | "share" | "delete"
    amount: Decimal
    wallet_type: str
    counterparty: str | None
    at: float


@dataclass(slots=True)
class Share:
    id: int
    epin: int  # the coupon shared from
    coupon: int  # the coupon created for the recipient
    email: str
    amount: Decimal
    username: str
    at: float


def _money(value: Decimal) -> str:
    return f"{value.quantize(CENT, rounding=ROUND_HALF_UP)}"


def _plain(value: Decimal) -> str:
    """5 -> "5", 1000 -> "1000", 7.5 -> "7.50" (for "Please enter an amount between ...")."""
    if value == value.to_integral_value():
        return str(int(value))
    return _money(value)


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).isoformat()


def _ok(data: dict[str, Any]) -> Result:
    return 200, {"status_code": 200, "errors": {}, "data": data}


def _validation_error(errors: Mapping[str, list[str]]) -> Result:
    return 400, {
        "status_code": 400,
        "message": "Validation Error",
        "errors": dict(errors),
        "data": {},
    }


def _detail_error(status: int, detail: str) -> Result:
    return status, {"status_code": status, "errors": {"detail": detail}, "data": {}}


def _request_failed(detail: str) -> Result:
    return 401, {
        "status_code": 401,
        "message": "Request Failed",
        "errors": {"detail": detail},
        "data": {},
    }


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def _required(
    fields: Mapping[str, str], name: str, errors: dict[str, list[str]], blank: str = MSG_BLANK
) -> str | None:
    """The field's value, trimmed; None (and the error recorded) when missing or blank."""
    raw = fields.get(name)
    if raw is None:
        errors[name] = [MSG_REQUIRED]
        return None
    value = raw.strip()
    if not value:
        errors[name] = [blank]
        return None
    return value


def _coupon_id(value: str) -> int:
    # Longer than any id: a lookup that finds nothing (and no int() of a 5000-digit string).
    return int(value) if len(value) <= 18 else -1


class EpinSandbox:
    """The Epin upstream's state: users, wallets, coupons, tokens, form keys, history."""

    def __init__(
        self,
        seed: EpinSeed | None = None,
        *,
        clock: Callable[[], float] = time.time,
        access_ttl_s: float | None = None,
        refresh_ttl_s: float | None = None,
        max_tokens: int = 100_000,
        max_logged_calls: int = 1_000,
    ) -> None:
        self.seed = seed or EpinSeed()
        self.clock = clock  # seconds since the epoch
        self.max_tokens = max_tokens
        self.max_logged_calls = max_logged_calls  # per user, so a long benchmark stays bounded
        self._call_seq = itertools.count(1)  # not reset: a seq is never handed out twice
        s = self.seed
        # What `reset` goes back to: the seed's settings, with the constructor's overrides.
        self._initial = Settings(
            access_ttl_s=access_ttl_s if access_ttl_s is not None else s.access_ttl_s,
            refresh_ttl_s=refresh_ttl_s if refresh_ttl_s is not None else s.refresh_ttl_s,
            page_size=s.page_size,
            max_page_size=s.max_page_size,
            facility_enabled=s.facility_enabled,
            max_active_coupons=s.limits.max_active_coupons,
            min_amount=s.limits.min_amount,
            max_amount=s.limits.max_amount,
        )
        self.reset()

    @classmethod
    def from_seed_file(cls, path: Path, **kwargs: Any) -> EpinSandbox:
        return cls(load_seed(path), **kwargs)

    # --- setup ----------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the seed: users, wallets, coupons, settings; no tokens, keys, history, counts,
        call log."""
        i = self._initial
        self.settings = Settings(
            i.access_ttl_s,
            i.refresh_ttl_s,
            i.page_size,
            i.max_page_size,
            i.facility_enabled,
            i.max_active_coupons,
            i.min_amount,
            i.max_amount,
            i.refused_token_shape,
        )
        self.api_key = self.seed.api_key
        self.currency = self.seed.currency
        self._users: dict[str, User] = {}
        self._coupons: dict[int, Coupon] = {}
        self._pins: set[str] = set()
        self._tokens: dict[str, Token] = {}
        self._form_keys: dict[str, FormKey] = {}
        self._shares: list[Share] = []
        self._secret = secrets.token_bytes(32)
        self._next_user_id = 1
        self._next_coupon_id = 1
        self._next_history_id = 1
        self.calls: dict[str, int] = dict.fromkeys(ROUTE_NAMES, 0)
        self.failures: dict[str, int] = dict.fromkeys(ROUTE_NAMES, 0)
        self.logins = 0
        self.login_failures = 0
        self.refreshes = 0
        self.refresh_failures = 0
        self._call_log: dict[str, deque[dict[str, Any]]] = {}  # username -> oldest first
        self.add_users(self.seed.users)

    def add_users(self, users: Iterable[UserSeed]) -> int:
        """Add users, or replace them by username (a replaced user's coupons are removed)."""
        count = 0
        for seed in users:
            old = self._users.get(seed.username)
            if old is not None:
                for cid in old.coupon_ids:
                    self._pins.discard(self._coupons.pop(cid).pin)
                user_id = old.id
            else:
                user_id = self._next_user_id
                self._next_user_id += 1
            wallets = {
                w.wallet_type: Wallet(
                    w.wallet_type,
                    w.name or w.wallet_type,
                    w.balance.quantize(CENT, rounding=ROUND_HALF_UP),
                    w.min_amount,
                    w.max_amount,
                    w.epin_enabled,
                )
                for w in seed.wallets
            }
            user = User(
                id=user_id,
                username=seed.username,
                password=seed.password,
                email=seed.email,
                active=seed.active,
                facility_enabled=seed.facility_enabled,
                mail_token=seed.mail_token,
                wallets=wallets,
            )
            self._users[seed.username] = user
            for c in seed.coupons:
                self._add_coupon(user, c)
            count += 1
        return count

    def _add_coupon(self, user: User, seed: CouponSeed) -> Coupon:
        cid = seed.id if seed.id is not None else self._next_coupon_id
        old = self._coupons.get(cid)
        if old is not None:  # replaced: out of its owner's coupons
            self._pins.discard(old.pin)
            if old.owner is not None and (owner := self._users.get(old.owner)) is not None:
                owner.coupon_ids.discard(cid)
        balance = seed.balance.quantize(CENT, rounding=ROUND_HALF_UP)
        refunded = None
        if seed.deleted:
            refunded = seed.refunded_amount if seed.refunded_amount is not None else balance
            refunded = refunded.quantize(CENT, rounding=ROUND_HALF_UP)
            balance = ZERO
        charge = seed.charge if seed.charge is not None else seed.balance
        pin = seed.pin if seed.pin is not None else self._new_pin()
        coupon = Coupon(
            id=cid,
            pin=pin,
            charge=charge.quantize(CENT, rounding=ROUND_HALF_UP),
            balance=balance,
            reusable=seed.reusable,
            transferable=seed.transferable,
            wallet_type=seed.wallet_type,
            owner=user.username,
            deleted=seed.deleted,
            refunded_amount=refunded,
        )
        self._coupons[cid] = coupon
        self._pins.add(pin)
        if not seed.deleted:
            user.coupon_ids.add(cid)
        self._next_coupon_id = max(self._next_coupon_id, cid + 1)
        return coupon

    def apply_settings(self, update: SettingsUpdate) -> None:
        """Change settings; raises KeyError for a user in `facility` that does not exist."""
        if update.facility is not None:
            unknown = [name for name in update.facility if name not in self._users]
            if unknown:
                raise KeyError(", ".join(unknown))
            for name, enabled in update.facility.items():
                self._users[name].facility_enabled = enabled
        s = self.settings
        if update.access_ttl_s is not None:
            s.access_ttl_s = update.access_ttl_s
        if update.refresh_ttl_s is not None:
            s.refresh_ttl_s = update.refresh_ttl_s
        if update.page_size is not None:
            s.page_size = update.page_size
        if update.max_page_size is not None:
            s.max_page_size = update.max_page_size
        if update.facility_enabled is not None:
            s.facility_enabled = update.facility_enabled
        if update.max_active_coupons is not None:
            s.max_active_coupons = update.max_active_coupons
        if update.min_amount is not None:
            s.min_amount = update.min_amount
        if update.max_amount is not None:
            s.max_amount = update.max_amount
        if update.refused_token_shape is not None:
            s.refused_token_shape = update.refused_token_shape

    def expire_tokens(self, refresh: bool = False) -> int:
        """Expire every access token now (and every refresh token with `refresh`)."""
        now = self.clock()
        count = 0
        for token in self._tokens.values():
            if (token.kind == "access" or refresh) and token.expires_at > now:
                token.expires_at = now
                count += not token.revoked
        return count

    def revoke_tokens(self, username: str, kind: TokenKind = "all") -> int:
        """Revoke the user's tokens of `kind` issued so far; the count of those still valid.

        Raises KeyError for a user that does not exist. Tokens issued later are not affected.
        """
        if username not in self._users:
            raise KeyError(username)
        now = self.clock()
        count = 0
        for token in self._tokens.values():
            if token.username == username and kind in ("all", token.kind) and not token.revoked:
                token.revoked = True
                count += token.expires_at > now
        return count

    def call_log(self, username: str) -> list[dict[str, Any]]:
        """The calls that named this user since the reset, oldest first."""
        return list(self._call_log.get(username, ()))

    # --- lookups --------------------------------------------------------------------------

    def user(self, username: str) -> User | None:
        return self._users.get(username)

    def coupon(self, coupon_id: int) -> Coupon | None:
        return self._coupons.get(coupon_id)

    def form_key(self, key: str) -> FormKey | None:
        return self._form_keys.get(key)

    def active_count(self, user: User) -> int:
        coupons = self._coupons
        return sum(1 for cid in user.coupon_ids if coupons[cid].balance > 0)

    def facility_on(self, user: User) -> bool:
        return self.settings.facility_enabled and user.facility_enabled

    # --- dispatch -------------------------------------------------------------------------

    def dispatch(
        self,
        route: str,
        *,
        apikey: str | None,
        authorization: str | None = None,
        fields: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        url: str = "",
        body_error: str | None = None,
        method: str = "",
        path: str = "",
    ) -> Result:
        """One call of route `route` with its headers, body fields and query; counted, logged.

        `url` is the request's absolute URL (for `next`/`previous`); `body_error` says the body
        could not be parsed (answered after the api-key and token checks). `method` and `path`
        are what the call log records (the route name stands in for an empty `path`).
        """
        fields = fields or {}
        query = query or {}
        caller = self._caller(route, authorization, fields)
        status, body = self._dispatch(route, apikey, authorization, fields, query, url, body_error)
        self.calls[route] += 1
        if status >= 400:
            self.failures[route] += 1
        if caller is not None:
            form = dict(fields)
            if route == LOGIN and "password" in form:
                form["password"] = "***"
            log = self._call_log.get(caller)
            if log is None:
                log = self._call_log[caller] = deque(maxlen=self.max_logged_calls)
            log.append(
                {
                    "seq": next(self._call_seq),
                    "at": self.clock(),
                    "route": path or route,
                    "method": method,
                    "form": form,
                    "query": dict(query),
                    "status": status,
                }
            )
        return status, body

    def _caller(
        self, route: str, authorization: str | None, fields: Mapping[str, str]
    ) -> str | None:
        """The known user a call names (see the module docstring), or None."""
        if route == LOGIN:
            name = (fields.get("username") or "").strip()
            return name if name in self._users else None
        if route == REFRESH:
            token = self._tokens.get((fields.get("refresh") or "").strip())
        else:
            parts = (authorization or "").split()
            token = self._tokens.get(parts[1]) if len(parts) == 2 else None
        return token.username if token is not None and token.username in self._users else None

    def _dispatch(
        self,
        route: str,
        apikey: str | None,
        authorization: str | None,
        fields: Mapping[str, str],
        query: Mapping[str, str],
        url: str,
        body_error: str | None,
    ) -> Result:
        if apikey is None or not _same(apikey, self.api_key):
            return _detail_error(403, MSG_INVALID_API_KEY)
        if route in (LOGIN, REFRESH):
            if body_error is not None:
                return _detail_error(400, body_error)
            return self.login(fields) if route == LOGIN else self.refresh(fields)
        user = self.authenticate(authorization)
        if not isinstance(user, User):
            return user
        if not self.facility_on(user):
            # The file documents this 401 for the generate endpoints (wallet list and create);
            # sandbox choice: every coupon endpoint answers it.
            return _request_failed(MSG_FACILITY_DISABLED)
        if body_error is not None:
            return _detail_error(400, body_error)
        if route == ACTIVE:
            return self.active_coupons(user, query, url)
        if route == TRANSFER:
            return self.transfer(user, fields)
        if route == SHARE:
            return self.share(user, fields)
        if route == DELETE:
            return self.delete(user, query)
        if route == WALLETS:
            return self.wallet_list(user)
        if route == CREATE:
            return self.create(user, fields)
        if route == HISTORY:
            return self.history(user, query, url)
        raise KeyError(route)

    # --- authentication -------------------------------------------------------------------

    def login(self, fields: Mapping[str, str]) -> Result:
        errors: dict[str, list[str]] = {}
        username = _required(fields, "username", errors)
        password = fields.get("password")
        if password is None:
            errors["password"] = [MSG_REQUIRED]
        elif not password.strip():
            errors["password"] = [MSG_BLANK]
        if username is None or password is None or errors:
            return _validation_error(errors)
        user = self._users.get(username)
        if user is None or not _same(password, user.password):
            self.login_failures += 1
            return _detail_error(401, MSG_AUTH_FAILED)
        if not user.active:
            self.login_failures += 1
            return _detail_error(401, MSG_INACTIVE)
        self.logins += 1
        return 200, {"refresh": self._issue(user, "refresh"), "access": self._issue(user, "access")}

    def refresh(self, fields: Mapping[str, str]) -> Result:
        raw = fields.get("refresh")
        if raw is None or not raw.strip():
            return 400, {"refresh": [MSG_REQUIRED if raw is None else MSG_BLANK]}
        token = self._tokens.get(raw.strip())
        if token is None or token.kind != "refresh" or token.expires_at <= self.clock():
            self.refresh_failures += 1
            return 401, dict(TOKEN_NOT_VALID_REFRESH)
        if token.revoked:
            # SimpleJWT checks the expiry first, then its blacklist.
            self.refresh_failures += 1
            return 401, dict(TOKEN_BLACKLISTED_REFRESH)
        user = self._users.get(token.username)
        if user is None or not user.active:
            self.refresh_failures += 1
            return 401, dict(NO_ACTIVE_ACCOUNT)
        self.refreshes += 1
        return 200, {"access": self._issue(user, "access")}

    def authenticate(self, authorization: str | None) -> User | Result:
        """The user of `Authorization: Bearer <access>`, or the 401 answer."""
        parts = (authorization or "").split()
        if len(parts) != 2 or parts[0] != "Bearer":
            return self._refused_token()
        token = self._tokens.get(parts[1])
        if (
            token is None
            or token.kind != "access"
            or token.revoked
            or token.expires_at <= self.clock()
        ):
            return self._refused_token()
        user = self._users.get(token.username)
        if user is None:
            return self._refused_token()
        if not user.active:
            return 401, dict(USER_INACTIVE)
        return user

    def _refused_token(self) -> Result:
        if self.settings.refused_token_shape == "simplejwt":
            return 401, copy.deepcopy(TOKEN_NOT_VALID_ACCESS)
        return 401, copy.deepcopy(TOKEN_NOT_VALID_ENVELOPE)

    def _issue(self, user: User, kind: str) -> str:
        """A new token: a JWT-looking string (HS256 over a per-run secret), kept in a table."""
        now = self.clock()
        ttl = self.settings.access_ttl_s if kind == "access" else self.settings.refresh_ttl_s
        expires_at = now + ttl
        header = _b64(b'{"alg":"HS256","typ":"JWT"}')
        claims = {
            "token_type": kind,
            "exp": math.ceil(expires_at),
            "iat": int(now),
            "jti": secrets.token_hex(16),
            "user_id": user.id,
        }
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{header}.{payload}".encode()
        signature = _b64(hmac.new(self._secret, signing_input, hashlib.sha256).digest())
        value = f"{header}.{payload}.{signature}"
        if len(self._tokens) >= self.max_tokens:
            self._tokens = {k: t for k, t in self._tokens.items() if t.expires_at > now}
        self._tokens[value] = Token(kind, user.username, expires_at)
        return value

    # --- coupon endpoints -----------------------------------------------------------------

    def active_coupons(self, user: User, query: Mapping[str, str], url: str = "") -> Result:
        """The caller's coupons that are not deleted and have a balance; `wallet`, `code`."""
        wallet = (query.get("wallet") or "").strip()
        code = (query.get("code") or "").strip()
        coupons = [
            c
            for cid in sorted(user.coupon_ids)
            if (c := self._coupons[cid]).balance > 0
            and (not wallet or c.wallet_type == wallet)
            and (not code or c.pin == code)
        ]
        return self._paginate(coupons, query, url, self.coupon_json)

    def transfer(self, user: User, fields: Mapping[str, str]) -> Result:
        """Give a coupon of the caller to another user."""
        errors: dict[str, list[str]] = {}
        target: User | None = None
        name = (fields.get("user") or "").strip()
        if not name:
            errors["user"] = [MSG_FIELD_BLANK]
        elif name == user.username:
            errors["user"] = [MSG_SELF_TRANSFER]
        else:
            target = self._users.get(name)
            if target is None or not target.active:
                errors["user"] = [MSG_USER_NOT_FOUND]
            elif self.active_count(target) >= self.settings.max_active_coupons:
                errors["user"] = [MSG_USER_MAX_COUPONS]
        raw = (fields.get("epin") or "").strip()
        coupon: Coupon | None = None
        if not _DIGITS.fullmatch(raw):
            errors["epin"] = [MSG_INVALID_COUPON]
        else:
            coupon = self._owned(user, _coupon_id(raw))
            if coupon is None:
                errors["epin"] = [MSG_COUPON_NOT_FOUND]
            elif coupon.balance <= 0:
                errors["epin"] = [MSG_INVALID_COUPON]
            elif not coupon.transferable:
                errors["epin"] = [MSG_NOT_TRANSFERABLE]
        if errors or target is None or coupon is None:
            return _validation_error(errors)
        user.coupon_ids.discard(coupon.id)
        target.coupon_ids.add(coupon.id)
        coupon.owner = target.username
        coupon.transfers += 1
        self._record(user, coupon, "transfer", coupon.balance, target.username)
        return _ok({"epin": coupon.id, "user": target.username})

    def share(self, user: User, fields: Mapping[str, str]) -> Result:
        """Move `share_amount` of a coupon's balance to a new coupon for an email address."""
        errors: dict[str, list[str]] = {}
        email = _required(fields, "email", errors)
        if email is not None and not _EMAIL.fullmatch(email):
            errors["email"] = [MSG_INVALID_EMAIL]
        coupon: Coupon | None = None
        raw = _required(fields, "epin", errors)
        if raw is not None:
            if not _DIGITS.fullmatch(raw):
                errors["epin"] = [MSG_NUMERIC_ONLY]
            else:
                coupon = self._owned(user, _coupon_id(raw))
                if coupon is None:
                    errors["epin"] = [MSG_COUPON_NOT_FOUND]
                elif not coupon.transferable:
                    errors["epin"] = [MSG_NOT_TRANSFERABLE]
        amount: Decimal | None = None
        raw_amount = _required(fields, "share_amount", errors)
        if raw_amount is not None:
            if not _SHARE_AMOUNT.fullmatch(raw_amount):
                errors["share_amount"] = [MSG_NUMERIC_ONLY]
            else:
                amount = Decimal(raw_amount)  # exact: at most two decimals
                if amount <= 0:
                    errors["share_amount"] = [MSG_INVALID_AMOUNT]  # sandbox choice
                elif coupon is not None and amount > coupon.balance:
                    errors["share_amount"] = [MSG_INSUFFICIENT]
        if errors or email is None or coupon is None or amount is None:
            return _validation_error(errors)
        amount = amount.quantize(CENT)
        now = self.clock()
        coupon.balance -= amount
        coupon.shares += 1
        shared = Coupon(
            id=self._next_coupon_id,
            pin=self._new_pin(),
            charge=amount,
            balance=amount,
            reusable=coupon.reusable,
            transferable=coupon.transferable,
            wallet_type=coupon.wallet_type,
            owner=None,
            email=email,
            source=coupon.id,
        )
        self._next_coupon_id += 1
        self._coupons[shared.id] = shared
        self._shares.append(
            Share(len(self._shares) + 1, coupon.id, shared.id, email, amount, user.username, now)
        )
        self._record(user, coupon, "share", amount, email)
        return _ok(
            {
                "epin": coupon.id,
                "share_amount": _money(amount),
                "balance": _money(coupon.balance),
                "email": email,
            }
        )

    def delete(self, user: User, query: Mapping[str, str]) -> Result:
        """`status=1`: delete the coupon, refunding its balance; no `status`: its refund status."""
        errors: dict[str, list[str]] = {}
        raw_status = (query.get("status") or "").strip()
        deleting = bool(raw_status)
        if deleting and raw_status != "1":
            errors["status"] = [f'"{raw_status}" is not a valid choice.']  # sandbox choice
        coupon: Coupon | None = None
        raw = _required(query, "epin", errors)
        if raw is not None:
            if not _DIGITS.fullmatch(raw):
                errors["epin"] = [MSG_NUMERIC_ONLY]
            else:
                coupon = self._coupons.get(_coupon_id(raw))
                if coupon is None or coupon.owner != user.username or (deleting and coupon.deleted):
                    errors["epin"] = [MSG_COUPON_NOT_FOUND]
                    coupon = None
        if errors or coupon is None:
            return _validation_error(errors)
        if not deleting:
            status = "refunded" if coupon.deleted else "not_refunded"
            return _ok({"epin": coupon.id, "refund_status": status})
        refund = coupon.balance
        wallet = user.wallets.get(coupon.wallet_type)
        if wallet is None:  # e.g. a coupon transferred from a wallet this user does not have
            wallet = Wallet(coupon.wallet_type, coupon.wallet_type, ZERO, None, None, False)
            user.wallets[coupon.wallet_type] = wallet
        wallet.balance += refund
        coupon.balance = ZERO
        coupon.deleted = True
        coupon.refunded_amount = refund
        coupon.deletes += 1
        user.coupon_ids.discard(coupon.id)
        self._record(user, coupon, "delete", refund, None)
        return _ok(
            {"epin": coupon.id, "refund_status": "refunded", "refunded_amount": _money(refund)}
        )

    def wallet_list(self, user: User) -> Result:
        """The facility-enabled wallets, a fresh single-use form key, the token checksum."""
        key = secrets.token_hex(16)
        self._form_keys[key] = FormKey(key, user.username, self.clock())
        wallets = [
            {
                "wallet_type": w.wallet_type,
                "name": w.name,
                "balance": _money(w.balance),
                "min_amount": _money(self._min_amount(w)),
                "max_amount": _money(self._max_amount(w)),
            }
            for w in user.wallets.values()
            if w.epin_enabled
        ]
        return _ok(
            {"wallets": wallets, "form_key": key, "token_checksum": token_checksum(user.mail_token)}
        )

    def create(self, user: User, fields: Mapping[str, str]) -> Result:
        """Create `number_of_pins` coupons of `epin_amount`, debiting the wallet."""
        key = (fields.get("form_key") or "").strip()
        form_key = self._form_keys.get(key) if key else None
        if form_key is not None:
            form_key.uses += 1
        if form_key is None or form_key.username != user.username or form_key.burnt:
            return _validation_error({"form_key": [MSG_FORM_RUNNING]})
        form_key.burnt = True  # burnt once accepted, even if the fields then fail validation

        errors: dict[str, list[str]] = {}
        wallet: Wallet | None = None
        wallet_type = _required(fields, "wallet_type", errors)
        if wallet_type is not None:
            wallet = user.wallets.get(wallet_type)
            if wallet is None or not wallet.epin_enabled:
                errors["wallet_type"] = [MSG_WALLET_INSUFFICIENT]  # sandbox choice
                wallet = None
        amount = self._epin_amount(fields, errors, wallet)
        count = self._number_of_pins(fields, errors, user)
        transferable = self._true_false(fields, "transferable", errors)
        reusable = self._true_false(fields, "reusable", errors)
        checksum = _required(fields, "token_checksum_field", errors)
        token = _required(fields, "token_field", errors)
        if (
            token is not None
            and checksum is not None
            and not (
                _same(token, user.mail_token) and _same(checksum.lower(), token_checksum(token))
            )
        ):
            errors["token_field"] = [MSG_TOKEN_MISMATCH]
        if (
            wallet is not None
            and amount is not None
            and count is not None
            and amount * count > wallet.balance
        ):
            errors["wallet_type"] = [MSG_WALLET_INSUFFICIENT]
        if (
            errors
            or wallet is None
            or amount is None
            or count is None
            or transferable is None
            or reusable is None
        ):
            return _validation_error(errors)
        wallet.balance -= amount * count
        created = []
        for _ in range(count):
            coupon = Coupon(
                id=self._next_coupon_id,
                pin=self._new_pin(),
                charge=amount,
                balance=amount,
                reusable=reusable,
                transferable=transferable,
                wallet_type=wallet.wallet_type,
                owner=user.username,
            )
            self._next_coupon_id += 1
            self._coupons[coupon.id] = coupon
            user.coupon_ids.add(coupon.id)
            self._record(user, coupon, "create", amount, None)
            created.append(self.coupon_json(coupon))
        return _ok({"coupons": created, "wallet_balance": _money(wallet.balance)})

    def history(self, user: User, query: Mapping[str, str], url: str = "") -> Result:
        """The caller's transfers, shares, deletions and creations, newest first; `wallet`."""
        wallet = (query.get("wallet") or "").strip()
        entries = [h for h in reversed(user.history) if not wallet or h.wallet_type == wallet]
        return self._paginate(entries, query, url, self.history_json)

    # --- validation helpers ---------------------------------------------------------------

    def _min_amount(self, wallet: Wallet | None) -> Decimal:
        if wallet is not None and wallet.min_amount is not None:
            return wallet.min_amount
        return self.settings.min_amount

    def _max_amount(self, wallet: Wallet | None) -> Decimal:
        if wallet is not None and wallet.max_amount is not None:
            return wallet.max_amount
        return self.settings.max_amount

    def _epin_amount(
        self, fields: Mapping[str, str], errors: dict[str, list[str]], wallet: Wallet | None
    ) -> Decimal | None:
        value = _required(fields, "epin_amount", errors)
        if value is None:
            return None
        message: str | None = None
        amount: Decimal | None = None
        if len(value) > 7:
            message = MSG_MAX_7_CHARS
        elif _DECIMAL.fullmatch(value):
            message = MSG_INTEGERS_ONLY
        elif not _DIGITS.fullmatch(value):
            message = MSG_INVALID_AMOUNT
        else:
            amount = Decimal(int(value)).quantize(CENT)
            low, high = self._min_amount(wallet), self._max_amount(wallet)
            if not low <= amount <= high:
                message = MSG_AMOUNT_RANGE.format(min=_plain(low), max=_plain(high))
                amount = None
        if message is not None:
            errors["epin_amount"] = [message]
        return amount

    def _number_of_pins(
        self, fields: Mapping[str, str], errors: dict[str, list[str]], user: User
    ) -> int | None:
        value = _required(fields, "number_of_pins", errors)
        if value is None:
            return None
        message: str | None = None
        count: int | None = None
        if not _DIGITS.fullmatch(value):
            message = MSG_NUMERIC_ONLY
        else:
            digits = value.lstrip("0") or "0"
            count = int(digits) if len(digits) <= 9 else None
            if count == 0:
                message = MSG_INVALID_PIN_COUNT
            elif count is None or self.active_count(user) + count > (
                self.settings.max_active_coupons
            ):
                message = MSG_EXCEEDS_MAX_ACTIVE
        if message is not None:
            errors["number_of_pins"] = [message]
            return None
        return count

    @staticmethod
    def _true_false(
        fields: Mapping[str, str], name: str, errors: dict[str, list[str]]
    ) -> bool | None:
        value = _required(fields, name, errors)
        if value is None:
            return None
        if value not in ("True", "False"):
            errors[name] = [MSG_TRUE_FALSE]
            return None
        return value == "True"

    # --- internals ------------------------------------------------------------------------

    def _owned(self, user: User, coupon_id: int) -> Coupon | None:
        """The caller's coupon that is not deleted (any balance)."""
        if coupon_id not in user.coupon_ids:
            return None
        return self._coupons.get(coupon_id)

    def _new_pin(self) -> str:
        while True:
            pin = "".join(secrets.choice(PIN_ALPHABET) for _ in range(PIN_LENGTH))
            if pin not in self._pins:
                self._pins.add(pin)
                return pin

    def _record(
        self, user: User, coupon: Coupon, action: str, amount: Decimal, counterparty: str | None
    ) -> None:
        user.history.append(
            HistoryEntry(
                self._next_history_id,
                coupon.id,
                action,
                amount,
                coupon.wallet_type,
                counterparty,
                self.clock(),
            )
        )
        self._next_history_id += 1

    def _paginate(
        self,
        items: Sequence[Any],
        query: Mapping[str, str],
        url: str,
        render: Callable[[Any], dict[str, Any]],
    ) -> Result:
        size = self.settings.page_size
        raw_size = (query.get("page_size") or "").strip()
        if _DIGITS.fullmatch(raw_size) and len(raw_size) <= 9 and int(raw_size) > 0:
            size = min(int(raw_size), self.settings.max_page_size)
        count = len(items)
        pages = max(1, math.ceil(count / size))
        raw_page = (query.get("page") or "1").strip()
        if raw_page == "last":
            page = pages
        elif _DIGITS.fullmatch(raw_page) and len(raw_page) <= 9:
            page = int(raw_page)
        else:
            page = 0
        if not 1 <= page <= pages:
            return _detail_error(404, MSG_INVALID_PAGE)
        start = (page - 1) * size
        results = [render(item) for item in items[start : start + size]]
        following = _page_url(url, page + 1) if page < pages else None
        previous = None if page == 1 else _page_url(url, page - 1 if page > 2 else None)
        return _ok({"results": results, "count": count, "previous": previous, "next": following})

    # --- JSON -----------------------------------------------------------------------------

    def coupon_json(self, coupon: Coupon) -> dict[str, Any]:
        cur = self.currency
        return {
            "id": coupon.id,
            "pin": coupon.pin,
            "charge": _money(coupon.charge),
            "balance": _money(coupon.balance),
            "reusable": coupon.reusable,
            "transferable": coupon.transferable,
            "wallet_type": coupon.wallet_type,
            "currecy_data": {  # sic: the vendor's spelling
                "decimals": cur.decimals,
                "symbol_placement": cur.symbol_placement,
                "symbol": cur.symbol,
                "rate": cur.rate,
            },
            "currency_code": cur.code,
        }

    @staticmethod
    def history_json(entry: HistoryEntry) -> dict[str, Any]:
        return {
            "id": entry.id,
            "epin": entry.epin,
            "action": entry.action,
            "amount": _money(entry.amount),
            "wallet_type": entry.wallet_type,
            "counterparty": entry.counterparty,
            "date": _iso(entry.at),
        }

    def snapshot(
        self, coupon_ids: Iterable[int] | None = None, with_coupons: bool = True
    ) -> dict[str, Any]:
        """State as JSON-able data: settings, users, coupons, shares, form keys, counters."""
        if coupon_ids is not None:
            selected: Iterable[Coupon] = (
                c for cid in coupon_ids if (c := self._coupons.get(cid)) is not None
            )
        else:
            selected = self._coupons.values() if with_coupons else ()
        users = [
            {
                "username": u.username,
                "email": u.email,
                "active": u.active,
                "facility_enabled": u.facility_enabled,
                "mail_token": u.mail_token,
                "token_checksum": token_checksum(u.mail_token),
                "wallets": [
                    {
                        "wallet_type": w.wallet_type,
                        "name": w.name,
                        "balance": _money(w.balance),
                        "min_amount": _money(self._min_amount(w)),
                        "max_amount": _money(self._max_amount(w)),
                        "epin_enabled": w.epin_enabled,
                    }
                    for w in u.wallets.values()
                ],
                "active_coupons": self.active_count(u),
                "history": len(u.history),
            }
            for u in self._users.values()
        ]
        coupons = [
            {
                "id": c.id,
                "pin": c.pin,
                "charge": _money(c.charge),
                "balance": _money(c.balance),
                "reusable": c.reusable,
                "transferable": c.transferable,
                "wallet_type": c.wallet_type,
                "owner": c.owner,
                "email": c.email,
                "source": c.source,
                "deleted": c.deleted,
                "refunded_amount": (
                    _money(c.refunded_amount) if c.refunded_amount is not None else None
                ),
                "transfers": c.transfers,
                "shares": c.shares,
                "deletes": c.deletes,
            }
            for c in selected
        ]
        shares = [
            {
                "id": s.id,
                "epin": s.epin,
                "coupon": s.coupon,
                "email": s.email,
                "amount": _money(s.amount),
                "username": s.username,
                "date": _iso(s.at),
            }
            for s in self._shares
        ]
        form_keys = [
            {"key": k.key, "username": k.username, "uses": k.uses, "burnt": k.burnt}
            for k in self._form_keys.values()
        ]
        all_coupons = self._coupons.values()
        wallet_total = sum(
            (w.balance for u in self._users.values() for w in u.wallets.values()), ZERO
        )
        coupon_total = sum((c.balance for c in all_coupons), ZERO)
        now = self.clock()
        return {
            "settings": self.settings.as_json(),
            "users": users,
            "coupons": coupons,
            "shares": shares,
            "form_keys": form_keys,
            "counters": {
                "calls": dict(self.calls),
                "failures": dict(self.failures),
                "logins": self.logins,
                "login_failures": self.login_failures,
                "refreshes": self.refreshes,
                "refresh_failures": self.refresh_failures,
            },
            "totals": {
                "users": len(self._users),
                "coupons": len(self._coupons),
                "active_coupons": sum(
                    1
                    for c in all_coupons
                    if c.owner is not None and not c.deleted and c.balance > 0
                ),
                "deleted_coupons": sum(1 for c in all_coupons if c.deleted),
                "shares": len(self._shares),
                "transfers": sum(c.transfers for c in all_coupons),
                "deletes": sum(c.deletes for c in all_coupons),
                "form_keys": len(self._form_keys),
                "form_key_reuses": sum(max(0, k.uses - 1) for k in self._form_keys.values()),
                "live_access_tokens": sum(
                    1
                    for t in self._tokens.values()
                    if t.kind == "access" and not t.revoked and t.expires_at > now
                ),
                "wallet_balance": _money(wallet_total),
                "coupon_balance": _money(coupon_total),
                # Wallets plus coupons (shared ones too): constant under transfer, share,
                # create and delete; only the admin API changes it.
                "value": _money(wallet_total + coupon_total),
            },
        }


def _page_url(url: str, page: int | None) -> str:
    """`url` with its `page` query parameter set to `page` (removed for None)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "page"]
    if page is not None:
        query.append(("page", str(page)))
    return urlunsplit(parts._replace(query=urlencode(query)))


# --- request bodies ---------------------------------------------------------------------------


class BodyError(ValueError):
    """The request body cannot be read as form data or a JSON object."""


def _field_text(value: Any) -> str:
    """A JSON value as the string a form would carry (a boolean as "True"/"False")."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, str):
        return value
    if isinstance(value, int | Decimal):
        return str(value)
    return json.dumps(value)


def parse_body(content_type: str, raw: bytes) -> dict[str, str]:
    """multipart/form-data, application/x-www-form-urlencoded or a JSON object -> fields.

    Without a content type, JSON is tried, then urlencoded. A repeated field keeps its last
    value (as Django's QueryDict.get does). Raises `BodyError`.
    """
    if not raw.strip():
        return {}
    media = content_type.split(";", 1)[0].strip().lower()
    try:
        if media == "multipart/form-data":
            return _parse_multipart(content_type, raw)
        if media == "application/x-www-form-urlencoded":
            return dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
        if media == "application/json" or media.endswith("+json"):
            return _parse_json(raw)
        if not media:
            try:
                return _parse_json(raw)
            except BodyError:
                return dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError as exc:
        raise BodyError("not UTF-8") from exc
    raise BodyError(f"unsupported media type {media!r}")


def _parse_json(raw: bytes) -> dict[str, str]:
    try:
        body = json.loads(raw, parse_float=Decimal)
    except ValueError as exc:  # also UnicodeDecodeError
        raise BodyError("invalid JSON") from exc
    if not isinstance(body, dict):
        raise BodyError("not a JSON object")
    return {str(k): _field_text(v) for k, v in body.items()}


def _parse_multipart(content_type: str, raw: bytes) -> dict[str, str]:
    """A small multipart/form-data reader (python-multipart is not a dependency).

    Fields only: a part with a filename is read as text too. Parts are split on the boundary;
    each has headers, a blank line, and its content up to the CRLF before the next delimiter.
    """
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise BodyError("multipart without a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = raw.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise BodyError("multipart without its closing delimiter")
    fields: dict[str, str] = {}
    for chunk in chunks[1:-1]:
        if not chunk.startswith(b"\r\n") or not chunk.endswith(b"\r\n"):
            raise BodyError("malformed multipart part")
        head, sep, content = chunk[2:].partition(b"\r\n\r\n")
        if not sep:
            raise BodyError("multipart part without headers")
        content = content[:-2]  # the CRLF that belongs to the next delimiter
        headers = Message()
        for line in head.decode("utf-8").split("\r\n"):
            if line.strip():
                name, colon, value = line.partition(":")
                if not colon:
                    raise BodyError("malformed multipart header")
                headers[name.strip()] = value.strip()
        field_name = headers.get_param("name", header="content-disposition")
        if not isinstance(field_name, str):
            raise BodyError("multipart part without a name")
        fields[field_name] = content.decode("utf-8")
    return fields


# --- HTTP -------------------------------------------------------------------------------------

_USERS_ADAPTER = TypeAdapter(list[UserSeed])
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _normal_prefix(prefix: str) -> str:
    inner = prefix.strip("/")
    return f"/{inner}/" if inner else "/"


def create_app(
    sandbox: EpinSandbox,
    faults: FaultConfig | None = None,
    *,
    prefix: str = DEFAULT_PREFIX,
    refresh_path: str = DEFAULT_REFRESH_PATH,
) -> Starlette:
    """The sandbox behind the upstream's URLs (`<prefix>user/...`, default prefix /api/v1/).

    Admin API (no auth): GET /_sandbox/health; GET /_sandbox/state (`?coupons=1,2` selects
    coupons, `?coupons=0` leaves them out); GET|POST /_sandbox/faults (POST merges fields into
    the fault config); POST /_sandbox/reset; POST /_sandbox/users (a list, or {"users": [...]},
    added or replaced by username); GET|POST /_sandbox/settings (`SettingsUpdate`); POST
    /_sandbox/expire-tokens (`{"refresh": true}` expires refresh tokens too); POST
    /_sandbox/revoke (`{"username", "kind": "access" | "refresh" | "all"}`, revokes that user's
    tokens issued so far); GET /_sandbox/calls?user=<username> (that user's call log).
    `app.state.sandbox` and `app.state.faults` (the `FaultInjector`) are there for tests.
    """
    injector = FaultInjector(faults or FaultConfig())
    paths: dict[str, dict[str, str]] = {
        "user/login/": {"POST": LOGIN},
        refresh_path.strip("/") + "/": {"POST": REFRESH},
        "user/get/active-epin/": {"GET": ACTIVE},
        "user/transfer/epin/": {"POST": TRANSFER},
        "user/share/epin/": {"POST": SHARE},
        "user/delete/epin/": {"DELETE": DELETE},
        "user/generate/epin/": {"GET": WALLETS, "POST": CREATE},
        "user/epin/history/": {"GET": HISTORY},
    }

    async def api(request: Request) -> Response:
        methods = paths.get(request.path_params["path"])
        if methods is None:
            return JSONResponse({"detail": "Not found."}, status_code=404)
        route = methods.get(request.method)
        if route is None:
            return JSONResponse(
                {"detail": f'Method "{request.method}" not allowed.'},
                status_code=405,
                headers={"Allow": ", ".join(methods)},
            )
        raw = await request.body()
        # For faults, the refund-status query (the delete endpoint without `status`) is a
        # route of its own: a test can make deletes land late and still read their status.
        is_query = route == DELETE and "status" not in request.query_params
        fault = await injector.inject(REFUND_STATUS if is_query else route)
        if fault is FaultKind.ERROR:
            return error_response(503)  # nothing applied
        if fault is FaultKind.TIMEOUT:
            return error_response(504)  # after timeout_sleep_s; nothing applied
        fields: dict[str, str] = {}
        body_error: str | None = None
        if request.method in ("POST", "PUT", "PATCH"):
            try:
                fields = parse_body(request.headers.get("content-type", ""), raw)
            except BodyError:
                body_error = MSG_MALFORMED
        status, body = sandbox.dispatch(
            route,
            apikey=request.headers.get("apikey"),
            authorization=request.headers.get("authorization"),
            fields=fields,
            query=dict(request.query_params),
            url=str(request.url),
            body_error=body_error,
            method=request.method,
            path=request.url.path,
        )
        if fault is FaultKind.DROP_AFTER_APPLY or fault is FaultKind.APPLY_LATE:
            await drop_connection(request.scope)  # applied above; the answer is lost
        return JSONResponse(body, status_code=status)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def state(request: Request) -> Response:
        raw = request.query_params.get("coupons")
        if raw is None or raw in ("1", "true"):
            snapshot = sandbox.snapshot()
        elif raw in ("0", "false"):
            snapshot = sandbox.snapshot(with_coupons=False)
        else:
            ids = [int(part) for part in raw.split(",") if _DIGITS.fullmatch(part.strip())]
            snapshot = sandbox.snapshot(ids)
        snapshot["faults"] = injector.snapshot()
        return JSONResponse(snapshot)

    faults_endpoint = faults_route(injector)

    async def reset(request: Request) -> Response:
        sandbox.reset()
        return JSONResponse(
            {"status": "ok", "totals": sandbox.snapshot(with_coupons=False)["totals"]}
        )

    async def users(request: Request) -> Response:
        return await add_items(request, "users", _USERS_ADAPTER, sandbox.add_users)

    def apply_settings(changes: dict[str, Any]) -> None:
        try:
            sandbox.apply_settings(SettingsUpdate.model_validate(changes))
        except KeyError as exc:
            raise SettingRefused(f"unknown user: {exc.args[0]}") from None

    # Read at each call: a reset replaces the sandbox's settings object.
    settings = settings_route(lambda: sandbox.settings.as_json(), apply_settings)

    async def expire_tokens(request: Request) -> Response:
        changes = await json_object(request)
        refresh = bool(changes.get("refresh")) if changes else False
        return JSONResponse({"expired": sandbox.expire_tokens(refresh=refresh)})

    async def revoke(request: Request) -> Response:
        changes = await json_object(request)
        if changes is None:
            return JSONResponse({"error": "expected a JSON object"}, status_code=400)
        try:
            order = RevokeRequest.model_validate(changes)
        except ValidationError as exc:
            return JSONResponse({"error": validation_errors(exc)}, status_code=422)
        try:
            count = sandbox.revoke_tokens(order.username, order.kind)
        except KeyError:
            return JSONResponse({"error": f"unknown user: {order.username}"}, status_code=404)
        return JSONResponse({"revoked": count})

    async def calls(request: Request) -> Response:
        username = request.query_params.get("user")
        if not username:
            return JSONResponse({"error": "expected ?user=<username>"}, status_code=400)
        if sandbox.user(username) is None:
            return JSONResponse({"error": f"unknown user: {username}"}, status_code=404)
        return JSONResponse({"calls": sandbox.call_log(username)})

    app = SandboxStarlette(
        routes=[
            Route("/_sandbox/health", health, methods=["GET"]),
            Route("/_sandbox/state", state, methods=["GET"]),
            Route("/_sandbox/faults", faults_endpoint, methods=["GET", "POST"]),
            Route("/_sandbox/reset", reset, methods=["POST"]),
            Route("/_sandbox/users", users, methods=["POST"]),
            Route("/_sandbox/settings", settings, methods=["GET", "POST"]),
            Route("/_sandbox/expire-tokens", expire_tokens, methods=["POST"]),
            Route("/_sandbox/revoke", revoke, methods=["POST"]),
            Route("/_sandbox/calls", calls, methods=["GET"]),
            # Every method reaches `api`, which answers 404/405 in Django REST framework's shape.
            Route(_normal_prefix(prefix) + "{path:path}", api, methods=_ALL_METHODS),
        ]
    )
    app.state.sandbox = sandbox
    app.state.faults = injector
    return app


# --- server -----------------------------------------------------------------------------------


def build_epin_server(
    host: str,
    port: int,
    seed_path: Path,
    faults: FaultConfig | None = None,
    *,
    prefix: str = DEFAULT_PREFIX,
    refresh_path: str = DEFAULT_REFRESH_PATH,
    access_ttl_s: float | None = None,
    refresh_ttl_s: float | None = None,
) -> uvicorn.Server:
    """A uvicorn server for the sandbox, not started (see `faults.sandbox_server`)."""
    sandbox = EpinSandbox.from_seed_file(
        seed_path, access_ttl_s=access_ttl_s, refresh_ttl_s=refresh_ttl_s
    )
    app = create_app(sandbox, faults or FaultConfig(), prefix=prefix, refresh_path=refresh_path)
    return sandbox_server(app, host, port)
