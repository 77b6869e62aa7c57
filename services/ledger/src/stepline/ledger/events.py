"""Appending to a run's event log and to the outbox, in the caller's transaction.

Every applied change appends a ``RunEvent`` with the run's next sequence number
and an outbox row holding the protobuf ``Event`` that the relay publishes to
``STEPLINE_EVENTS``. Both are written by the operation that made the change, in
its transaction, so an event exists if and only if its change was committed.
"""

from __future__ import annotations

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
}


@dataclass
class _Pending:
    record: run_pb2.RunEvent
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
        record.time.FromDatetime(datetime.now(UTC))
        self.pending.append(_Pending(record, payload or {}, typed))
        return self.last_sequence

    async def flush(self, conn: asyncpg.Connection) -> None:
        """Write the queued events, their outbox rows and the run's last sequence."""
        if not self.pending:
            return
        events = []
        outbox = []
        for item in self.pending:
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
            event_uuid = uuid.UUID(record.event_id)
            when = record.time.ToDatetime(tzinfo=UTC)
            events.append(
                (
                    record.run_id,
                    record.sequence,
                    event_uuid,
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
            outbox.append((event_uuid, record.run_id, subject, envelope.SerializeToString(), when))
        await conn.executemany(
            "INSERT INTO events (run_id, sequence, event_id, type, actor_id, actor_roles, time,"
            " task_id, chunk_id, payload) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            events,
        )
        await conn.executemany(
            "INSERT INTO outbox (event_id, run_id, subject, body, create_time)"
            " VALUES ($1, $2, $3, $4, $5)",
            outbox,
        )
        await conn.execute(
            "UPDATE runs SET last_sequence = $2, update_time = clock_timestamp() WHERE run_id = $1",
            self.run_id,
            self.last_sequence,
        )
        self.pending.clear()
