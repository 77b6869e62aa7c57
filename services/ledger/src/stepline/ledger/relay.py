"""The outbox relay: publishes committed events from ``outbox`` to ``STEPLINE_EVENTS``.

Every write of the ledger appends its events and their outbox rows in its own
transaction (see :mod:`stepline.ledger.events`). The relay reads the rows that
are not yet published, in ``id`` order, publishes each body (a serialized
``stepline.api.events.v1.Event``) to ``stepline.events.<kind>.<run_id>`` and
then sets ``publish_time``.

Exactly-once publication
    Each message carries ``Nats-Msg-Id`` = the event id. A row is marked
    published only after JetStream acked its publish, so a crash (or a NATS or
    database error) between the ack and the mark leaves the row unpublished and
    the next pass publishes it again; JetStream drops that second copy because
    it holds a message with the same id within its duplicate window
    (``Streams.duplicate_window_s``). No row is ever lost, and the stream holds
    each event once as long as a row is re-published within the window after
    its first publish. Beyond the window (a relay stopped for longer between
    the ack and the mark) a duplicate can reach the stream, which is why
    consumers still dedupe on ``event_id`` (delivery is at least once).

Order
    A run's rows are published one at a time, in ``id`` order, each ack
    awaited before the next publish; different runs are published
    concurrently. The events of one run are committed in ``id`` order (a run's
    writes are applied one batch at a time, guarded by its ``last_sequence``),
    so the stream holds each run's events in sequence order.
    Should two relays ever overlap (a leader
    that lost its database session while a publish was in flight), each still
    publishes in ``id`` order and the duplicate window keeps only the first
    copy, so per-run order still holds.

One active relay
    Every ledger replica runs a relay, but only the one that holds a PostgreSQL
    session advisory lock (taken with ``pg_try_advisory_lock`` on a connection
    the relay keeps for itself) publishes; the others retry every poll
    interval. The lock goes with the session: if the leader's process or its
    connection dies, another replica takes over at its next try.

Wake-up
    The leader ``LISTEN``s on ``stepline_outbox`` (notified by a trigger when
    outbox rows are committed) and also polls every ``poll_interval_s``, so a
    missed notification only delays publication.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import asyncpg
from nats.js import JetStreamContext

from stepline.api.events.v1 import events_pb2
from stepline.common.jetstream import CONTENT_TYPE_HEADER, MSG_ID_HEADER, Streams

log = logging.getLogger(__name__)

CHANNEL = "stepline_outbox"
# Advisory lock key: per schema, since advisory locks are per database.
_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtext('stepline:outbox-relay:' || current_schema()))"
_SELECT_SQL = (
    "SELECT id, event_id, run_id, subject, body FROM outbox"
    " WHERE publish_time IS NULL ORDER BY id LIMIT $1"
)
_MARK_SQL = "UPDATE outbox SET publish_time = clock_timestamp() WHERE id = ANY($1::bigint[])"
_CONTENT_TYPE = f"application/protobuf; proto={events_pb2.Event.DESCRIPTOR.full_name}"


async def pending_count(pool: asyncpg.Pool) -> int:
    """How many outbox rows are waiting to be published."""
    count = await pool.fetchval("SELECT count(*) FROM outbox WHERE publish_time IS NULL")
    return int(count)


class OutboxRelay:
    """Publishes the ledger's outbox to JetStream while it holds the relay lock.

    The relay keeps one connection of ``pool`` (the one holding the lock) from
    its first pass until :meth:`close`; :meth:`run` closes it when it ends. Call
    :meth:`close` (or use ``async with``) when driving :meth:`publish_pending`
    directly, or the pool cannot close.

    ``after_publish``, a test hook, is awaited with the row id after each ack and
    before the row is marked; raising from it simulates a crash mid-batch.
    """

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        streams: Streams,
        batch_size: int = 256,
        poll_interval_s: float = 1.0,
        publish_timeout_s: float = 5.0,
        after_publish: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._pool = pool
        self._js = js
        self._streams = streams
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.publish_timeout_s = publish_timeout_s
        self._after_publish = after_publish
        self._conn: asyncpg.Connection | None = None
        self._leader = False
        self._wake = asyncio.Event()
        self.published = 0  # rows published (and marked) since start, for metrics

    @property
    def is_leader(self) -> bool:
        """Whether this relay holds the lock (as of its last pass)."""
        return self._leader and self._conn is not None and not self._conn.is_closed()

    async def __aenter__(self) -> OutboxRelay:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Give the connection back to the pool, which releases the lock and LISTEN."""
        conn, self._conn, self._leader = self._conn, None, False
        if conn is None:
            return
        try:
            if not conn.is_closed():
                await conn.remove_listener(CHANNEL, self._notified)
            # The pool's reset runs pg_advisory_unlock_all() (and UNLISTEN *).
            await self._pool.release(conn)
        except Exception:
            log.warning("outbox relay: releasing its connection failed", exc_info=True)
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
                log.info("outbox relay: this replica is now the active relay")
        return self._leader

    def _notified(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        self._wake.set()

    async def publish_pending(self) -> int:
        """One pass: publish up to ``batch_size`` unpublished rows.

        Rows of one run are published one at a time in ``id`` order, each ack
        awaited before the next; different runs are published concurrently.
        Returns how many rows were published and marked (0 when another relay
        holds the lock). Rows are marked only after their publish was acked; if
        a publish fails, the rows acked are marked, the failed row and the later
        rows of its run stay pending, and the error is raised.
        """
        if not await self.try_lead():
            return 0
        conn = self._conn
        assert conn is not None
        rows = await conn.fetch(_SELECT_SQL, self.batch_size)
        by_run: dict[str, list[Any]] = {}
        for row in rows:
            by_run.setdefault(row["run_id"], []).append(row)
        done: list[int] = []
        results = await asyncio.gather(
            *(self._publish_run(conn, run_rows, done) for run_rows in by_run.values()),
            return_exceptions=True,
        )
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None and not isinstance(failure, Exception):
            raise failure  # cancelled, or the process is going down: mark nothing
        if failure is not None:
            # Keep what was acked, so a long outage does not outlive the duplicate
            # window for those rows; the failed rows stay pending.
            if done:
                try:
                    await self._mark(conn, done)
                except Exception:
                    log.warning("outbox relay: marking %d acked rows failed", len(done))
            raise failure
        if done:
            await self._mark(conn, done)
        return len(done)

    async def _publish_run(
        self, conn: asyncpg.Connection, rows: list[Any], done: list[int]
    ) -> None:
        for row in rows:
            if conn.is_closed():
                raise ConnectionError("outbox relay lost its database session")
            subject = self._streams.subject("events", *row["subject"].split("."))
            ack = await self._js.publish(
                subject,
                bytes(row["body"]),
                timeout=self.publish_timeout_s,
                stream=self._streams.events,
                headers={
                    MSG_ID_HEADER: str(row["event_id"]),
                    CONTENT_TYPE_HEADER: _CONTENT_TYPE,
                },
            )
            if ack.duplicate:
                log.debug("outbox row %d was already in the stream", row["id"])
            if self._after_publish is not None:
                await self._after_publish(row["id"])
            done.append(row["id"])

    async def _mark(self, conn: asyncpg.Connection, ids: list[int]) -> None:
        await conn.execute(_MARK_SQL, ids)
        self.published += len(ids)

    async def run(self) -> None:
        """Relay until cancelled: drain the outbox, then wait for NOTIFY or the poll."""
        try:
            while True:
                try:
                    if not await self.try_lead():
                        await asyncio.sleep(self.poll_interval_s)
                        continue
                    while True:
                        # Cleared before reading, so a NOTIFY during the pass
                        # makes the wait below return at once.
                        self._wake.clear()
                        if await self.publish_pending() < self.batch_size:
                            break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
                except Exception as exc:
                    log.warning("outbox relay: %s; retrying in %ss", exc, self.poll_interval_s)
                    if self._conn is not None and self._conn.is_closed():
                        await self.close()
                    await asyncio.sleep(self.poll_interval_s)
        finally:
            await self.close()
