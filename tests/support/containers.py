"""Containers for the deploy tests: the engine (podman or docker) as deploy/images/engine.sh
finds it, and the project's images as deploy/images/build.sh and deploy/compose/standins/build.sh
make them (each skips a build whose inputs have not changed).

Nothing is installed or configured on the host here: the engine's flags for this host are
passed on each call (VOUCHER_BRIDGE_ENGINE_CONFIGURE=0), and a host where containers cannot run
skips the tests that need them, saying why.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
IMAGES = PROJECT_ROOT / "deploy" / "images"
ENGINE_SH = IMAGES / "engine.sh"
BUILD_SH = IMAGES / "build.sh"
STANDINS_SH = PROJECT_ROOT / "deploy" / "compose" / "standins" / "build.sh"

# Builds run the engine through engine.sh: with the flags, without writing containers.conf.
SCRIPT_ENV = {"VOUCHER_BRIDGE_ENGINE_CONFIGURE": "0"}
BUILD_TIMEOUT_S = 1800


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def script(*args: str | Path, timeout: float = BUILD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """One of the project's image scripts, with the tests' environment; never raises."""
    return subprocess.run(
        ["bash", *map(str, args)],
        env={**os.environ, **SCRIPT_ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _lines(*args: str | Path) -> list[str]:
    result = script(*args, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))}: {_tail(result.stderr)}")
    return [line for line in result.stdout.splitlines() if line]


@dataclass
class Engine:
    """podman or docker, with what this host needs on each call (engine.sh's flags)."""

    path: str
    global_flags: list[str] = field(default_factory=list)
    run_flags: list[str] = field(default_factory=list)

    @property
    def is_podman(self) -> bool:
        return Path(self.path).name == "podman"

    def command(self, subcommand: str, *args: str) -> list[str]:
        extra = self.run_flags if subcommand in ("run", "create", "build") else []
        return [self.path, *self.global_flags, subcommand, *extra, *args]

    def run(
        self, subcommand: str, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(subcommand, *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{self.path} {subcommand} {' '.join(args)} exited {result.returncode}:\n"
                f"{_tail(result.stderr)}"
            )
        return result

    def inspect(self, *what: str) -> list[dict[str, Any]]:
        """`inspect` of images or containers."""
        found: list[dict[str, Any]] = json.loads(self.run("inspect", *what).stdout)
        return found

    def exists(self, image: str) -> bool:
        return self.run("image", "inspect", image, check=False).returncode == 0

    def healthy(self, container: str) -> bool:
        """Runs the container's healthcheck once now (podman; without systemd it schedules
        none), or reads the state docker keeps."""
        if self.is_podman:
            return self.run("healthcheck", "run", container, check=False).returncode == 0
        [state] = self.inspect(container)
        return bool(state["State"].get("Health", {}).get("Status") == "healthy")

    def state(self, container: str) -> dict[str, Any]:
        [found] = self.inspect(container)
        state: dict[str, Any] = found["State"]
        return state

    def logs(self, container: str) -> str:
        result = self.run("logs", container, check=False)
        return result.stdout + result.stderr


@functools.cache
def _probe() -> Engine | str:
    """The engine, or why containers cannot run here."""
    named = script(ENGINE_SH, "name", timeout=30)
    if named.returncode != 0:
        return f"no container engine: {_tail(named.stderr, 3)} (.ci/run installs podman)"
    engine = Engine(
        named.stdout.strip(),
        _lines(ENGINE_SH, "global-flags"),
        _lines(ENGINE_SH, "run-flags"),
    )
    info = engine.run("info", check=False, timeout=60)
    if info.returncode != 0:
        return f"{engine.path} does not work here: {_tail(info.stderr, 3)}"
    base = script(BUILD_SH, "base")
    if base.returncode != 0:
        return f"no base image for the project's images: {_tail(base.stderr, 5)}"
    image = base.stdout.strip().splitlines()[-1]
    ran = engine.run("run", "--rm", "--network", "none", image, "true", check=False)
    if ran.returncode != 0:
        return f"{engine.path} cannot run a container here: {_tail(ran.stderr, 3)}"
    return engine


def engine_or_skip() -> Engine:
    """The container engine, after a container has run on it; else the test is skipped."""
    found = _probe()
    if isinstance(found, str):
        pytest.skip(found)
    return found


def build(*args: str | Path) -> str:
    """Runs an image build script (it skips a build whose inputs label matches) and returns
    the tag it builds; a failing build fails the test."""
    builder, kind = args
    result = script(builder, kind)
    if result.returncode != 0:
        pytest.fail(f"{Path(builder).name} {kind} failed:\n{_tail(result.stderr, 40)}")
    [tag] = _lines(builder, "tag", kind)
    return tag


def service_image() -> str:
    return build(BUILD_SH, "service")


def sandbox_image() -> str:
    return build(BUILD_SH, "sandbox")


def standin_image(kind: str, variable: str) -> str:
    """$variable when set (e.g. KAFKA_IMAGE=apache/kafka:4.3.1 where a registry can be
    reached), else the project's test stand-in for the official image."""
    given = os.environ.get(variable, "").strip()
    return given or build(STANDINS_SH, kind)


def wait_ready(port: int, timeout_s: float = 90, partitions: int = 1) -> dict[str, Any]:
    """/health/ready of a service on the host's port, once it has at least `partitions`."""
    deadline = time.monotonic() + timeout_s
    report: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5)
            report = response.json()
            if response.status_code == 200 and len(report["partitions"]) >= partitions:
                return report
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"127.0.0.1:{port} not ready with {partitions} partitions: {report}")


def wait_until(what: str, check: Any, timeout_s: float, interval_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s")
        time.sleep(interval_s)


def kcat_produce(
    bootstrap: str, topic: str, key: str, value: Mapping[str, Any], headers: Mapping[str, str]
) -> None:
    """One record, produced by kcat (an independent client, as a POS integrator would use)."""
    args = ["kcat", "-P", "-b", bootstrap, "-t", topic, "-k", key]
    for name, header in headers.items():
        args += ["-H", f"{name}={header}"]
    subprocess.run(args, input=json.dumps(value).encode(), check=True, timeout=30)
