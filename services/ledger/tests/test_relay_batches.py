"""What the event relay publishes for each row, and how a pass ends when an event
is not sent or not acked. The published content is checked against a real
nats-server; ack failures with a stand-in for JetStream whose acks the test
decides."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any, cast

import pytest
from nats.aio.client import Client as NATS
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.events.v1 import events_pb2
from stepline.common.jetstream import (
    CONTENT_TYPE_HEADER,
    MSG_ID_HEADER,
    Streams,
    content_type,
    ensure_streams,
)
from stepline.ledger import convert
from stepline.ledger.events import EventLog, payload_struct
from stepline.ledger.relay import EventRelay, pending_count

from .conftest import ACTOR, Ledger, move_task, running_run

R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState
E = run_pb2.RunEventType
EXPECTED_STREAM_HEADER = "Nats-Expected-Stream"
CONTENT_TYPE = "application/protobuf; proto=stepline.api.events.v1.Event"


async def _append(ledger: Ledger, run_id: str, payload: dict[str, Any]) -> None:
    """One event with ``payload``, appended as the ledger's writes do."""
    async with ledger.pool.acquire() as conn, conn.transaction():
        last = await conn.fetchval(
            "SELECT last_sequence FROM runs WHERE run_id = $1 FOR UPDATE", run_id
        )
        log = EventLog(run_id, last)
        log.add(E.RUN_EVENT_TYPE_CONTROL_REQUESTED, ACTOR, payload=payload)
        await log.flush(conn)


async def _log(ledger: Ledger) -> list[Any]:
    """Every event row, in the relay's order, its payload decoded (as convert.event
    takes it for GetRunHistory)."""
    return list(await ledger.pool.fetch("SELECT * FROM events ORDER BY xid, run_id, sequence"))


def test_payload_structs_are_those_built_from_the_decoded_json() -> None:
    long = {"message": "x" * 600, "n": 1}
    for payload in ({}, {"to_state": "RUNNING", "attempt_number": 1, "failure": None}, long):
        text = json.dumps(payload)
        expected = convert.struct(payload).SerializeToString()
        assert payload_struct(text) == expected
        assert payload_struct(text) == expected  # remembered, or not (the long one)


async def test_each_event_is_published_with_the_ledgers_record(
    ledger: Ledger, nats_client: NATS, streams: Streams
) -> None:
    js = nats_client.jetstream()
    await ensure_streams(js, streams)
    run_id, epoch = await running_run(ledger, "req-1")
    await move_task(ledger, run_id, epoch, "a", T.TASK_RUN_STATE_RUNNING)
    await move_task(
        ledger,
        run_id,
        epoch,
        "a",
        T.TASK_RUN_STATE_FAILED,
        failure=common_pb2.Failure(
            reason=common_pb2.FAILURE_REASON_VERB_ERROR,
            message="exit 3",
            details=convert.struct({"code": 3}),
        ),
    )
    # Payloads too long to be remembered, with every kind of JSON value.
    await _append(ledger, run_id, {"reason": "r" * 600, "list": [1, 2.5, None, True, "s"]})
    await _append(ledger, run_id, {"nested": {"deep": {"text": "t" * 700}}, "empty": {}})
    rows = await _log(ledger)

    async with EventRelay(pool=ledger.pool, js=js, streams=streams) as relay:
        assert await relay.publish_pending() == len(rows)
    info = await js.stream_info(streams.events)
    assert info.state.messages == len(rows)
    for seq, row in enumerate(rows, start=info.state.first_seq):
        msg = await js.get_msg(streams.events, seq)
        assert msg.headers == {
            MSG_ID_HEADER: str(row["event_id"]),
            CONTENT_TYPE_HEADER: CONTENT_TYPE,
            EXPECTED_STREAM_HEADER: streams.events,
        }
        assert msg.data is not None
        event = events_pb2.Event.FromString(msg.data)
        record = convert.event(row)  # as GetRunHistory returns it
        assert event.record == record
        assert (event.event_id, event.run_id, event.sequence) == (
            record.event_id,
            record.run_id,
            record.sequence,
        )
        assert event.time == record.time and event.actor == record.actor
        typed = events_pb2.Event.FromString(row["envelope"] or b"")
        kind = typed.WhichOneof("payload")
        assert event.WhichOneof("payload") == kind
        if kind is not None:
            assert getattr(event, kind) == getattr(typed, kind)
    assert rows[-1]["payload"]["nested"]["deep"]["text"] == "t" * 700


