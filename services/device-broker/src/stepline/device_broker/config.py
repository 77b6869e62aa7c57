"""Device broker settings, read once from ``STEPLINE_*`` variables."""

from __future__ import annotations

from dataclasses import dataclass

from stepline.common.config import (
    Env,
    NatsSettings,
    ServerSettings,
    database_url,
    parse_address,
)


@dataclass(frozen=True, kw_only=True)
class DeviceBrokerSettings:
    server: ServerSettings
    database_url: str
    nats: NatsSettings
    adb_servers: tuple[tuple[str, int], ...]
    schema: str = "device_broker"

    @classmethod
    def from_env(cls, env: Env) -> DeviceBrokerSettings:
        servers = tuple(
            parse_address(item.strip(), name="STEPLINE_ADB_SERVERS")
            for item in env.text("ADB_SERVERS", "127.0.0.1:5037").split(",")
            if item.strip()
        )
        return cls(
            server=ServerSettings.from_env(env, service="device-broker"),
            database_url=database_url(env),
            nats=NatsSettings.from_env(env),
            adb_servers=servers,
        )
