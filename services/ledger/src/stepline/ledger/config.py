"""Ledger settings, read once from ``STEPLINE_*`` variables."""

from __future__ import annotations

from dataclasses import dataclass

from stepline.common.config import Env, NatsSettings, ServerSettings, database_url


@dataclass(frozen=True, kw_only=True)
class LedgerSettings:
    server: ServerSettings
    database_url: str
    nats: NatsSettings
    schema: str = "ledger"

    @classmethod
    def from_env(cls, env: Env) -> LedgerSettings:
        return cls(
            server=ServerSettings.from_env(env, service="ledger"),
            database_url=database_url(env),
            nats=NatsSettings.from_env(env),
        )
