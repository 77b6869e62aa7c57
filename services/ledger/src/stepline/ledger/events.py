"""Appending to a run's event log, in the caller's transaction.

Every applied change appends ``RunEvent`` rows with the run's next sequence
numbers, written by the operation that made the change, in its transaction, so
an event exists if and only if its change was committed. The relay
(:mod:`stepline.ledger.relay`) publishes the log itself to ``STEPLINE_EVENTS``:
each row becomes a protobuf ``Event`` (:func:`published_event`) whose typed
payload, if any, the row keeps in ``envelope``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from google.protobuf.message import Message

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.events.v1 import events_pb2
from stepline.common.requests import fingerprint
from stepline.ledger import convert

E = run_pb2.RunEventType

# Subject kind of each event type: stepline.events.<kind>.<run_id>
_KIND: dict[int, str] = {
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


# Columns of ``events`` in table order: each queued event is a row of the
# composite type ``events`` (xid is left NULL there: the insert lists the other
# columns, so the column default, the writing transaction, applies).
EVENT_COLUMNS = (
    "run_id",
    "sequence",
    "event_id",
    "type",
    "actor_id",
    "actor_roles",
    "time",
    "task_id",
    "chunk_id",
    "payload",
    "xid",
    "envelope",
    "request_fingerprint",
    "response",
)
_STORED_COLUMNS = ", ".join(c for c in EVENT_COLUMNS if c != "xid")
_FINGERPRINT = EVENT_COLUMNS.index("request_fingerprint")
_RESPONSE = EVENT_COLUMNS.index("response")


def insert_events(param: str, *, where: str = "") -> str:
    """SQL that appends the events of ``param``, an ``events[]`` parameter of
    :meth:`EventLog.event_rows` (``where``: a condition on appending them)."""
    condition = f" WHERE {where}" if where else ""
    return (
        f"INSERT INTO events ({_STORED_COLUMNS})"
        f" SELECT {_STORED_COLUMNS} FROM unnest({param}::events[]){condition}"
    )


# uuid.uuid4() and uuid.uuid5() as text, without building UUID objects (several
# microseconds each, on the hot path): the version and variant bits set by hand.
_VERSION_BITS = ~(0xF000 << 64 | 0xC000 << 48)
_V4 = 0x4000 << 64 | 0x8000 << 48
_V5 = 0x5000 << 64 | 0x8000 << 48


def _uuid_text(value: int) -> str:
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def random_id() -> str:
    """A random (version 4) UUID, as ``str(uuid.uuid4())``."""
    return _uuid_text(int.from_bytes(os.urandom(16)) & _VERSION_BITS | _V4)


def name_based_id(namespace: uuid.UUID, name: str) -> str:
    """A name-based (version 5) UUID, as ``str(uuid.uuid5(namespace, name))``."""
    digest = hashlib.sha1(namespace.bytes + name.encode()).digest()[:16]
    return _uuid_text(int.from_bytes(digest) & _VERSION_BITS | _V5)


def subject_kind(type_: int) -> str:
    """The ``<kind>`` of an event's subject, ``stepline.events.<kind>.<run_id>``."""
    return _KIND.get(type_, "run")


