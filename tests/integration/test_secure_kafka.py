"""Kafka security, tried for real (issue 12): a broker of this module's own, started by
`deploy/kafka/kafka.sh` in secure mode (a CA and a broker certificate made at its first start,
SCRAM-SHA-512 users made when its storage is formatted), with a SASL_SSL listener and an mTLS
one. The service runs as a process on the secure listener only; the tills and the result reader
use the secure listeners too (the plaintext one on loopback only creates topics and, in the last
test, re-issues the broker's certificate).

- tills' commands are answered over SASL_SSL with SCRAM-SHA-512, the broker verified against the
  generated CA;
- and over mTLS with an encrypted client key (KAFKA_SSL_KEY_PASSWORD), the broker's host name
  verified (the listener is reached and advertised as `localhost`);
- a wrong SCRAM password, or a CA that did not sign the broker's certificate, leaves the service
  running and not ready, /health/ready saying why, one log line naming the setting to check, no
  secret anywhere in its log; once the broker's certificate is from the CA the service trusts,
  it becomes ready and answers, without a restart.

The shared plaintext broker the other tests use is not touched.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from tests.conftest import Sandbox, Stack
from tests.support.infra import PrivateBroker
from tests.support.kafka import PROJECT_ROOT, create_topic
from tests.support.workload import (
    TillWorkload,
    check_till_results,
    read_until_answered,
    service_env,
)
from voucher_sandboxes.localstack import (
    CommandProducer,
    Process,
    ReceivedResult,
    ResultReader,
    free_port,
    start_service,
)

pytestmark = pytest.mark.kafka

SERVICE_USER = "voucher-bridge"
HARNESS_USER = "admin"
CLEAR_LINE = "cannot use the Kafka cluster"


class SecureBroker(PrivateBroker):
    """kafka.sh with KAFKA_SECURE=1 on ports of its own; `bootstrap` is its PLAINTEXT
    listener (loopback, for creating topics), `sasl_bootstrap` and `mtls_bootstrap` the
    secure ones."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.state_dir = state_dir
        self.sasl_port, self.mtls_port = free_port(), free_port()
        self._env.update(
            KAFKA_SECURE="1",
            KAFKA_SASL_SSL_PORT=str(self.sasl_port),
            KAFKA_MTLS_PORT=str(self.mtls_port),
        )
        self.sasl_bootstrap = f"127.0.0.1:{self.sasl_port}"
        self.mtls_bootstrap = f"localhost:{self.mtls_port}"
        self.tls = state_dir / "tls"

    def password(self, user: str) -> str:
        return (self.state_dir / "scram" / f"{user}.password").read_text().strip()

    @property
    def key_password(self) -> str:
        return (self.tls / "client.key.password").read_text().strip()

    def secrets(self) -> list[str]:
        return [self.password(SERVICE_USER), self.password(HARNESS_USER), self.key_password]


@pytest.fixture(scope="module")
def secure_broker() -> Iterator[SecureBroker]:
    # Under the project's var/, not /tmp: the broker's keys stay with the project's state.
    broker = SecureBroker(PROJECT_ROOT / "var" / f"test-secure-kafka-{uuid.uuid4().hex[:8]}")
    try:
        broker.up()
        yield broker
    finally:
        try:
            broker.down()
        finally:
            shutil.rmtree(broker.state_dir, ignore_errors=True)


def test_the_secure_broker_was_made_as_claimed(secure_broker: SecureBroker) -> None:
    tls, scram = secure_broker.tls, secure_broker.state_dir / "scram"
    assert (tls.stat().st_mode & 0o777) == 0o700 and (scram.stat().st_mode & 0o777) == 0o700
    for private in (tls / "ca.key", tls / "broker.pem", tls / "client.key", *scram.iterdir()):
        assert (private.stat().st_mode & 0o777) == 0o600, private
    assert (tls / "client.key").read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    sans = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(tls / "broker.pem")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "DNS:localhost" in sans and "IP Address:127.0.0.1" in sans
    config = (secure_broker.state_dir / "server.properties").read_text()
    assert "listener.name.mtls.ssl.client.auth=required" in config
    logs = "".join(
        p.read_text(errors="replace") for p in (secure_broker.state_dir / "logs").glob("*")
    )
    for secret in secure_broker.secrets():
        assert secret not in config and secret not in logs


# -- commands over the secure listeners --------------------------------------------------------


