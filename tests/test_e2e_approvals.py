"""GOVERN steps end to end through the real mesh (`stepline up` processes: the
scheduler, the ledger, the approvals service and two executors, on real
PostgreSQL and NATS JetStream; the ``mesh_state`` fixture of tests/conftest.py).

A run of examples/approval.yaml suspends at its approval step, holding no
executor; an approver (not the run's initiator) approves it and the run
completes, or rejects it and the run fails with the approver's reason.
Cancelling a suspended run closes its request. Approval latency shows in the
ledger's statistics. A suspended run survives the loss of the executor that
suspended it (kill -9): the other one finishes it after the decision. That
test kills an executor (and starts it again), so it is the last of the module.
"""

from __future__ import annotations

import os
import signal
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from google.protobuf import struct_pb2

from stepline.api.approvals.v1 import approvals_pb2 as apb
from stepline.api.approvals.v1 import approvals_pb2_grpc
from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.ledger.v1 import ledger_pb2
from stepline.api.scheduler.v1 import scheduler_service_pb2 as spb
from stepline.api.scheduler.v1 import workflow_service_pb2 as wpb
from stepline.common.states import RUN_TERMINAL

from .conftest import Connect, MeshApi, executor_record, outputs, restart_executor, task

R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState
F = common_pb2.FailureReason
A = apb.ApprovalState
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "approval.yaml"


@dataclass
class Api(MeshApi):
    """``runs`` as admin, the runs' initiator."""

    approvals: approvals_pb2_grpc.ApprovalsServiceAsyncStub  # as admin
    approver: approvals_pb2_grpc.ApprovalsServiceAsyncStub  # as the `approver` principal

    @classmethod
    def stubs(cls, channel: Connect) -> dict[str, Any]:
        return {
            "approvals": approvals_pb2_grpc.ApprovalsServiceStub(channel("approvals")),
            "approver": approvals_pb2_grpc.ApprovalsServiceStub(channel("approvals", "approver")),
        }

    async def register(self, name: str = "approval") -> None:
        """examples/approval.yaml, under ``name``."""
        text = EXAMPLE.read_text(encoding="utf-8").replace(
            "\nname: approval\n", f"\nname: {name}\n"
        )
        await self.workflows.RegisterWorkflow(
            wpb.RegisterWorkflowRequest(
                request_id=str(uuid.uuid4()),
                source_text=wpb.WorkflowSource(format=wpb.SOURCE_FORMAT_YAML, text=text),
            )
        )

    async def start(self, name: str = "approval", amount: int = 42) -> str:
        inputs = struct_pb2.Struct()
        inputs.update({"amount": amount})
        response = await self.runs.StartRun(
            spb.StartRunRequest(request_id=str(uuid.uuid4()), workflow_name=name, inputs=inputs)
        )
        return response.run.run_id

    async def suspended(self, run_id: str) -> run_pb2.WorkflowRun:
        """The run once it waits for its approval, with no executor holding it."""

        def waiting(run: run_pb2.WorkflowRun) -> bool:
            return run.state in RUN_TERMINAL or (
                run.state == R.WORKFLOW_RUN_STATE_SUSPENDED and not run.claim.executor_id
            )

        run = await self.until(run_id, waiting, "suspended")
        assert run.state == R.WORKFLOW_RUN_STATE_SUSPENDED, run.failure
        return run

    async def approval(self, approval_id: str) -> apb.Approval:
        response = await self.approvals.GetApproval(apb.GetApprovalRequest(approval_id=approval_id))
        return response.approval

    async def approve(self, approval_id: str, reason: str = "") -> apb.Approval:
        response = await self.approver.Approve(
            apb.ApproveRequest(request_id=str(uuid.uuid4()), approval_id=approval_id, reason=reason)
        )
        return response.approval

    async def history(self, run_id: str) -> list[run_pb2.RunEvent]:
        response = await self.ledger.GetRunHistory(ledger_pb2.GetRunHistoryRequest(run_id=run_id))
        return list(response.events)


def run_moves(events: list[run_pb2.RunEvent]) -> list[str]:
    return [
        str(e.payload["to_state"])
        for e in events
        if e.type == run_pb2.RUN_EVENT_TYPE_RUN_STATE_CHANGED
    ]


