"""Runs suspended at a GOVERN step are dispatched again once their approval is
decided: on the ApprovalDecided event (the listener, running in the scheduler
under test), or by the sweep when the event was lost.

The tests play the executor against the real ledger (claim, suspend, release)
and the approvals service's part: events on STEPLINE_EVENTS, and for the sweep
a small in-test ``ApprovalsService`` answering GetApproval over real gRPC.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from stepline.api.approvals.v1 import approvals_pb2 as apb
from stepline.api.approvals.v1 import approvals_pb2_grpc
from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.ledger.v1 import ledger_pb2 as lpb
from stepline.api.scheduler.v1 import scheduler_service_pb2 as pb
from stepline.common import jetstream
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings
from stepline.scheduler.server import connected
from stepline.scheduler.suspended import LISTENER_CONSUMER, SuspendedSweep

from .conftest import Mesh

R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState
A = apb.ApprovalState
EXECUTOR = common_pb2.Principal(id="executor-x", roles=["service"])
WAIT_S = 20.0


def gated() -> workflow_pb2.WorkflowDefinition:
    definition = workflow_pb2.WorkflowDefinition(name="gated", allowed_verbs=["core.*"])
    definition.steps.add(
        id="ask",
        govern=workflow_pb2.Govern(policy=workflow_pb2.ApprovalPolicy(approver_roles=["approver"])),
    )
    definition.steps.add(id="after", atomic=workflow_pb2.AtomicOp(verb="core.noop"))
    return definition


class Executor:
    """Plays an executor against the ledger: claims a run and suspends it."""

    def __init__(self, mesh: Mesh, run_id: str) -> None:
        self.mesh = mesh
        self.run_id = run_id
        self.epoch = 0

    async def claim(self, lease_s: int = 30) -> run_pb2.WorkflowRun:
        claimed = await self.mesh.ledger.ClaimRun(
            lpb.ClaimRunRequest(
                request_id=str(uuid.uuid4()),
                run_id=self.run_id,
                executor_id=EXECUTOR.id,
                lease_duration=Duration(seconds=lease_s),
            )
        )
        self.epoch = claimed.claim.epoch
        return claimed.run

    async def move_run(self, state: int) -> None:
        await self.mesh.ledger.TransitionRun(
            lpb.TransitionRunRequest(
                request_id=str(uuid.uuid4()),
                run_id=self.run_id,
                epoch=self.epoch,
                actor=EXECUTOR,
                state=state,  # type: ignore[arg-type]
            )
        )

    async def move_task(self, task_id: str, state: int, approval_id: str = "") -> None:
        await self.mesh.ledger.TransitionTask(
            lpb.TransitionTaskRequest(
                request_id=str(uuid.uuid4()),
                run_id=self.run_id,
                task_id=task_id,
                epoch=self.epoch,
                actor=EXECUTOR,
                state=state,  # type: ignore[arg-type]
                approval_id=approval_id,
            )
        )

    async def release(self) -> None:
        await self.mesh.ledger.ReleaseClaim(
            lpb.ReleaseClaimRequest(
                request_id=str(uuid.uuid4()),
                run_id=self.run_id,
                executor_id=EXECUTOR.id,
                epoch=self.epoch,
                reason="suspended",
            )
        )

    async def suspend(self, approval_id: str, *, release: bool = True, lease_s: int = 30) -> None:
        """Claim, RUNNING, the GOVERN task SUSPENDED with ``approval_id``, the run
        SUSPENDED, then (``release``) give the claim up, as the executor does."""
        run = await self.claim(lease_s)
        ask = next(t for t in run.tasks if t.step_id == "ask")
        await self.move_run(R.WORKFLOW_RUN_STATE_RUNNING)
        await self.move_task(ask.task_id, T.TASK_RUN_STATE_RUNNING)
        await self.move_task(ask.task_id, T.TASK_RUN_STATE_SUSPENDED, approval_id)
        await self.move_run(R.WORKFLOW_RUN_STATE_SUSPENDED)
        if release:
            await self.release()


async def start_gated(mesh: Mesh) -> str:
    await mesh.register(gated())
    response = await mesh.scheduler.StartRun(
        pb.StartRunRequest(request_id=str(uuid.uuid4()), workflow_name="gated")
    )
    return response.run.run_id


async def decided_event(
    mesh: Mesh, run_id: str, approval_id: str, state: int = A.APPROVAL_STATE_APPROVED
) -> int:
    """Publish ApprovalDecided as the approvals service does; returns its stream sequence."""
    event = events_pb2.Event(
        event_id=str(uuid.uuid4()),
        run_id=run_id,
        approval_decided=events_pb2.ApprovalDecided(approval_id=approval_id, state=state),  # type: ignore[arg-type]
    )
    streams = mesh.settings.nats.streams
    ack = await jetstream.publish_proto(
        mesh.nc.jetstream(),
        streams.subject("events", "approval", run_id),
        event,
        msg_id=event.event_id,
    )
    return int(ack.seq)


async def handled(mesh: Mesh, seq: int) -> None:
    """Until the listener acked every event up to stream sequence ``seq``."""
    js = mesh.nc.jetstream()
    async with asyncio.timeout(WAIT_S):
        while True:
            info = await js.consumer_info(mesh.settings.nats.streams.events, LISTENER_CONSUMER)
            if info.ack_floor.stream_seq >= seq and not info.num_ack_pending:
                return
            await asyncio.sleep(0.02)


async def seen_not_acked(mesh: Mesh, seq: int) -> None:
    """Until the listener took the event at ``seq`` and left it for later."""
    js = mesh.nc.jetstream()
    async with asyncio.timeout(WAIT_S):
        while True:
            info = await js.consumer_info(mesh.settings.nats.streams.events, LISTENER_CONSUMER)
            if info.delivered.stream_seq >= seq and info.num_ack_pending:
                return
            await asyncio.sleep(0.02)


async def jobs_of(mesh: Mesh, run_id: str, count: int) -> list[tuple[int, str]]:
    """(epoch, msg id) of the run's jobs once there are ``count``."""
    async with asyncio.timeout(WAIT_S):
        while True:
            jobs = [
                (j.job.dispatch_epoch, j.msg_id)
                for j in await mesh.jobs()
                if j.job.run_id == run_id
            ]
            if len(jobs) >= count:
                return jobs
            await asyncio.sleep(0.02)


