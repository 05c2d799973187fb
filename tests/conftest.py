"""Shared fixtures: a real Kafka broker, the eVOUCHER sandbox, and voucher-bridge in-process."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import settings as hypothesis_settings

from tests.support.kafka import create_topic, ensure_kafka, unique_topic
from voucher_bridge.app import Service
from voucher_bridge.settings import Settings
from voucher_sandboxes.localstack import (
    Process,
    epin_settings,
    free_port,
    start_epin_sandbox,
    start_sandbox,
)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    return ensure_kafka()


class Sandbox:
    """The eVOUCHER sandbox process and its admin API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.admin = httpx.Client(base_url=url + "/_sandbox/", timeout=10)

    def add_terminal(self, store: str = "limassol-3") -> tuple[str, str]:
        name = f"till-{uuid.uuid4().hex[:10]}"
        token = f"tok-{uuid.uuid4().hex}"
        self.admin.post(
            "terminals", json=[{"token": token, "machine_name": name, "store": store}]
        ).raise_for_status()
        return name, token

    def add_vouchers(self, *values: str, store: str = "limassol-3", **extra: Any) -> list[str]:
        codes = [f"{uuid.uuid4().int % 10**12:012d}" for _ in values]
        vouchers = [
            {"code": c, "value": v, "store": store, "expires": "2099-12-31", **extra}
            for c, v in zip(codes, values, strict=True)
        ]
        self.admin.post("vouchers", json=vouchers).raise_for_status()
        return codes

    def faults(self, **config: Any) -> None:
        self.admin.post("faults", json=config).raise_for_status()

    def vouchers(self, codes: list[str]) -> dict[str, dict[str, Any]]:
        state = self.admin.get("state", params={"codes": ",".join(codes)}).json()
        return {v["code"]: v for v in state["vouchers"]}

    def calls(self, terminal: str) -> list[dict[str, Any]]:
        """The calls the sandbox handled for this till (machine name), oldest first."""
        r = self.admin.get("calls", params={"terminal": terminal})
        r.raise_for_status()
        calls: list[dict[str, Any]] = r.json()["calls"]
        return calls


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    port = free_port()
    process: Process = start_sandbox(port, tmp_path_factory.mktemp("sandbox") / "sandbox.log")
    try:
        yield Sandbox(f"http://127.0.0.1:{port}")
    finally:
        process.stop()


class EpinSandbox:
    """The Epin sandbox process and its admin API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.settings = epin_settings(url)
        self.admin = httpx.Client(base_url=url + "/_sandbox/", timeout=10)

    def add_account(self, coupons: list[dict[str, Any]] | None = None, **user: Any) -> str:
        """A new user with a wallet and the given coupons; returns the username."""
        name = f"acct-{uuid.uuid4().hex[:10]}"
        seed = {
            "username": name,
            "password": f"pw-{uuid.uuid4().hex}",
            "email": f"{name}@example.cy",
            "mail_token": f"MT-{uuid.uuid4().hex[:8]}",
            "wallets": [{"wallet_type": "wallet1", "name": "E-Wallet", "balance": "1000.00"}],
            "coupons": coupons or [],
            **user,
        }
        self.admin.post("users", json=[seed]).raise_for_status()
        self.users[name] = seed
        return name

    @property
    def users(self) -> dict[str, dict[str, Any]]:
        if not hasattr(self, "_users"):
            self._users: dict[str, dict[str, Any]] = {}
        return self._users

    def faults(self, **config: Any) -> None:
        self.admin.post("faults", json=config).raise_for_status()

    def state(self, **params: str) -> dict[str, Any]:
        return dict(self.admin.get("state", params=params).json())

    def calls(self, user: str) -> list[dict[str, Any]]:
        """The calls that named this user (login, refresh, bearer token), oldest first."""
        r = self.admin.get("calls", params={"user": user})
        r.raise_for_status()
        calls: list[dict[str, Any]] = r.json()["calls"]
        return calls

    def revoke(self, username: str, kind: str = "all") -> int:
        """Revoke the user's tokens ("access", "refresh" or "all") issued so far."""
        r = self.admin.post("revoke", json={"username": username, "kind": kind})
        r.raise_for_status()
        revoked: int = r.json()["revoked"]
        return revoked


@pytest.fixture(scope="session")
def epin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EpinSandbox]:
    port = free_port()
    process = start_epin_sandbox(port, tmp_path_factory.mktemp("epin") / "epin.log")
    try:
        yield EpinSandbox(f"http://127.0.0.1:{port}")
    finally:
        process.stop()