async def test_an_event_too_large_to_send_stops_its_run_for_the_pass(
    ledger: Ledger, nats_client: NATS, streams: Streams
) -> None:
    js = nats_client.jetstream()
    await ensure_streams(js, streams)
    for run_id in ("ra", "rb"):
        await ledger.pool.execute(
            "INSERT INTO runs (run_id, request_id, workflow_name, workflow_version, definition,"
            " state, initiator_id) VALUES ($1, $1, 'wf', 1, '', 1, 'alice')",
            run_id,
        )
    huge = events_pb2.Event()
    huge.run_control.reason = "x" * (nats_client.max_payload + 1)
    # In the relay's order: ra 1, rb 1, ra 2 (too large), rb 2, ra 3.
    for xid, (run_id, sequence) in enumerate(
        (("ra", 1), ("rb", 1), ("ra", 2), ("rb", 2), ("ra", 3)), start=9
    ):
        await ledger.pool.execute(
            "INSERT INTO events (run_id, sequence, event_id, type, actor_id, xid, envelope)"
            " VALUES ($1, $2, gen_random_uuid(), $3, 'alice', $4::text::xid8, $5)",
            run_id,
            sequence,
            E.RUN_EVENT_TYPE_CONTROL_REQUESTED,
            str(xid),
            huge.SerializeToString() if (run_id, sequence) == ("ra", 2) else None,
        )
    relay = EventRelay(
        pool=ledger.pool, js=js, streams=streams, max_payload=nats_client.max_payload
    )
    async with relay:
        for _ in range(3):  # each pass meets it again
            with pytest.raises(MaxPayloadError, match="max_payload"):
                await relay.publish_pending()
        assert relay.published == 2  # ra 1 and rb 1: the cursor stops before ra 2
    # It never reached the client: no publish is left waiting for its ack (the
    # client's own check would have failed it after taking a pending-ack slot).
    assert js.publish_async_pending() == 0
    assert await pending_count(ledger.pool) == 3
    info = await js.stream_info(streams.events)
    published = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(streams.events, seq)
        assert msg.data is not None
        event = events_pb2.Event.FromString(msg.data)
        published.append((event.run_id, event.sequence))
    # rb's next event went out; none of ra's after the one not sent.
    assert published == [("ra", 1), ("rb", 1), ("rb", 2)]


async def test_the_size_checked_is_the_size_the_server_counts(
    ledger: Ledger, nats_client: NATS, streams: Streams
) -> None:
    """An event the relay finds exactly at the server's limit, headers included
    (the expected stream's too), is taken by the server."""
    js = nats_client.jetstream()
    await ensure_streams(js, streams)
    limit = nats_client.max_payload
    relay = EventRelay(pool=ledger.pool, js=js, streams=streams, max_payload=limit)
    event_id = str(uuid.uuid4())
    data = b"x" * (limit - relay.message_size(b"", event_id))
    assert relay.message_size(data, event_id) == limit
    headers = {MSG_ID_HEADER: event_id, CONTENT_TYPE_HEADER: content_type(events_pb2.Event)}
    ack = await js.publish(
        streams.subject("events", "run", "r1"), data, stream=streams.events, headers=headers
    )
    assert ack.stream == streams.events


