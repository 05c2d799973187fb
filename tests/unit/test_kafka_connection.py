"""Kafka connection settings (issue 12): the client's encrypted key opened with
KAFKA_SSL_KEY_PASSWORD, the broker's host name checked unless KAFKA_SSL_CHECK_HOSTNAME is off,
every client of the service given the same security, and what is said (once per cause, no
secret in it) when the cluster does not take this client."""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiokafka import errors as kafka_errors
from faststream.kafka.security import parse_security

from voucher_bridge.app import Service
from voucher_bridge.kafka.connection import (
    ConnectionProblem,
    KafkaTlsFilesError,
    ProblemLog,
    classify,
    connection_args,
    faststream_security,
    ssl_context,
)
from voucher_bridge.settings import Settings

KEY_PASSWORD = "key-pw-SECRET-3b7e9d1f"
SASL_PASSWORD = "sasl-pw-SECRET-8c2a4e6b"


@pytest.fixture
def client_files(tmp_path: Path) -> dict[str, Path]:
    """A self-signed client certificate and its key, encrypted (PKCS#8, AES-256)."""
    plain, key, cert = tmp_path / "plain.key", tmp_path / "client.key", tmp_path / "client.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(plain), "-out", str(cert), "-days", "1", "-subj", "/CN=client"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in", str(plain), "-out", str(key),
         "-passout", f"pass:{KEY_PASSWORD}"],
        check=True, capture_output=True,
    )  # fmt: skip
    assert key.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    return {"kafka_ssl_certfile": cert, "kafka_ssl_keyfile": key}


def _mtls(files: dict[str, Path], **extra: Any) -> Settings:
    return Settings(kafka_security_protocol="SSL", **files, **extra)


# -- the client's key ---------------------------------------------------------------------------


def test_an_encrypted_client_key_is_opened_with_the_key_password(
    client_files: dict[str, Path],
) -> None:
    context = ssl_context(_mtls(client_files, kafka_ssl_key_password=KEY_PASSWORD))
    assert context.verify_mode == ssl.CERT_REQUIRED
    # The same files, the context aiokafka gets for SSL.
    args = connection_args(_mtls(client_files, kafka_ssl_key_password=KEY_PASSWORD))
    assert isinstance(args["ssl_context"], ssl.SSLContext)


def test_a_wrong_key_password_is_refused_naming_the_settings_never_the_password(
    client_files: dict[str, Path],
) -> None:
    with pytest.raises(KafkaTlsFilesError) as refused:
        ssl_context(_mtls(client_files, kafka_ssl_key_password="not-" + KEY_PASSWORD))
    message = str(refused.value)
    assert "KAFKA_SSL_KEY_PASSWORD" in message and "KAFKA_SSL_KEYFILE" in message
    assert KEY_PASSWORD not in message
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


def test_an_encrypted_key_without_its_password_is_refused_not_prompted_for(
    client_files: dict[str, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    # OpenSSL's own fallback asks on the terminal ("Enter PEM pass phrase:"), which would
    # leave a service waiting for an answer that never comes.
    with pytest.raises(
        KafkaTlsFilesError, match="KAFKA_SSL_KEYFILE is encrypted: set KAFKA_SSL_KEY_PASSWORD"
    ):
        ssl_context(_mtls(client_files))
    out, err = capfd.readouterr()
    assert "pass phrase" not in out + err


def test_a_ca_file_that_holds_no_certificate_is_refused_naming_the_setting(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(KafkaTlsFilesError, match="KAFKA_SSL_CAFILE"):
        ssl_context(Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "ca.pem"))


# -- the broker's host name ---------------------------------------------------------------------


def test_the_broker_host_name_is_checked_by_default() -> None:
    assert Settings().kafka_ssl_check_hostname is True
    context = ssl_context(Settings(kafka_security_protocol="SASL_SSL"))
    assert context.check_hostname is True and context.verify_mode == ssl.CERT_REQUIRED


def test_turning_the_host_name_check_off_still_verifies_the_certificate_chain() -> None:
    context = ssl_context(Settings(kafka_security_protocol="SSL", kafka_ssl_check_hostname=False))
    assert context.check_hostname is False
    assert context.verify_mode == ssl.CERT_REQUIRED


# -- one security for every client ----------------------------------------------------------


def test_faststreams_clients_and_the_services_own_get_the_same_security(tmp_path: Path) -> None:
    settings = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="voucher-bridge",
        kafka_sasl_password=SASL_PASSWORD,
        kafka_ssl_check_hostname=False,
        idempotency_store_url=f"sqlite:///{tmp_path / 'store.sqlite3'}",
    )
    ours = connection_args(settings)
    theirs = parse_security(faststream_security(settings))
    service = Service(settings)
    for args in (ours, theirs, service.producer._connection, service.broker._connection_kwargs):
        assert args["security_protocol"] == "SASL_SSL"
        assert args["sasl_mechanism"] == "SCRAM-SHA-512"
        assert args["sasl_plain_username"] == "voucher-bridge"
        assert args["sasl_plain_password"] == SASL_PASSWORD
        assert args["ssl_context"].check_hostname is False
        assert args["ssl_context"].verify_mode == ssl.CERT_REQUIRED


# -- what a refused connection says -------------------------------------------------------------


def _settings() -> Settings:
    return Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="voucher-bridge",
        kafka_sasl_password=SASL_PASSWORD,
    )


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"certificate verify failed: {message}")
    error.verify_code, error.verify_message = code, message
    return error