async def test_commands_flow_over_sasl_ssl_with_scram(
    secure_broker: SecureBroker, sandbox: Sandbox, tmp_path: Path
) -> None:
    ca = secure_broker.tls / "ca.crt"
    harness = {
        "security_protocol": "SASL_SSL",
        "ssl_context": ssl.create_default_context(cafile=str(ca)),
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": HARNESS_USER,
        "sasl_plain_password": secure_broker.password(HARNESS_USER),
    }
    env = {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": SERVICE_USER,
        "KAFKA_SASL_PASSWORD": secure_broker.password(SERVICE_USER),
        "KAFKA_SSL_CAFILE": str(ca),
    }
    await _tills_answered(
        secure_broker, secure_broker.sasl_bootstrap, harness, env, sandbox, tmp_path
    )


async def test_commands_flow_over_mtls_with_an_encrypted_key_and_the_host_name_verified(
    secure_broker: SecureBroker, sandbox: Sandbox, tmp_path: Path
) -> None:
    tls = secure_broker.tls
    key = tls / "client.key"
    assert key.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    context.load_cert_chain(str(tls / "client.crt"), str(key), secure_broker.key_password)
    env = {
        "KAFKA_SECURITY_PROTOCOL": "SSL",
        "KAFKA_SSL_CAFILE": str(tls / "ca.crt"),
        "KAFKA_SSL_CERTFILE": str(tls / "client.crt"),
        "KAFKA_SSL_KEYFILE": str(key),
        "KAFKA_SSL_KEY_PASSWORD": secure_broker.key_password,
        # KAFKA_SSL_CHECK_HOSTNAME left to its default: on.
    }
    harness = {"security_protocol": "SSL", "ssl_context": context}
    await _tills_answered(
        secure_broker, secure_broker.mtls_bootstrap, harness, env, sandbox, tmp_path
    )


async def test_the_service_checks_the_broker_host_name_unless_told_not_to(
    secure_broker: SecureBroker,
) -> None:
    """The service's own TLS context, against the real mTLS listener: a name the broker's
    certificate does not list is refused, unless KAFKA_SSL_CHECK_HOSTNAME is off."""
    from voucher_bridge.kafka.connection import ssl_context
    from voucher_bridge.settings import Settings

    tls = secure_broker.tls
    files = {
        "kafka_security_protocol": "SSL",
        "kafka_ssl_cafile": tls / "ca.crt",
        "kafka_ssl_certfile": tls / "client.crt",
        "kafka_ssl_keyfile": tls / "client.key",
        "kafka_ssl_key_password": secure_broker.key_password,
    }

    async def handshake(context: ssl.SSLContext, name: str) -> None:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", secure_broker.mtls_port, ssl=context, server_hostname=name
        )
        writer.close()

    await handshake(ssl_context(Settings(**files)), "localhost")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await handshake(ssl_context(Settings(**files)), "broker.invalid")
    await handshake(
        ssl_context(Settings(**files, kafka_ssl_check_hostname=False)), "broker.invalid"
    )


# -- what the service does when the cluster will not have it ----------------------------------


async def test_a_wrong_scram_password_leaves_it_running_not_ready_and_saying_why(
    secure_broker: SecureBroker, sandbox: Sandbox, tmp_path: Path
) -> None:
    wrong = f"wrong-{secrets.token_hex(12)}"
    env = {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": SERVICE_USER,
        "KAFKA_SASL_PASSWORD": wrong,
        "KAFKA_SSL_CAFILE": str(secure_broker.tls / "ca.crt"),
    }
    _, port, service = await _start(
        secure_broker, secure_broker.sasl_bootstrap, env, sandbox, tmp_path
    )
    try:
        report, body = await _wait_not_ready(port, "authentication failed")
        assert report["check"] == ["KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"]
        # Asked again meanwhile (after 1, 2 and 4 s): still one line for the one cause.
        await asyncio.sleep(8)
        assert service.alive()
        report, body = await _wait_not_ready(port, "authentication failed")
    finally:
        code = service.stop()
    log = service.log_path.read_text(errors="replace")
    assert code == 0, log[-3000:]
    lines = [line for line in log.splitlines() if CLEAR_LINE in line]
    assert len(lines) == 1, lines
    assert "authentication failed" in lines[0] and "KAFKA_SASL_PASSWORD" in lines[0]
    assert "Traceback" not in log
    for secret in [wrong, *secure_broker.secrets()]:
        assert secret not in log and secret not in body, "a secret was logged or answered"