async def test_a_suspended_run_completes_once_an_approver_approves(api: Api) -> None:
    await api.register()
    run_id = await api.start(amount=42)
    run = await api.suspended(run_id)
    ask = task(run, "ask")
    assert ask.state == T.TASK_RUN_STATE_SUSPENDED
    assert ask.approval_id
    assert task(run, "prepare").state == T.TASK_RUN_STATE_SUCCEEDED
    assert task(run, "publish").state == T.TASK_RUN_STATE_PENDING

    approval = await api.approval(ask.approval_id)
    assert approval.state == A.APPROVAL_STATE_PENDING
    assert (approval.run_id, approval.task_id, approval.step_id) == (run_id, ask.task_id, "ask")
    assert approval.workflow_name == "approval"
    assert approval.initiator.id == "admin"
    assert list(approval.policy.approver_roles) == ["approver"]
    assert outputs(approval.context) == {
        "inputs.amount": 42,
        "steps.prepare.summary": "payout of 42",
    }
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # the initiator may not approve
        await api.approvals.Approve(
            apb.ApproveRequest(request_id=str(uuid.uuid4()), approval_id=ask.approval_id)
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    decided = await api.approve(ask.approval_id, "numbers check out")
    assert decided.state == A.APPROVAL_STATE_APPROVED
    run = await api.finished(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure
    output = outputs(task(run, "ask").output)
    assert output["approval_id"] == ask.approval_id
    assert output["state"] == "APPROVED"
    [decision] = output["decisions"]
    assert (decision["actor"], decision["outcome"], decision["reason"]) == (
        "approver",
        "APPROVED",
        "numbers check out",
    )
    published = outputs(task(run, "publish").output)
    assert published["published"] == "payout of 42"
    assert published["decisions"][0]["actor"] == "approver"

    events = await api.history(run_id)
    assert run_moves(events) == ["RUNNING", "SUSPENDED", "RUNNING", "SUCCEEDED"]
    [recorded] = [e for e in events if e.type == run_pb2.RUN_EVENT_TYPE_APPROVAL_DECISION_RECORDED]
    assert recorded.actor.id == "approver"
    assert recorded.task_id == ask.task_id


async def test_a_rejection_fails_the_run_with_the_approvers_reason(api: Api) -> None:
    await api.register()
    run_id = await api.start(amount=1_000_000)
    run = await api.suspended(run_id)
    approval_id = task(run, "ask").approval_id
    await api.approver.Reject(
        apb.RejectRequest(
            request_id=str(uuid.uuid4()), approval_id=approval_id, reason="far too much"
        )
    )
    run = await api.finished(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_FAILED
    assert run.failure.reason == F.FAILURE_REASON_REJECTED
    assert "far too much" in run.failure.message
    assert "approver" in run.failure.message
    ask = task(run, "ask")
    assert ask.state == T.TASK_RUN_STATE_FAILED
    assert ask.failure.reason == F.FAILURE_REASON_REJECTED
    assert task(run, "publish").state == T.TASK_RUN_STATE_SKIPPED
    assert (await api.approval(approval_id)).state == A.APPROVAL_STATE_REJECTED


async def test_cancelling_a_suspended_run_closes_its_request(api: Api) -> None:
    await api.register()
    run_id = await api.start()
    run = await api.suspended(run_id)
    approval_id = task(run, "ask").approval_id
    cancelled = await api.runs.CancelRun(
        spb.CancelRunRequest(request_id=str(uuid.uuid4()), run_id=run_id, reason="not needed")
    )
    assert cancelled.run.state == R.WORKFLOW_RUN_STATE_CANCELLED  # at once: nobody holds it
    run = await api.get(run_id)
    assert task(run, "ask").state == T.TASK_RUN_STATE_CANCELLED
    assert task(run, "publish").state == T.TASK_RUN_STATE_SKIPPED

    async def closed() -> apb.Approval | None:
        approval = await api.approval(approval_id)
        return approval if approval.state != A.APPROVAL_STATE_PENDING else None

    approval = await api.eventually(closed, what="the request to be closed")
    assert approval.state == A.APPROVAL_STATE_CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await api.approve(approval_id)
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await api.get(run_id)).state == R.WORKFLOW_RUN_STATE_CANCELLED


async def test_approval_latency_shows_in_the_ledger_stats(api: Api) -> None:
    name = f"e2e-approval-{uuid.uuid4().hex[:8]}"
    await api.register(name)
    since = datetime.now(UTC) - timedelta(seconds=1)
    run_id = await api.start(name)
    run = await api.suspended(run_id)
    waited_from = datetime.now(UTC)
    await api.approve(task(run, "ask").approval_id, "ok")
    decided_by = datetime.now(UTC)
    run = await api.finished(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED
    ask = task(run, "ask")
    request = ledger_pb2.GetStatsRequest(workflow_name=name)
    request.window.start_time.FromDatetime(since)
    request.window.end_time.FromDatetime(datetime.now(UTC) + timedelta(seconds=1))
    stats = (await api.ledger.GetStats(request)).total
    latency = stats.approval_latency
    assert latency.count == 1
    seconds = latency.average.ToTimedelta().total_seconds()
    # from SUSPENDED to the decision's resume: at most what the test waited in all
    suspended_at = ask.start_time.ToDatetime(tzinfo=UTC)
    assert 0 < seconds <= (datetime.now(UTC) - suspended_at).total_seconds()
    assert seconds >= (decided_by - waited_from).total_seconds() - 0.1
    assert latency.max == latency.average


# --- losing the executor of a suspended run (last: it kills one) -------------------


async def test_a_suspended_run_survives_the_loss_of_its_executor(api: Api) -> None:
    await api.register()
    run_id = await api.start(amount=7)
    run = await api.suspended(run_id)
    ask = task(run, "ask")
    suspender = ask.attempts[-1].executor_id
    record = executor_record(api.state, suspender)
    env = psutil.Process(record.pid).environ()
    os.kill(record.pid, signal.SIGKILL)
    try:
        assert (await api.get(run_id)).state == R.WORKFLOW_RUN_STATE_SUSPENDED
        await api.approve(ask.approval_id, "still fine")
        run = await api.finished(run_id)
    finally:
        await restart_executor(api.state, record, env)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure
    claims = [
        e.actor.id for e in await api.history(run_id) if e.type == run_pb2.RUN_EVENT_TYPE_CLAIMED
    ]
    assert claims[0] == suspender
    assert claims[-1] != suspender  # the other executor finished it
    assert task(run, "publish").attempts[-1].executor_id == claims[-1]
