"""SchedulerService over gRPC against a real ledger: starting, cancelling, watching."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.ledger.v1 import ledger_pb2
from stepline.api.scheduler.v1 import scheduler_service_pb2 as pb

from .conftest import Mesh, hello


def start_request(request_id: str = "", **inputs: str | int) -> pb.StartRunRequest:
    request = pb.StartRunRequest(request_id=request_id, workflow_name="hello")
    request.inputs.update(inputs or {"who": "world"})
    return request


async def run_count(mesh: Mesh) -> int:
    listed = await mesh.ledger.ListRuns(ledger_pb2.ListRunsRequest())
    return len(listed.runs)


async def test_start_run_records_the_run_with_its_tasks_then_publishes_one_job(
    mesh: Mesh,
) -> None:
    await mesh.register(hello())
    started = await mesh.scheduler.StartRun(start_request(who="ada"))
    run = started.run
    assert started.created
    assert run.state == common_pb2.WORKFLOW_RUN_STATE_PENDING
    assert run.initiator.id == "alice"
    assert (run.workflow_name, run.workflow_version) == ("hello", 1)

    recorded = await mesh.ledger.GetRun(
        ledger_pb2.GetRunRequest(run_id=run.run_id, view=run_pb2.RUN_VIEW_TASKS)
    )
    assert [t.task_id for t in recorded.run.tasks] == [
        f"{run.run_id}/greet",
        f"{run.run_id}/bye",
    ]
    assert dict(recorded.run.inputs) == {"who": "ada", "times": 1}  # default applied

    jobs = await mesh.jobs()
    assert [(j.job.run_id, j.job.dispatch_epoch, j.msg_id) for j in jobs] == [
        (run.run_id, 1, f"run:{run.run_id}:1")
    ]
    assert jobs[0].subject == mesh.settings.nats.streams.subject("jobs", "run")


async def test_start_run_with_the_same_key_returns_the_same_run_and_one_job(
    mesh: Mesh,
) -> None:
    await mesh.register(hello())
    first = await mesh.scheduler.StartRun(start_request("key-1"))
    again = await mesh.scheduler.StartRun(start_request("key-1"))
    assert (first.created, again.created) == (True, False)
    assert again.run.run_id == first.run.run_id
    assert len(await mesh.jobs()) == 1
    assert await run_count(mesh) == 1


async def test_invalid_inputs_are_refused_naming_the_input_and_create_nothing(
    mesh: Mesh,
) -> None:
    await mesh.register(hello())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.scheduler.StartRun(start_request(who="ada", colour="red"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "colour" in (refused.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await mesh.scheduler.StartRun(start_request(times=2))
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "who" in (missing.value.details() or "")
    assert await run_count(mesh) == 0
    assert await mesh.jobs() == []


async def test_start_is_denied_to_a_principal_without_start(mesh: Mesh) -> None:
    permissions = workflow_pb2.WorkflowPermissions(
        start=workflow_pb2.AccessList(roles=["admin"]),
        define=workflow_pb2.AccessList(roles=["operator"]),
    )
    await mesh.register(hello(permissions=permissions))
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await mesh.scheduler.StartRun(start_request())
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await run_count(mesh) == 0
    assert await mesh.jobs() == []


async def test_unknown_workflow_is_not_found(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await mesh.scheduler.StartRun(start_request())
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_of_a_pending_run_ends_it_at_once(mesh: Mesh) -> None:
    await mesh.register(hello())
    run = (await mesh.scheduler.StartRun(start_request())).run
    cancelled = await mesh.scheduler.CancelRun(
        pb.CancelRunRequest(request_id="c-1", run_id=run.run_id, reason="not today")
    )
    assert cancelled.run.state == common_pb2.WORKFLOW_RUN_STATE_CANCELLED
    assert cancelled.run.failure.reason == common_pb2.FAILURE_REASON_CANCELLED
    got = await mesh.scheduler.GetRun(pb.GetRunRequest(run_id=run.run_id))
    assert got.run.state == common_pb2.WORKFLOW_RUN_STATE_CANCELLED
    listed = await mesh.scheduler.ListRuns(pb.ListRunsRequest())
    assert [r.run_id for r in listed.runs] == [run.run_id]


async def test_watch_run_streams_history_then_live_events_to_the_end(mesh: Mesh) -> None:
    await mesh.register(hello())
    run = (await mesh.scheduler.StartRun(start_request())).run
    stream = mesh.scheduler.WatchRun(pb.WatchRunRequest(run_id=run.run_id), timeout=20)
    first = await stream.read()
    assert isinstance(first, pb.WatchRunResponse)
    assert first.event.type == run_pb2.RUN_EVENT_TYPE_RUN_CREATED  # from the history

    await mesh.scheduler.CancelRun(pb.CancelRunRequest(request_id="c", run_id=run.run_id))
    events = [first.event]
    async with asyncio.timeout(15):  # the watch's ledger poll is 30 s: these are live
        while (message := await stream.read()) != grpc.aio.EOF:
            assert isinstance(message, pb.WatchRunResponse)
            events.append(message.event)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    last = events[-1]
    assert last.type == run_pb2.RUN_EVENT_TYPE_RUN_STATE_CHANGED
    assert last.payload["to_state"] == "CANCELLED"
    assert run_pb2.RUN_EVENT_TYPE_CONTROL_REQUESTED in [e.type for e in events]

    # A run already ended: its whole history, then the end of the stream.
    replay = [
        m.event.sequence
        async for m in mesh.scheduler.WatchRun(
            pb.WatchRunRequest(run_id=run.run_id, after_sequence=1), timeout=10
        )
    ]
    assert replay == [e.sequence for e in events[1:]]


async def test_resume_of_a_paused_run_dispatches_it_again(mesh: Mesh) -> None:
    await mesh.register(hello())
    run = (await mesh.scheduler.StartRun(start_request())).run
    executor = common_pb2.Principal(id="executor-1", roles=["service"])
    claim = await mesh.ledger.ClaimRun(
        ledger_pb2.ClaimRunRequest(request_id="claim", run_id=run.run_id, executor_id="executor-1")
    )
    epoch = claim.claim.epoch
    for state in (common_pb2.WORKFLOW_RUN_STATE_RUNNING, common_pb2.WORKFLOW_RUN_STATE_PAUSED):
        await mesh.ledger.TransitionRun(
            ledger_pb2.TransitionRunRequest(
                request_id=f"to-{state}",
                run_id=run.run_id,
                epoch=epoch,
                actor=executor,
                state=state,
            )
        )
    await mesh.ledger.ReleaseClaim(
        ledger_pb2.ReleaseClaimRequest(
            request_id="release", run_id=run.run_id, executor_id="executor-1", epoch=epoch
        )
    )
    resumed = await mesh.scheduler.ResumeRun(pb.ResumeRunRequest(request_id="r", run_id=run.run_id))
    assert resumed.run.dispatch_epoch == 2
    jobs = await mesh.jobs()
    assert [j.msg_id for j in jobs] == [f"run:{run.run_id}:1", f"run:{run.run_id}:2"]
