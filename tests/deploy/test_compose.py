"""deploy/compose/compose.yaml brought up for real: Kafka, PostgreSQL, both sandboxes and two
voucher-bridge instances on the PostgreSQL store; a command from kcat answered; one instance
killed (SIGKILL); the next commands, on every partition, answered by the other once the group
has rebalanced; down with the volumes removed.

Kafka and PostgreSQL are the official images where KAFKA_IMAGE / POSTGRES_IMAGE name them, else
the project's test stand-ins (deploy/compose/standins/), which take the same environment.
podman-compose 1.0.3 ignores depends_on conditions, so the stack is brought up in the order
they say: the services the others wait for, healthy; the topics; the instances."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.containers import (
    Engine,
    engine_or_skip,
    kcat_produce,
    sandbox_image,
    service_image,
    standin_image,
    wait_ready,
    wait_until,
)
from voucher_sandboxes import EPIN_SEED, EVOUCHER_SEED
from voucher_sandboxes.localstack import CommandProducer, ResultReader, free_port, seed_tokens

PROJECT_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = PROJECT_ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
PARTITIONS = 6

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed (.ci/run does)"),
]


class Stack:
    """One compose project of this test's own (its name, ports and secrets)."""

    def __init__(self, engine: Engine, tmp_path: Path) -> None:
        self.engine = engine
        self.project = f"vbtest{uuid.uuid4().hex[:8]}"
        self.kafka_port = free_port()
        self.http_ports = {1: free_port(), 2: free_port()}
        secrets = tmp_path / "secrets"
        subprocess.run(
            ["bash", str(COMPOSE_DIR / "secrets.sh"), str(secrets)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.env = {
            **os.environ,
            "KAFKA_IMAGE": standin_image("kafka", "KAFKA_IMAGE"),
            "POSTGRES_IMAGE": standin_image("postgres", "POSTGRES_IMAGE"),
            "VOUCHER_BRIDGE_IMAGE": service_image(),
            "SANDBOX_IMAGE": sandbox_image(),
            "VOUCHER_BRIDGE_COMPOSE_SECRETS": str(secrets),
            "KAFKA_HOST_PORT": str(self.kafka_port),
            "EVOUCHER_HOST_PORT": str(free_port()),
            "EPIN_HOST_PORT": str(free_port()),
            "VOUCHER_BRIDGE_1_HTTP_PORT": str(self.http_ports[1]),
            "VOUCHER_BRIDGE_2_HTTP_PORT": str(self.http_ports[2]),
            "SESSION_TIMEOUT_MS": "10000",
        }
        self.log = tmp_path / "compose.log"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    def compose(self, *args: str, timeout: float = 300) -> None:
        if self.engine.is_podman:
            # The host's flags on every podman call podman-compose makes (nothing is written
            # to containers.conf by a test).
            command = ["podman-compose"]
            if self.engine.global_flags:
                command += ["--podman-args", " ".join(self.engine.global_flags)]
            if self.engine.run_flags:
                command += ["--podman-run-args", " ".join(self.engine.run_flags)]
        else:
            command = [self.engine.path, "compose"]
        command += ["-p", self.project, "-f", str(COMPOSE_FILE), *args]
        with self.log.open("a") as log:
            log.write(f"\n$ {' '.join(command)}\n")
            log.flush()
            done = subprocess.run(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            )
        assert done.returncode == 0, f"{' '.join(args)} failed; see {self.log}"

    def container(self, service: str) -> str:
        """The container of a service (podman-compose and docker compose name them apart;
        both label them)."""
        found = self.engine.run(
            "ps",
            "--all",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
            "--format",
            "{{.Names}}",
        ).stdout.split()
        assert len(found) == 1, f"{service}: {found}"
        return found[0]

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {
            "containers": self.engine.run(
                "ps", "--all", "--filter", label, "--format", "{{.Names}}"
            ).stdout.split(),
            "volumes": self.engine.run(
                "volume", "ls", "--filter", label, "--format", "{{.Name}}"
            ).stdout.split(),
        }

    def down(self) -> None:
        self.compose("down", "--volumes")
        if self.engine.is_podman:
            # podman-compose 1.0.3 leaves the project's network behind.
            self.engine.run("network", "rm", f"{self.project}_default", check=False)

    def dump_logs(self) -> str:
        names = self.leftovers()["containers"]
        return "\n".join(f"--- {n}\n{self.engine.logs(n)[-3000:]}" for n in names)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    engine = engine_or_skip()
    if engine.is_podman and shutil.which("podman-compose") is None:
        pytest.skip("podman-compose is not installed (.ci/run installs it)")
    stack = Stack(engine, tmp_path)
    try:
        yield stack
    finally:
        try:
            stack.down()
        finally:
            # Whatever down left (a failed down, a container it did not know of).
            left = stack.leftovers()
            if left["containers"]:
                engine.run("rm", "--force", "--volumes", *left["containers"], check=False)
            for volume in left["volumes"]:
                engine.run("volume", "rm", "--force", volume, check=False)


def _command(type_: str, subject: str, data: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "/compose-test",
        "type": type_,
        "subject": subject,
        "time": datetime.now(UTC).isoformat(),
        "data": data,
    }


async def _send_to_every_partition(
    bootstrap: str, topic: str, commands: list[dict[str, Any]]
) -> set[str]:
    """One command on each partition (whatever its key hashes to): none is left unserved."""
    assert len(commands) == PARTITIONS
    async with CommandProducer(bootstrap, topic) as producer:
        for partition, command in enumerate(commands):
            await producer.send_raw(
                command["subject"].encode(),
                json.dumps(command).encode(),
                [("content-type", b"application/cloudevents+json")],
                partition=partition,
            )
    return {c["id"] for c in commands}


async def test_two_instances_answer_and_one_takes_over_when_the_other_is_killed(
    stack: Stack,
) -> None:
    engine = stack.engine
    try:
        # What the others wait for (depends_on: service_healthy), healthy by their own checks.
        stack.compose("up", "-d", "kafka", "postgres", "evoucher-sandbox", "epin-sandbox")
        for service in ("kafka", "postgres", "evoucher-sandbox", "epin-sandbox"):
            name = stack.container(service)
            wait_until(f"{service} healthy", lambda n=name: engine.healthy(n), 180, 2)
        # The topics, once (service_completed_successfully).
        stack.compose("up", "-d", "topics")
        topics = stack.container("topics")

        def topics_made() -> bool:
            state = engine.state(topics)
            return state["Status"] == "exited" and state["ExitCode"] == 0

        wait_until("topics made", topics_made, 120)
        # The two instances, in one group on the PostgreSQL store.
        stack.compose("up", "-d", "voucher-bridge-1", "voucher-bridge-2")
        ready = {i: wait_ready(port, 120) for i, port in stack.http_ports.items()}
        assert all(r["broker"] and r["producer"] for r in ready.values())

        def shared() -> bool:
            # Both members of one group: the 12 partitions (6 per command topic) split.
            owned = [wait_ready(port, 30)["partitions"] for port in stack.http_ports.values()]
            every = [p for partitions in owned for p in partitions]
            return all(owned) and len(every) == len(set(every)) == 2 * PARTITIONS

        wait_until("the partitions shared by both instances", shared, 60)

        terminals = list(seed_tokens(EVOUCHER_SEED))
        accounts = [u["username"] for u in json.loads(EPIN_SEED.read_text())["users"]]

        # A command from kcat, from the host, answered.
        first = _command("pos.bill_total", terminals[0], {"bill_total": "12.50"})
        kcat_produce(
            stack.bootstrap,
            "pos.commands",
            terminals[0],
            first,
            {"content-type": "application/cloudevents+json"},
        )
        async with ResultReader(stack.bootstrap, "pos.results") as pos_results:
            [answer] = await pos_results.wait_for({first["id"]}, 60)
        assert answer.data["outcome"] == "succeeded", answer.data
        # A coupon command: the Epin key and accounts came from the secrets directory.
        listed = _command("coupon.list_active", accounts[0], {"wallet": "wallet1"})
        async with CommandProducer(stack.bootstrap, "coupon.commands") as producer:
            await producer.send_raw(
                accounts[0].encode(),
                json.dumps(listed).encode(),
                [("content-type", b"application/cloudevents+json")],
            )
        async with ResultReader(stack.bootstrap, "coupon.results") as coupon_results:
            [coupons] = await coupon_results.wait_for({listed["id"]}, 60)
        assert coupons.data["outcome"] == "succeeded", coupons.data

        # One instance killed, as a crash would (no drain, no leave-group).
        killed = stack.container("voucher-bridge-1")
        engine.run("kill", "--signal", "KILL", killed)
        wait_until("the killed instance down", lambda: not engine.state(killed)["Running"], 30)
        # The survivor gets all partitions once the broker drops the dead member (session
        # timeout, 10 s here).
        survivor = wait_ready(stack.http_ports[2], 90, partitions=2 * PARTITIONS)
        assert len(survivor["partitions"]) == 2 * PARTITIONS

        pos = await _send_to_every_partition(
            stack.bootstrap,
            "pos.commands",
            [
                _command("pos.bill_total", terminals[p % len(terminals)], {"bill_total": f"{p}.10"})
                for p in range(PARTITIONS)
            ],
        )
        coupon = await _send_to_every_partition(
            stack.bootstrap,
            "coupon.commands",
            [
                _command("coupon.list_active", accounts[p % 3], {"wallet": "wallet1"})
                for p in range(PARTITIONS)
            ],
        )
        async with ResultReader(stack.bootstrap, "pos.results") as pos_results:
            answers = await pos_results.wait_for(pos, 90)
        async with ResultReader(stack.bootstrap, "coupon.results") as coupon_results:
            coupon_answers = await coupon_results.wait_for(coupon, 90)
        outcomes = {r.data["command_id"]: r.data["outcome"] for r in answers + coupon_answers}
        assert set(outcomes.values()) == {"succeeded"}, outcomes
        # Only the survivor can have answered them: the other is still down.
        assert not engine.state(killed)["Running"]
    except BaseException:
        print(stack.dump_logs())
        raise

    stack.down()
    assert stack.leftovers() == {"containers": [], "volumes": []}
