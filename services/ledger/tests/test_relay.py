"""The event relay against a real PostgreSQL and nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import asyncpg
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.events.v1 import events_pb2
from stepline.common.db import create_pool, load_migrations
from stepline.common.jetstream import MSG_ID_HEADER, Streams, ensure_streams
from stepline.common.testing import eventually
from stepline.ledger.events import EventLog
from stepline.ledger.relay import EventRelay, pending_count

from .conftest import ACTOR, Ledger, move_task, running_run

R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState
E = run_pb2.RunEventType

# Subject kind of each event type (stepline.events.<kind>.<run_id>), per events.proto.
KIND = {
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
    E.RUN_EVENT_TYPE_ARTIFACT_RECORDED: "task",
    E.RUN_EVENT_TYPE_APPROVAL_DECISION_RECORDED: "task",
}


async def _js(nats_client: NATS, streams: Streams) -> JetStreamContext:
    js = nats_client.jetstream()
    await ensure_streams(js, streams)
    return js


async def _stream_messages(js: JetStreamContext, streams: Streams) -> int:
    info = await js.stream_info(streams.events)
    return int(info.state.messages)


async def _read_stream(
    js: JetStreamContext, streams: Streams
) -> list[tuple[str, str, events_pb2.Event]]:
    """Every message of the events stream: (subject, Nats-Msg-Id, Event), in stream order."""
    info = await js.stream_info(streams.events)
    result = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(streams.events, seq)
        assert msg.subject is not None and msg.data is not None and msg.headers is not None
        result.append(
            (msg.subject, msg.headers[MSG_ID_HEADER], events_pb2.Event.FromString(msg.data))
        )
    return result


async def _event_ids(ledger: Ledger) -> set[str]:
    rows = await ledger.pool.fetch("SELECT event_id FROM events")
    return {str(row["event_id"]) for row in rows}


async def _drain(relay: EventRelay) -> int:
    total = 0
    while (count := await relay.publish_pending()) > 0:
        total += count
    return total


async def test_every_event_is_published_once_in_run_order(
    ledger: Ledger, nats_client: NATS, streams: Streams
) -> None:
    js = await _js(nats_client, streams)
    first, epoch1 = await running_run(ledger, "req-1")
    second, epoch2 = await running_run(ledger, "req-2")
    for step in ("a", "b"):  # interleave the two runs' writes
        for run_id, epoch in ((first, epoch1), (second, epoch2)):
            await move_task(ledger, run_id, epoch, step, T.TASK_RUN_STATE_RUNNING)
            await move_task(ledger, run_id, epoch, step, T.TASK_RUN_STATE_SUCCEEDED)
    total = await pending_count(ledger.pool)
    assert total > 10

    async with EventRelay(pool=ledger.pool, js=js, streams=streams, batch_size=4) as relay:
        assert await _drain(relay) == total
        assert relay.published == total
        assert await relay.publish_pending() == 0
    assert await pending_count(ledger.pool) == 0
    cursor = await ledger.pool.fetchrow("SELECT run_id, sequence FROM relay_position")
    last = await ledger.pool.fetchrow(
        "SELECT run_id, sequence FROM events ORDER BY xid DESC, run_id DESC, sequence DESC LIMIT 1"
    )
    assert tuple(cursor) == tuple(last)

    messages = await _read_stream(js, streams)
    assert len(messages) == total
    for run_id in (first, second):
        rows = await ledger.pool.fetch(
            "SELECT sequence, event_id, type FROM events WHERE run_id = $1 ORDER BY sequence",
            run_id,
        )
        published = [m for m in messages if m[2].run_id == run_id]
        assert [e.record.sequence for _, _, e in published] == list(range(1, len(rows) + 1))
        assert [e.sequence for _, _, e in published] == [row["sequence"] for row in rows]
        for (subject, msg_id, event), row in zip(published, rows, strict=True):
            assert event.event_id == msg_id == event.record.event_id == str(row["event_id"])
            assert event.record.type == row["type"]
            assert event.record.run_id == run_id
            assert subject == streams.subject("events", KIND[row["type"]], run_id)
            assert event.time == event.record.time and event.actor == event.record.actor
            if row["type"] == E.RUN_EVENT_TYPE_TASK_STATE_CHANGED:
                # The typed payload travels too.
                assert event.WhichOneof("payload") == "task_state_changed"
                assert event.task_state_changed.task_id == event.record.task_id
                to_state = T.Name(event.task_state_changed.to_state)
                assert to_state == "TASK_RUN_STATE_" + event.record.payload["to_state"]
            if row["type"] == E.RUN_EVENT_TYPE_RUN_CREATED:
                assert event.run_state_changed.to_state == R.WORKFLOW_RUN_STATE_PENDING
    assert {m[1] for m in messages} == await _event_ids(ledger)


class Crash(BaseException):
    """Like a killed process: nothing runs after it (the relay marks nothing)."""


class Boom(Exception):
    """An error: the relay marks the rows acked before it, then re-raises."""


@pytest.mark.parametrize("error", [Crash, Boom])
async def test_crash_between_publish_and_mark(
    ledger: Ledger, nats_client: NATS, streams: Streams, error: type[BaseException]
) -> None:
    js = await _js(nats_client, streams)
    run_id, epoch = await running_run(ledger, "req-1")
    await move_task(ledger, run_id, epoch, "a", T.TASK_RUN_STATE_RUNNING)
    total = await pending_count(ledger.pool)
    assert total >= 5
    crash_after = 3
    acked: list[str] = []

    async def hook(event_id: str) -> None:
        acked.append(event_id)
        if len(acked) == crash_after:
            raise error("crash after the ack, before the mark")

    async with EventRelay(pool=ledger.pool, js=js, streams=streams, after_publish=hook) as crashing:
        with pytest.raises(error):
            await crashing.publish_pending()
    # The run's events were sent back to back: all reached the stream, and
    # the cursor moved past none (Crash) or past those acked before the error.
    assert await _stream_messages(js, streams) == total
    marked = 0 if error is Crash else crash_after - 1
    assert await pending_count(ledger.pool) == total - marked

    async with EventRelay(pool=ledger.pool, js=js, streams=streams) as fresh:
        assert await fresh.publish_pending() == total - marked
    assert await pending_count(ledger.pool) == 0
    messages = await _read_stream(js, streams)
    assert len(messages) == total  # the re-published rows were deduplicated
    assert {msg_id for _, msg_id, _ in messages} == await _event_ids(ledger)
    assert [e.record.sequence for _, _, e in messages] == list(range(1, total + 1))


async def test_only_one_relay_publishes(
    ledger: Ledger, nats_client: NATS, streams: Streams
) -> None:
    js = await _js(nats_client, streams)
    run_id, epoch = await running_run(ledger, "req-1")
    async with (
        EventRelay(pool=ledger.pool, js=js, streams=streams) as one,
        EventRelay(pool=ledger.pool, js=js, streams=streams) as two,
    ):
        assert await one.publish_pending() > 0
        assert one.is_leader
        await move_task(ledger, run_id, epoch, "a", T.TASK_RUN_STATE_RUNNING)
        waiting = await pending_count(ledger.pool)
        assert waiting > 0
        assert await two.publish_pending() == 0
        assert not two.is_leader
        assert await pending_count(ledger.pool) == waiting

        await one.close()  # the leader goes away: its lock goes with its session
        assert await two.publish_pending() == waiting
        assert two.is_leader
        assert await one.publish_pending() == 0  # a new session, the lock is taken
        assert not one.is_leader
    assert await pending_count(ledger.pool) == 0
    assert {m[1] for m in await _read_stream(js, streams)} == await _event_ids(ledger)


async def _run_until_cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_run_wakes_on_commits_here_and_in_other_replicas(
    ledger: Ledger, nats_client: NATS, streams: Streams
) -> None:
    js = await _js(nats_client, streams)
    run_id, epoch = await running_run(ledger, "req-1")
    # Poll intervals far beyond the test's timeouts: only wake-ups can wake them.
    leader = EventRelay(pool=ledger.pool, js=js, streams=streams, poll_interval_s=600)
    follower = EventRelay(pool=ledger.pool, js=js, streams=streams, poll_interval_s=600)
    # Counted before the relay starts: its first pass may move the cursor at once.
    before = await pending_count(ledger.pool)
    assert before > 0
    leading = asyncio.create_task(leader.run())
    following: asyncio.Task[None] | None = None
    try:

        async def drained() -> bool:
            return await _stream_messages(js, streams) == before

        await eventually(drained, what="the first pass")
        await eventually(lambda: _zero(ledger), what="the cursor to move")
        assert leader.is_leader

        # This ledger's commits wake its relay...
        ledger.store.committer.on_commit = leader.notify
        await move_task(ledger, run_id, epoch, "a", T.TASK_RUN_STATE_RUNNING)
        total = len(await _event_ids(ledger))
        assert total > before

        async def published() -> bool:
            return await _stream_messages(js, streams) == len(await _event_ids(ledger))

        await eventually(published, what="the pass after a local commit")
        await eventually(lambda: _zero(ledger), what="the cursor to move")

        # ...and a replica whose relay does not lead passes its commits on (NOTIFY).
        following = asyncio.create_task(follower.run())
        ledger.store.committer.on_commit = follower.notify
        await move_task(ledger, run_id, epoch, "a", T.TASK_RUN_STATE_SUCCEEDED)
        assert len(await _event_ids(ledger)) > total
        await eventually(published, what="the pass after another replica's commit")
        await eventually(lambda: _zero(ledger), what="the cursor to move")
        assert not follower.is_leader
    finally:
        ledger.store.committer.on_commit = None
        if following is not None:
            await _run_until_cancelled(following)
        await _run_until_cancelled(leading)
    assert not leader.is_leader  # run() gave its connection (and the lock) back
    async with EventRelay(pool=ledger.pool, js=js, streams=streams) as successor:
        assert await successor.try_lead()


async def test_events_wait_for_older_transactions(
    ledger: Ledger, nats_client: NATS, streams: Streams
) -> None:
    """An event committed while an older transaction still runs is published only
    after that one ends: the older one could still commit events before it."""
    js = await _js(nats_client, streams)
    run_id, epoch = await running_run(ledger, "req-1")
    async with EventRelay(pool=ledger.pool, js=js, streams=streams) as relay:
        await _drain(relay)
        assert not relay.held_back()
        async with ledger.pool.acquire() as conn:
            older = conn.transaction()
            await older.start()
            await conn.fetchval("SELECT pg_current_xact_id()")  # it has begun writing
            await move_task(ledger, run_id, epoch, "a", T.TASK_RUN_STATE_RUNNING)  # a newer one
            assert await pending_count(ledger.pool) == 2
            assert await relay.publish_pending() == 0
            assert relay.held_back()
            await older.rollback()
        assert await relay.publish_pending() == 2
        assert not relay.held_back()
    messages = await _read_stream(js, streams)
    assert [e.record.sequence for _, _, e in messages] == list(range(1, len(messages) + 1))


async def test_an_append_behind_a_newer_transaction_is_refused(ledger: Ledger) -> None:
    """A run's events are appended in transaction order (the relay's order): a
    transaction older than the one that appended the run's last event (as another
    replica's write, which waited for the run's lock) cannot append after it."""
    run_id, epoch = await running_run(ledger, "req-1")
    async with ledger.pool.acquire() as conn, conn.transaction():
        await conn.fetchval("SELECT pg_current_xact_id()")  # it has begun writing
        await move_task(ledger, run_id, epoch, "a", T.TASK_RUN_STATE_RUNNING)  # a newer one
        last = await conn.fetchval("SELECT last_sequence FROM runs WHERE run_id = $1", run_id)
        log = EventLog(run_id, last)
        log.add(E.RUN_EVENT_TYPE_CONTROL_REQUESTED, ACTOR)
        with pytest.raises(asyncpg.SerializationError, match="newer transaction"):
            await log.flush(conn)


async def _zero(ledger: Ledger) -> bool:
    return await pending_count(ledger.pool) == 0


async def test_run_retries_after_nats_errors(
    ledger: Ledger,
    nats_client: NATS,
    streams: Streams,
    caplog: pytest.LogCaptureFixture,
) -> None:
    js = nats_client.jetstream()  # the events stream does not exist yet
    await running_run(ledger, "req-1")
    total = await pending_count(ledger.pool)
    relay = EventRelay(pool=ledger.pool, js=js, streams=streams, poll_interval_s=0.05)
    task = asyncio.create_task(relay.run())
    try:
        with caplog.at_level(logging.WARNING, logger="stepline.ledger.relay"):

            async def warned() -> bool:
                return any("event relay" in r.getMessage() for r in caplog.records)

            await eventually(warned, what="a warning")
        assert not task.done()
        assert await pending_count(ledger.pool) == total  # the cursor moves only on acks

        await ensure_streams(js, streams)
        await eventually(lambda: _zero(ledger), what="the rows to be published")
        messages = await _read_stream(js, streams)
        assert [e.record.sequence for _, _, e in messages] == list(range(1, total + 1))
    finally:
        await _run_until_cancelled(task)


def test_kind_table_covers_every_event_type() -> None:
    types = {value for name, value in E.items() if name != "RUN_EVENT_TYPE_UNSPECIFIED"}
    assert set(KIND) == types


async def test_events_waiting_in_the_old_outbox_are_relayed_after_the_migration(
    database_url: str, nats_client: NATS, streams: Streams
) -> None:
    """Migration 0004 drops ``outbox``: the events it still held are published
    from the log, with the bodies the outbox held; the published ones are not."""
    migrations = load_migrations("stepline.ledger")
    assert migrations[3].name == "event_relay"
    old = await create_pool(database_url, schema="legacy", migrations=migrations[:3])
    bodies: dict[str, bytes] = {}
    try:
        await old.execute(
            "INSERT INTO runs (run_id, request_id, workflow_name, workflow_version, definition,"
            " state, initiator_id) VALUES ('r1', 'q1', 'wf', 1, '', 1, 'alice')"
        )
        for sequence in (1, 2, 3):
            event_id = str(uuid.uuid4())
            event = events_pb2.Event(event_id=event_id, run_id="r1", sequence=sequence)
            event.run_state_changed.workflow_name = "wf"
            event.record.event_id = event_id
            event.record.sequence = sequence
            bodies[event_id] = event.SerializeToString()
            await old.execute(
                "INSERT INTO events (run_id, sequence, event_id, type, actor_id)"
                " VALUES ('r1', $1, $2, $3, 'alice')",
                sequence,
                event_id,
                E.RUN_EVENT_TYPE_RUN_STATE_CHANGED,
            )
            await old.execute(
                "INSERT INTO outbox (event_id, run_id, subject, body, publish_time)"
                " VALUES ($1, 'r1', 'run.r1', $2, CASE WHEN $3 THEN now() END)",
                event_id,
                bodies[event_id],
                sequence == 1,  # the first one was published already
            )
    finally:
        await old.close()
    new = await create_pool(database_url, schema="legacy", migrations=migrations)
    try:
        assert await pending_count(new) == 2
        js = await _js(nats_client, streams)
        async with EventRelay(pool=new, js=js, streams=streams) as relay:
            assert await _drain(relay) == 2
        messages = await _read_stream(js, streams)
        assert [e.sequence for _, _, e in messages] == [2, 3]
        for subject, msg_id, event in messages:
            assert subject == streams.subject("events", "run", "r1")
            assert event.run_state_changed.workflow_name == "wf"  # the old body's payload
            assert event.record.type == E.RUN_EVENT_TYPE_RUN_STATE_CHANGED  # from the row
            assert event.event_id == msg_id and msg_id in bodies
    finally:
        await new.close()


async def test_events_are_relayed_in_transaction_number_order(
    ledger: Ledger, nats_client: NATS, streams: Streams
) -> None:
    """The cursor's order is numeric in the transaction id: events of xid 9 go
    out before those of xid 10 (as text, "10" sorts first)."""
    await ledger.pool.execute(
        "INSERT INTO runs (run_id, request_id, workflow_name, workflow_version, definition,"
        " state, initiator_id) VALUES ('r9', 'q9', 'wf', 1, '', 1, 'alice')"
    )
    for sequence, xid in ((1, "9"), (2, "10"), (3, "10")):
        await ledger.pool.execute(
            "INSERT INTO events (run_id, sequence, event_id, type, actor_id, xid)"
            " VALUES ('r9', $1, $2, $3, 'alice', $4::text::xid8)",
            sequence,
            uuid.uuid4(),
            E.RUN_EVENT_TYPE_RUN_STATE_CHANGED,
            xid,
        )
    js = await _js(nats_client, streams)
    async with EventRelay(pool=ledger.pool, js=js, streams=streams, batch_size=2) as relay:
        assert await _drain(relay) == 3
    assert [e.sequence for _, _, e in await _read_stream(js, streams)] == [1, 2, 3]
