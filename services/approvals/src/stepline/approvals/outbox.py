"""Outboxes: what a committed change still owes to NATS and to the ledger.

A change to a request writes, in its own transaction, the events it causes
(``event_outbox``: ``ApprovalRequested``/``ApprovalDecided``) and, for each
decision, the ledger record (``ledger_outbox``: a ``RecordApprovalDecision``
request). Background loops then drain them, so a crash, a NATS outage or a
ledger outage between the commit and the call delays them but loses nothing:

* :class:`EventPublisher` publishes events in order with ``Nats-Msg-Id`` = the
  event id (JetStream drops a re-publish within its duplicate window) and marks
  them published; one replica at a time (a transaction advisory lock).
* :class:`LedgerRecorder` calls the ledger (idempotent on the decision id),
  retrying transient failures with exponential backoff; a refusal that no
  retry can change (the run or task does not exist, ...) is kept with its error
  and logged, not retried.

Both wake at once when this process commits work (:class:`Pulse`) and poll
every ``poll_s`` for work other replicas or retries leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
from google.protobuf.message import Message
from nats.js import JetStreamContext

from stepline.api.common.v1 import common_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.ledger.v1 import ledger_pb2
from stepline.common.client import rpc
from stepline.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SteplineError,
)
from stepline.common.jetstream import CONTENT_TYPE_HEADER, MSG_ID_HEADER, Streams, content_type

if TYPE_CHECKING:
    from stepline.api.ledger.v1.ledger_pb2_grpc import LedgerServiceAsyncStub

log = logging.getLogger(__name__)

_EVENT_CONTENT_TYPE = content_type(events_pb2.Event)
_EVENTS_LOCK_SQL = (
    "SELECT pg_try_advisory_xact_lock(hashtext('stepline:approvals-events:' || current_schema()))"
)
#: Refusals of the ledger that a retry cannot change (ABORTED: the request_id
#: was used before with other content).
PERMANENT = (InvalidArgument, NotFound, FailedPrecondition, AlreadyExists, Aborted)
LEDGER_INITIAL_BACKOFF_S = 0.5
LEDGER_MAX_BACKOFF_S = 60.0


class Pulse:
    """Wakes the background loops when this process committed work for them."""

    def __init__(self) -> None:
        self._events: list[asyncio.Event] = []

    def listener(self) -> asyncio.Event:
        event = asyncio.Event()
        self._events.append(event)
        return event

    def fire(self) -> None:
        for event in self._events:
            event.set()


def backoff(attempts: int, *, initial_s: float, max_s: float) -> float:
    """Delay after ``attempts`` failed attempts: initial, doubled each time, capped."""
    return float(min(initial_s * 2 ** max(attempts - 1, 0), max_s))


async def drain_forever(
    name: str, step: Callable[[], Awaitable[float]], wake: asyncio.Event, poll_s: float
) -> None:
    """Run ``step`` until cancelled. ``step`` returns how long until it has work
    again (0: at once); the loop waits that long, at most ``poll_s``, or until woken."""
    while True:
        wake.clear()  # before the pass, so a wake-up during it is not lost
        try:
            delay = await step()
        except Exception as exc:
            log.warning("%s: pass failed (%s); retrying in %ss", name, exc, poll_s)
            delay = poll_s
        if delay <= 0:
            await asyncio.sleep(0)
            continue
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
        # cancellation that arrives as the wake-up does, and the loop never stops.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(delay, poll_s)):
                await wake.wait()


# --- writers (in the caller's transaction) ---------------------------------


async def add_event(
    conn: asyncpg.Connection,
    *,
    run_id: str,
    actor: common_pb2.Principal,
    payload: tuple[str, Message],
    now: datetime | None = None,
) -> str:
    """Queue an approval event of ``run_id`` (kind ``approval``); returns its id."""
    event = events_pb2.Event(event_id=str(uuid.uuid4()), run_id=run_id, actor=actor)
    event.time.FromDatetime(now or datetime.now(UTC))
    name, message = payload
    getattr(event, name).CopyFrom(message)
    await conn.execute(
        "INSERT INTO event_outbox (event_id, subject, body) VALUES ($1, $2, $3)",
        uuid.UUID(event.event_id),
        f"approval.{run_id}",
        event.SerializeToString(),
    )
    return event.event_id


async def add_ledger_record(
    conn: asyncpg.Connection, request: ledger_pb2.RecordApprovalDecisionRequest
) -> None:
    """Queue the ledger record of one decision (request_id = the decision id)."""
    await conn.execute(
        "INSERT INTO ledger_outbox (decision_id, request) VALUES ($1, $2)",
        uuid.UUID(request.request_id),
        request.SerializeToString(),
    )


# --- drainers ----------------------------------------------------------------


class EventPublisher:
    """Publishes ``event_outbox`` to ``STEPLINE_EVENTS``, in order."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        streams: Streams,
        batch_size: int = 100,
        publish_timeout_s: float = 5.0,
    ) -> None:
        self._pool = pool
        self._js = js
        self._streams = streams
        self.batch_size = batch_size
        self.publish_timeout_s = publish_timeout_s

    async def publish_pending(self) -> float:
        """One pass; returns 0 if a full batch went out (more may wait), else 1 hour."""
        done: list[int] = []
        failure: Exception | None = None
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(_EVENTS_LOCK_SQL):
                return 3600.0  # another replica is publishing; the poll brings us back
            rows = await conn.fetch(
                "SELECT id, event_id, subject, body FROM event_outbox"
                " WHERE publish_time IS NULL ORDER BY id LIMIT $1",
                self.batch_size,
            )
            for row in rows:
                try:
                    await self._js.publish(
                        self._streams.subject("events", *row["subject"].split(".")),
                        bytes(row["body"]),
                        timeout=self.publish_timeout_s,
                        stream=self._streams.events,
                        headers={
                            MSG_ID_HEADER: str(row["event_id"]),
                            CONTENT_TYPE_HEADER: _EVENT_CONTENT_TYPE,
                        },
                    )
                except Exception as exc:
                    failure = exc  # keep what was acked; the rest stays, in order
                    break
                done.append(row["id"])
            if done:
                await conn.execute(
                    "UPDATE event_outbox SET publish_time = clock_timestamp()"
                    " WHERE id = ANY($1::bigint[])",
                    done,
                )
        if failure is not None:
            raise failure
        return 0.0 if len(rows) >= self.batch_size else 3600.0


