"""Webhook signatures, for both directions: HMAC-SHA256 over ``<timestamp>.<body>``.

A signed request carries these headers::

    Stepline-Delivery-Id: <unique id of this delivery>
    Stepline-Timestamp:   <unix seconds>
    Stepline-Event:       <event type>            (outbound only)
    Stepline-Signature:   v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>

A receiver recomputes the signature over the raw body it received, compares it
in constant time, and refuses timestamps too far from its clock (replays of an
old request). ``Stepline-Signature`` may carry several comma-separated
signatures (e.g. during a secret rotation); one valid ``v1`` is enough.
"""

from __future__ import annotations

import hashlib
import hmac
import time

DELIVERY_ID_HEADER = "Stepline-Delivery-Id"
TIMESTAMP_HEADER = "Stepline-Timestamp"
EVENT_HEADER = "Stepline-Event"
SIGNATURE_HEADER = "Stepline-Signature"
SCHEME = "v1"
DEFAULT_TOLERANCE_S = 300.0


class SignatureError(Exception):
    """A request's signature or timestamp is missing, malformed, wrong or stale."""


def _bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def sign(secret: str | bytes, timestamp: int, body: str | bytes) -> str:
    """The ``Stepline-Signature`` value for ``body`` sent at ``timestamp``."""
    message = str(int(timestamp)).encode("ascii") + b"." + _bytes(body)
    digest = hmac.new(_bytes(secret), message, hashlib.sha256).hexdigest()
    return f"{SCHEME}={digest}"


def signed_headers(
    secret: str | bytes,
    body: str | bytes,
    *,
    delivery_id: str,
    event: str | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    """The headers of a signed request (timestamp: now unless given)."""
    when = int(time.time()) if timestamp is None else int(timestamp)
    headers = {
        DELIVERY_ID_HEADER: delivery_id,
        TIMESTAMP_HEADER: str(when),
        SIGNATURE_HEADER: sign(secret, when, body),
    }
    if event is not None:
        headers[EVENT_HEADER] = event
    return headers


def verify(
    secret: str | bytes,
    timestamp: str | int | None,
    body: str | bytes,
    signature: str | None,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> int:
    """Check a signature and its timestamp; returns the timestamp.

    Raises :class:`SignatureError` (saying why, never echoing the secret) if the
    signature is missing or wrong, or the timestamp is not an integer or lies
    more than ``tolerance_s`` from ``now``.
    """
    if timestamp is None or str(timestamp).strip() == "":
        raise SignatureError(f"missing {TIMESTAMP_HEADER}")
    try:
        when = int(str(timestamp).strip())
    except ValueError:
        raise SignatureError(f"{TIMESTAMP_HEADER} must be unix seconds") from None
    if not signature:
        raise SignatureError(f"missing {SIGNATURE_HEADER}")
    expected = sign(secret, when, body)
    candidates = [part.strip() for part in signature.split(",")]
    if not any(hmac.compare_digest(expected, c) for c in candidates if c.startswith("v1=")):
        raise SignatureError("signature does not match")
    current = time.time() if now is None else now
    if abs(current - when) > tolerance_s:
        raise SignatureError(f"{TIMESTAMP_HEADER} is more than {tolerance_s:g}s from now")
    return when
