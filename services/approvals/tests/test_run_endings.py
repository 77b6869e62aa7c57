"""RunEndings on its own, fed run events directly: only ended runs with PENDING
requests cost a transaction, every other event is acked as read, and an event
whose handling failed is delivered again without holding back the rest of its
batch."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from stepline.api.approvals.v1 import approvals_pb2 as pb
from stepline.api.common.v1 import common_pb2
from stepline.api.events.v1 import events_pb2
from stepline.approvals.runs import CONSUMER, RunEndings
from stepline.approvals.store import ApprovalStore
from stepline.common import jetstream
from stepline.common.auth import Principal
from stepline.common.db import create_pool, load_migrations
from stepline.common.jetstream import Streams
from stepline.common.testing import eventually

from .conftest import policy

R = common_pb2.WorkflowRunState
S = pb.ApprovalState
SERVICE = Principal("stepline-services", frozenset({"service"}))
Follow = Callable[[ApprovalStore], Awaitable[RunEndings]]


class Recording(ApprovalStore):
    """An ApprovalStore that records cancel_for_run calls and fails those of ``failing``
    runs the first time."""

    def __init__(self, pool: asyncpg.Pool, *, failing: set[str] | None = None) -> None:
        super().__init__(pool)
        self.calls: list[str] = []
        self._failing = set(failing or ())

    async def cancel_for_run(self, run_id: str, *, state_name: str, ended: datetime) -> int:
        self.calls.append(run_id)
        if run_id in self._failing:
            self._failing.discard(run_id)
            raise asyncpg.ConnectionDoesNotExistError("connection lost (test)")
        return await super().cancel_for_run(run_id, state_name=state_name, ended=ended)


@dataclass
class Setup:
    pool: asyncpg.Pool
    js: JetStreamContext
    streams: Streams

    async def approval(self, run_id: str) -> str:
        """A PENDING request of ``run_id``; returns its id."""
        created = await ApprovalStore(self.pool).create(
            pb.CreateApprovalRequest(
                request_id=str(uuid.uuid4()),
                run_id=run_id,
                task_id=f"{run_id}/gate",
                step_id="gate",
                workflow_name="payout",
                policy=policy(),
                initiator=common_pb2.Principal(id="erin"),
            ),
            SERVICE,
        )
        return created.approval.approval_id

    async def state(self, approval_id: str) -> int:
        value: int = await self.pool.fetchval(
            "SELECT state FROM approvals WHERE approval_id = $1", approval_id
        )
        return value

    async def publish(self, run_id: str, data: bytes) -> None:
        await self.js.publish(
            self.streams.subject("events", "run", run_id),
            data,
            headers={jetstream.MSG_ID_HEADER: str(uuid.uuid4())},
        )

    async def run_state(self, run_id: str, to_state: int) -> None:
        """A RUN_STATE_CHANGED event as the ledger's relay publishes it."""
        now = Timestamp()
        now.GetCurrentTime()
        event = events_pb2.Event(
            event_id=str(uuid.uuid4()),
            run_id=run_id,
            time=now,
            run_state_changed=events_pb2.RunStateChanged(
                workflow_name="payout",
                workflow_version=1,
                to_state=to_state,  # type: ignore[arg-type]
            ),
        )
        await self.publish(run_id, event.SerializeToString())

    async def claimed(self, run_id: str) -> None:
        """A run event without a typed payload (CLAIMED)."""
        event = events_pb2.Event(event_id=str(uuid.uuid4()), run_id=run_id)
        event.record.run_id = run_id
        event.record.payload.update({"epoch": 1})
        await self.publish(run_id, event.SerializeToString())

    async def caught_up(self) -> bool:
        """Every event published so far is acked (or terminated)."""
        info = await self.js.consumer_info(self.streams.events, CONSUMER)
        last = (await self.js.stream_info(self.streams.events)).state.last_seq
        return bool(
            info.num_pending == 0
            and info.num_ack_pending == 0
            and info.ack_floor.stream_seq == last
        )


@pytest.fixture
async def setup(database_url: str, nats_url: str, streams: Streams) -> AsyncIterator[Setup]:
    pool = await create_pool(
        database_url, schema="approvals", migrations=load_migrations("stepline.approvals")
    )
    nc: NATS = await jetstream.connect(nats_url, name="run-endings-test")
    try:
        js = nc.jetstream()
        await jetstream.ensure_streams(js, streams)
        yield Setup(pool=pool, js=js, streams=streams)
    finally:
        await nc.close()
        await pool.close()


