"""Settings from STEPLINE_* variables, with pointed errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepline.approvals.config import ApprovalsSettings
from stepline.approvals.secret_store import SecretStore
from stepline.common.config import Env
from stepline.common.errors import ConfigError

BASE = {
    "STEPLINE_DATABASE_URL": "postgresql://localhost/x",
    "STEPLINE_NATS_URL": "nats://127.0.0.1:4222",
    "STEPLINE_LEDGER_ADDR": "127.0.0.1:7001",
}


def test_defaults() -> None:
    settings = ApprovalsSettings.from_env(Env(BASE))
    hooks = settings.webhooks
    assert (hooks.listen, hooks.secrets_file, hooks.inbound_secret) == (
        "127.0.0.1:0",
        None,
        "inbound",
    )
    assert (hooks.max_attempts, hooks.initial_backoff_s, hooks.max_backoff_s) == (10, 1.0, 300.0)
    assert (hooks.timeout_s, hooks.tolerance_s) == (10.0, 300.0)
    assert (settings.sweep_interval_s, settings.outbox_poll_s) == (5.0, 1.0)


def test_every_setting_is_read() -> None:
    settings = ApprovalsSettings.from_env(
        Env(
            {
                **BASE,
                "STEPLINE_APPROVALS_WEBHOOK_LISTEN": "0.0.0.0:8443",
                "STEPLINE_APPROVALS_SECRETS_FILE": "/etc/stepline/secrets.json",
                "STEPLINE_APPROVALS_INBOUND_SECRET": "chatops",
                "STEPLINE_APPROVALS_WEBHOOK_MAX_ATTEMPTS": "3",
                "STEPLINE_APPROVALS_WEBHOOK_INITIAL_BACKOFF_S": "0.5",
                "STEPLINE_APPROVALS_WEBHOOK_MAX_BACKOFF_S": "60",
                "STEPLINE_APPROVALS_WEBHOOK_TIMEOUT_S": "2",
                "STEPLINE_APPROVALS_WEBHOOK_TOLERANCE_S": "120",
                "STEPLINE_APPROVALS_SWEEP_INTERVAL_S": "0",
                "STEPLINE_APPROVALS_OUTBOX_POLL_S": "0.25",
            }
        )
    )
    hooks = settings.webhooks
    assert hooks.listen == "0.0.0.0:8443"
    assert hooks.secrets_file == Path("/etc/stepline/secrets.json")
    assert hooks.inbound_secret == "chatops"
    assert (hooks.max_attempts, hooks.initial_backoff_s, hooks.max_backoff_s) == (3, 0.5, 60.0)
    assert (hooks.timeout_s, hooks.tolerance_s) == (2.0, 120.0)
    assert (settings.sweep_interval_s, settings.outbox_poll_s) == (0.0, 0.25)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("APPROVALS_WEBHOOK_LISTEN", "nope", "must be host:port"),
        ("APPROVALS_WEBHOOK_MAX_ATTEMPTS", "0", "at least 1"),
        ("APPROVALS_WEBHOOK_MAX_BACKOFF_S", "0.5", "MAX_BACKOFF_S must be at least"),
        ("APPROVALS_SWEEP_INTERVAL_S", "-1", "at least 0"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        ApprovalsSettings.from_env(Env({**BASE, f"STEPLINE_{name}": value}))
    assert "STEPLINE_APPROVALS_" in str(info.value)


def test_secrets_file_is_checked_and_values_never_shown(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    path.write_text('{"secrets": {"hooks": "top-secret-value"}}')
    store = SecretStore.from_file(path)
    assert store.get("hooks") == "top-secret-value"
    assert "hooks" in store and "other" not in store
    assert "top-secret-value" not in repr(store)
    path.write_text('{"secrets": {"hooks": 5}}')
    with pytest.raises(ConfigError, match="non-empty string"):
        SecretStore.from_file(path)
    path.write_text('{"hooks": "x"}')
    with pytest.raises(ConfigError, match="'secrets' object"):
        SecretStore.from_file(path)
    assert SecretStore.from_file(None).names() == []
