"""Appending to a run's event log and to the outbox, in the caller's transaction.

Every applied change appends a ``RunEvent`` with the run's next sequence number
and an outbox row holding the protobuf ``Event`` that the relay publishes to
``STEPLINE_EVENTS``. Both are written by the operation that made the change, in
its transaction, so an event exists if and only if its change was committed.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from google.protobuf.message import Message

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.events.v1 import events_pb2
from stepline.ledger import convert

E = run_pb2.RunEventType

# Subject kind of each event type: stepline.events.<kind>.<run_id>
_KIND = {
    E.RUN_EVENT_TYPE_RUN_CREATED: "run",
    E.RUN_EVENT_TYPE_RUN_STATE_CHANGED: "run",
    E.RUN_EVENT_TYPE_CLAIMED: "run",
    E.RUN_EVENT_TYPE_CLAIM_RELEASED: "run",
    E.RUN_EVENT_TYPE_DISPATCHED: "run",
    E.RUN_EVENT_TYPE_TASK_STATE_CHANGED: "task",
    E.RUN_EVENT_TYPE_ATTEMPT_RECORDED: "task",
    E.RUN_EVENT_TYPE_CHUNKS_CREATED: "chunk",
    E.RUN_EVENT_TYPE_CHUNK_STATE_CHANGED: "chunk",
    E.RUN_EVENT_TYPE_CONTROL_REQUESTED: "control",
    # Facts about a task's or chunk's record, not a state change. An approval
    # decision goes with its task: kind `approval` is the approvals service's
    # own (ApprovalRequested, ApprovalDecided).
    E.RUN_EVENT_TYPE_ARTIFACT_RECORDED: "task",
    E.RUN_EVENT_TYPE_APPROVAL_DECISION_RECORDED: "task",
}


@dataclass
class _Pending:
    record: run_pb2.RunEvent
    time: datetime
    payload: dict[str, Any]
    typed: tuple[str, Message] | None


@dataclass
class EventLog:
    """The events one operation appends to one run's log."""

    run_id: str
    last_sequence: int
    pending: list[_Pending] = field(default_factory=list)

    def add(
        self,
        type_: int,
        actor: common_pb2.Principal,
        *,
        task_id: str = "",
        chunk_id: str = "",
        payload: dict[str, Any] | None = None,
        typed: tuple[str, Message] | None = None,
    ) -> int:
        """Queue an event; returns its sequence number."""
        self.last_sequence += 1
        record = run_pb2.RunEvent(
            event_id=str(uuid.uuid4()),
            run_id=self.run_id,
            sequence=self.last_sequence,
            type=type_,  # type: ignore[arg-type]
            actor=actor,
            task_id=task_id,
            chunk_id=chunk_id,
            payload=convert.struct(payload),
        )
        now = datetime.now(UTC)
        convert.fill_timestamp(record.time, now)
        self.pending.append(_Pending(record, now, payload or {}, typed))
        return self.last_sequence

    def queued(self) -> list[run_pb2.RunEvent]:
        """The events added and not yet flushed, oldest first."""
        return [item.record for item in self.pending]

    async def flush(
        self,
        conn: asyncpg.Connection,
        *,
        request: Message | None = None,
        response: Message | None = None,
    ) -> None:
        """Write the queued events, their outbox rows, the run's last sequence and,
        given a request, its response for idempotent replays: one statement."""
        events, outbox = event_rows(self)
        await conn.execute(
            _FLUSH_SQL,
            self.run_id,
            events,
            [o[0] for o in outbox],
            [o[2] for o in outbox],
            [o[3] for o in outbox],
            [o[4] for o in outbox],
            self.last_sequence,
            request.DESCRIPTOR.name if request is not None else None,
            getattr(request, "request_id", None),
            fingerprint(request) if request is not None else None,
            response.SerializeToString() if response is not None else None,
        )
        self.pending.clear()


def event_rows(log: EventLog) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The ``events`` rows (in table column order) and outbox rows (event_id, run_id,
    subject, body, create_time) of the events queued in ``log``."""
    events: list[tuple[Any, ...]] = []
    outbox: list[tuple[Any, ...]] = []
    for item in log.pending:
        record = item.record
        envelope = events_pb2.Event(
            event_id=record.event_id,
            run_id=record.run_id,
            sequence=record.sequence,
            time=record.time,
            actor=record.actor,
            record=record,
        )
        if item.typed is not None:
            name, message = item.typed
            getattr(envelope, name).CopyFrom(message)
        when = item.time
        events.append(
            (
                record.run_id,
                record.sequence,
                record.event_id,
                int(record.type),
                record.actor.id,
                list(record.actor.roles),
                when,
                record.task_id or None,
                record.chunk_id or None,
                item.payload,
            )
        )
        subject = f"{_KIND.get(record.type, 'run')}.{record.run_id}"
        outbox.append((record.event_id, record.run_id, subject, envelope.SerializeToString(), when))
    return events, outbox


def fingerprint(request: Message) -> str:
    """A digest of ``request`` without its request_id, to tell replays from conflicts."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


_FLUSH_SQL = """
WITH new_events AS (
    INSERT INTO events (run_id, sequence, event_id, type, actor_id, actor_roles, time,
                        task_id, chunk_id, payload)
    SELECT * FROM unnest($2::events[])
), new_outbox AS (
    INSERT INTO outbox (event_id, run_id, subject, body, create_time)
    SELECT o.event_id, $1, o.subject, o.body, o.create_time
    FROM unnest($3::uuid[], $4::text[], $5::bytea[], $6::timestamptz[])
        AS o(event_id, subject, body, create_time)
), new_request AS (
    INSERT INTO requests (method, request_id, fingerprint, response)
    SELECT $8, $9, $10, $11 WHERE $8::text IS NOT NULL
)
UPDATE runs SET last_sequence = $7,
    update_time = CASE WHEN $7 > last_sequence THEN clock_timestamp() ELSE update_time END
WHERE run_id = $1
"""
