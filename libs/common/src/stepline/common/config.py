"""Settings read once, at the edge, from ``STEPLINE_*`` environment variables.

``__main__`` modules build one frozen settings object with :class:`Env` and pass
it down; nothing below them reads ``os.environ``. Every malformed value raises
:class:`~stepline.common.errors.ConfigError` naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from stepline.common.errors import ConfigError, InvalidArgument
from stepline.common.jetstream import Streams

PREFIX = "STEPLINE_"
# large enough for an 8 MiB artifact (LedgerService.PutArtifact/GetArtifact) with its envelope
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class Env:
    """Typed access to ``STEPLINE_*`` variables of one environment mapping."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = dict(os.environ if environ is None else environ)

    def _raw(self, name: str) -> str | None:
        value = self._environ.get(PREFIX + name)
        return None if value is None or value.strip() == "" else value.strip()

    def text(self, name: str, default: str | None = None) -> str:
        value = self._raw(name)
        if value is not None:
            return value
        if default is None:
            raise ConfigError(f"{PREFIX}{name} is required but not set")
        return default

    def optional(self, name: str) -> str | None:
        return self._raw(name)

    def integer(self, name: str, default: int, *, minimum: int | None = None) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{PREFIX}{name} must be an integer, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"{PREFIX}{name} must be at least {minimum}, got {value}")
        return value

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{PREFIX}{name} must be a number, got {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"{PREFIX}{name} must be at least {minimum}, got {value}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{PREFIX}{name} must be true or false, got {raw!r}")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default).lower()
        if value not in choices:
            raise ConfigError(f"{PREFIX}{name} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def path(self, name: str, default: str | None = None) -> Path:
        return Path(self.text(name, default))


def parse_address(value: str, *, name: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:port`` for IPv6), with a clear error on bad input."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{name} must be host:port, got {value!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{name} has a non-numeric port in {value!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name} port must be 0-65535, got {port}")
    return host.strip("[]"), port


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """What every Stepline gRPC service needs to serve."""

    service: str
    listen: str = "127.0.0.1:0"
    auth_file: Path | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"
    log_json: bool = False

    @classmethod
    def from_env(cls, env: Env, *, service: str) -> ServerSettings:
        listen = env.text("LISTEN", "127.0.0.1:0")
        parse_address(listen, name=PREFIX + "LISTEN")
        auth = env.optional("AUTH_FILE")
        return cls(
            service=service,
            listen=listen,
            auth_file=Path(auth) if auth else None,
            max_message_bytes=env.integer(
                "MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES, minimum=1024
            ),
            shutdown_grace_s=env.number("SHUTDOWN_GRACE_S", 10.0),
            log_level=env.choice("LOG_LEVEL", "INFO", ("debug", "info", "warning", "error")),
            log_json=env.choice("LOG_FORMAT", "text", ("text", "json")) == "json",
        )


@dataclass(frozen=True, kw_only=True)
class ClientSettings:
    """How a service reaches the others: its own credentials and default deadline."""

    service_token: str | None = None
    default_timeout_s: float = 10.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: calls wait (within their deadline) for a peer that is not reachable yet,
    #: instead of failing at once with UNAVAILABLE: services starting together
    #: (from_env sets it); interactive clients keep failing fast
    wait_for_ready: bool = False

    @classmethod
    def from_env(cls, env: Env) -> ClientSettings:
        token_file = env.optional("SERVICE_TOKEN_FILE")
        token = env.optional("SERVICE_TOKEN")
        if token_file is not None:
            try:
                token = Path(token_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"{PREFIX}SERVICE_TOKEN_FILE {token_file!r} is unreadable: {exc}"
                ) from None
        return cls(
            service_token=token,
            default_timeout_s=env.number("RPC_TIMEOUT_S", 10.0, minimum=0.001),
            max_message_bytes=env.integer(
                "MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES, minimum=1024
            ),
            wait_for_ready=True,
        )


@dataclass(frozen=True, kw_only=True)
class NatsSettings:
    """Where NATS is, and the namespace of Stepline's streams on it."""

    url: str
    stream_prefix: str = ""

    @property
    def streams(self) -> Streams:
        return Streams(prefix=self.stream_prefix)

    @classmethod
    def from_env(cls, env: Env) -> NatsSettings:
        url = env.text("NATS_URL")
        if not url.startswith(("nats://", "tls://")):
            raise ConfigError(f"{PREFIX}NATS_URL must start with nats:// or tls://, got {url!r}")
        prefix = env.text("STREAM_PREFIX", "")
        try:
            Streams(prefix=prefix)
        except InvalidArgument as exc:
            raise ConfigError(f"{PREFIX}STREAM_PREFIX: {exc}") from None
        return cls(url=url, stream_prefix=prefix)


def database_url(env: Env) -> str:
    url = env.text("DATABASE_URL")
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{PREFIX}DATABASE_URL must be a postgresql:// URL")
    return url


def service_address(env: Env, name: str) -> str:
    """The ``host:port`` of another Stepline service, e.g. ``LEDGER_ADDR``."""
    value = env.text(name)
    parse_address(value, name=PREFIX + name)
    return value