class LedgerRecorder:
    """Records decisions in their run's history through the ledger."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        ledger: LedgerServiceAsyncStub,
        call_timeout_s: float = 10.0,
        batch_size: int = 50,
    ) -> None:
        self._pool = pool
        self._ledger = ledger
        self.call_timeout_s = call_timeout_s
        self.batch_size = batch_size

    async def record_due(self) -> float:
        """One pass over due records; returns the seconds until the next is due."""
        rows = await self._pool.fetch(
            "UPDATE ledger_outbox SET attempts = attempts + 1,"
            "   next_attempt_time = clock_timestamp() + $2 * interval '1 second'"
            " WHERE id IN (SELECT id FROM ledger_outbox"
            "   WHERE done_time IS NULL AND NOT given_up AND next_attempt_time <= clock_timestamp()"
            "   ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)"
            " RETURNING id, decision_id, request, attempts",
            self.batch_size,
            self.call_timeout_s + 5.0,  # a lease: a replica that dies mid-call lets go
        )
        by_approval: dict[str, list[tuple[Any, ledger_pb2.RecordApprovalDecisionRequest]]] = {}
        for row in rows:
            request = ledger_pb2.RecordApprovalDecisionRequest()
            request.ParseFromString(bytes(row["request"]))
            by_approval.setdefault(request.approval_id, []).append((row, request))
        # One approval's decisions in order; different approvals concurrently.
        for group in by_approval.values():
            group.sort(key=lambda item: item[0]["id"])
        await asyncio.gather(*(self._record_group(group) for group in by_approval.values()))
        if len(rows) >= self.batch_size:
            return 0.0
        wait = await self._pool.fetchval(
            "SELECT extract(epoch FROM min(next_attempt_time) - clock_timestamp())"
            " FROM ledger_outbox WHERE done_time IS NULL AND NOT given_up"
        )
        return 3600.0 if wait is None else max(float(wait), 0.0)

    async def _record_group(
        self, group: list[tuple[Any, ledger_pb2.RecordApprovalDecisionRequest]]
    ) -> None:
        for row, request in group:
            if not await self._record(row, request):
                break  # later decisions of this approval wait for this one's retry

    async def _record(self, row: Any, request: ledger_pb2.RecordApprovalDecisionRequest) -> bool:
        decision_id, attempts = row["decision_id"], row["attempts"]
        try:
            await rpc(self._ledger.RecordApprovalDecision(request, timeout=self.call_timeout_s))
        except PERMANENT as exc:
            log.error(
                "ledger refused decision %s of approval %s for run %s: %s; not retried",
                decision_id,
                request.approval_id,
                request.run_id,
                exc,
            )
            await self._pool.execute(
                "UPDATE ledger_outbox SET given_up = true, last_error = $2 WHERE decision_id = $1",
                decision_id,
                f"{type(exc).__name__}: {exc}",
            )
            return True
        except SteplineError as exc:
            delay = backoff(
                attempts, initial_s=LEDGER_INITIAL_BACKOFF_S, max_s=LEDGER_MAX_BACKOFF_S
            )
            log.warning(
                "recording decision %s in the ledger failed (attempt %d: %s); retry in %.1fs",
                decision_id,
                attempts,
                exc,
                delay,
            )
            await self._pool.execute(
                "UPDATE ledger_outbox SET last_error = $2,"
                " next_attempt_time = clock_timestamp() + $3 * interval '1 second'"
                " WHERE decision_id = $1",
                decision_id,
                f"{type(exc).__name__}: {exc}",
                delay,
            )
            return False
        await self._pool.execute(
            "UPDATE ledger_outbox SET done_time = clock_timestamp(), last_error = ''"
            " WHERE decision_id = $1",
            decision_id,
        )
        return True
