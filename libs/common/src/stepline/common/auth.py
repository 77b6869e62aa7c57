"""Bearer-token authentication for every Stepline RPC.

Callers send ``authorization: Bearer <token>``. A service knows principals from
an auth file (``STEPLINE_AUTH_FILE``) holding only SHA-256 digests of tokens, so
the file itself grants nothing if read::

    {"principals": [{"id": "admin", "roles": ["admin"], "token_sha256": "<hex>"}]}

Health checks and reflection stay open so that probes need no credentials.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from stepline.common.errors import ConfigError, PermissionDenied, Unauthenticated
from stepline.common.interceptors import wrap_handler
from stepline.common.logs import principal_var

OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a person, a service or an external system."""

    id: str
    roles: frozenset[str] = field(default_factory=frozenset)

    def has_role(self, *roles: str) -> bool:
        return not self.roles.isdisjoint(roles)


_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "stepline_principal", default=None
)


def current_principal() -> Principal:
    """The caller of the RPC being handled; only valid inside a handler."""
    principal = _principal.get()
    if principal is None:
        raise Unauthenticated("no authenticated caller for this call")
    return principal


def require_role(*roles: str) -> Principal:
    """Return the caller if it holds one of ``roles``, else PERMISSION_DENIED."""
    principal = current_principal()
    if not principal.has_role(*roles):
        raise PermissionDenied(f"principal {principal.id!r} needs one of the roles {sorted(roles)}")
    return principal


def new_token() -> str:
    """A fresh random bearer token."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Authenticator:
    """Maps bearer tokens to principals by comparing digests in constant time."""

    def __init__(self, principals: Mapping[str, Principal]) -> None:
        self._by_digest = dict(principals)

    @classmethod
    def from_tokens(cls, tokens: Iterable[tuple[str, Principal]]) -> Authenticator:
        return cls({token_digest(token): principal for token, principal in tokens})

    @classmethod
    def from_file(cls, path: Path) -> Authenticator:
        try:
            document: Any = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"auth file {str(path)!r} is unreadable: {exc}") from None
        entries = document.get("principals") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ConfigError(f"auth file {str(path)!r} needs a 'principals' list")
        principals: dict[str, Principal] = {}
        for index, entry in enumerate(entries):
            where = f"auth file {str(path)!r} principals[{index}]"
            if not isinstance(entry, dict):
                raise ConfigError(f"{where} must be an object")
            pid, digest, roles = entry.get("id"), entry.get("token_sha256"), entry.get("roles", [])
            if not isinstance(pid, str) or not pid:
                raise ConfigError(f"{where}.id must be a non-empty string")
            if not isinstance(digest, str) or len(digest) != 64:
                raise ConfigError(f"{where}.token_sha256 must be a 64-character hex digest")
            if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
                raise ConfigError(f"{where}.roles must be a list of strings")
            principals[digest.lower()] = Principal(pid, frozenset(roles))
        return cls(principals)

    def principals_by_id(self) -> dict[str, Principal]:
        """Every principal by id (the roles of entries sharing an id merged)."""
        roles: dict[str, set[str]] = {}
        for principal in self._by_digest.values():
            roles.setdefault(principal.id, set()).update(principal.roles)
        return {pid: Principal(pid, frozenset(r)) for pid, r in roles.items()}

    @staticmethod
    def write_file(path: Path, entries: Iterable[tuple[str, Principal]]) -> None:
        """Write an auth file for ``(token, principal)`` pairs (digests only)."""
        document = {
            "principals": [
                {"id": p.id, "roles": sorted(p.roles), "token_sha256": token_digest(token)}
                for token, p in entries
            ]
        }
        path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        header = None
        for key, value in metadata or ():
            if key.lower() == "authorization":
                header = value.decode("latin-1") if isinstance(value, bytes) else value
                break
        if header is None:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        presented = token_digest(token.strip())
        for digest, principal in self._by_digest.items():
            if hmac.compare_digest(digest, presented):
                return principal
        raise Unauthenticated("invalid bearer token")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """The one server interceptor: authenticates each call, exposes its principal
    to the handler, and maps every error the handler raises to a gRPC status."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Any,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None:
            return None
        if method.startswith(OPEN_METHOD_PREFIXES):
            return wrap_handler(handler)
        authenticator = self._authenticator
        metadata = handler_call_details.invocation_metadata

        def enter() -> None:
            principal = authenticator.authenticate(metadata)
            _principal.set(principal)
            principal_var.set(principal.id)

        return wrap_handler(handler, before=enter)
