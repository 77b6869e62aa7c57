"""The event outbox on its own: nothing is published before the commit, everything
after it, and a re-publish after a crash (published, not yet marked) is stored
once by the stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from stepline.api.approvals.v1 import approvals_pb2 as pb
from stepline.api.common.v1 import common_pb2
from stepline.api.events.v1 import events_pb2
from stepline.approvals.outbox import EventPublisher
from stepline.approvals.store import ApprovalStore
from stepline.common import jetstream
from stepline.common.auth import Principal
from stepline.common.db import create_pool, load_migrations
from stepline.common.jetstream import Streams

from .conftest import policy

EXECUTOR = Principal("stepline-services", frozenset({"service"}))


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(
        database_url, schema="approvals", migrations=load_migrations("stepline.approvals")
    )
    try:
        yield pool
    finally:
        await pool.close()


async def test_events_survive_until_published_and_are_stored_once(
    pool: asyncpg.Pool, nats_url: str, streams: Streams
) -> None:
    store = ApprovalStore(pool)  # no loops: nothing drains the outbox yet
    request = pb.CreateApprovalRequest(
        request_id="t:1",
        run_id="run-1",
        task_id="run-1/gate",
        step_id="gate",
        workflow_name="payout",
        policy=policy(),
        initiator=common_pb2.Principal(id="erin"),
    )
    created = (await store.create(request, EXECUTOR)).approval
    approve = await store.decide(
        approval_id=created.approval_id,
        actor=Principal("bob", frozenset({"approver"})),
        outcome=pb.DECISION_OUTCOME_APPROVED,
        reason="ok",
        channel=pb.DECISION_CHANNEL_GRPC,
    )
    assert approve.state == pb.APPROVAL_STATE_APPROVED
    assert await pool.fetchval("SELECT count(*) FROM event_outbox WHERE publish_time IS NULL") == 2
    assert await pool.fetchval("SELECT count(*) FROM ledger_outbox WHERE done_time IS NULL") == 1

    nc = await jetstream.connect(nats_url, name="outbox-test")
    try:
        js = nc.jetstream()
        await jetstream.ensure_streams(js, streams)
        publisher = EventPublisher(pool=pool, js=js, streams=streams)
        await publisher.publish_pending()
        assert (
            await pool.fetchval("SELECT count(*) FROM event_outbox WHERE publish_time IS NULL") == 0
        )
        # A crash between the publish and the mark: the rows are published again.
        await pool.execute("UPDATE event_outbox SET publish_time = NULL")
        await publisher.publish_pending()
        info = await js.stream_info(streams.events)
        assert info.state.messages == 2
        kinds = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(streams.events, seq)
            event = events_pb2.Event()
            event.ParseFromString(msg.data or b"")
            assert msg.subject == streams.subject("events", "approval", "run-1")
            assert (msg.headers or {})[jetstream.MSG_ID_HEADER] == event.event_id
            kinds.append(event.WhichOneof("payload"))
        assert kinds == ["approval_requested", "approval_decided"]
    finally:
        await nc.close()