def _closed_after(reason: str) -> kafka_errors.KafkaConnectionError:
    tls = ssl.SSLError(1, reason)
    tls.reason = reason
    closed = kafka_errors.KafkaConnectionError("Connection at broker:9093 closed")
    closed.__cause__ = tls
    return closed


@pytest.mark.parametrize(
    ("error", "reason", "check"),
    [
        (
            kafka_errors.SaslAuthenticationFailed("invalid credentials"),
            "authentication failed",
            ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"),
        ),
        (
            kafka_errors.UnsupportedSaslMechanismError("no"),
            "SASL mechanism not enabled on the broker",
            ("KAFKA_SASL_MECHANISM",),
        ),
        (
            _verify_error(19, "self-signed certificate in certificate chain"),
            "TLS certificate not trusted",
            ("KAFKA_SSL_CAFILE",),
        ),
        (
            _verify_error(62, "Hostname mismatch, certificate is not valid for 'b'."),
            "TLS certificate does not name the broker's host",
            ("KAFKA_BOOTSTRAP_SERVERS",),
        ),
        (
            _closed_after("SSLV3_ALERT_BAD_CERTIFICATE"),
            "TLS client certificate refused by the broker",
            ("KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE"),
        ),
        (
            kafka_errors.KafkaConnectionError("Connection at broker:9093 closed"),
            "the broker closed the connection",
            ("KAFKA_SECURITY_PROTOCOL", "KAFKA_BOOTSTRAP_SERVERS"),
        ),
        (
            ConnectionRefusedError(111, "refused"),
            "broker unreachable",
            ("KAFKA_BOOTSTRAP_SERVERS",),
        ),
    ],
)
def test_a_refused_connection_names_its_cause_and_the_settings_to_check(
    error: BaseException, reason: str, check: tuple[str, ...]
) -> None:
    problem = classify(error, _settings(), "broker:9093")
    assert (problem.reason, problem.check) == (reason, check)
    assert "broker:9093" in problem.detail
    text = problem.describe()
    assert text.startswith(reason) and all(name in text for name in check)


def test_no_secret_is_passed_on_from_what_a_library_said() -> None:
    leaked = _verify_error(19, f"odd text quoting {SASL_PASSWORD}")
    problem = classify(leaked, _settings(), "broker:9093")
    assert SASL_PASSWORD not in problem.describe()
    assert "**********" in problem.detail


def test_a_cause_is_logged_once_again_only_after_a_while_and_its_end_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    problems = ProblemLog(logging.getLogger("test.kafka"), repeat_s=300, clock=lambda: now[0])
    refused = ConnectionProblem("authentication failed", ("KAFKA_SASL_PASSWORD",), "as 'vb'")
    untrusted = ConnectionProblem("TLS certificate not trusted", ("KAFKA_SSL_CAFILE",))
    with caplog.at_level(logging.INFO, "test.kafka"):
        for _ in range(10):  # asked again and again
            problems.report(refused, "broker:9093")
            now[0] += 5
        assert len(caplog.records) == 1
        now[0] += 300
        problems.report(refused, "broker:9093")  # still so, after a while: said again
        problems.report(untrusted, "broker:9093")  # another cause: said at once
        problems.report(None, "broker:9093")
        problems.report(None, "broker:9093")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    assert "authentication failed" in lines[0] and "KAFKA_SASL_PASSWORD" in lines[0]
    assert "TLS certificate not trusted" in lines[2] and "KAFKA_SSL_CAFILE" in lines[2]
    assert "takes this client now" in lines[3]
    assert [r.levelno for r in caplog.records] == [logging.ERROR] * 3 + [logging.INFO]
    assert problems.current is None


# -- the service while the cluster does not take it ---------------------------------------------


async def test_a_service_the_cluster_does_not_take_starts_nothing_says_why_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    service = Service(
        Settings(
            kafka_bootstrap_servers="127.0.0.1:1",  # nothing listens there
            idempotency_store_url=f"sqlite:///{tmp_path / 'store.sqlite3'}",
        )
    )
    await service.on_startup()  # returns: /health/ready must be served meanwhile
    assert not service.producer.started
    report = await service.readiness()
    assert report["ready"] is False and report["broker"] is False
    assert report["reason"] == "broker unreachable"
    assert report["check"] == ["KAFKA_BOOTSTRAP_SERVERS"]
    # The broker's start waits for the cluster; a stop ends the wait, and nothing starts.
    waiting = asyncio.create_task(service._until_kafka_takes_us())
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await service.on_shutdown()
    assert await asyncio.wait_for(waiting, 15) is False
    await service.after_shutdown()  # the store instance never started: not stopped either
    assert not service.producer.started