async def test_an_untrusted_ca_leaves_it_not_ready_until_the_broker_certificate_is_from_it(
    secure_broker: SecureBroker, sandbox: Sandbox, tmp_path: Path
) -> None:
    other = _make_ca(tmp_path / "other-ca")
    env = {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": SERVICE_USER,
        "KAFKA_SASL_PASSWORD": secure_broker.password(SERVICE_USER),
        "KAFKA_SSL_CAFILE": str(other.ca),
    }
    s, port, service = await _start(
        secure_broker, secure_broker.sasl_bootstrap, env, sandbox, tmp_path
    )
    reissued = False
    try:
        report, body = await _wait_not_ready(port, "TLS certificate not trusted")
        assert report["check"] == ["KAFKA_SSL_CAFILE"]
        assert "certificate" in report["detail"]
        await asyncio.sleep(3)
        assert service.alive()

        # The operator's fix is on the broker's side: its certificate re-issued by the CA the
        # clients trust (a dynamic keystore update, as on a live cluster). The same process
        # becomes ready and answers.
        await _set_sasl_keystore(secure_broker, other.broker_pem)
        reissued = True
        await _wait_ready(port, 60)
        harness = {
            "security_protocol": "SASL_SSL",
            "ssl_context": ssl.create_default_context(cafile=str(other.ca)),
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": HARNESS_USER,
            "sasl_plain_password": secure_broker.password(HARNESS_USER),
        }
        async with (
            _SecureCommandProducer(s.bootstrap, s.commands, harness) as producer,
            _SecureResultReader(s.bootstrap, s.results, harness) as reader,
        ):
            till = next(iter(s.terminals))
            sent = await producer.send("pos.bill_total", till, {"bill_total": "12.50"})
            [result] = await reader.wait_for({sent.id}, 60)
        assert result.data["outcome"] == "succeeded"
        assert service.alive()
    finally:
        code = service.stop()
        if reissued:
            await _set_sasl_keystore(secure_broker, secure_broker.tls / "broker.pem")
    log = service.log_path.read_text(errors="replace")
    assert code == 0, log[-3000:]
    lines = [line for line in log.splitlines() if CLEAR_LINE in line]
    assert len(lines) == 1, lines
    assert "TLS certificate not trusted" in lines[0] and "KAFKA_SSL_CAFILE" in lines[0]
    assert "takes this client now" in log
    assert "Traceback" not in log
    for secret in secure_broker.secrets():
        assert secret not in log and secret not in body, "a secret was logged or answered"


# -- helpers ------------------------------------------------------------------------------------


async def _start(
    broker: SecureBroker,
    bootstrap: str,
    security_env: dict[str, str],
    sandbox: Sandbox,
    tmp_path: Path,
    tills: int = 1,
) -> tuple[Stack, int, Process]:
    """Topics and tills of the test's own (the topics made on the loopback PLAINTEXT
    listener), and the service as a process with its health endpoint, on the secure listener
    only."""
    s = Stack(bootstrap, sandbox, f"sqlite:///{tmp_path / 'store.sqlite3'}")
    for _ in range(tills):
        s.terminal()
    for topic in (s.commands, s.results, s.dlq, s.coupon_commands, s.coupon_results, s.coupon_dlq):
        await create_topic(broker.bootstrap, topic, 2)
    port = free_port()
    # DEBUG: the most talkative the service (and aiokafka, and FastStream) can be; still no
    # secret may show.
    env = service_env(s, **security_env, LOG_LEVEL="DEBUG")
    return s, port, start_service(env, tmp_path / "service.log", http_port=port)


async def _tills_answered(
    broker: SecureBroker,
    bootstrap: str,
    harness: dict[str, Any],
    security_env: dict[str, str],
    sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    """Tills' bills (total, two scans, a redeem each) over the secure listener: each command
    answered once, in its till's order, no voucher redeemed twice; and no secret logged."""
    s, port, service = await _start(broker, bootstrap, security_env, sandbox, tmp_path, tills=3)
    try:
        report = await _wait_ready(port, 60)
        assert report["broker"] and report["producer"] and report["consuming"]
        tills = list(s.terminals)
        vouchers = {t: sandbox.add_vouchers("10.00", "10.00", "10.00", "10.00") for t in tills}
        double_before = _double_redemptions(sandbox)
        workload = _SecureTillWorkload(bootstrap, s.commands, tills, vouchers, security=harness)
        async with _SecureResultReader(bootstrap, s.results, harness) as reader:
            await asyncio.wait_for(workload.run(2), 120)
            await read_until_answered(reader, {c.id for c in workload.sent}, 120, service.alive)
            await reader.settle(1.0)
        codes = [code for codes in vouchers.values() for code in codes]
        outcomes = check_till_results(
            workload,
            reader.records,
            sandbox.vouchers(codes),
            _double_redemptions(sandbox) - double_before,
        )
        assert outcomes == {
            "pos.bill_total:succeeded": 6,
            "pos.scan:succeeded": 12,
            "pos.redeem:succeeded": 6,
        }, outcomes
    finally:
        code = service.stop()
    log = service.log_path.read_text(errors="replace")
    assert code == 0, log[-3000:]
    for secret in broker.secrets():
        assert secret not in log, "a secret was logged"


async def _wait_ready(port: int, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    report: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=10) as http:
        while time.monotonic() < deadline:
            try:
                response = await http.get(f"http://127.0.0.1:{port}/health/ready")
                report = response.json()
                if response.status_code == 200 and report["partitions"]:
                    return report
            except (httpx.TransportError, ValueError):
                pass
            await asyncio.sleep(0.3)
    raise TimeoutError(f"not ready: {report}")


async def _wait_not_ready(
    port: int, reason: str, timeout_s: float = 30
) -> tuple[dict[str, Any], str]:
    """/health/ready answering 503, the broker named as what fails and `reason` as why."""
    deadline = time.monotonic() + timeout_s
    seen: Any = None
    async with httpx.AsyncClient(timeout=10) as http:
        while time.monotonic() < deadline:
            try:
                response = await http.get(f"http://127.0.0.1:{port}/health/ready")
                seen = (response.status_code, response.text)
                report = response.json()
                if response.status_code == 503 and report.get("reason") == reason:
                    assert report["ready"] is False and report["broker"] is False, report
                    return report, response.text
            except (httpx.TransportError, ValueError):
                pass
            await asyncio.sleep(0.3)
    raise TimeoutError(f"/health/ready never said {reason!r}: {seen}")


def _double_redemptions(sandbox: Sandbox) -> int:
    totals = sandbox.admin.get("state", params={"vouchers": "0"}).json()["totals"]
    return int(totals["double_redemptions"])


@dataclass
class _SecureTillWorkload(TillWorkload):
    """The tills of tests.support.workload, producing over a secure listener."""

    security: dict[str, Any] = field(default_factory=dict)

    async def run(self, bills_per_till: int) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", request_timeout_ms=5_000, **self.security
        )
        await producer.start()
        try:
            await asyncio.gather(
                *(self._till(producer, till, bills_per_till) for till in self.tills)
            )
        finally:
            await producer.stop()


