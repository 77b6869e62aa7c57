"""Outbound webhooks: POSTs each PENDING delivery until its subscriber answers 2xx.

A pass claims the deliveries that are due (``FOR UPDATE SKIP LOCKED``, then
their next attempt is pushed past the request timeout, so another replica
leaves them alone while this one tries and takes them over if this one dies),
POSTs them concurrently, and records every attempt in ``delivery_attempts``
(time, status code, error, duration). A 2xx answer makes the delivery
DELIVERED; anything else schedules the next attempt after an exponential
backoff, until ``max_attempts`` attempts make it FAILED. Receivers dedupe on
``Stepline-Delivery-Id``: a delivery whose answer was lost is sent again.

Neither secrets nor signatures nor URLs (which may hold tokens) are logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from stepline.api.approvals.v1 import approvals_pb2 as pb
from stepline.approvals.config import WebhookSettings
from stepline.approvals.outbox import backoff
from stepline.approvals.secret_store import SecretStore
from stepline.approvals.signing import signed_headers
from stepline.approvals.subscriptions import event_type_name

log = logging.getLogger(__name__)

USER_AGENT = "stepline-approvals/1"
MAX_ERROR = 500

_CLAIM_SQL = """
UPDATE deliveries d SET next_attempt_time = clock_timestamp() + $2 * interval '1 second'
FROM subscriptions s
WHERE s.subscription_id = d.subscription_id
  AND d.delivery_id IN (
      SELECT delivery_id FROM deliveries
      WHERE state = 1 AND next_attempt_time <= clock_timestamp()
      ORDER BY next_attempt_time LIMIT $1 FOR UPDATE SKIP LOCKED)
RETURNING d.delivery_id, d.subscription_id, d.event_type, d.body, d.attempts,
          s.url, s.secret_ref
"""

_RECORD_SQL = """
WITH updated AS (
    UPDATE deliveries SET attempts = attempts + 1, last_status_code = $2, last_error = $3,
        last_attempt_time = $4, state = $5, next_attempt_time = $6
    WHERE delivery_id = $1 AND state = 1
    RETURNING attempts
)
INSERT INTO delivery_attempts (delivery_id, attempt_number, attempt_time, status_code,
                               error, duration_ms)
SELECT $1, attempts, $4, $2, $3, $7 FROM updated
ON CONFLICT DO NOTHING
"""


class WebhookSender:
    """Delivers due webhooks; :meth:`deliver_due` is one pass."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        secrets: SecretStore,
        settings: WebhookSettings,
        client: httpx.AsyncClient,
        batch_size: int = 32,
    ) -> None:
        self._pool = pool
        self._secrets = secrets
        self._settings = settings
        self._client = client
        self.batch_size = batch_size

    async def deliver_due(self) -> float:
        """Attempt the due deliveries; returns the seconds until the next is due."""
        rows = await self._pool.fetch(_CLAIM_SQL, self.batch_size, self._settings.timeout_s + 5.0)
        await asyncio.gather(*(self._attempt(row) for row in rows))
        if len(rows) >= self.batch_size:
            return 0.0
        wait = await self._pool.fetchval(
            "SELECT extract(epoch FROM min(next_attempt_time) - clock_timestamp())"
            " FROM deliveries WHERE state = 1"
        )
        return 3600.0 if wait is None else max(float(wait), 0.0)

    async def _attempt(self, row: Any) -> None:
        try:
            await self._attempt_once(row)
        except Exception:
            # The claim lapses and a later pass tries again; others go on.
            log.exception("delivery %s: recording the attempt failed", row["delivery_id"])

    async def _attempt_once(self, row: Any) -> None:
        delivery_id = str(row["delivery_id"])
        attempt = row["attempts"] + 1
        started = datetime.now(UTC)
        clock = time.monotonic()
        status, error = await self._post(row, delivery_id)
        duration_ms = (time.monotonic() - clock) * 1000.0
        if 200 <= status < 300:
            state, next_time = pb.DELIVERY_STATE_DELIVERED, None
        elif attempt >= self._settings.max_attempts:
            state, next_time = pb.DELIVERY_STATE_FAILED, None
        else:
            delay = backoff(
                attempt,
                initial_s=self._settings.initial_backoff_s,
                max_s=self._settings.max_backoff_s,
            )
            state, next_time = pb.DELIVERY_STATE_PENDING, started + timedelta(seconds=delay)
        await self._pool.execute(
            _RECORD_SQL,
            row["delivery_id"],
            status,
            error,
            started,
            state,
            next_time,
            duration_ms,
        )
        outcome = pb.DeliveryState.Name(state)
        if state == pb.DELIVERY_STATE_DELIVERED:
            log.info("delivery %s (attempt %d) delivered", delivery_id, attempt)
        else:
            log.warning(
                "delivery %s to subscription %s, attempt %d: %s; now %s",
                delivery_id,
                row["subscription_id"],
                attempt,
                error or f"HTTP {status}",
                outcome,
            )

    async def _post(self, row: Any, delivery_id: str) -> tuple[int, str]:
        """POST one delivery; returns (status code or 0, error text or '')."""
        secret = self._secrets.get(row["secret_ref"])
        if secret is None:
            return 0, f"secret {row['secret_ref']!r} is not in the secrets file"
        body: str = row["body"]
        headers = signed_headers(
            secret,
            body,
            delivery_id=delivery_id,
            event=event_type_name(row["event_type"]),
        )
        headers["Content-Type"] = "application/json"
        headers["User-Agent"] = USER_AGENT
        try:
            response = await self._client.post(
                row["url"],
                content=body.encode("utf-8"),
                headers=headers,
                timeout=self._settings.timeout_s,
            )
        except httpx.TimeoutException:
            return 0, f"timed out after {self._settings.timeout_s:g}s"
        except httpx.HTTPError as exc:
            return 0, _short(f"{type(exc).__name__}: {exc}")
        if 200 <= response.status_code < 300:
            return response.status_code, ""
        return response.status_code, _short(f"HTTP {response.status_code}")


def _short(text: str) -> str:
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 3] + "..."
