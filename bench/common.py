"""What the benchmark's load, its two comparison systems and its runner share.

The load: `pos.*` commands as CloudEvents (structured mode), keyed by terminal, every one
valid and cheap for the sandbox, and independent of any voucher state (so the three systems
can share one sandbox, one after another, and every run does the same upstream work):

- 80 % `pos.bill_total` with a bill total between 1.00 and 199.99: always `succeeded`
  (the sandbox opens a new bill for the terminal's session);
- 20 % `pos.scan` of a code no voucher has (`8` + 10 digits; generated codes start with `9`):
  always `rejected`, `voucher_not_found`.

Both are one POST to the eVOUCHER API each. The comparison systems (`bench.naive`,
`bench.bare`) make exactly the call voucher-bridge makes for them (same URL, `X-Token`, JSON
body, the terminal's `OCSESSID` cookie sent back) and publish a small result record with the
same key, carrying `data.command_id`, which is all the runner reads.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from voucher_bridge.http_transport import AsyncioHTTPTransport

SCAN_SHARE = 0.2  # of the commands; the rest are bill totals
TOKEN_PREFIX = "bench-token-"
MAX_TERMINALS = 1000


def machine_name(i: int) -> str:
    # voucher_sandboxes.evoucher.generated_machine_name
    return f"gen-till-{i:06d}"


def token(i: int) -> str:
    # voucher_sandboxes.evoucher.generated_token, with the benchmark's prefix
    return f"{TOKEN_PREFIX}{i:06d}"


def terminals(count: int = MAX_TERMINALS) -> dict[str, str]:
    """machine name → X-Token of the sandbox's generated terminals (EVOUCHER_TERMINALS)."""
    return {machine_name(i): token(i) for i in range(count)}


def sandbox_seed(count: int = MAX_TERMINALS) -> dict[str, Any]:
    """A sandbox seed generating `count` terminals (one voucher each, never used)."""
    return {
        "stores": [],
        "terminals": [],
        "vouchers": [],
        "generate": {
            "terminals": count,
            "vouchers_per_terminal": 1,
            "terminals_per_store": 1,
            "token_prefix": TOKEN_PREFIX,
        },
    }


@dataclass(frozen=True)
class Command:
    id: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


STRUCTURED = [("content-type", b"application/cloudevents+json")]


def commands(count: int, terminal_count: int, run: str, seed: int = 1) -> list[Command]:
    """`count` commands over terminals 0..terminal_count-1: each command's terminal and kind
    drawn from a RNG seeded with `seed`, so every system gets the same sequence."""
    rng = random.Random(seed)
    return [_command(seq, rng, rng.randrange(terminal_count), run) for seq in range(count)]


def warmup_commands(count: int, run: str) -> list[Command]:
    """One command for each of terminals 0..count-1."""
    rng = random.Random(0)
    return [_command(i, rng, i, run) for i in range(count)]


def _command(seq: int, rng: random.Random, terminal_index: int, run: str) -> Command:
    terminal = machine_name(terminal_index)
    command_id = f"{run}-{seq:07d}-{uuid.uuid4().hex[:8]}"
    if rng.random() < SCAN_SHARE:
        type_, data = "pos.scan", {"voucher_code": f"8{rng.randrange(10**10):010d}"}
    else:
        cents = rng.randrange(100, 20000)
        type_, data = "pos.bill_total", {"bill_total": f"{cents // 100}.{cents % 100:02d}"}
    event = {
        "specversion": "1.0",
        "id": command_id,
        "source": f"/stores/bench/pos/{terminal}",
        "type": type_,
        "subject": terminal,
        # Now, not a fixed date: a command older than the store's retention is refused unsent.
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "datacontenttype": "application/json",
        "data": data,
    }
    return Command(command_id, terminal.encode(), json.dumps(event).encode(), STRUCTURED)


# --- the comparison systems' side --------------------------------------------------------------


@dataclass(frozen=True)
class SystemConfig:
    """What `bench.naive` and `bench.bare` read from the environment."""

    bootstrap: str
    commands_topic: str
    results_topic: str
    group_id: str
    sandbox_url: str
    tokens: dict[str, str]
    max_connections: int

    @classmethod
    def from_env(cls) -> SystemConfig:
        return cls(
            bootstrap=os.environ["BENCH_BOOTSTRAP"],
            commands_topic=os.environ["BENCH_COMMANDS_TOPIC"],
            results_topic=os.environ["BENCH_RESULTS_TOPIC"],
            group_id=os.environ["BENCH_GROUP_ID"],
            sandbox_url=os.environ["BENCH_SANDBOX_URL"],
            tokens=json.loads(os.environ["BENCH_TERMINALS"]),
            max_connections=int(os.environ.get("BENCH_MAX_CONNECTIONS", "200")),
        )


