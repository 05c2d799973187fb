"""aiokafka connection arguments from the settings (shared by consumer, producer and admin), and
what to say when the cluster will not have this client: why, and which setting to check.

aiokafka reports a refused login or an untrusted certificate only as "Unable to bootstrap", the
cause in a log line of its own; `connection_problem` connects once itself and names the cause.
Nothing here puts a password into a message: causes are worded here, and the few library texts
passed on (certificate checks, socket errors) are scrubbed of the configured secrets anyway.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import errors as kafka_errors
from aiokafka.conn import collect_hosts, create_conn
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from voucher_bridge.settings import InvalidSettings, Settings

log = logging.getLogger(__name__)


class KafkaTlsFilesError(InvalidSettings):
    """The TLS files the settings name cannot be used: refused at start, naming the settings."""


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context for SSL and SASL_SSL: the broker verified against KAFKA_SSL_CAFILE (else
    the system's CAs) and, unless KAFKA_SSL_CHECK_HOSTNAME is off, its host name; the client's
    own certificate when KAFKA_SSL_CERTFILE is set (mTLS)."""
    cafile = settings.kafka_ssl_cafile
    try:
        context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    except (OSError, ssl.SSLError) as exc:
        raise KafkaTlsFilesError(
            f"invalid settings: KAFKA_SSL_CAFILE: cannot read CA certificates from {cafile} "
            f"({_error_text(exc, settings)})"
        ) from None
    # Set before anything else: check_hostname needs verify_mode CERT_REQUIRED, which
    # create_default_context has set; turning it off leaves the chain still verified.
    context.check_hostname = settings.kafka_ssl_check_hostname
    if settings.kafka_ssl_certfile:
        try:
            context.load_cert_chain(
                str(settings.kafka_ssl_certfile),
                str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
                # A callable, never None: without one OpenSSL asks for an encrypted key's
                # password on the terminal, and a service would wait for it.
                password=_key_password(settings),
            )
        except _NoKeyPassword:
            raise KafkaTlsFilesError(
                "invalid settings: KAFKA_SSL_KEYFILE is encrypted: set KAFKA_SSL_KEY_PASSWORD"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise KafkaTlsFilesError(
                "invalid settings: KAFKA_SSL_CERTFILE / KAFKA_SSL_KEYFILE: cannot load the "
                "client certificate and key (a wrong KAFKA_SSL_KEY_PASSWORD, a key that is not "
                f"the certificate's, or not PEM: {_error_text(exc, settings)})"
            ) from None
    return context


class _NoKeyPassword(Exception):
    pass


def _key_password(settings: Settings) -> Callable[[], str]:
    def password() -> str:
        # Called by OpenSSL only for an encrypted key.
        if settings.kafka_ssl_key_password is None:
            raise _NoKeyPassword
        return settings.kafka_ssl_key_password.get_secret_value()

    return password


def connection_args(settings: Settings) -> dict[str, Any]:
    args: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        args["ssl_context"] = ssl_context(settings)
    if settings.kafka_security_protocol.startswith("SASL"):
        args["sasl_mechanism"] = settings.kafka_sasl_mechanism or "SCRAM-SHA-512"
        args["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            args["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return args


def faststream_security(settings: Settings) -> BaseSecurity | None:
    """The same connection settings in FastStream's terms (for its consumer, its own producer
    and admin client, and AsyncAPI)."""
    args = connection_args(settings)
    context = args.get("ssl_context")
    protocol = settings.kafka_security_protocol
    if not protocol.startswith("SASL"):
        return BaseSecurity(ssl_context=context) if context else None
    username = settings.kafka_sasl_username or ""
    password = args.get("sasl_plain_password") or ""
    kinds: dict[str, type[SASLPlaintext | SASLScram256 | SASLScram512]] = {
        "PLAIN": SASLPlaintext,
        "SCRAM-SHA-256": SASLScram256,
        "SCRAM-SHA-512": SASLScram512,
    }
    kind = kinds[args["sasl_mechanism"]]
    return kind(username=username, password=password, ssl_context=context)


# -- why the cluster will not have this client -------------------------------------------------


@dataclass(frozen=True)
class ConnectionProblem:
    """Why this client cannot use the cluster: a short reason, the settings to check, and what
    was seen (no secret in any of them)."""

    reason: str
    check: tuple[str, ...]
    detail: str = ""

    def describe(self) -> str:
        text = f"{self.reason} ({self.detail})" if self.detail else self.reason
        if self.check:
            text += f"; check {' and '.join(self.check)}"
        return text


_BOOTSTRAP = "KAFKA_BOOTSTRAP_SERVERS"
_PROTOCOL = "KAFKA_SECURITY_PROTOCOL"
# What a broker that requires a client certificate answers when it has none it accepts.
_CLIENT_CERT_ALERTS = {
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "TLSV1_ALERT_UNKNOWN_CA",
    "TLSV1_ALERT_ACCESS_DENIED",
}
_HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH
_NOT_YET_VALID, _EXPIRED = 9, 10  # X509_V_ERR_CERT_NOT_YET_VALID, _HAS_EXPIRED
_UNREACHABLE = "broker unreachable"


async def connection_problem(
    settings: Settings, args: dict[str, Any] | None = None, timeout_s: float = 5.0
) -> ConnectionProblem | None:
    """None when a bootstrap server takes this client (TLS, version lookup and SASL login, as
    the clients do them); else why none does: a refusal of this client before a server that
    cannot be reached."""
    args = args if args is not None else connection_args(settings)
    problems: list[ConnectionProblem] = []
    for host, port, _ in collect_hosts(settings.kafka_bootstrap_servers, randomize=False):
        try:
            async with asyncio.timeout(timeout_s):
                conn = await create_conn(
                    host,
                    port,
                    request_timeout_ms=int(timeout_s * 1000),
                    ssl_context=args.get("ssl_context"),
                    security_protocol=args["security_protocol"],
                    sasl_mechanism=args.get("sasl_mechanism"),
                    sasl_plain_username=args.get("sasl_plain_username"),
                    sasl_plain_password=args.get("sasl_plain_password"),
                )
        except (OSError, kafka_errors.KafkaError, TimeoutError) as exc:
            problems.append(classify(exc, settings, f"{host}:{port}"))
            continue
        conn.close()
        return None
    if not problems:
        return ConnectionProblem("no bootstrap server", (_BOOTSTRAP,))
    return next((p for p in problems if p.reason != _UNREACHABLE), problems[0])


def classify(exc: BaseException, settings: Settings, where: str) -> ConnectionProblem:
    """What a failed connection to `where` says about the settings."""
    if isinstance(exc, kafka_errors.SaslAuthenticationFailed):
        mechanism = settings.kafka_sasl_mechanism or "SCRAM-SHA-512"
        return ConnectionProblem(
            "authentication failed",
            ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"),
            f"{mechanism} as {settings.kafka_sasl_username!r} at {where}",
        )
    if isinstance(exc, kafka_errors.UnsupportedSaslMechanismError):
        return ConnectionProblem(
            "SASL mechanism not enabled on the broker",
            ("KAFKA_SASL_MECHANISM",),
            f"{settings.kafka_sasl_mechanism or 'SCRAM-SHA-512'} at {where}",
        )
    tls = _ssl_error_in(exc)
    if isinstance(tls, ssl.SSLCertVerificationError):
        seen = f"{where}: {_error_text(tls, settings)}"
        if tls.verify_code == _HOSTNAME_MISMATCH:
            return ConnectionProblem(
                "TLS certificate does not name the broker's host", (_BOOTSTRAP,), seen
            )
        if tls.verify_code in (_NOT_YET_VALID, _EXPIRED):
            return ConnectionProblem("TLS certificate out of its validity", (), seen)
        return ConnectionProblem("TLS certificate not trusted", ("KAFKA_SSL_CAFILE",), seen)
    if tls is not None and tls.reason in _CLIENT_CERT_ALERTS:
        return ConnectionProblem(
            "TLS client certificate refused by the broker",
            ("KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE"),
            f"{where}: {tls.reason}",
        )
    if tls is not None:
        return ConnectionProblem(
            "TLS handshake failed", (_PROTOCOL, _BOOTSTRAP), f"{where}: {tls.reason or tls}"
        )
    if isinstance(exc, socket.gaierror):
        return ConnectionProblem("broker host name not found", (_BOOTSTRAP,), where)
    if isinstance(exc, kafka_errors.KafkaConnectionError | ConnectionResetError):
        # A TLS client at a plaintext listener is reset; a plaintext client at a TLS one
        # closed: both say the protocol does not match the listener.
        return ConnectionProblem("the broker closed the connection", (_PROTOCOL, _BOOTSTRAP), where)
    if isinstance(exc, OSError | TimeoutError):
        return ConnectionProblem(_UNREACHABLE, (_BOOTSTRAP,), f"{where}: {type(exc).__name__}")
    return ConnectionProblem(
        "cannot connect", (_BOOTSTRAP, _PROTOCOL), f"{where}: {type(exc).__name__}"
    )


def _ssl_error_in(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind `exc` (aiokafka wraps a handshake refused late, as TLS 1.3
    refuses a client certificate, in a "connection closed")."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _error_text(exc: BaseException, settings: Settings) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        text = str(exc.verify_message)
    elif isinstance(exc, OSError) and exc.strerror:
        text = str(exc.strerror)
    else:
        text = str(exc) or type(exc).__name__
    for secret in (settings.kafka_sasl_password, settings.kafka_ssl_key_password):
        if secret is not None and secret.get_secret_value():
            text = text.replace(secret.get_secret_value(), "**********")
    return text


class ProblemLog:
    """One log line per cause, not one per attempt: a cause is logged when it appears, again
    every `repeat_s` while it lasts, and its end once."""

    def __init__(
        self,
        logger: logging.Logger = log,
        repeat_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._repeat_s = repeat_s
        self._clock = clock
        self._current: ConnectionProblem | None = None
        self._logged_at = 0.0

    @property
    def current(self) -> ConnectionProblem | None:
        return self._current

    def report(self, problem: ConnectionProblem | None, bootstrap: str) -> None:
        now = self._clock()
        if problem is None:
            if self._current is not None:
                self._log.info("the Kafka cluster at %s takes this client now", bootstrap)
            self._current = None
            return
        same = self._current is not None and (self._current.reason, self._current.check) == (
            problem.reason,
            problem.check,
        )
        self._current = problem
        if same and now - self._logged_at < self._repeat_s:
            return
        self._logged_at = now
        self._log.error(
            "cannot use the Kafka cluster at %s: %s; not ready, trying again",
            bootstrap,
            problem.describe(),
        )
