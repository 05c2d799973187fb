"""Settings: a malformed secret setting is named, never shown (issue 12)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from voucher_bridge.cli import main
from voucher_bridge.settings import InvalidSettings, Settings, load_settings

TOKEN = "tok-SECRET-4f9c2a7e1b8d"
PASSWORD = "pw-SECRET-9e1d7b3c5a2f"

MALFORMED = [
    ("EVOUCHER_TERMINALS", '{"till-1": "' + TOKEN + '",', "EVOUCHER_TERMINALS"),
    ("EVOUCHER_TERMINALS", '["' + TOKEN + '"]', "EVOUCHER_TERMINALS"),
    ("EVOUCHER_TERMINALS", '{"till-1": {"token": "' + TOKEN + '"}}', "EVOUCHER_TERMINALS.till-1"),
    ("EPIN_ACCOUNTS", '{"shop": {"username": "shop", "pw": "' + PASSWORD + '"}}', "EPIN_ACCOUNTS"),
    ("EPIN_ACCOUNTS", '{"shop": "' + PASSWORD + '"}', "EPIN_ACCOUNTS.shop"),
    ("EPIN_ACCOUNTS", '{"shop": {"username": 5, "password": "' + PASSWORD + '"}', "EPIN_ACCOUNTS"),
]


@pytest.mark.parametrize(("name", "value", "named"), MALFORMED)
def test_a_malformed_secret_setting_is_named_and_not_shown(
    name: str,
    value: str,
    named: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidSettings) as raised:
        load_settings()
    assert named in str(raised.value)
    # Nothing of the value, and no chained exception that could quote it.
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    for text in (str(raised.value), repr(raised.value)):
        assert TOKEN not in text and PASSWORD not in text

    assert main(["topics"]) == 2
    out = capsys.readouterr()
    logged = caplog.text + out.out + out.err
    assert named in logged
    assert TOKEN not in logged and PASSWORD not in logged


def test_pydantic_errors_hide_every_input() -> None:
    # Also where the Settings class is used directly (tests, tools), not only through
    # load_settings: the model hides inputs in its own errors.
    with pytest.raises(ValidationError) as raised:
        Settings(evoucher_terminals={"till-1": {"token": TOKEN}})  # type: ignore[dict-item]
    assert TOKEN not in str(raised.value) and TOKEN not in repr(raised.value)


def test_a_malformed_secret_file_is_named_and_not_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "epin_accounts").write_text('{"shop": "' + PASSWORD + '"}')
    monkeypatch.setenv("VOUCHER_BRIDGE_SECRETS_DIR", str(tmp_path))
    with pytest.raises(InvalidSettings) as raised:
        load_settings()
    assert "EPIN_ACCOUNTS.shop" in str(raised.value)
    assert PASSWORD not in str(raised.value)


def test_the_store_url_is_a_secret() -> None:
    url = f"postgresql://bridge:{PASSWORD}@db/bridge"
    settings = Settings(idempotency_store_url=url)  # type: ignore[arg-type]
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings)
    assert settings.idempotency_store_url.get_secret_value() == url


def test_a_mounted_secret_file_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image's default IDEMPOTENCY_STORE_URL (SQLite in its volume) must not hide the
    PostgreSQL URL the platform mounted: each instance would keep a store of its own."""
    url = f"postgresql://bridge:{PASSWORD}@db/bridge"
    (tmp_path / "idempotency_store_url").write_text(url)
    monkeypatch.setenv("VOUCHER_BRIDGE_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("IDEMPOTENCY_STORE_URL", "sqlite:////var/lib/voucher-bridge/x.sqlite3")
    monkeypatch.setenv("KAFKA_GROUP_ID", "from-the-environment")
    settings = load_settings()
    assert settings.idempotency_store_url.get_secret_value() == url
    assert settings.kafka_group_id == "from-the-environment"  # no file: the environment's