def http_client(config: SystemConfig) -> httpx.AsyncClient:
    """As voucher-bridge's EvoucherClient builds its own (timeouts, pool size, JSON accept)."""
    limits = httpx.Limits(
        max_connections=config.max_connections, max_keepalive_connections=config.max_connections
    )
    return httpx.AsyncClient(
        base_url=config.sandbox_url.rstrip("/") + "/",
        timeout=httpx.Timeout(15.0, connect=5.0, pool=None),
        limits=limits,
        headers={"Accept": "application/json"},
    )


class Upstream:
    """The one eVOUCHER call per command, as voucher-bridge sends it (`evoucher.client`).

    `lean=True` (the bare loop) calls httpx's transport directly, as voucher-bridge does, so
    that the floor is not slower than the service at the HTTP layer; the naive subscriber uses
    `AsyncClient.post`, as most code would.
    """

    def __init__(self, config: SystemConfig, *, lean: bool = False) -> None:
        self._tokens = config.tokens
        self._http = http_client(config)
        self._lean = lean
        self._transport = AsyncioHTTPTransport(
            limits=httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_connections,
            )
        )
        self._timeout = httpx.Timeout(15.0, connect=5.0, pool=None).as_dict()
        base = httpx.URL(config.sandbox_url.rstrip("/") + "/index.php")
        self._urls = {
            route: base.copy_merge_params({"route": f"account/{route}"})
            for route in ("bill_total_api", "scan_voucher_api")
        }
        self._cookies: dict[str, str] = {}  # terminal → OCSESSID, in memory only

    async def call(self, event: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        terminal = event["subject"]
        data = event.get("data") or {}
        if event["type"] == "pos.bill_total":
            route = "bill_total_api"
            # voucher-bridge sends the amount as an exact JSON number
            body = f'{{"bill_total":{data["bill_total"]},"machine_name":{json.dumps(terminal)}}}'
        else:
            route = "scan_voucher_api"
            body = json.dumps({"voucher_code": data["voucher_code"]}, separators=(",", ":"))
        headers = {"X-Token": self._tokens[terminal], "Content-Type": "application/json"}
        session = self._cookies.get(terminal)
        if session:
            headers["Cookie"] = f"OCSESSID={session}"
        if self._lean:
            status, content, fresh = await self._lean_post(route, body, headers)
        else:
            response = await self._http.post(
                "index.php", params={"route": f"account/{route}"}, content=body, headers=headers
            )
            status, content = response.status_code, response.content
            fresh = response.cookies.get("OCSESSID")
        if fresh and fresh != session:
            self._cookies[terminal] = fresh
        try:
            payload = json.loads(content)
        except ValueError:
            payload = None
        return status, payload if isinstance(payload, dict) else None

    async def _lean_post(
        self, route: str, body: str, headers: dict[str, str]
    ) -> tuple[int, bytes, str | None]:
        headers.update({"Accept": "application/json", "Accept-Encoding": "gzip, deflate"})
        request = httpx.Request(
            "POST",
            self._urls[route],
            headers=headers,
            content=body.encode(),
            extensions={"timeout": self._timeout},
        )
        response = await self._transport.handle_async_request(request)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        fresh = None
        for header in response.headers.get_list("set-cookie"):
            name, _, rest = header.partition("=")
            if name.strip() == "OCSESSID":
                fresh = rest.split(";", 1)[0]
        return response.status_code, content, fresh

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._transport.aclose()


def result_value(event: dict[str, Any], status: int, payload: dict[str, Any] | None) -> bytes:
    """A small result event: what a naive implementation would publish."""
    ok = bool(payload and payload.get("success"))
    message = (payload or {}).get("message")
    return json.dumps(
        {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": "/services/bench",
            "type": f"{event.get('type')}.result",
            "subject": event.get("subject"),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "data": {
                "command_id": event.get("id"),
                "outcome": "succeeded" if ok else "rejected",
                "message": message,
                "upstream": {"last_status": status},
            },
        }
    ).encode()
