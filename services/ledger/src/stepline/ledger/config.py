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
    commit_shards: int = 4
    default_lease_s: float = 30.0
    max_lease_s: float = 300.0

    @classmethod
    def from_env(cls, env: Env) -> LedgerSettings:
        return cls(
            server=ServerSettings.from_env(env, service="ledger"),
            database_url=database_url(env),
            nats=NatsSettings.from_env(env),
            commit_shards=env.integer("LEDGER_COMMIT_SHARDS", 4, minimum=1),
            default_lease_s=env.number("LEDGER_DEFAULT_LEASE_S", 30.0, minimum=1.0),
            max_lease_s=env.number("LEDGER_MAX_LEASE_S", 300.0, minimum=1.0),
        )
