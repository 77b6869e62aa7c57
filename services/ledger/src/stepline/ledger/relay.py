"""The event relay: publishes the ledger's event log to ``STEPLINE_EVENTS``.

Every write of the ledger appends its events to ``events`` in its own
transaction (see :mod:`stepline.ledger.events`), with ``xid``, the appending
transaction. The relay reads the log itself after a cursor kept in
``relay_position``, in ``(xid, run_id, sequence)`` order, publishes each event
as a ``stepline.api.events.v1.Event`` (:func:`~stepline.ledger.events.published_event`)
to ``stepline.events.<kind>.<run_id>``, then moves the cursor past it.

No event is skipped
    Transactions commit in any order, so the relay reads only the events of
    transactions older than every transaction still in progress when it reads
    (``xid < pg_snapshot_xmin(pg_current_snapshot())``): those have all ended,
    and every transaction yet to commit has a larger xid, so its events sort
    after the cursor. An event is thus published once every transaction that
    began writing before its own has ended (milliseconds under load; a long
    writing transaction elsewhere in the cluster holds publication back while it
    runs, and the relay re-reads it every ``held_back_retry_s``, doubling up to
    ``max_held_back_retry_s``, meanwhile).

Exactly-once publication
    Each message carries ``Nats-Msg-Id`` = the event id. The cursor moves only
    past events whose publish was acked, so a crash (or a NATS or database
    error) between the ack and the move leaves them after the cursor and the
    next pass publishes them again; JetStream drops that second copy because it
    holds a message with the same id within its duplicate window
    (``Streams.duplicate_window_s``). No event is ever lost, and the stream
    holds each event once as long as it is re-published within the window after
    its first publish. Beyond the window (a relay stopped for longer between
    the ack and the move) a duplicate can reach the stream, which is why
    consumers still dedupe on ``event_id`` (delivery is at least once).

Order
    A run's events are appended in the order of their transactions' xids: a
    ledger applies a run's shard writes one batch at a time, and a write that
    waited for a run's lock while another transaction (another replica's, or a
    claim applied beside the shards) appended to its log is refused and
    retried (``ledger_check_append_order``; a transition's guard on the run's
    ``last_sequence`` refuses it too). So the cursor's order is each run's
    sequence order. A pass sends its events back to back in that order on the
    relay's one NATS connection, which JetStream stores in the order they
    arrive, then checks their acks in that order: one write and one wait for
    many events (an ack already received is taken without waiting). An event
    that cannot be sent (larger than the server takes) stops its run's sending
    for the pass, and the cursor never moves past an event not sent or not
    acked: the acks after the first such event are not waited for.
    Should two relays ever overlap (a leader that lost its database session
    while a publish was in flight), each still publishes in order and the
    duplicate window keeps only the first copy, so per-run order still holds.

One active relay
    Every ledger replica runs a relay, but only the one that holds a PostgreSQL
    session advisory lock (taken with ``pg_try_advisory_lock`` on a connection
    the relay keeps for itself) publishes; the others retry every poll
    interval. The lock goes with the session: if the leader's process or its
    connection dies, another replica takes over at its next try, from the
    cursor in ``relay_position``.

Wake-up
    The ledger that commits a write wakes its own relay (:meth:`EventRelay.notify`,
    the group committer's ``on_commit``). A relay that is not the leader passes
    the wake-up on with ``NOTIFY stepline_events``, outside any write
    transaction (a NOTIFY inside one would make concurrent commits wait for
    each other). The leader ``LISTEN``s, and also polls every
    ``poll_interval_s``, so a missed notification only delays publication.
    After a wake-up it waits ``min_pass_interval_s`` (5 ms) before reading, so
    that under load one pass (two statements) publishes the events of many
    commits rather than one pass per commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import asyncpg
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.api import Header

from stepline.api.events.v1 import events_pb2
from stepline.common.jetstream import CONTENT_TYPE_HEADER, MSG_ID_HEADER, Streams, content_type
from stepline.ledger.events import published_event, subject_kind

log = logging.getLogger(__name__)

CHANNEL = "stepline_events"
# Advisory lock key: per schema, since advisory locks are per database.
_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtext('stepline:event-relay:' || current_schema()))"
_CURSOR_SQL = "SELECT xid::text AS xid, run_id, sequence FROM relay_position"
# The events after the cursor that are readable (see "No event is skipped"), and
# whether events were committed that are not readable yet, behind an older
# transaction still running (the first row has it, also when no event is).
# The payload comes as JSON text, for published_event, and the event id as text.
# Both parts are index range scans of ``events_relay``, whatever the size of the
# log: max() reads its last entry, and the events are read in its order (the
# ORDER BY names the table's columns: ``xid`` alone would be the text alias,
# whose order is not the cursor's).
_SELECT_SQL = """
SELECT coalesce((SELECT max(xid) FROM events) >= h.horizon, false) AS held_back, e.*
FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon) h
LEFT JOIN LATERAL (
    SELECT ev.xid::text AS xid, ev.run_id, ev.sequence, ev.event_id::text AS event_id, ev.type,
           ev.actor_id, ev.actor_roles, ev.time, ev.task_id, ev.chunk_id,
           ev.payload::text AS payload, ev.envelope
    FROM events ev
    WHERE (ev.xid, ev.run_id, ev.sequence) > ($1::text::xid8, $2::text, $3::bigint)
      AND ev.xid < h.horizon
    ORDER BY ev.xid, ev.run_id, ev.sequence
    LIMIT $4
) e ON true
"""
_ADVANCE_SQL = (
    "UPDATE relay_position SET xid = $1::text::xid8, run_id = $2, sequence = $3,"
    " update_time = clock_timestamp()"
)
_PENDING_SQL = (
    "SELECT count(*) FROM events e, relay_position p"
    " WHERE (e.xid, e.run_id, e.sequence) > (p.xid, p.run_id, p.sequence)"
)
_CONTENT_TYPE = content_type(events_pb2.Event)

Cursor = tuple[str, str, int]  # (xid, run_id, sequence) of the last event published


async def pending_count(pool: asyncpg.Pool) -> int:
    """How many committed events are waiting to be published."""
    count = await pool.fetchval(_PENDING_SQL)
    return int(count)


class EventTooLarge(MaxPayloadError):
    """An event over the NATS server's message limit: it stops its run's events."""

    def __init__(self, event_id: str, size: int, limit: int) -> None:
        super().__init__(event_id, size, limit)
        self.event_id, self.size, self.limit = event_id, size, limit

    def __str__(self) -> str:
        return (
            f"event {self.event_id} is {self.size} bytes with its headers,"
            f" over the NATS server's max_payload of {self.limit}"
        )


def _header_bytes(headers: dict[str, str]) -> int:
    """Size of the NATS header block a client sends for ``headers``."""
    return len("NATS/1.0\r\n\r\n") + sum(len(k) + len(v) + 4 for k, v in headers.items())


class EventRelay:
    """Publishes the ledger's event log to JetStream while it holds the relay lock.

    The relay keeps one connection of ``pool`` (the one holding the lock) from
    its first pass until :meth:`close`; :meth:`run` closes it when it ends. Call
    :meth:`close` (or use ``async with``) when driving :meth:`publish_pending`
    directly, or the pool cannot close.

    ``after_publish``, a test hook, is awaited with the event id after each ack
    and before the cursor moves; raising from it simulates a crash mid-batch.

    ``max_payload`` is the NATS server's limit on a message, headers included
    (the client's ``max_payload``): an event over it is not handed to the
    client at all, whose asynchronous publish would fail only after taking a
    pending-ack slot that it never gives back.
    """

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        streams: Streams,
        batch_size: int = 256,
        poll_interval_s: float = 1.0,
        held_back_retry_s: float = 0.005,
        max_held_back_retry_s: float = 0.1,
        min_pass_interval_s: float = 0.005,
        publish_timeout_s: float = 5.0,
        after_publish: Callable[[str], Awaitable[None]] | None = None,
        max_payload: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._pool = pool
        self._js = js
        self._streams = streams
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.held_back_retry_s = held_back_retry_s
        self.max_held_back_retry_s = max_held_back_retry_s
        self.min_pass_interval_s = min_pass_interval_s
        self.publish_timeout_s = publish_timeout_s
        self._after_publish = after_publish
        self.max_payload = max_payload
        # The headers of every event but its id, as the client sends them: ours,
        # and the expected stream that publish_async adds.
        self._header_base = _header_bytes(
            {
                MSG_ID_HEADER: "",
                CONTENT_TYPE_HEADER: _CONTENT_TYPE,
                Header.EXPECTED_STREAM: streams.events,
            }
        )
        # Subject of an event type, up to the run id: stepline.events.<kind>.
        self._subject_prefixes: dict[int, str] = {}
        self._conn: asyncpg.Connection | None = None
        self._leader = False
        self._cursor: Cursor | None = None  # read from relay_position when leading
        self._held_back = False  # as of the last read
        self._wake = asyncio.Event()  # a notification or a local commit
        self._committed = asyncio.Event()  # a local commit
        self.published = 0  # events published (and passed by the cursor) since start

    @property
    def is_leader(self) -> bool:
        """Whether this relay holds the lock (as of its last pass)."""
        return self._leader and self._conn is not None and not self._conn.is_closed()

    async def __aenter__(self) -> EventRelay:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def notify(self) -> None:
        """This ledger committed a write: publish it (leader) or pass it on (not)."""
        self._committed.set()
        self._wake.set()

    async def close(self) -> None:
        """Give the connection back to the pool, which releases the lock and LISTEN."""
        conn, self._conn, self._leader, self._cursor = self._conn, None, False, None
        if conn is None:
            return
        try:
            if not conn.is_closed():
                await conn.remove_listener(CHANNEL, self._notified)
            # The pool's reset runs pg_advisory_unlock_all() (and UNLISTEN *).
            await self._pool.release(conn)
        except Exception:
            log.warning("event relay: releasing its connection failed", exc_info=True)
            conn.terminate()

    async def try_lead(self) -> bool:
        """Take the relay lock if it is free; returns whether this relay holds it."""
        if self._conn is not None and self._conn.is_closed():
            await self.close()  # the session is gone, and the lock with it
        if self._conn is None:
            conn = await self._pool.acquire()
            try:
                await conn.add_listener(CHANNEL, self._notified)
            except BaseException:
                await self._pool.release(conn)
                raise
            self._conn = conn
        if not self._leader:
            self._leader = bool(await self._conn.fetchval(_LOCK_SQL))
            if self._leader:
                self._cursor = None  # another relay may have moved it
                log.info("event relay: this replica is now the active relay")
        return self._leader

    def _notified(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        self._wake.set()

    async def publish_pending(self) -> int:
        """One pass: publish up to ``batch_size`` events after the cursor.

        The events are sent back to back in the cursor's order (each run's in
        its order), then their acks checked in that order. Returns how many
        events were published and passed by the cursor (0 when another relay
        holds the lock). The cursor moves only past acked events; if a publish
        fails, the cursor moves past the events acked before the first one not
        sent or not acked (in the cursor's order), the rest stay pending (a later
        pass re-publishes them; JetStream drops the copies of those that reached
        the stream), and the error is raised.
        """
        if not await self.try_lead():
            return 0
        conn = self._conn
        assert conn is not None
        if self._cursor is None:
            row = await conn.fetchrow(_CURSOR_SQL)
            self._cursor = (row["xid"], row["run_id"], row["sequence"])
        rows = await conn.fetch(_SELECT_SQL, *self._cursor, self.batch_size)
        self._held_back = rows[0]["held_back"]
        if rows[0]["event_id"] is None:
            return 0
        if conn.is_closed():
            raise ConnectionError("event relay lost its database session")
        sent, failure = await self._send(rows)
        done, ack_failure = await self._await_acks(sent)
        if ack_failure is not None:  # it came before any event not sent
            failure = ack_failure
        if failure is not None:
            # Keep what was acked, so a long outage does not outlive the duplicate
            # window for those events; the failed ones stay pending.
            if done:
                try:
                    await self._advance(conn, rows[done - 1], done)
                except Exception:
                    log.warning("event relay: moving the cursor past %d events failed", done)
            raise failure
        if done:
            await self._advance(conn, rows[done - 1], done)
        return done

    def held_back(self) -> bool:
        """Whether the last pass saw events committed that it could not read yet: a
        transaction older than theirs was still running."""
        return self._held_back

    async def _send(
        self, rows: list[Any]
    ) -> tuple[list[tuple[int, str, asyncio.Future[Any]]], Exception | None]:
        """Send the events in the cursor's order, without waiting (see "Order").

        Returns (index, event id, ack future) of those sent and the first error.
        An event that cannot be sent (too large, connection closed) is not, nor
        any later event of its run.
        """
        sent: list[tuple[int, str, asyncio.Future[Any]]] = []
        failure: Exception | None = None
        stopped: set[str] = set()  # runs with an event not sent
        prefixes = self._subject_prefixes
        publish = self._js.publish_async
        stream = self._streams.events
        limit = self.max_payload
        try:
            for index, row in enumerate(rows):
                run_id = row["run_id"]
                if run_id in stopped:
                    continue
                type_ = row["type"]
                prefix = prefixes.get(type_)
                if prefix is None:
                    prefix = self._streams.subject("events", subject_kind(type_), "")
                    prefixes[type_] = prefix
                event_id = row["event_id"]
                data = published_event(row).SerializeToString()
                headers = {MSG_ID_HEADER: event_id, CONTENT_TYPE_HEADER: _CONTENT_TYPE}
                try:
                    if limit is not None:
                        size = self.message_size(data, event_id)
                        if size > limit:
                            raise EventTooLarge(event_id, size, limit)
                    future = await publish(prefix + run_id, data, stream=stream, headers=headers)
                except Exception as exc:
                    if failure is None:
                        failure = exc
                    if not isinstance(exc, MaxPayloadError):
                        break  # the connection's trouble: every later publish meets it too
                    stopped.add(run_id)
                    continue
                sent.append((index, event_id, future))
        except BaseException:  # cancelled: no ack will be awaited
            for _, _, future in sent:
                future.cancel()
            raise
        return sent, failure

    def message_size(self, data: bytes, event_id: str) -> int:
        """What the server counts against its max_payload for an event: its
        serialised ``data`` and the headers sent with it."""
        return len(data) + self._header_base + len(event_id)

    async def _await_acks(
        self, sent: list[tuple[int, str, asyncio.Future[Any]]]
    ) -> tuple[int, Exception | None]:
        """Check the acks in the cursor's order, up to the first event not sent or not
        acked; returns how many events from the first one were acked, and the error
        that stopped the count, if any. The acks not awaited are cancelled."""
        done = 0
        try:
            for index, event_id, future in sent:
                if index != done:
                    break  # an earlier event was not sent: the cursor stops there
                # An ack that already came needs no timer (most of them: one read
                # from the connection brings many).
                try:
                    if future.done():
                        ack = future.result()
                    else:
                        ack = await asyncio.wait_for(future, self.publish_timeout_s)
                    if ack.duplicate:
                        log.debug("event %s was already in the stream", event_id)
                    if self._after_publish is not None:
                        await self._after_publish(event_id)
                except Exception as exc:
                    return done, exc
                done += 1
        finally:
            for _, _, future in sent:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # retrieved: no "never retrieved" warning
        return done, None

    async def _advance(self, conn: asyncpg.Connection, last: Any, count: int) -> None:
        cursor: Cursor = (last["xid"], last["run_id"], last["sequence"])
        await conn.execute(_ADVANCE_SQL, *cursor)
        self._cursor = cursor
        self.published += count

    async def run(self) -> None:
        """Relay until cancelled: publish what is pending, then wait for a wake-up."""
        retry_s = self.held_back_retry_s
        try:
            while True:
                try:
                    if not await self.try_lead():
                        await self._follow()
                        continue
                    while True:
                        # Cleared before reading, so a wake-up during the pass
                        # makes the wait below return at once.
                        self._wake.clear()
                        self._committed.clear()
                        if await self.publish_pending() < self.batch_size:
                            break
                    if self.held_back():
                        await self._wait(self._wake, retry_s)
                        retry_s = min(retry_s * 2, self.max_held_back_retry_s)
                    else:
                        retry_s = self.held_back_retry_s
                        await self._wait(self._wake, self.poll_interval_s)
                    # Under load every commit wakes the relay: let a few gather,
                    # so that a pass's reads and its cursor's commit serve many.
                    await asyncio.sleep(self.min_pass_interval_s)
                except Exception as exc:
                    log.warning("event relay: %s; retrying in %ss", exc, self.poll_interval_s)
                    if self._conn is not None and self._conn.is_closed():
                        await self.close()
                    await asyncio.sleep(self.poll_interval_s)
        finally:
            await self.close()

    async def _follow(self) -> None:
        """Not the leader: pass this ledger's commits on to the leader until the
        next try for the lock."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.poll_interval_s
        while (left := deadline - loop.time()) > 0:
            if not await self._wait(self._committed, left):
                break
            self._committed.clear()
            if self._conn is not None and not self._conn.is_closed():
                await self._conn.execute("SELECT pg_notify($1, '')", CHANNEL)

    @staticmethod
    async def _wait(event: asyncio.Event, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)
            return True
        return False