class FakeJetStream:
    """Takes publishes; the test resolves their acks (``acks[i]`` is the i-th)."""

    def __init__(self, respond: Callable[[int, asyncio.Future[PubAck]], None]) -> None:
        self.respond = respond
        self.acks: list[asyncio.Future[PubAck]] = []
        self.msg_ids: list[str] = []

    async def publish_async(
        self, subject: str, payload: bytes, *, stream: str, headers: dict[str, str]
    ) -> asyncio.Future[PubAck]:
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self.respond(len(self.acks), future)
        self.acks.append(future)
        self.msg_ids.append(headers[MSG_ID_HEADER])
        return future


def _ack(index: int, future: asyncio.Future[PubAck]) -> None:
    future.set_result(PubAck(stream="S", seq=index + 1))


async def _interleaved_runs(ledger: Ledger) -> list[tuple[str, str]]:
    """Two runs whose events alternate in the relay's order: (event id, run id) of
    each, in that order."""
    first, epoch1 = await running_run(ledger, "req-1")
    second, epoch2 = await running_run(ledger, "req-2")
    for step in ("a", "b"):
        for run_id, epoch in ((first, epoch1), (second, epoch2)):
            await move_task(ledger, run_id, epoch, step, T.TASK_RUN_STATE_RUNNING)
    return [(str(row["event_id"]), row["run_id"]) for row in await _log(ledger)]


async def test_the_cursor_stops_at_the_first_ack_not_received(
    ledger: Ledger, streams: Streams
) -> None:
    events = await _interleaved_runs(ledger)
    event_ids = [event_id for event_id, _ in events]
    total = len(events)
    # The acks of the first run's last event and of the other run's next one never come.
    lost = max(i for i, (_, run_id) in enumerate(events) if run_id == events[0][1])
    also_lost = lost + 1
    assert events[also_lost][1] != events[lost][1] and also_lost < total - 1

    def respond(index: int, future: asyncio.Future[PubAck]) -> None:
        if index not in (lost, also_lost):
            _ack(index, future)

    fake = FakeJetStream(respond)
    js = cast(JetStreamContext, fake)
    async with EventRelay(
        pool=ledger.pool, js=js, streams=streams, publish_timeout_s=0.05
    ) as relay:
        with pytest.raises(TimeoutError):
            await relay.publish_pending()
        assert relay.published == lost
        assert fake.msg_ids == event_ids  # all sent, in the relay's order
        assert fake.acks[lost].cancelled() and fake.acks[also_lost].cancelled()
    assert await pending_count(ledger.pool) == total - lost

    again = FakeJetStream(_ack)
    js = cast(JetStreamContext, again)
    async with EventRelay(pool=ledger.pool, js=js, streams=streams) as relay:
        assert await relay.publish_pending() == total - lost
    assert again.msg_ids == event_ids[lost:]
    assert await pending_count(ledger.pool) == 0


async def test_an_error_ack_stops_the_cursor_and_is_raised(
    ledger: Ledger, streams: Streams
) -> None:
    events = await _interleaved_runs(ledger)
    total = len(events)
    # An event of the first run, followed by events of both runs.
    failed = max(i for i, (_, run_id) in enumerate(events) if run_id == events[0][1]) - 1
    assert {run_id for _, run_id in events[failed + 1 :]} == {run_id for _, run_id in events}

    def respond(index: int, future: asyncio.Future[PubAck]) -> None:
        if index == failed:
            future.set_exception(APIError(code=503, description="storage unavailable"))
        else:
            _ack(index, future)

    fake = FakeJetStream(respond)
    js = cast(JetStreamContext, fake)
    async with EventRelay(pool=ledger.pool, js=js, streams=streams) as relay:
        with pytest.raises(APIError, match="storage unavailable"):
            await relay.publish_pending()
    # The events after it were acked (the other run's too): they stay pending.
    assert all(ack.done() for ack in fake.acks)
    assert await pending_count(ledger.pool) == total - failed
