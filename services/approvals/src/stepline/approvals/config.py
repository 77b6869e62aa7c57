"""Approvals settings, read once from ``STEPLINE_*`` variables."""

from __future__ import annotations

from dataclasses import dataclass

from stepline.common.config import (
    ClientSettings,
    Env,
    NatsSettings,
    ServerSettings,
    database_url,
    service_address,
)


@dataclass(frozen=True, kw_only=True)
class ApprovalsSettings:
    server: ServerSettings
    client: ClientSettings
    database_url: str
    nats: NatsSettings
    ledger_addr: str
    schema: str = "approvals"

    @classmethod
    def from_env(cls, env: Env) -> ApprovalsSettings:
        return cls(
            server=ServerSettings.from_env(env, service="approvals"),
            client=ClientSettings.from_env(env),
            database_url=database_url(env),
            nats=NatsSettings.from_env(env),
            ledger_addr=service_address(env, "LEDGER_ADDR"),
        )
