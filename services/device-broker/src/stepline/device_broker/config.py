"""Device broker settings, read once from ``STEPLINE_*`` variables."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from stepline.common.config import (
    PREFIX,
    Env,
    NatsSettings,
    ServerSettings,
    database_url,
    parse_address,
)
from stepline.common.errors import ConfigError

PROFILES = ("standard", "keep_accounts", "none")
"""Cleanup profiles (see docs/devices.md):

* ``standard``: uninstall the packages installed during the lease, remove the
  session folders, ``pm clear`` the third-party apps, home key; verified;
* ``keep_accounts``: the same without ``pm clear`` (apps stay signed in);
* ``none``: no cleanup at all; the device is free again as soon as it is
  released (health is still checked in the background). For trusted pools
  and for measuring the lease path alone."""

DEFAULT_SESSION_DIRS = ("/sdcard/stepline", "/data/local/tmp/stepline")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _items(env: Env, name: str) -> list[str]:
    return [item.strip() for item in env.text(name, "").split(",") if item.strip()]


def _name(value: str, *, what: str) -> str:
    if not _NAME_RE.match(value):
        raise ConfigError(
            f"{what} {value!r} must be 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def _mapping(env: Env, name: str, *, what: str) -> dict[str, str]:
    """``KEY=VALUE,KEY=VALUE`` (keys may contain ``:``, e.g. device serials)."""
    result: dict[str, str] = {}
    for item in _items(env, name):
        key, sep, value = item.rpartition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"{PREFIX}{name} entries must be KEY={what.upper()}, got {item!r}")
        result[key.strip()] = value.strip()
    return result


def _labels(env: Env) -> dict[str, dict[str, str]]:
    raw = env.optional("DEVICE_LABELS")
    if raw is None:
        return {}
    problem = f"{PREFIX}DEVICE_LABELS must be a JSON object of serial -> {{label: value}}"
    try:
        document = json.loads(raw)
    except ValueError:
        raise ConfigError(f"{problem}; it is not valid JSON") from None
    if not isinstance(document, dict):
        raise ConfigError(problem)
    result: dict[str, dict[str, str]] = {}
    for serial, labels in document.items():
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise ConfigError(f"{problem}; the entry of {serial!r} is not")
        result[serial] = dict(labels)
    return result


@dataclass(frozen=True, kw_only=True)
class HealthThresholds:
    """What a healthy device must show."""

    min_battery_pct: int = 20
    min_storage_free_mb: int = 500


@dataclass(frozen=True, kw_only=True)
class DeviceBrokerSettings:
    server: ServerSettings
    database_url: str
    nats: NatsSettings
    adb_servers: tuple[tuple[str, int], ...]
    schema: str = "device_broker"
    #: phones (``host:port``) to ``adb connect`` through the first adb server
    device_addresses: tuple[str, ...] = ()
    default_pool: str = "default"
    #: pool per device serial (for TCP phones the serial is the address)
    device_pools: Mapping[str, str] = field(default_factory=dict)
    device_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    default_cleanup_profile: str = "standard"
    #: cleanup profile per pool
    cleanup_profiles: Mapping[str, str] = field(default_factory=dict)
    session_dirs: tuple[str, ...] = DEFAULT_SESSION_DIRS
    scan_interval_s: float = 5.0
    health_freshness_s: float = 60.0
    health: HealthThresholds = field(default_factory=HealthThresholds)
    default_lease_s: float = 60.0
    max_lease_s: float = 600.0
    #: longest a Lease call waits for a device when it carries no deadline
    max_wait_s: float = 300.0
    adb_timeout_s: float = 10.0

    def pool_of(self, serial: str) -> str:
        return self.device_pools.get(serial, self.default_pool)

    def profile_of(self, pool: str) -> str:
        return self.cleanup_profiles.get(pool, self.default_cleanup_profile)

    def labels_of(self, serial: str) -> dict[str, str]:
        return dict(self.device_labels.get(serial, {}))

    @classmethod
    def from_env(cls, env: Env) -> DeviceBrokerSettings:
        servers = tuple(
            parse_address(item, name=f"{PREFIX}ADB_SERVERS")
            for item in (_items(env, "ADB_SERVERS") or ["127.0.0.1:5037"])
        )
        addresses = tuple(_items(env, "DEVICE_ADDRESSES"))
        for address in addresses:
            parse_address(address, name=f"{PREFIX}DEVICE_ADDRESSES")
        default_pool = _name(env.text("DEVICE_POOL", "default"), what=f"{PREFIX}DEVICE_POOL")
        pools = {
            serial: _name(pool, what=f"pool in {PREFIX}DEVICE_POOLS")
            for serial, pool in _mapping(env, "DEVICE_POOLS", what="pool").items()
        }
        default_profile = env.choice("BROKER_CLEANUP_PROFILE", "standard", PROFILES)
        profiles: dict[str, str] = {}
        for pool, profile in _mapping(env, "BROKER_CLEANUP_PROFILES", what="profile").items():
            if profile not in PROFILES:
                raise ConfigError(
                    f"{PREFIX}BROKER_CLEANUP_PROFILES: profile {profile!r} of pool {pool!r} "
                    f"must be one of {', '.join(PROFILES)}"
                )
            profiles[_name(pool, what=f"pool in {PREFIX}BROKER_CLEANUP_PROFILES")] = profile
        session_dirs = tuple(_items(env, "BROKER_SESSION_DIRS")) or DEFAULT_SESSION_DIRS
        for path in session_dirs:
            if not path.startswith("/") or path.rstrip("/") in ("", "/sdcard", "/data"):
                raise ConfigError(
                    f"{PREFIX}BROKER_SESSION_DIRS: {path!r} must be an absolute folder "
                    "below /sdcard or /data (it is removed with rm -rf after each lease)"
                )
        default_lease_s = env.number("BROKER_DEFAULT_LEASE_S", 60.0, minimum=1.0)
        max_lease_s = env.number("BROKER_MAX_LEASE_S", 600.0, minimum=1.0)
        if default_lease_s > max_lease_s:
            raise ConfigError(
                f"{PREFIX}BROKER_DEFAULT_LEASE_S ({default_lease_s}) must not exceed "
                f"{PREFIX}BROKER_MAX_LEASE_S ({max_lease_s})"
            )
        scan_interval_s = env.number("BROKER_SCAN_INTERVAL_S", 5.0, minimum=0.05)
        freshness_s = env.number("BROKER_HEALTH_FRESHNESS_S", 60.0, minimum=1.0)
        if freshness_s < 2 * scan_interval_s:
            raise ConfigError(
                f"{PREFIX}BROKER_HEALTH_FRESHNESS_S ({freshness_s}) must be at least twice "
                f"{PREFIX}BROKER_SCAN_INTERVAL_S ({scan_interval_s}): health is re-checked "
                "at scans, before it goes stale"
            )
        return cls(
            server=ServerSettings.from_env(env, service="device-broker"),
            database_url=database_url(env),
            nats=NatsSettings.from_env(env),
            adb_servers=servers,
            device_addresses=addresses,
            default_pool=default_pool,
            device_pools=pools,
            device_labels=_labels(env),
            default_cleanup_profile=default_profile,
            cleanup_profiles=profiles,
            session_dirs=session_dirs,
            scan_interval_s=scan_interval_s,
            health_freshness_s=freshness_s,
            health=HealthThresholds(
                min_battery_pct=env.integer("BROKER_MIN_BATTERY_PCT", 20, minimum=0),
                min_storage_free_mb=env.integer("BROKER_MIN_STORAGE_FREE_MB", 500, minimum=0),
            ),
            default_lease_s=default_lease_s,
            max_lease_s=max_lease_s,
            max_wait_s=env.number("BROKER_MAX_WAIT_S", 300.0, minimum=0.0),
            adb_timeout_s=env.number("BROKER_ADB_TIMEOUT_S", 10.0, minimum=0.1),
        )
