"""Settings from STEPLINE_* variables: parsing and pointed errors."""

from __future__ import annotations

import pytest

from stepline.common.config import Env
from stepline.common.errors import ConfigError
from stepline.device_broker.config import DeviceBrokerSettings

BASE = {
    "STEPLINE_DATABASE_URL": "postgresql://localhost/stepline",
    "STEPLINE_NATS_URL": "nats://127.0.0.1:4222",
}


def settings(**env: str) -> DeviceBrokerSettings:
    return DeviceBrokerSettings.from_env(Env({**BASE, **env}))


def test_defaults() -> None:
    loaded = settings()
    assert loaded.adb_servers == (("127.0.0.1", 5037),)
    assert loaded.device_addresses == ()
    assert loaded.pool_of("127.0.0.1:5555") == "default"
    assert loaded.profile_of("default") == "standard"
    assert loaded.session_dirs == ("/sdcard/stepline", "/data/local/tmp/stepline")
    assert (loaded.scan_interval_s, loaded.health_freshness_s) == (5.0, 60.0)
    assert (loaded.health.min_battery_pct, loaded.health.min_storage_free_mb) == (20, 500)
    assert (loaded.default_lease_s, loaded.max_lease_s) == (60.0, 600.0)


def test_pools_profiles_and_labels() -> None:
    loaded = settings(
        STEPLINE_DEVICE_ADDRESSES="127.0.0.1:5555, 127.0.0.1:5556",
        STEPLINE_DEVICE_POOL="farm",
        STEPLINE_DEVICE_POOLS="127.0.0.1:5556=accounts",
        STEPLINE_DEVICE_LABELS='{"127.0.0.1:5555": {"site": "paris"}}',
        STEPLINE_BROKER_CLEANUP_PROFILE="keep_accounts",
        STEPLINE_BROKER_CLEANUP_PROFILES="farm=standard,accounts=keep_accounts",
        STEPLINE_BROKER_MIN_BATTERY_PCT="35",
    )
    assert loaded.device_addresses == ("127.0.0.1:5555", "127.0.0.1:5556")
    assert loaded.pool_of("127.0.0.1:5555") == "farm"
    assert loaded.pool_of("127.0.0.1:5556") == "accounts"
    assert loaded.profile_of("farm") == "standard"
    assert loaded.profile_of("accounts") == "keep_accounts"
    assert loaded.profile_of("other") == "keep_accounts"
    assert loaded.labels_of("127.0.0.1:5555") == {"site": "paris"}
    assert loaded.labels_of("127.0.0.1:5556") == {}
    assert loaded.health.min_battery_pct == 35


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STEPLINE_DEVICE_ADDRESSES": "phone-without-port"}, "DEVICE_ADDRESSES"),
        ({"STEPLINE_DEVICE_POOLS": "127.0.0.1:5555"}, "DEVICE_POOLS entries"),
        ({"STEPLINE_DEVICE_POOL": "bad pool"}, "DEVICE_POOL"),
        ({"STEPLINE_BROKER_CLEANUP_PROFILES": "default=scrub"}, "must be one of"),
        ({"STEPLINE_BROKER_CLEANUP_PROFILE": "scrub"}, "BROKER_CLEANUP_PROFILE"),
        ({"STEPLINE_DEVICE_LABELS": "site=paris"}, "not valid JSON"),
        ({"STEPLINE_DEVICE_LABELS": '{"a": {"k": 1}}'}, "entry of 'a'"),
        ({"STEPLINE_BROKER_SESSION_DIRS": "/sdcard"}, "SESSION_DIRS"),
        ({"STEPLINE_BROKER_SESSION_DIRS": "relative/dir"}, "SESSION_DIRS"),
        ({"STEPLINE_BROKER_DEFAULT_LEASE_S": "900"}, "must not exceed"),
        ({"STEPLINE_BROKER_HEALTH_FRESHNESS_S": "5"}, "at least twice"),
        ({"STEPLINE_BROKER_MIN_BATTERY_PCT": "lots"}, "must be an integer"),
    ],
)
def test_bad_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(**env)
    assert message in str(info.value)
