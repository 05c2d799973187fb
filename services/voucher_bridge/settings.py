"""Settings from the environment (and a `.env` file, and a secrets directory), per design.md.

Secrets are SecretStr: their repr is masked, so a logged Settings object leaks nothing; and
no validation error shows the value it refused (`hide_input_in_errors`), so a malformed
EVOUCHER_TERMINALS or EPIN_ACCOUNTS names the setting and the problem, never the tokens.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)


class EpinAccount(BaseModel):
    username: str
    password: SecretStr


class ConsoleUser(BaseModel):
    """One console login: a password, or its hash (`voucher-bridge console hash-password`)."""

    password: SecretStr
    role: Literal["viewer", "operator"] = "viewer"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # A file in the secrets directory is what the platform mounted on purpose: it wins
        # over the environment (where an image's default, e.g. its SQLite store URL, would
        # otherwise hide a mounted PostgreSQL URL, and each instance keep a store of its own).
        return init_settings, file_secret_settings, env_settings, dotenv_settings

    # Kafka
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_group_id: str = "voucher-bridge"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    # Opens an encrypted KAFKA_SSL_KEYFILE (PKCS#8 PEM); unset, an encrypted key is refused at
    # start (never prompted for on a terminal).
    kafka_ssl_key_password: SecretStr | None = None
    # The broker's certificate must name the host it is reached by. Turning this off only for
    # a broker addressed by an IP its certificate does not list: anyone holding any certificate
    # from the same CA could then pose as the broker.
    kafka_ssl_check_hostname: bool = True
    pos_commands_topic: str = "pos.commands"
    pos_results_topic: str = "pos.results"
    coupon_commands_topic: str = "coupon.commands"
    coupon_results_topic: str = "coupon.results"
    # Records larger than this are not commands: they go to the dead-letter topic.
    max_record_bytes: int = Field(default=1_048_576, gt=0)
    # Results are cut to fit this (`truncated: true`); below the producer's 1 MiB request
    # limit with room for the key and headers.
    max_result_bytes: int = Field(default=1_000_000, gt=1000, le=1_040_000)

    # Processing
    # Records taken at once, shared equally among the partitions held (kafka/dispatcher.py).
    max_in_flight: int = Field(default=1000, gt=0)
    # Processes that run the commands, so that one partition's keys use more than one core
    # (workers/pool.py); the consumer, the key-ordered dispatch and the commits stay in the
    # service's process. 1: the commands run in the service's own process. Unset: the cores
    # this process may use (its CPU affinity, bounded by a cgroup's CPU quota), at most 4.
    workers: int | None = Field(default=None, ge=1, le=64)
    commit_interval_ms: int = Field(default=200, ge=0)
    drain_timeout_s: float = Field(default=30.0, gt=0)
    # Every command is answered within this, whatever fails around it (upstream, store): the
    # upstream calls are cancelled then and the command answered as it stands.
    command_timeout_s: float = Field(default=120.0, gt=0)
    max_poll_interval_ms: int = Field(default=300_000, gt=0)
    session_timeout_ms: int = Field(default=45_000, gt=0)
    fetch_max_wait_ms: int = Field(default=50, ge=0)

    # eVOUCHER POS API
    evoucher_base_url: str = "https://evoucher.cy"
    evoucher_terminals: dict[str, SecretStr] = Field(default_factory=dict)
    evoucher_connect_timeout_s: float = Field(default=5.0, gt=0)
    evoucher_read_timeout_s: float = Field(default=15.0, gt=0)
    # The real host is a small shop site: bound how many calls it gets at once.
    evoucher_max_connections: int = Field(default=10, gt=0)

    # Epixel Epin API
    epin_base_url: str | None = None
    epin_api_key: SecretStr | None = None
    epin_accounts: dict[str, EpinAccount] = Field(default_factory=dict)
    epin_refresh_path: str = "user/token/refresh/"
    epin_connect_timeout_s: float = Field(default=5.0, gt=0)
    epin_read_timeout_s: float = Field(default=15.0, gt=0)
    epin_max_connections: int = Field(default=10, gt=0)
    # Coupon PINs are bearer value: `masked` (the default) publishes "****" for every `pin` in
    # coupon.results; `shown` publishes them as the API gave them (only where every reader of
    # the results topic may spend the coupons).
    coupon_result_pins: Literal["masked", "shown"] = "masked"
    # Each till's shop, for the `store` of its results, where its commands' source does not
    # name it (/stores/<store>/...): JSON object terminal → store.
    terminal_stores: dict[str, str] = Field(default_factory=dict)
    # Lists follow `next` to the end, but no further than this many pages.
    epin_max_pages: int = Field(default=100, gt=0)

    # An upstream that is down (breaker.py): its circuit opens after this many consecutive
    # failures (no connection, timeout, dropped connection, 5xx; 0 turns it off), refuses
    # calls for `open_s`, then lets `half_open_probes` calls through at a time; the first
    # answered closes it. While open, a POS command fails at once (a customer is waiting at
    # the till; nothing was sent), a coupon command waits for it, at most `max_wait_s`, its
    # command time standing still meanwhile.
    evoucher_breaker_failures: int = Field(default=5, ge=0)
    evoucher_breaker_open_s: float = Field(default=10.0, gt=0)
    evoucher_breaker_half_open_probes: int = Field(default=1, ge=1)
    evoucher_breaker_when_open: Literal["fail", "wait"] = "fail"
    evoucher_breaker_max_wait_s: float = Field(default=600.0, ge=0)
    epin_breaker_failures: int = Field(default=5, ge=0)
    epin_breaker_open_s: float = Field(default=10.0, gt=0)
    epin_breaker_half_open_probes: int = Field(default=1, ge=1)
    epin_breaker_when_open: Literal["fail", "wait"] = "wait"
    epin_breaker_max_wait_s: float = Field(default=600.0, ge=0)
    # Requests per second to the upstream's host, beside *_MAX_CONNECTIONS (0: no limit, the
    # default: neither vendor states a limit, and a made-up one lower than a busy hour's
    # demand would queue every till behind it until commands time out). `burst`: how many may
    # go at once after a quiet spell.
    evoucher_rate_limit_rps: float = Field(default=0.0, ge=0)
    evoucher_rate_limit_burst: int = Field(default=2, ge=1)
    epin_rate_limit_rps: float = Field(default=0.0, ge=0)
    epin_rate_limit_burst: int = Field(default=2, ge=1)

    # Retries of calls that are safe to repeat (a redeem is never resent once it may have
    # arrived): attempts in all, exponential backoff with full jitter.
    upstream_retry_attempts: int = Field(default=3, ge=1)
    upstream_retry_base_delay_s: float = Field(default=0.2, ge=0)
    upstream_retry_max_delay_s: float = Field(default=5.0, ge=0)

    # Idempotency store
    # A PostgreSQL URL carries its password: a secret like the others.
    idempotency_store_url: SecretStr = SecretStr("sqlite:///var/voucher-bridge/idempotency.sqlite3")
    # One store operation; a slower one counts as failed and is tried again (within the
    # command's time).
    store_timeout_s: float = Field(default=5.0, gt=0)
    # Command topics that keep records longer than the store keeps commands: `warn` at start,
    # or `refuse` to start (old commands are refused by age either way: `command_expired`).
    retention_check: Literal["warn", "refuse"] = "warn"
    idempotency_retention_s: float = Field(default=7 * 24 * 3600, gt=0)
    # How often records past their retention are removed (in batches, between commands).
    idempotency_purge_interval_s: float = Field(default=600, gt=0)
    # How often this instance says it is alive, and after how long without that another
    # instance takes over its unfinished commands.
    instance_heartbeat_s: float = Field(default=2.0, gt=0)
    instance_stale_after_s: float = Field(default=15.0, gt=0)
    # How often indeterminate redeems are looked at again, and for how long after the call
    # (the upstream locks a scanned voucher to its terminal for 5 minutes).
    settle_interval_s: float = Field(default=5.0, gt=0)
    settle_window_s: float = Field(default=240.0, ge=0)
    # The Epin history keeps every action: settle its lost answers for longer.
    epin_settle_window_s: float = Field(default=3600.0, ge=0)
    # A lost answer is "not applied" only once the call can no longer be under way upstream:
    # this long after it went out (well above any server-side request limit).
    evoucher_apply_grace_s: float = Field(default=120.0, ge=0)
    epin_apply_grace_s: float = Field(default=120.0, ge=0)

    # A record running longer than this is logged (once, with its command) and counted: long
    # before COMMAND_TIMEOUT_S ends it.
    stuck_after_s: float = Field(default=60.0, gt=0)
    # Liveness (/health/live) fails only when the process cannot make progress: its event loop
    # has not run, or its consumer has not polled Kafka, for this long (a broker or store
    # outage is readiness's business, not a reason to restart).
    liveness_loop_blocked_s: float = Field(default=30.0, gt=0)
    liveness_poll_idle_s: float = Field(default=120.0, gt=0)

    # Health and metrics HTTP endpoint (0 turns it off)
    http_port: int = Field(default=8080, ge=0)
    http_host: str = "127.0.0.1"

    # The operator console (/console/ on the HTTP port): off (404) while no user is set.
    console_users: dict[str, ConsoleUser] = Field(default_factory=dict)
    # A dead letter replayed this many times (its chain of replays counted) is refused.
    console_replay_max: int = Field(default=3, ge=1)
    # At most this many replays a minute, all instances' and the CLI's (a slip of the hand
    # replays few).
    console_replays_per_minute: int = Field(default=30, ge=1)
    # How many of each dead-letter partition's newest records a listing reads.
    console_dlq_scan: int = Field(default=500, ge=1, le=100_000)
    # The tracing UI's address for a trace, `{trace_id}` in it; none: trace ids as text.
    console_trace_url: str | None = None

    @property
    def pos_dlq_topic(self) -> str:
        return self.pos_commands_topic + ".dlq"

    @property
    def coupon_dlq_topic(self) -> str:
        return self.coupon_commands_topic + ".dlq"


class InvalidSettings(Exception):
    """The settings cannot be used; the message names each setting and what is wrong with it,
    and holds none of the values (they may be secrets)."""


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment; `VOUCHER_BRIDGE_SECRETS_DIR` names a secrets directory
    (one file per setting, as Docker and Kubernetes mount them)."""
    secrets_dir = os.environ.get("VOUCHER_BRIDGE_SECRETS_DIR")
    try:
        if secrets_dir:
            return Settings(_secrets_dir=secrets_dir, **overrides)
        return Settings(**overrides)
    except ValidationError as exc:
        problems = [
            # The setting as it is spelled in the environment, then where inside its value.
            ".".join([str(e["loc"][0]).upper(), *map(str, e["loc"][1:])]) + ": " + e["msg"]
            for e in exc.errors(include_url=False, include_input=False, include_context=False)
        ]
        raise InvalidSettings("invalid settings: " + "; ".join(problems)) from None
    except SettingsError as exc:
        # A value that is not JSON where JSON is wanted. pydantic-settings names the field in
        # its message; the cause (the JSON error) is dropped, as some parsers quote the text.
        field = re.search(r'field "(\w+)"', str(exc))
        name = field.group(1).upper() if field else "a setting"
        raise InvalidSettings(f"invalid settings: {name}: not valid JSON") from None