class _SecureCommandProducer(CommandProducer):
    def __init__(self, bootstrap: str, topic: str, security: dict[str, Any]) -> None:
        super().__init__(bootstrap, topic)
        self._security = security

    async def __aenter__(self) -> _SecureCommandProducer:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap, acks="all", **self._security
        )
        await self._producer.start()
        return self


class _SecureResultReader(ResultReader):
    """ResultReader (from the beginning, no group) over a secure listener."""

    def __init__(self, bootstrap: str, topic: str, security: dict[str, Any]) -> None:
        # Not ResultReader's __init__: its plaintext consumer would be made and never closed.
        self._consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
            **security,
        )
        self.records: list[ReceivedResult] = []


@dataclass
class _OtherCa:
    ca: Path
    broker_pem: Path


def _make_ca(directory: Path) -> _OtherCa:
    """A CA that did not sign the broker's certificate, and a broker certificate from it with
    the same subject and names (what a live keystore update allows)."""
    directory.mkdir(mode=0o700)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl(
        "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=another CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
    )  # fmt: skip
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "broker.key", "-out", "broker.csr", "-subj", "/CN=localhost",
    )  # fmt: skip
    (directory / "broker.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    openssl(
        "x509", "-req", "-in", "broker.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-set_serial", "0x" + secrets.token_hex(8), "-days", "2", "-extfile", "broker.ext",
        "-out", "broker.crt",
    )  # fmt: skip
    pem = directory / "broker.pem"
    pem.write_text(
        "".join((directory / f).read_text() for f in ("broker.key", "broker.crt", "ca.crt"))
    )
    pem.chmod(0o600)
    return _OtherCa(directory / "ca.crt", pem)


async def _set_sasl_keystore(broker: SecureBroker, pem: Path) -> None:
    """The SASL_SSL listener's keystore, changed on the running broker (AlterConfigs on its
    loopback PLAINTEXT listener); its handshakes use the new certificate from then on."""
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        resource = ConfigResource(
            ConfigResourceType.BROKER,
            "1",
            {"listener.name.sasl_ssl.ssl.keystore.location": str(pem)},
        )
        for response in await admin.alter_configs([resource]):
            for entry in response.resources:
                assert entry[0] == 0, f"the broker refused the keystore: {entry}"
    finally:
        await admin.close()
    # Applied by the broker in the background: wait until a handshake shows the new one.
    expected = _leaf_certificate(pem)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        served = await asyncio.to_thread(
            ssl.get_server_certificate, ("127.0.0.1", broker.sasl_port)
        )
        if ssl.PEM_cert_to_DER_cert(served) == expected:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError("the broker still serves its former certificate")


def _leaf_certificate(pem: Path) -> bytes:
    """The first certificate of a PEM keystore (the broker's own), as DER."""
    text = pem.read_text()
    start = text.index("-----BEGIN CERTIFICATE-----")
    end = text.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
    return ssl.PEM_cert_to_DER_cert(text[start:end])
