"""Approvals settings, read once from ``STEPLINE_*`` variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stepline.common.config import (
    PREFIX,
    ClientSettings,
    Env,
    NatsSettings,
    ServerSettings,
    database_url,
    parse_address,
    service_address,
)
from stepline.common.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class WebhookSettings:
    """Outbound deliveries and the inbound decision endpoint.

    ``listen``: ``host:port`` of the inbound HTTP server (port 0: any free port,
    logged at start). ``secrets_file``: JSON ``{"secrets": {name: value}}``
    holding the signing secrets that subscriptions name; unset means none.
    ``inbound_secret``: name of the secret that signs inbound decisions.
    ``max_attempts``: attempts per delivery before it is FAILED.
    ``initial_backoff_s``/``max_backoff_s``: delay after the first failed
    attempt, doubled after each further one up to the maximum.
    ``timeout_s``: limit on one outbound POST. ``tolerance_s``: how far an
    inbound request's timestamp may be from the service's clock.
    """

    listen: str = "127.0.0.1:0"
    secrets_file: Path | None = None
    inbound_secret: str = "inbound"
    max_attempts: int = 10
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 300.0
    timeout_s: float = 10.0
    tolerance_s: float = 300.0

    @classmethod
    def from_env(cls, env: Env) -> WebhookSettings:
        listen = env.text("APPROVALS_WEBHOOK_LISTEN", "127.0.0.1:0")
        parse_address(listen, name=PREFIX + "APPROVALS_WEBHOOK_LISTEN")
        secrets = env.optional("APPROVALS_SECRETS_FILE")
        settings = cls(
            listen=listen,
            secrets_file=Path(secrets) if secrets else None,
            inbound_secret=env.text("APPROVALS_INBOUND_SECRET", "inbound"),
            max_attempts=env.integer("APPROVALS_WEBHOOK_MAX_ATTEMPTS", 10, minimum=1),
            initial_backoff_s=env.number("APPROVALS_WEBHOOK_INITIAL_BACKOFF_S", 1.0, minimum=0.001),
            max_backoff_s=env.number("APPROVALS_WEBHOOK_MAX_BACKOFF_S", 300.0, minimum=0.001),
            timeout_s=env.number("APPROVALS_WEBHOOK_TIMEOUT_S", 10.0, minimum=0.001),
            tolerance_s=env.number("APPROVALS_WEBHOOK_TOLERANCE_S", 300.0, minimum=1.0),
        )
        if settings.max_backoff_s < settings.initial_backoff_s:
            raise ConfigError(
                f"{PREFIX}APPROVALS_WEBHOOK_MAX_BACKOFF_S must be at least "
                f"{PREFIX}APPROVALS_WEBHOOK_INITIAL_BACKOFF_S"
            )
        return settings


@dataclass(frozen=True, kw_only=True)
class ApprovalsSettings:
    """What the approvals service needs.

    ``sweep_interval_s``: how often PENDING requests past their expiry are
    marked EXPIRED (0 turns the sweeper off; decisions after expiry are refused
    either way). ``outbox_poll_s``: how often the outboxes (events, ledger
    records, webhook deliveries) are checked for work that no local write
    announced (another replica's, or retries that came due).
    """

    server: ServerSettings
    client: ClientSettings
    database_url: str
    nats: NatsSettings
    ledger_addr: str
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    schema: str = "approvals"
    sweep_interval_s: float = 5.0
    outbox_poll_s: float = 1.0

    @classmethod
    def from_env(cls, env: Env) -> ApprovalsSettings:
        return cls(
            server=ServerSettings.from_env(env, service="approvals"),
            client=ClientSettings.from_env(env),
            database_url=database_url(env),
            nats=NatsSettings.from_env(env),
            ledger_addr=service_address(env, "LEDGER_ADDR"),
            webhooks=WebhookSettings.from_env(env),
            sweep_interval_s=env.number("APPROVALS_SWEEP_INTERVAL_S", 5.0),
            outbox_poll_s=env.number("APPROVALS_OUTBOX_POLL_S", 1.0, minimum=0.01),
        )