async def dispatches(mesh: Mesh, run_id: str) -> list[str]:
    history = await mesh.ledger.GetRunHistory(lpb.GetRunHistoryRequest(run_id=run_id))
    return [
        e.payload["reason"] for e in history.events if e.type == run_pb2.RUN_EVENT_TYPE_DISPATCHED
    ]


async def test_a_decision_dispatches_the_suspended_run_once(mesh: Mesh) -> None:
    run_id = await start_gated(mesh)
    await Executor(mesh, run_id).suspend("ap-1")
    seq = await decided_event(mesh, run_id, "ap-1")
    jobs = await jobs_of(mesh, run_id, 2)
    assert jobs == [(1, f"run:{run_id}:1"), (2, f"run:{run_id}:2")]
    await handled(mesh, seq)
    # the same decision again (a second publisher, a redelivery): no new dispatch
    again = await decided_event(mesh, run_id, "ap-1")
    await handled(mesh, again)
    assert len(await jobs_of(mesh, run_id, 2)) == 2
    assert await dispatches(mesh, run_id) == ["approval_decided"]
    run = await mesh.ledger.GetRun(lpb.GetRunRequest(run_id=run_id))
    assert run.run.state == R.WORKFLOW_RUN_STATE_SUSPENDED
    assert run.run.dispatch_epoch == 2


async def test_a_run_that_is_not_suspended_is_left_alone(mesh: Mesh) -> None:
    run_id = await start_gated(mesh)
    executor = Executor(mesh, run_id)
    await executor.claim()
    await executor.move_run(R.WORKFLOW_RUN_STATE_RUNNING)
    await executor.release()  # RUNNING and free: the reconciler's business, not ours
    seq = await decided_event(mesh, run_id, "ap-9", A.APPROVAL_STATE_REJECTED)
    unknown = await decided_event(mesh, "no-such-run", "ap-0")
    await handled(mesh, max(seq, unknown))
    assert len(await jobs_of(mesh, run_id, 1)) == 1
    assert await dispatches(mesh, run_id) == []


async def test_a_held_run_is_dispatched_once_its_holder_lets_go(mesh: Mesh) -> None:
    run_id = await start_gated(mesh)
    executor = Executor(mesh, run_id)
    await executor.suspend("ap-1", release=False, lease_s=2)
    seq = await decided_event(mesh, run_id, "ap-1")
    await seen_not_acked(mesh, seq)  # held: looked at, kept for later
    assert len(await jobs_of(mesh, run_id, 1)) == 1
    await executor.release()
    assert await jobs_of(mesh, run_id, 2) == [(1, f"run:{run_id}:1"), (2, f"run:{run_id}:2")]
    await handled(mesh, seq)


class Approvals(approvals_pb2_grpc.ApprovalsServiceServicer):
    def __init__(self) -> None:
        self.states: dict[str, int] = {}

    async def GetApproval(
        self, request: apb.GetApprovalRequest, context: Any
    ) -> apb.GetApprovalResponse:
        state = self.states.get(request.approval_id)
        if state is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such approval")
        return apb.GetApprovalResponse(
            approval=apb.Approval(approval_id=request.approval_id, state=state)  # type: ignore[arg-type]
        )


@pytest.fixture
async def approvals() -> AsyncIterator[tuple[Approvals, str]]:
    servicer = Approvals()
    server = grpc.aio.server()
    approvals_pb2_grpc.add_ApprovalsServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_the_sweep_dispatches_a_decided_run_whose_event_was_lost(
    mesh: Mesh, approvals: tuple[Approvals, str]
) -> None:
    servicer, addr = approvals
    run_id = await start_gated(mesh)
    servicer.states["ap-1"] = A.APPROVAL_STATE_PENDING
    await Executor(mesh, run_id).suspend("ap-1")
    async with (
        connected(mesh.settings) as parts,
        open_channel(addr, settings=ClientSettings()) as channel,
    ):
        stub = approvals_pb2_grpc.ApprovalsServiceStub(channel)
        eager = SuspendedSweep(parts.runs, stub, grace_s=0.001)
        patient = SuspendedSweep(parts.runs, stub, grace_s=60)
        assert await eager.sweep() == 0  # still PENDING
        servicer.states["ap-1"] = A.APPROVAL_STATE_APPROVED
        assert await patient.sweep() == 0  # suspended a moment ago: left alone for now
        assert await eager.sweep() == 1
        assert await patient.sweep() == 0  # just dispatched: its executor gets time
    assert await jobs_of(mesh, run_id, 2) == [(1, f"run:{run_id}:1"), (2, f"run:{run_id}:2")]
    assert await dispatches(mesh, run_id) == ["approval_decided"]