@pytest.fixture
async def following(setup: Setup) -> AsyncIterator[Follow]:
    """Starts RunEndings on a given store (short pauses); stopped at the end."""
    started: list[tuple[RunEndings, asyncio.Task[None]]] = []

    async def start(store: ApprovalStore) -> RunEndings:
        endings = RunEndings(store=store, js=setup.js, streams=setup.streams, pause_s=0.01)
        await endings.start()
        started.append((endings, asyncio.create_task(endings.run())))
        return endings

    yield start
    for endings, task in started:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await endings.close()


async def test_only_ended_runs_with_pending_requests_cost_a_transaction(
    setup: Setup, following: Follow
) -> None:
    ended, running, no_approvals = "run-ended", "run-running", "run-plain"
    closes = await setup.approval(ended)
    stays = await setup.approval(running)
    for run_id in (ended, running, no_approvals):
        await setup.run_state(run_id, R.WORKFLOW_RUN_STATE_PENDING)
        await setup.claimed(run_id)
        await setup.run_state(run_id, R.WORKFLOW_RUN_STATE_RUNNING)
    await setup.publish("run-garbled", b"\xff not a protobuf")
    store = Recording(setup.pool)
    await following(store)
    await eventually(setup.caught_up, what="the backlog acked")

    # Events published while it runs: one fetch after a pause takes them.
    await setup.run_state(ended, R.WORKFLOW_RUN_STATE_SUCCEEDED)
    await setup.run_state(no_approvals, R.WORKFLOW_RUN_STATE_FAILED)
    await eventually(setup.caught_up, what="the endings acked")

    assert await setup.state(closes) == S.APPROVAL_STATE_CANCELLED
    assert await setup.state(stays) == S.APPROVAL_STATE_PENDING
    assert store.calls == [ended]  # the run without requests needed no transaction
    info = await setup.js.consumer_info(setup.streams.events, CONSUMER)
    # Each event delivered once: the garbled one was terminated, not retried.
    assert info.delivered.consumer_seq == info.delivered.stream_seq == 12


async def test_a_failed_handling_is_delivered_again_alone(setup: Setup, following: Follow) -> None:
    approvals = {run_id: await setup.approval(run_id) for run_id in ("a", "b", "c")}
    for run_id in approvals:  # one batch: the three endings in this order
        await setup.run_state(run_id, R.WORKFLOW_RUN_STATE_CANCELLED)
    store = Recording(setup.pool, failing={"b"})
    await following(store)

    async def all_cancelled() -> bool:
        states = [await setup.state(a) for a in approvals.values()]
        return all(s == S.APPROVAL_STATE_CANCELLED for s in states)

    await eventually(all_cancelled, what="every request cancelled")
    await eventually(setup.caught_up, what="every event acked")
    # a and c were handled (and acked) in the first pass; only b came back.
    assert store.calls == ["a", "b", "c", "b"]
    info = await setup.js.consumer_info(setup.streams.events, CONSUMER)
    assert info.delivered.stream_seq == 3 and info.delivered.consumer_seq == 4


async def test_a_failed_lookup_delivers_the_batch_endings_again(
    setup: Setup, following: Follow
) -> None:
    pending = await setup.approval("x")
    await setup.claimed("x")
    await setup.run_state("x", R.WORKFLOW_RUN_STATE_TIMED_OUT)
    lookups: list[list[str]] = []

    class FlakyLookup(Recording):
        async def runs_with_pending(self, run_ids: Sequence[str]) -> set[str]:
            lookups.append(list(run_ids))
            if len(lookups) == 1:
                raise asyncpg.ConnectionDoesNotExistError("connection lost (test)")
            return await super().runs_with_pending(run_ids)

    await following(FlakyLookup(setup.pool))

    async def cancelled() -> bool:
        return await setup.state(pending) == S.APPROVAL_STATE_CANCELLED

    await eventually(cancelled, what="the request cancelled after a retry")
    await eventually(setup.caught_up, what="every event acked")
    assert lookups == [["x"], ["x"]]
    info = await setup.js.consumer_info(setup.streams.events, CONSUMER)
    # The CLAIMED event was acked in the first pass: only the ending came back.
    assert info.delivered.stream_seq == 2 and info.delivered.consumer_seq == 3
