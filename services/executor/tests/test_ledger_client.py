"""The executor's ledger client over real gRPC: transitions of many runs share
``ApplyTransitions`` calls, and each still gets its own answer."""

from __future__ import annotations

import asyncio

import pytest

from stepline.api.common.v1 import common_pb2
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
        claim = await ledger.claim(request_id=f"claim-{run_id}", run_id=run_id, lease_s=30)
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
        assert outcomes[1:-1] == [None] * 23
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