@dataclass
class EventLog:
    """The events one operation appends to one run's log.

    ``first_event_id``, if given, is the id of the first event added (a task or
    chunk transition derives it from its request, see :mod:`stepline.ledger.unit`);
    the others get random ids.
    """

    run_id: str
    last_sequence: int
    first_event_id: str | None = None
    rows: list[list[Any]] = field(default_factory=list)

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
        """Queue an event; returns its sequence number. ``typed`` names the field of
        ``stepline.api.events.v1.Event`` that the published event carries, if any."""
        self.last_sequence += 1
        event_id = self.first_event_id if not self.rows and self.first_event_id else None
        envelope = None
        if typed is not None:
            holder = events_pb2.Event()
            getattr(holder, typed[0]).CopyFrom(typed[1])
            envelope = holder.SerializeToString()
        self.rows.append(
            [
                self.run_id,
                self.last_sequence,
                event_id or random_id(),
                type_,
                actor.id,
                list(actor.roles),
                datetime.now(UTC),
                task_id or None,
                chunk_id or None,
                payload or {},
                None,
                envelope,
                None,
                None,
            ]
        )
        return self.last_sequence

    def record_request(self, fingerprint_: str, response: bytes) -> None:
        """Keep an idempotency record (request fingerprint, response) on the first event."""
        first = self.rows[0]
        first[_FINGERPRINT] = fingerprint_
        first[_RESPONSE] = response

    def queued(self) -> list[run_pb2.RunEvent]:
        """The events added and not yet flushed, oldest first."""
        return [convert.event(dict(zip(EVENT_COLUMNS, row, strict=True))) for row in self.rows]

    def event_rows(self) -> list[tuple[Any, ...]]:
        """The queued events as rows of the composite type ``events``."""
        return [tuple(row) for row in self.rows]

    async def flush(
        self,
        conn: asyncpg.Connection,
        *,
        request: Message | None = None,
        response: Message | None = None,
    ) -> None:
        """Write the queued events, the run's last sequence and, given a request, its
        response for idempotent replays: one statement."""
        first_sequence = self.rows[0][1] if self.rows else 0
        await conn.execute(
            _FLUSH_SQL,
            self.run_id,
            self.event_rows(),
            self.last_sequence,
            request.DESCRIPTOR.name if request is not None else None,
            getattr(request, "request_id", None),
            fingerprint(request) if request is not None else None,
            response.SerializeToString() if response is not None else None,
            first_sequence - 1,
        )
        self.rows.clear()


def published_event(row: Any) -> events_pb2.Event:
    """The ``stepline.api.events.v1.Event`` the relay publishes for an ``events`` row,
    read with its ``payload`` as JSON text (``payload::text``)."""
    envelope = row["envelope"]
    if envelope:
        event = events_pb2.Event.FromString(envelope)
        event.ClearField("record")  # an old outbox body carries one: the row's replaces it
    else:
        event = events_pb2.Event()
    record = event.record
    convert.fill_event(record, row)
    record.payload.MergeFromString(payload_struct(row["payload"]))
    event.event_id = record.event_id
    event.run_id = record.run_id
    event.sequence = record.sequence
    event.time.CopyFrom(record.time)
    event.actor.CopyFrom(record.actor)
    return event


def payload_struct(text: str) -> bytes:
    """An event's payload, JSON text, as a serialized ``google.protobuf.Struct``:
    those of ``convert.struct(json.loads(text))``. A run's events repeat a few
    payloads (``{"from_state": "PENDING", "to_state": "RUNNING", ...}``), so short
    ones are remembered: building a Struct from a dict is slow (pure Python),
    parsing its bytes is not."""
    if len(text) <= _CACHED_PAYLOAD_CHARS:
        return _cached_payload_struct(text)
    return _payload_struct(text)


def _payload_struct(text: str) -> bytes:
    return convert.struct(json.loads(text)).SerializeToString()


_CACHED_PAYLOAD_CHARS = 512
_cached_payload_struct = functools.lru_cache(maxsize=1024)(_payload_struct)


# Appends a run's events. An event appended by a newer transaction than this
# one (another ledger replica's, committed while this one waited for the run's
# lock) makes it fail with serialization_failure, to be retried: the relay
# publishes in transaction order, so a run's events must be appended in it too.
_FLUSH_SQL = f"""
WITH new_events AS (
    {insert_events("$2")}
), new_request AS (
    INSERT INTO requests (method, request_id, fingerprint, response)
    SELECT $4, $5, $6, $7 WHERE $4::text IS NOT NULL
)
UPDATE runs SET last_sequence = $3,
    update_time = CASE WHEN $3 > last_sequence THEN clock_timestamp() ELSE update_time END
WHERE run_id = $1 AND (cardinality($2::events[]) = 0 OR ledger_check_append_order($1, $8))
"""
