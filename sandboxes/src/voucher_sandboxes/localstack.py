"""Running voucher-bridge locally: the sandboxes and the service as processes, a POS-side
producer of commands and a reader of results. Used by `make demo`, the tests and the bench.

The service is started as its console module (`python -m voucher_bridge.cli run`) of the same
interpreter, so this needs the service installed beside it (the project's dev environment), but
imports none of it."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from voucher_sandboxes import EPIN_SEED, EVOUCHER_SEED


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def seed_tokens(seed: Path = EVOUCHER_SEED) -> dict[str, str]:
    """terminal name → X-Token, as EVOUCHER_TERMINALS wants it, from a sandbox seed file."""
    data = json.loads(seed.read_text())
    return {t["machine_name"]: t["token"] for t in data["terminals"]}


class Process:
    """A child process of ours, stopped with SIGTERM (or SIGKILL) and waited for."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            args, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float = 50.0) -> int:
        # Above the service's own stop bound (DRAIN_TIMEOUT_S 30 + 10 s, serving.py): a stop
        # that hangs ends by its watchdog, which says where it hung, not by this SIGKILL.
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait()
        self._log.close()


EPIN_PREFIX = "/api/v1/"


def start_sandbox(port: int, log_path: Path, *extra: str, seed: Path = EVOUCHER_SEED) -> Process:
    """The eVOUCHER sandbox as a process, once it answers."""
    return _start_sandbox("evoucher", port, log_path, seed, extra)


def start_epin_sandbox(port: int, log_path: Path, *extra: str, seed: Path = EPIN_SEED) -> Process:
    """The Epin sandbox as a process, once it answers."""
    return _start_sandbox("epin", port, log_path, seed, extra)


def _start_sandbox(
    kind: str, port: int, log_path: Path, seed: Path, extra: tuple[str, ...]
) -> Process:
    command = [sys.executable, "-m", "voucher_sandboxes.cli", kind]
    process = Process([*command, "--port", str(port), "--seed", str(seed), *extra], {}, log_path)
    _wait_healthy(process, port, log_path)
    return process


def epin_settings(url: str, seed: Path = EPIN_SEED) -> dict[str, str]:
    """EPIN_BASE_URL, EPIN_API_KEY and EPIN_ACCOUNTS (every seeded user) for a sandbox."""
    data = json.loads(seed.read_text())
    accounts = {
        u["username"]: {"username": u["username"], "password": u["password"]} for u in data["users"]
    }
    return {
        "EPIN_BASE_URL": url + EPIN_PREFIX.rstrip("/"),
        "EPIN_API_KEY": data["api_key"],
        "EPIN_ACCOUNTS": json.dumps(accounts),
    }


def _wait_healthy(process: Process, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"sandbox exited; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/_sandbox/health", timeout=1).is_success:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"sandbox did not answer on port {port}; see {log_path}")


def start_service(env: Mapping[str, str], log_path: Path, http_port: int = 0) -> Process:
    return Process(
        [sys.executable, "-m", "voucher_bridge.cli", "run", "--http-port", str(http_port)],
        env,
        log_path,
    )


def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def trace_id_of(traceparent: str | None) -> str | None:
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 else None


@dataclass
class SentCommand:
    id: str
    source: str
    type: str
    subject: str
    data: dict[str, Any] | None
    traceparent: str


class CommandProducer:
    """Plays a POS machine or the back office: CloudEvents commands, keyed by subject."""

    def __init__(self, bootstrap: str, topic: str, source: str = "/stores/demo/pos") -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._source = source
        self._producer: AIOKafkaProducer | None = None

    async def __aenter__(self) -> CommandProducer:
        self._producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap, acks="all")
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def send(
        self,
        type_: str,
        subject: str,
        data: dict[str, Any] | None,
        *,
        binary: bool = False,
        command_id: str | None = None,
        source: str | None = None,
    ) -> SentCommand:
        assert self._producer is not None
        command = SentCommand(
            id=command_id or str(uuid.uuid4()),
            source=source or f"{self._source}/{subject}",
            type=type_,
            subject=subject,
            data=data,
            traceparent=new_traceparent(),
        )
        attributes = {
            "specversion": "1.0",
            "id": command.id,
            "source": command.source,
            "type": command.type,
            "subject": command.subject,
            "time": datetime.now(UTC).isoformat(),
        }
        headers = [("traceparent", command.traceparent.encode())]
        if binary:
            headers += [(f"ce_{k}", v.encode()) for k, v in attributes.items()]
            headers.append(("content-type", b"application/json"))
            value = json.dumps(data).encode() if data is not None else None
        else:
            headers.append(("content-type", b"application/cloudevents+json"))
            value = json.dumps(
                {**attributes, "datacontenttype": "application/json", "data": data}
            ).encode()
        await self._producer.send_and_wait(
            self._topic, value=value, key=subject.encode(), headers=headers
        )
        return command

    async def send_raw(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        partition: int | None = None,
    ) -> int:
        """Send a record as given; returns the partition it went to."""
        assert self._producer is not None
        metadata = await self._producer.send_and_wait(
            self._topic, value=value, key=key, headers=headers, partition=partition
        )
        return int(metadata.partition)


@dataclass
class ReceivedResult:
    key: bytes | None
    partition: int
    offset: int
    headers: dict[str, bytes]
    event: dict[str, Any]

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.event["data"])

    @property
    def traceparent(self) -> str | None:
        value = self.headers.get("traceparent")
        return value.decode() if value else None


class ResultReader:
    """Reads a results (or dead-letter) topic from the beginning, without a group."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        self.records: list[ReceivedResult] = []

    async def __aenter__(self) -> ResultReader:
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def poll(self, timeout_s: float = 0.2) -> None:
        batches = await self._consumer.getmany(timeout_ms=int(timeout_s * 1000))
        for records in batches.values():
            for r in records:
                try:
                    event = json.loads(r.value) if r.value else {}
                except ValueError:
                    event = {}
                self.records.append(
                    ReceivedResult(r.key, r.partition, r.offset, dict(r.headers), event)
                )

    def for_commands(self, ids: set[str]) -> list[ReceivedResult]:
        return [r for r in self.records if r.event.get("data", {}).get("command_id") in ids]

    async def wait_for(self, ids: set[str], timeout_s: float = 60.0) -> list[ReceivedResult]:
        """Poll until every command in `ids` has at least one result; all results for them."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.for_commands(ids)
            if {r.data["command_id"] for r in found} >= ids:
                return found
            if time.monotonic() > deadline:
                missing = ids - {r.data["command_id"] for r in found}
                raise TimeoutError(
                    f"no result for {len(missing)} commands, e.g. {sorted(missing)[:3]}"
                )
            await self.poll()

    async def settle(self, quiet_s: float = 1.0) -> None:
        """Read until nothing new arrives for `quiet_s`."""
        while True:
            before = len(self.records)
            await self.poll(quiet_s)
            if len(self.records) == before:
                return
            await asyncio.sleep(0)
