"""A Kafka broker and a PostgreSQL server of a test's own, to stop and start mid-run.

Each is the project's own (`deploy/kafka/kafka.sh`, `deploy/postgres/pg.sh`) on ports and in a
state directory of its own, so restarting it disturbs no other test. The broker shares the
jars the session's broker fetched (var/kafka/libs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

from tests.support.kafka import KAFKA_SH
from tests.support.postgres import PG_SH
from voucher_sandboxes.localstack import free_port


class PrivateBroker:
    def __init__(self, state_dir: Path) -> None:
        self.port = free_port()
        self._env = {
            **os.environ,
            "KAFKA_PORT": str(self.port),
            "KAFKA_CONTROLLER_PORT": str(free_port()),
            "KAFKA_STATE_DIR": str(state_dir),
            "KAFKA_HEAP": "-Xms128m -Xmx512m",
        }
        self.bootstrap = f"127.0.0.1:{self.port}"

    def up(self) -> None:
        try:
            subprocess.run(["bash", str(KAFKA_SH), "up"], env=self._env, check=True, timeout=300)
        except subprocess.CalledProcessError:
            # Seen once under load: the JVM gone at start with nothing logged. Once more.
            subprocess.run(["bash", str(KAFKA_SH), "up"], env=self._env, check=True, timeout=300)

    def down(self) -> None:
        subprocess.run(["bash", str(KAFKA_SH), "down"], env=self._env, check=True, timeout=120)


class PrivatePostgres:
    def __init__(self) -> None:
        # Not under pytest's tmp_path: run as root, the server's own account must reach it.
        self.state_dir = Path("/var/tmp") / f"voucher-bridge-test-pg-{uuid.uuid4().hex[:8]}"
        self._env = {
            **os.environ,
            "PG_PORT": str(free_port()),
            "PG_STATE_DIR": str(self.state_dir),
        }
        self.url = ""

    def up(self) -> str:
        done = subprocess.run(
            ["bash", str(PG_SH), "up"],
            env=self._env,
            check=True,
            timeout=600,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.url = [line for line in done.stdout.splitlines() if line.startswith("postgresql:")][-1]
        return self.url

    def down(self) -> None:
        subprocess.run(["bash", str(PG_SH), "down"], env=self._env, check=True, timeout=120)

    def remove(self) -> None:
        subprocess.run(["bash", str(PG_SH), "down"], env=self._env, check=False, timeout=120)
        shutil.rmtree(self.state_dir, ignore_errors=True)
