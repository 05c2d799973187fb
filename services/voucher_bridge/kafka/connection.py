"""aiokafka connection arguments from the settings (shared by consumer, producer and admin)."""

from __future__ import annotations

import ssl
from typing import Any

from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from voucher_bridge.settings import Settings


def connection_args(settings: Settings) -> dict[str, Any]:
    args: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        )
        if settings.kafka_ssl_certfile:
            context.load_cert_chain(
                str(settings.kafka_ssl_certfile),
                str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
            )
        args["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL"):
        args["sasl_mechanism"] = settings.kafka_sasl_mechanism or "SCRAM-SHA-512"
        args["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            args["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return args


def faststream_security(settings: Settings) -> BaseSecurity | None:
    """The same connection settings in FastStream's terms (for its consumer and AsyncAPI)."""
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
