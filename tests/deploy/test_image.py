"""The service image (deploy/Containerfile) as it is shipped: what it holds and says about
itself, and the container answering a command on the real broker, read-only, as uid 10001.

Skipped, saying why, where no container can run (tests/support/containers.py); the image is
built once and reused while its inputs are unchanged (deploy/images/build.sh)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Sandbox
from tests.support.containers import (
    Engine,
    engine_or_skip,
    kcat_produce,
    service_image,
    wait_ready,
)
from tests.support.kafka import create_topic, unique_topic
from voucher_sandboxes.localstack import ResultReader, free_port, trace_id_of

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STATE = "/var/lib/voucher-bridge"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return engine_or_skip()


@pytest.fixture(scope="module")
def image(engine: Engine) -> str:
    return service_image()


@pytest.fixture(scope="module")
def inspected(engine: Engine, image: str) -> dict[str, Any]:
    [found] = engine.inspect("--type", "image", image)
    return found


def test_the_image_runs_as_10001_with_the_service_only(engine: Engine, image: str) -> None:
    assert engine.run("run", "--rm", "--read-only", image, "id", "-u").stdout.strip() == "10001"
    assert engine.run("run", "--rm", image, "id", "-un").stdout.strip() == "voucher"

    # The doubles, the tests, the bench and the dev tools are not in it.
    refused = engine.run(
        "run", "--rm", image, "python3.11", "-c", "import voucher_sandboxes", check=False
    )
    assert refused.returncode == 1
    assert "No module named 'voucher_sandboxes'" in refused.stderr
    probe = (
        "import importlib.util as u, json; print(json.dumps([m for m in "
        "('voucher_sandboxes', 'tests', 'bench', 'pytest', 'hypothesis', 'mypy', 'ruff', "
        "'testcontainers') if u.find_spec(m)]))"
    )
    found = engine.run("run", "--rm", image, "python3.11", "-c", probe).stdout
    assert json.loads(found) == []
    assert engine.run("run", "--rm", image, "voucher-bridge", "--help").returncode == 0

    # Nothing of the build's CA handling is left: no helper, no bundle, no setting naming one.
    leftovers = engine.run(
        "run",
        "--rm",
        image,
        "sh",
        "-c",
        "ls /usr/local/bin/with-build-ca /tmp/build-ca.pem /run/secrets/ca /opt/uv 2>/dev/null;"
        " env | grep -E '^(SSL_CERT_FILE|PIP_CERT|UV_)' || true",
    )
    assert leftovers.stdout.strip() == ""


def test_the_build_context_leaves_out_state_tests_and_the_bench() -> None:
    # podman reads .containerignore, docker .dockerignore: the same list.
    ignore = (PROJECT_ROOT / ".containerignore").read_text()
    assert (PROJECT_ROOT / ".dockerignore").read_text() == ignore
    patterns = {line.strip() for line in ignore.splitlines() if not line.startswith("#")}
    assert {".git", ".venv", "var", "tests", "bench", "**/.env"} <= patterns


def test_the_image_says_how_to_run_it(inspected: dict[str, Any]) -> None:
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert config["Cmd"] == ["voucher-bridge", "run"]
    assert not config.get("Entrypoint")
    assert config["StopSignal"] == "SIGTERM"
    assert STATE in config["Volumes"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["IDEMPOTENCY_STORE_URL"] == f"sqlite:///{STATE}/idempotency.sqlite3"
    assert env["HTTP_HOST"] == "0.0.0.0"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"

    # podman keeps the healthcheck beside the config, docker in it.
    healthcheck = inspected.get("Healthcheck") or config.get("Healthcheck")
    assert healthcheck, "no HEALTHCHECK (podman builds it only with --format docker)"
    assert healthcheck["Test"][0] == "CMD"
    assert "python3.11" in healthcheck["Test"]
    assert "/health/live" in " ".join(healthcheck["Test"])

    labels = inspected.get("Labels") or config["Labels"]
    head = subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert labels["org.opencontainers.image.title"] == "voucher-bridge"
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert labels["org.opencontainers.image.revision"] in (head, head + "-dirty")
    assert labels["org.opencontainers.image.description"]
    assert labels["org.opencontainers.image.licenses"]
    assert "org.opencontainers.image.source" in labels
    # What build.sh compares to skip a build whose inputs have not changed.
    assert labels["org.voucher-bridge.inputs"]


@pytest.mark.kafka
@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed (.ci/run does)")
async def test_the_container_answers_a_command_read_only_and_stops_on_sigterm(
    engine: Engine, image: str, kafka_bootstrap: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    commands = unique_topic("pos.commands")
    suffix = commands.removeprefix("pos.commands")
    topics = {
        "POS_COMMANDS_TOPIC": commands,
        "POS_RESULTS_TOPIC": f"pos.results{suffix}",
        "COUPON_COMMANDS_TOPIC": f"coupon.commands{suffix}",
        "COUPON_RESULTS_TOPIC": f"coupon.results{suffix}",
    }
    for topic in [*topics.values(), f"{commands}.dlq", f"coupon.commands{suffix}.dlq"]:
        await create_topic(kafka_bootstrap, topic, 2)
    till, token = sandbox.add_terminal()

    # The terminal's token as a file in a secrets directory, as a Kubernetes Secret mounts it.
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o755)
    (secrets / "evoucher_terminals").write_text(json.dumps({till: token}))
    (secrets / "evoucher_terminals").chmod(0o644)
    secrets.chmod(0o755)

    name = f"vb-image-test-{uuid.uuid4().hex[:8]}"
    volume = f"{name}-state"
    port = free_port()
    env = {
        **topics,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "KAFKA_GROUP_ID": f"vb-image-{uuid.uuid4().hex[:8]}",
        "EVOUCHER_BASE_URL": sandbox.url,
        "VOUCHER_BRIDGE_SECRETS_DIR": "/run/voucher-bridge-secrets",
        "HTTP_PORT": str(port),
        "DRAIN_TIMEOUT_S": "10",
    }
    engine.run("volume", "create", volume)
    try:
        engine.run(
            "run",
            "--detach",
            "--name",
            name,
            "--network",
            "host",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--volume",
            f"{volume}:{STATE}",
            "--volume",
            f"{secrets}:/run/voucher-bridge-secrets:ro",
            *[arg for key, value in env.items() for arg in ("--env", f"{key}={value}")],
            image,
        )
        try:
            report = wait_ready(port, timeout_s=60)
        except TimeoutError:
            pytest.fail(f"not ready; the container's log:\n{engine.logs(name)[-4000:]}")
        assert report["broker"] and report["producer"] and report["consuming"]
        assert httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=5).is_success
        assert engine.healthy(name), "the image's HEALTHCHECK fails on a live service"

        # The service itself (PID 1), not only a shell started beside it, runs as 10001.
        status = engine.run("exec", name, "cat", "/proc/1/status").stdout
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert set(uids) == {"10001"}

        command_id = str(uuid.uuid4())
        traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
        kcat_produce(
            kafka_bootstrap,
            commands,
            till,
            {
                "specversion": "1.0",
                "id": command_id,
                "source": "/stores/image-test/pos",
                "type": "pos.bill_total",
                "subject": till,
                "time": datetime.now(UTC).isoformat(),
                "data": {"bill_total": "19.90"},
            },
            {"content-type": "application/cloudevents+json", "traceparent": traceparent},
        )
        async with ResultReader(kafka_bootstrap, topics["POS_RESULTS_TOPIC"]) as reader:
            [result] = await reader.wait_for({command_id}, 60)
        assert result.data["outcome"] == "succeeded", result.data
        assert result.data["bill_total"] == "19.90"
        assert trace_id_of(result.traceparent) == traceparent.split("-")[1]

        # The store is in the volume; the root file system took no write.
        listing = engine.run("exec", name, "ls", STATE).stdout.split()
        assert "idempotency.sqlite3" in listing
        assert engine.run("exec", name, "touch", "/opt/x", check=False).returncode != 0

        began = time.monotonic()
        engine.run("stop", "--time", "40", name, timeout=60)
        stopped_in = time.monotonic() - began
        state = engine.state(name)
        log = engine.logs(name)
        # SIGTERM drains, commits and exits 0 (not 143): the stop is a clean one.
        assert state["ExitCode"] == 0, f"exit {state['ExitCode']}:\n{log[-3000:]}"
        assert stopped_in < 35, f"SIGTERM took {stopped_in:.1f} s"
        assert "shut down gracefully" in log
        assert token not in log, "a terminal's token was logged"
    finally:
        engine.run("rm", "--force", "--volumes", name, check=False)
        engine.run("volume", "rm", "--force", volume, check=False)
