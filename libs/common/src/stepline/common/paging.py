"""Pagination of List RPCs (see common.proto): page sizes and opaque page tokens.

A page token is the position after the last item of a page, as base64url JSON;
clients pass back ``next_page_token`` as given. A token that is not one of ours
is refused with INVALID_ARGUMENT, never read as a position.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from stepline.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_MALFORMED = "page_token is malformed; pass back next_page_token as given"


def page_size(value: int, maximum: int = MAX_PAGE_SIZE) -> int:
    """The page size to serve for a request's ``page_size`` (0: the default)."""
    if value < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(value or DEFAULT_PAGE_SIZE, maximum)


def encode_token(**position: Any) -> str:
    """A page token holding ``position`` (JSON values)."""
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode()


def decode_token(token: str, *keys: str) -> dict[str, Any] | None:
    """The position a page token holds, with exactly ``keys``; None for the first page."""
    if not token:
        return None
    try:
        position = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, TypeError):
        raise InvalidArgument(_MALFORMED) from None
    if not isinstance(position, dict) or set(position) != set(keys):
        raise InvalidArgument(_MALFORMED)
    return position


def decode_value(token: str, key: str, kind: type) -> Any:
    """The single ``key`` of a page token, which must be a ``kind``; None for the first page."""
    position = decode_token(token, key)
    if position is None:
        return None
    if not isinstance(position[key], kind):
        raise InvalidArgument(_MALFORMED)
    return position[key]


def after_position(token: str) -> tuple[datetime, str] | None:
    """The ``(create_time, id)`` position of a page token of a list ordered by
    creation time then id (see :func:`next_token`); None for the first page."""
    position = decode_token(token, "t", "id")
    if position is None:
        return None
    try:
        return datetime.fromisoformat(position["t"]), str(position["id"])
    except (TypeError, ValueError):
        raise InvalidArgument(_MALFORMED) from None


def next_token(rows: Sequence[Mapping[str, Any]], size: int, id_column: str) -> str:
    """The token after the last row of a page of ``size`` rows (fetched with one
    more to tell), ordered by ``create_time`` then ``id_column``; empty at the end."""
    if len(rows) <= size:
        return ""
    last = rows[size - 1]
    return encode_token(t=last["create_time"].isoformat(), id=str(last[id_column]))
