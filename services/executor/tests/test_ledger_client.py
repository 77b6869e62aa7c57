"""The executor's ledger client over real gRPC: transitions of many runs share
``ApplyTransitions`` calls, and each still gets its own answer."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings
from stepline.common.errors import FailedPrecondition, NotFound
from stepline.executor.ledger import Fence, Ledger

from .conftest import Mesh, atomic, workflow

T = common_pb2.TaskRunState


async def claimed(mesh: Mesh, ledger: Ledger, count: int) -> list[Fence]:
    fences = []
    for _ in range(count):
        run_id = await mesh.create(workflow(atomic("a", "core.noop")))
        claim = await ledger.claim(
            request_id=f"claim-{run_id}", run_id=run_id, lease_s=30, first_task=False
        )
        fences.append(ledger.fence(claim))
    return fences


async def test_concurrent_transitions_share_calls_and_are_answered_apart(mesh: Mesh) -> None:
    channel = open_channel(
        mesh.ledger_addr, settings=ClientSettings(), token=mesh.credentials.service_token
    )
    async with channel:
        ledger = Ledger(channel, executor_id="executor-batch")
        fences = await claimed(mesh, ledger, 24)
        stale = ledger.fence(
            await ledger.claim(request_id="c2", run_id=fences[0].run_id, lease_s=30)
        )
        assert stale.epoch != fences[0].epoch  # fences[0] is now stale
        outcomes = await asyncio.gather(
            *(f.transition_step(f"{f.run_id}/a", T.TASK_RUN_STATE_RUNNING) for f in fences),
            stale.transition_step(f"{stale.run_id}/missing", T.TASK_RUN_STATE_RUNNING),
            return_exceptions=True,
        )
        assert isinstance(outcomes[0], FailedPrecondition)
        started = outcomes[1:-1]
        assert all(isinstance(o, pb.StepTransitionResult) for o in started)
        assert {o.task.task.state for o in started} == {T.TASK_RUN_STATE_RUNNING}  # type: ignore[union-attr]
        assert isinstance(outcomes[-1], NotFound)
        batcher = ledger.transitions
        assert batcher.items == 25
        assert batcher.calls < batcher.items  # shared calls
        for fence in fences[1:]:
            run = await ledger.get_run(fence.run_id, view=2)
            assert [t.state for t in run.tasks] == [T.TASK_RUN_STATE_RUNNING]
        first = await ledger.get_run(fences[0].run_id, view=2)
        assert [t.state for t in first.tasks] == [T.TASK_RUN_STATE_PENDING]


async def test_a_lone_transition_is_sent_at_once(mesh: Mesh) -> None:
    channel = open_channel(
        mesh.ledger_addr, settings=ClientSettings(), token=mesh.credentials.service_token
    )
    async with channel:
        ledger = Ledger(channel, executor_id="executor-lone")
        (fence,) = await claimed(mesh, ledger, 1)
        await fence.transition_step(f"{fence.run_id}/a", T.TASK_RUN_STATE_RUNNING)
        await fence.transition_step(f"{fence.run_id}/a", T.TASK_RUN_STATE_SUCCEEDED)
        assert (ledger.transitions.calls, ledger.transitions.items) == (2, 2)
        with pytest.raises(FailedPrecondition):  # a terminal task moves no more
            await fence.transition_step(f"{fence.run_id}/a", T.TASK_RUN_STATE_SKIPPED)


async def test_a_step_end_travels_with_the_next_step_start(mesh: Mesh, database_url: str) -> None:
    """Between two atomic steps, the end of one and the start of the next are
    one call and one commit (the events of both carry the same xid); the first
    step starts with the run's claim, and the last step's end goes with the
    run's end and the claim's release."""
    steps = [atomic(name, "core.echo", {"step": name}) for name in ("a", "b", "c")]
    async with mesh.executor():
        run_id = await mesh.start(workflow(*steps))
        run = await mesh.wait_run(run_id)
    assert run.state == common_pb2.WORKFLOW_RUN_STATE_SUCCEEDED
    assert [t.state for t in run.tasks] == [T.TASK_RUN_STATE_SUCCEEDED] * 3
    assert [dict(t.output) for t in run.tasks] == [{"step": n} for n in ("a", "b", "c")]
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT xid::text AS xid, task_id, payload FROM ledger.events"
            " WHERE run_id = $1 AND type = $2 ORDER BY sequence",
            run_id,
            run_pb2.RUN_EVENT_TYPE_TASK_STATE_CHANGED,
        )
        claimed = await conn.fetchval(
            "SELECT xid::text FROM ledger.events WHERE run_id = $1 AND type = $2",
            run_id,
            run_pb2.RUN_EVENT_TYPE_CLAIMED,
        )
        last = await conn.fetch(
            "SELECT xid::text AS xid, type FROM ledger.events WHERE run_id = $1"
            " ORDER BY sequence DESC LIMIT 2",
            run_id,
        )
    finally:
        await conn.close()
    changes = [
        (r["task_id"].rsplit("/", 1)[1], json.loads(r["payload"])["to_state"], r["xid"])
        for r in rows
    ]
    assert [(step, state) for step, state, _ in changes] == [
        ("a", "RUNNING"),
        ("a", "SUCCEEDED"),
        ("b", "RUNNING"),
        ("b", "SUCCEEDED"),
        ("c", "RUNNING"),
        ("c", "SUCCEEDED"),
    ]
    xids = [xid for _, _, xid in changes]
    assert xids[1] == xids[2] and xids[3] == xids[4]  # a ends with b's start, b with c's
    assert xids[0] != xids[1] and xids[4] != xids[5]
    assert xids[0] == claimed  # a's start is the claim's commit
    assert [r["type"] for r in last] == [
        run_pb2.RUN_EVENT_TYPE_CLAIM_RELEASED,
        run_pb2.RUN_EVENT_TYPE_RUN_STATE_CHANGED,
    ]
    assert {r["xid"] for r in last} == {xids[5]}  # c's end, the run's end, the release
