"""Ledger settings, read once from ``STEPLINE_*`` variables."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from stepline.common.config import Env, NatsSettings, ServerSettings, database_url
from stepline.ledger.checks import MAX_ARTIFACT_BYTES

log = logging.getLogger(__name__)

# The smallest gRPC message limit the ledger serves with: a PutArtifact request
# or GetArtifact response carries up to MAX_ARTIFACT_BYTES of content plus its
# description (ids, name, content type, actor; a few KiB at most).
MIN_MESSAGE_BYTES = MAX_ARTIFACT_BYTES + 256 * 1024


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


def with_room_for_artifacts(server: ServerSettings) -> ServerSettings:
    """``server`` with a message limit of at least :data:`MIN_MESSAGE_BYTES`, so a
    full-size artifact fits whatever ``STEPLINE_MAX_MESSAGE_BYTES`` says."""
    if server.max_message_bytes >= MIN_MESSAGE_BYTES:
        return server
    log.info(
        "ledger message limit raised from %d to %d bytes to fit artifacts",
        server.max_message_bytes,
        MIN_MESSAGE_BYTES,
    )
    return replace(server, max_message_bytes=MIN_MESSAGE_BYTES)
