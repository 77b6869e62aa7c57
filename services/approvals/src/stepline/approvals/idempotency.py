"""Idempotent mutating RPCs: the response of each ``(method, request_id)`` is kept.

A replay with the same content (same fingerprint) returns the kept response
and changes nothing; a request_id reused with other content is refused with
ABORTED, as common.proto says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import asyncpg
from google.protobuf.message import Message

from stepline.common.errors import Aborted, InvalidArgument

M = TypeVar("M", bound=Message)
MAX_REQUEST_ID = 200


@dataclass(frozen=True)
class RequestKey:
    """One mutating call: its method, request_id and content fingerprint."""

    method: str
    request_id: str
    fingerprint: str

    @classmethod
    def of(cls, method: str, request_id: str, fingerprint: str) -> RequestKey:
        if not request_id.strip():
            raise InvalidArgument("request_id is required (an idempotency key, e.g. a UUID)")
        if len(request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"request_id must be at most {MAX_REQUEST_ID} characters")
        return cls(method, request_id, fingerprint)


async def replayed(conn: asyncpg.Connection, key: RequestKey, response: type[M]) -> M | None:
    """The kept response of ``key``'s request, if it was made before."""
    row = await conn.fetchrow(
        "SELECT fingerprint, response FROM requests WHERE method = $1 AND request_id = $2",
        key.method,
        key.request_id,
    )
    if row is None:
        return None
    if row["fingerprint"] != key.fingerprint:
        raise Aborted(
            f"request_id {key.request_id!r} was already used for a different {key.method} "
            "request; use a new request_id"
        )
    result = response()
    result.ParseFromString(bytes(row["response"]))
    return result


async def remember(conn: asyncpg.Connection, key: RequestKey, response: Message) -> None:
    """Keep ``response`` as the answer to replays of ``key`` (in the caller's transaction)."""
    try:
        await conn.execute(
            "INSERT INTO requests (method, request_id, fingerprint, response)"
            " VALUES ($1, $2, $3, $4)",
            key.method,
            key.request_id,
            key.fingerprint,
            response.SerializeToString(),
        )
    except asyncpg.UniqueViolationError:
        raise Aborted(
            f"request_id {key.request_id!r} is being used by a concurrent {key.method} request; "
            "retry it to get its result"
        ) from None