@pytest.fixture(autouse=True)
def _no_faults(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, the shared sandboxes go back to answering without faults."""
    sandboxes = [
        value
        for name in ("sandbox", "epin")
        if name in request.fixturenames
        and isinstance(value := request.getfixturevalue(name), Sandbox | EpinSandbox)
    ]
    yield
    for sandbox in sandboxes:
        sandbox.faults(
            latency_ms=0,
            latency_jitter_ms=0,
            error_rate=0,
            timeout_rate=0,
            drop_after_apply_rate=0,
            apply_late_rate=0,
            routes=None,
        )


class Stack:
    """Topics of one test, and a way to start voucher-bridge instances on them."""

    def __init__(self, bootstrap: str, sandbox: Sandbox, store_url: str) -> None:
        self.bootstrap = bootstrap
        self.sandbox = sandbox
        self.store_url = store_url
        self.commands = unique_topic("pos.commands")
        self.results = self.commands.replace("commands", "results")
        self.dlq = self.commands + ".dlq"
        suffix = self.commands.removeprefix("pos.commands")
        self.coupon_commands = f"coupon.commands{suffix}"
        self.coupon_results = f"coupon.results{suffix}"
        self.coupon_dlq = self.coupon_commands + ".dlq"
        self.accounts: dict[str, dict[str, str]] = {}
        self.group = f"vb-{uuid.uuid4().hex[:8]}"
        self.terminals: dict[str, str] = {}

    def use_epin(self, epin: EpinSandbox) -> None:
        self.epin = epin

    def settings(self, **overrides: Any) -> Settings:
        epin = getattr(self, "epin", None)
        coupon: dict[str, Any] = {}
        if epin is not None:
            coupon = {
                "epin_base_url": epin.settings["EPIN_BASE_URL"],
                "epin_api_key": epin.settings["EPIN_API_KEY"],
                "epin_accounts": {
                    name: {"username": u["username"], "password": u["password"]}
                    for name, u in epin.users.items()
                },
            }
        values: dict[str, Any] = {
            **coupon,
            "kafka_bootstrap_servers": self.bootstrap,
            "kafka_group_id": self.group,
            "pos_commands_topic": self.commands,
            "pos_results_topic": self.results,
            "coupon_commands_topic": self.coupon_commands,
            "coupon_results_topic": self.coupon_results,
            "evoucher_base_url": self.sandbox.url,
            "evoucher_terminals": self.terminals,
            "evoucher_max_connections": 50,
            "commit_interval_ms": 50,
            "drain_timeout_s": 20,
            "http_port": 0,
            "idempotency_store_url": self.store_url,
            "instance_heartbeat_s": 0.5,
            "instance_stale_after_s": 3.0,
            "settle_interval_s": 0.5,
            # In-process instances run their commands in this process (they are looked into:
            # spans, breakers, patched parts), unless WORKERS says otherwise (the Makefile's
            # second pass); instances started as processes run as shipped (a worker per core).
            "workers": int(os.environ.get("WORKERS", "1")),
        }
        values.update(overrides)
        return Settings(**values)

    def terminal(self, store: str = "limassol-3") -> str:
        name, token = self.sandbox.add_terminal(store)
        self.terminals[name] = token
        return name

    @asynccontextmanager
    async def service(self, **overrides: Any) -> AsyncIterator[Service]:
        service = Service(self.settings(**overrides))
        app = service.app()
        await app.start()
        try:
            yield service
        finally:
            await app.stop()


@pytest.fixture(scope="session")
def postgres_server() -> str:
    from tests.support.postgres import ensure_postgres

    return ensure_postgres()


@pytest.fixture(params=["sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty idempotency store. Tests that must hold on both stores parametrize
    this fixture indirectly with ["sqlite", "postgres"]."""
    if request.param == "postgres":
        from tests.support.postgres import fresh_database

        return fresh_database(request.getfixturevalue("postgres_server"))
    return f"sqlite:///{tmp_path / 'store.sqlite3'}"


@pytest.fixture
async def stack(
    kafka_bootstrap: str, sandbox: Sandbox, store_url: str
) -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    async def make(partitions: int = 3) -> Stack:
        stack = Stack(kafka_bootstrap, sandbox, store_url)
        for topic in (stack.commands, stack.results, stack.dlq):
            await create_topic(kafka_bootstrap, topic, partitions)
        for topic in (stack.coupon_commands, stack.coupon_results, stack.coupon_dlq):
            await create_topic(kafka_bootstrap, topic, 2)
        return stack

    yield make


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.kafka)


os.environ.setdefault("OTEL_TRACES_EXPORTER", "none")

# Property tests: the same examples on every run (CI must not turn red by luck), no example
# database in the tree. `HYPOTHESIS_PROFILE=explore` draws new ones.
hypothesis_settings.register_profile("default", derandomize=True, database=None, deadline=None)
hypothesis_settings.register_profile("explore", database=None, deadline=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
