"""GOVERN steps in the executor against the real ledger and NATS.

The approvals service here is a small in-test ``ApprovalsService`` over real
gRPC (the real service is exercised end to end in tests/test_e2e_approvals.py):
it records requests idempotently, lets a test decide them, and publishes
ApprovalDecided events as the real service does. The scheduler's part, a new
dispatch after the decision, is done by the tests (RecordDispatch + a job).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from stepline.api.approvals.v1 import approvals_pb2 as apb
from stepline.api.approvals.v1 import approvals_pb2_grpc
from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common import jetstream
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings
from stepline.common.plan import plan
from stepline.common.testing import eventually
from stepline.executor.govern import late_cancel
from stepline.executor.ledger import Ledger
from stepline.executor.runner import Worker
from stepline.executor.verbs.registry import VerbRegistry

from .conftest import OPERATOR, WAIT_S, Mesh, atomic, workflow

A = apb.ApprovalState
R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState
F = common_pb2.FailureReason
W = workflow_pb2
E = run_pb2.RunEventType


class FakeApprovals(approvals_pb2_grpc.ApprovalsServiceServicer):
    """CreateApproval (idempotent on request_id) and GetApproval, in memory."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.by_request: dict[str, str] = {}
        self.approvals: dict[str, apb.Approval] = {}
        self.creates: list[apb.CreateApprovalRequest] = []
        self.created = asyncio.Event()
        self.gets = 0
        #: state a request reads as right after it was created (a decision that
        #: arrives while the executor is still suspending the run)
        self.decide_on_create: int = 0

    async def CreateApproval(
        self, request: apb.CreateApprovalRequest, context: Any
    ) -> apb.CreateApprovalResponse:
        self.creates.append(request)
        self.created.set()
        existing = self.by_request.get(request.request_id)
        if existing is not None:
            return apb.CreateApprovalResponse(approval=self.approvals[existing], created=False)
        approval = apb.Approval(
            approval_id=f"ap-{len(self.approvals) + 1}",
            run_id=request.run_id,
            task_id=request.task_id,
            step_id=request.step_id,
            workflow_name=request.workflow_name,
            labels=request.labels,
            state=A.APPROVAL_STATE_PENDING,
            policy=request.policy,
            context=request.context,
            initiator=request.initiator,
        )
        self.by_request[request.request_id] = approval.approval_id
        self.approvals[approval.approval_id] = approval
        response = apb.CreateApprovalResponse(created=True)
        response.approval.CopyFrom(approval)
        if self.decide_on_create:
            await self.decide(approval.approval_id, self.decide_on_create, publish=False)
        return response

    async def GetApproval(
        self, request: apb.GetApprovalRequest, context: Any
    ) -> apb.GetApprovalResponse:
        self.gets += 1
        approval = self.approvals.get(request.approval_id)
        if approval is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no approval {request.approval_id}")
        return apb.GetApprovalResponse(approval=approval)

    async def decide(
        self,
        approval_id: str,
        state: int,
        *,
        actor: str = "user:bob",
        reason: str = "",
        publish: bool = True,
    ) -> None:
        approval = self.approvals[approval_id]
        approval.state = state  # type: ignore[assignment]
        now = Timestamp()
        now.GetCurrentTime()
        if state in (A.APPROVAL_STATE_APPROVED, A.APPROVAL_STATE_REJECTED):
            outcome = (
                apb.DECISION_OUTCOME_APPROVED
                if state == A.APPROVAL_STATE_APPROVED
                else apb.DECISION_OUTCOME_REJECTED
            )
            approval.decisions.add(
                actor=common_pb2.Principal(id=actor, roles=["approver"]),
                outcome=outcome,
                reason=reason,
                decide_time=now,
                channel=apb.DECISION_CHANNEL_GRPC,
            )
        approval.decide_time.CopyFrom(now)
        if publish:
            event = events_pb2.Event(
                event_id=str(uuid.uuid4()),
                run_id=approval.run_id,
                time=now,
                approval_decided=events_pb2.ApprovalDecided(
                    approval_id=approval_id, task_id=approval.task_id, state=state
                ),
            )
            await jetstream.publish_proto(
                self.mesh.nc.jetstream(),
                self.mesh.streams.subject("events", "approval", approval.run_id),
                event,
                msg_id=event.event_id,
            )


@dataclass
class Gates:
    mesh: Mesh
    fake: FakeApprovals
    addr: str
    seen: dict[str, int] = field(default_factory=dict)

    def executor(self, executor_id: str = "executor-1", **overrides: Any) -> Any:
        return self.mesh.executor(executor_id, approvals_addr=self.addr, **overrides)

    async def nth_event(
        self, run_id: str, kind: str, match: Callable[[events_pb2.Event], bool], n: int
    ) -> events_pb2.Event:
        """The ``n``-th event of ``kind`` for the run that ``match``es."""
        count = 0

        def nth(event: events_pb2.Event) -> bool:
            nonlocal count
            if match(event):
                count += 1
            return count == n

        return await self.mesh.wait_event(run_id, kind, nth)

    async def suspended(
        self, run_id: str, n: int = 1, *, held: bool = False
    ) -> run_pb2.WorkflowRun:
        """The run after its ``n``-th suspension: once its claim was released with
        reason ``suspended`` or, ``held``, once it went SUSPENDED."""

        def released(e: events_pb2.Event) -> bool:
            record = e.record
            return record.type == E.RUN_EVENT_TYPE_CLAIM_RELEASED and (
                record.payload["reason"] == "suspended"
            )

        def went_suspended(e: events_pb2.Event) -> bool:
            return e.run_state_changed.to_state == R.WORKFLOW_RUN_STATE_SUSPENDED

        await self.nth_event(run_id, "run", went_suspended if held else released, n)
        return await self.mesh.get(run_id)

    async def redispatch(self, run_id: str) -> None:
        """What the scheduler does on ApprovalDecided: a new dispatch and its job."""
        run = await self.mesh.get(run_id)
        dispatched = await self.mesh.stub.RecordDispatch(
            pb.RecordDispatchRequest(
                request_id=str(uuid.uuid4()),
                run_id=run_id,
                expected_dispatch_epoch=run.dispatch_epoch,
                actor=common_pb2.Principal(id="service:scheduler", roles=["service"]),
                reason="approval_decided",
            )
        )
        await self.mesh.publish(run_id, dispatched.dispatch_epoch)

    async def jobs_left(self) -> int:
        info = await self.mesh.nc.jetstream().stream_info(self.mesh.streams.jobs)
        return int(info.state.messages)

    async def until_jobs_left(self, count: int) -> None:
        async def left() -> bool:
            return await self.jobs_left() == count

        await eventually(left, what=f"{count} job(s) left in the stream", timeout_s=WAIT_S)

    async def start(
        self, definition: W.WorkflowDefinition, inputs: dict[str, Any], **labels: str
    ) -> str:
        """Like Mesh.start, with run labels (the scheduler merges them in)."""
        definition.version = definition.version or 1
        request = pb.CreateRunRequest(
            request_id=str(uuid.uuid4()),
            definition=definition,
            initiator=OPERATOR,
            labels=labels,
            tasks=plan(definition),
        )
        request.inputs.update(inputs)
        run_id = (await self.mesh.stub.CreateRun(request)).run.run_id
        await self.mesh.publish(run_id)
        return run_id


@pytest.fixture
async def gates(mesh: Mesh) -> AsyncIterator[Gates]:
    fake = FakeApprovals(mesh)
    server = grpc.aio.server()
    approvals_pb2_grpc.add_ApprovalsServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Gates(mesh, fake, f"127.0.0.1:{port}")
    finally:
        await server.stop(None)


def govern(step_id: str, *context_keys: str, **fields: Any) -> W.Step:
    policy = W.ApprovalPolicy(
        approver_roles=["approver"],
        required_approvals=1,
        expiry_outcome=fields.pop("expiry_outcome", 0),
    )
    return W.Step(
        id=step_id,
        govern=W.Govern(
            policy=policy,
            context_keys=list(context_keys),
            hold_device=fields.pop("hold_device", False),
        ),
        **fields,
    )


def task(run: run_pb2.WorkflowRun, path: str) -> run_pb2.TaskRun:
    return next(t for t in run.tasks if t.step_path == path)


def gated(**fields: Any) -> W.WorkflowDefinition:
    """prep -> ask (GOVERN) -> after."""
    return workflow(
        atomic("prep", "core.echo", {"amount": "{{ inputs.amount }}"}),
        govern("ask", "inputs.amount", "steps.prep.amount", **fields),
        atomic("after", "core.echo", {"by": "{{ steps.ask.decisions }}"}),
        name="gated",
    )


async def history(mesh: Mesh, run_id: str) -> list[run_pb2.RunEvent]:
    response = await mesh.stub.GetRunHistory(pb.GetRunHistoryRequest(run_id=run_id))
    return list(response.events)


def run_moves(events: list[run_pb2.RunEvent]) -> list[tuple[str, str]]:
    """(to_state, reason) of every run state change."""
    payloads = [dict(e.payload) for e in events if e.type == E.RUN_EVENT_TYPE_RUN_STATE_CHANGED]
    return [(p["to_state"], p.get("reason", "")) for p in payloads]


async def test_the_run_suspends_and_an_approval_completes_it(gates: Gates) -> None:
    mesh, fake = gates.mesh, gates.fake
    async with gates.executor():
        run_id = await gates.start(gated(), {"amount": 42}, tenant="acme")
        run = await gates.suspended(run_id)
        ask = task(run, "ask")
        assert ask.state == T.TASK_RUN_STATE_SUSPENDED
        assert ask.approval_id == "ap-1"
        assert task(run, "after").state == T.TASK_RUN_STATE_PENDING
        assert not run.claim.executor_id  # released while the run waits
        await gates.until_jobs_left(0)  # and its job acked
        [request] = fake.creates
        assert request.request_id == f"{ask.task_id}:1"
        assert (request.run_id, request.task_id, request.step_id) == (run_id, ask.task_id, "ask")
        assert request.workflow_name == "gated"
        assert dict(request.labels) == {"tenant": "acme"}
        assert request.initiator == OPERATOR
        assert list(request.policy.approver_roles) == ["approver"]
        assert dict(request.context) == {"inputs.amount": 42, "steps.prep.amount": 42}

        await fake.decide("ap-1", A.APPROVAL_STATE_APPROVED, reason="fine by me")
        await gates.redispatch(run_id)
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure
    output = dict(task(run, "ask").output)
    assert output["approval_id"] == "ap-1"
    assert output["state"] == "APPROVED"
    [decision] = output["decisions"]
    assert (decision["actor"], decision["outcome"], decision["reason"]) == (
        "user:bob",
        "APPROVED",
        "fine by me",
    )
    assert decision["time"]
    assert dict(task(run, "after").output)["by"][0]["actor"] == "user:bob"
    assert [a.state for a in task(run, "ask").attempts] == [T.TASK_RUN_STATE_SUCCEEDED]
    moves = run_moves(await history(mesh, run_id))
    assert moves == [
        ("RUNNING", "claimed"),
        ("SUSPENDED", "suspended"),
        ("RUNNING", "resumed"),
        ("SUCCEEDED", ""),
    ]
    assert len(fake.creates) == 1  # the resumed run read the decision, it asked nothing new


async def test_a_rejection_fails_the_run_with_the_deciders_reason(gates: Gates) -> None:
    mesh, fake = gates.mesh, gates.fake
    async with gates.executor():
        run_id = await mesh.start(gated(), {"amount": 7})
        await gates.suspended(run_id)
        await fake.decide("ap-1", A.APPROVAL_STATE_REJECTED, actor="user:carol", reason="too much")
        await gates.redispatch(run_id)
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_FAILED
    assert run.failure.reason == F.FAILURE_REASON_REJECTED
    assert run.failure.message == "approval ap-1 was rejected by user:carol: too much"
    ask = task(run, "ask")
    assert ask.state == T.TASK_RUN_STATE_FAILED
    assert ask.failure.reason == F.FAILURE_REASON_REJECTED
    assert dict(ask.failure.details) == {
        "approval_id": "ap-1",
        "rejected_by": "user:carol",
        "reason": "too much",
    }
    assert task(run, "after").state == T.TASK_RUN_STATE_SKIPPED


@pytest.mark.parametrize(
    ("outcome", "task_state", "run_state"),
    [
        (0, T.TASK_RUN_STATE_TIMED_OUT, R.WORKFLOW_RUN_STATE_TIMED_OUT),
        (
            W.APPROVAL_EXPIRY_OUTCOME_FAILED,
            T.TASK_RUN_STATE_FAILED,
            R.WORKFLOW_RUN_STATE_FAILED,
        ),
    ],
)
async def test_an_expired_request_ends_the_step_per_its_expiry_outcome(
    gates: Gates, outcome: int, task_state: int, run_state: int
) -> None:
    mesh, fake = gates.mesh, gates.fake
    async with gates.executor():
        run_id = await mesh.start(gated(expiry_outcome=outcome), {"amount": 1})
        await gates.suspended(run_id)
        await fake.decide("ap-1", A.APPROVAL_STATE_EXPIRED)
        await gates.redispatch(run_id)
        run = await mesh.wait_run(run_id)
    assert run.state == run_state
    ask = task(run, "ask")
    assert ask.state == task_state
    assert ask.failure.reason == F.FAILURE_REASON_APPROVAL_EXPIRED
    assert run.failure.reason == F.FAILURE_REASON_APPROVAL_EXPIRED


async def test_a_dispatch_before_the_decision_suspends_the_run_again(gates: Gates) -> None:
    mesh, fake = gates.mesh, gates.fake
    async with gates.executor():
        run_id = await mesh.start(gated(), {"amount": 3})
        await gates.suspended(run_id)
        gets = fake.gets
        await gates.redispatch(run_id)  # nothing decided yet
        run = await gates.suspended(run_id, 2)
        assert task(run, "ask").state == T.TASK_RUN_STATE_SUSPENDED
        assert task(run, "ask").approval_id == "ap-1"
        assert not run.claim.executor_id
        assert len(fake.creates) == 1 and fake.gets > gets  # read back, not asked again
        await fake.decide("ap-1", A.APPROVAL_STATE_APPROVED)
        await gates.redispatch(run_id)
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED


async def test_a_decision_while_the_run_suspends_is_picked_up_at_once(gates: Gates) -> None:
    """Decided before the run was SUSPENDED (the scheduler only wakes SUSPENDED
    runs): the executor looks once more after suspending it and goes on."""
    mesh, fake = gates.mesh, gates.fake
    fake.decide_on_create = A.APPROVAL_STATE_APPROVED
    async with gates.executor():
        run_id = await mesh.start(gated(), {"amount": 5})
        run = await mesh.wait_run(run_id)  # no dispatch from the test
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure
    events = await history(mesh, run_id)
    assert run_moves(events) == [
        ("RUNNING", "claimed"),
        ("SUSPENDED", "suspended"),
        ("RUNNING", "resumed"),
        ("SUCCEEDED", ""),
    ]
    # under the same claim: no release, no second claim
    kinds = [e.type for e in events]
    assert kinds.count(E.RUN_EVENT_TYPE_CLAIMED) == 1
    assert kinds.count(E.RUN_EVENT_TYPE_CLAIM_RELEASED) == 1  # at the end


async def test_hold_device_waits_for_the_decision_under_the_claim(gates: Gates) -> None:
    mesh, fake = gates.mesh, gates.fake
    async with gates.executor():
        run_id = await mesh.start(gated(hold_device=True), {"amount": 9})
        run = await gates.suspended(run_id, held=True)
        assert task(run, "ask").state == T.TASK_RUN_STATE_SUSPENDED
        assert run.claim.executor_id == "executor-1"  # still held
        assert await gates.jobs_left() == 1  # the job is kept alive, not acked
        await fake.decide("ap-1", A.APPROVAL_STATE_APPROVED)  # no dispatch needed
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure
    moves = run_moves(await history(mesh, run_id))
    assert [m[0] for m in moves] == ["RUNNING", "SUSPENDED", "RUNNING", "SUCCEEDED"]
    claims = [e for e in await history(mesh, run_id) if e.type == E.RUN_EVENT_TYPE_CLAIMED]
    assert len(claims) == 1


async def test_cancel_while_held_cancels_the_step_and_the_run(gates: Gates) -> None:
    mesh = gates.mesh
    async with gates.executor():
        run_id = await mesh.start(gated(hold_device=True), {"amount": 9})
        await gates.suspended(run_id, held=True)
        # pending for the holder (or, the run being SUSPENDED, applied by the ledger)
        await mesh.control(run_id, run_pb2.CONTROL_ACTION_CANCEL, "no longer needed")
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_CANCELLED
    assert run.failure.message == "no longer needed"
    assert task(run, "ask").state == T.TASK_RUN_STATE_CANCELLED
    assert task(run, "after").state == T.TASK_RUN_STATE_SKIPPED


async def test_cancel_of_a_suspended_run_needs_no_executor(gates: Gates) -> None:
    mesh = gates.mesh
    async with gates.executor():
        run_id = await mesh.start(gated(), {"amount": 2})
        await gates.suspended(run_id)
    # no executor runs now: the ledger applies the cancel at once
    assert await mesh.control(run_id, run_pb2.CONTROL_ACTION_CANCEL, "stop")
    run = await mesh.get(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_CANCELLED
    assert task(run, "ask").state == T.TASK_RUN_STATE_CANCELLED


async def test_a_rejection_under_pause_run_pauses_and_resume_asks_again(gates: Gates) -> None:
    mesh, fake = gates.mesh, gates.fake
    definition = gated()
    definition.failure_policy = W.FAILURE_POLICY_PAUSE_RUN
    async with gates.executor():
        run_id = await mesh.start(definition, {"amount": 4})
        await gates.suspended(run_id)
        await fake.decide("ap-1", A.APPROVAL_STATE_REJECTED, reason="not yet")
        await gates.redispatch(run_id)
        paused = await mesh.wait_run(run_id, R.WORKFLOW_RUN_STATE_PAUSED)
        assert paused.failure.reason == F.FAILURE_REASON_REJECTED
        assert await mesh.control(run_id, run_pb2.CONTROL_ACTION_RESUME)
        await gates.redispatch(run_id)
        run = await gates.suspended(run_id, 2)
        ask = task(run, "ask")
        assert ask.approval_id == "ap-2"
        assert [a.reason for a in ask.attempts] == ["initial", "operator_resume"]
        assert fake.creates[-1].request_id == f"{ask.task_id}:2"
        await fake.decide("ap-2", A.APPROVAL_STATE_APPROVED)
        await gates.redispatch(run_id)
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED


async def test_a_missing_context_value_fails_the_step(gates: Gates) -> None:
    mesh = gates.mesh
    definition = workflow(
        atomic("prep", "core.echo", {"other": 1}), govern("ask", "steps.prep.amount")
    )
    async with gates.executor():
        run = await mesh.wait_run(await mesh.start(definition))
    assert run.state == R.WORKFLOW_RUN_STATE_FAILED
    assert task(run, "ask").failure.reason == F.FAILURE_REASON_INVALID_INPUT
    assert "steps.prep.amount" in task(run, "ask").failure.message
    assert not gates.fake.creates


async def test_without_an_approvals_service_the_step_fails(mesh: Mesh) -> None:
    async with mesh.executor():  # no approvals_addr
        run = await mesh.wait_run(await mesh.start(workflow(govern("ask"))))
    assert run.state == R.WORKFLOW_RUN_STATE_FAILED
    assert run.failure.reason == F.FAILURE_REASON_INTERNAL
    assert "STEPLINE_APPROVALS_ADDR" in run.failure.message


async def test_a_suspended_run_survives_its_executor(gates: Gates) -> None:
    """Suspension is in the ledger: another executor finishes the run."""
    mesh, fake = gates.mesh, gates.fake
    async with gates.executor("executor-a"):
        run_id = await mesh.start(gated(), {"amount": 8})
        await gates.suspended(run_id)
    await fake.decide("ap-1", A.APPROVAL_STATE_APPROVED)
    async with gates.executor("executor-b"):
        await gates.redispatch(run_id)
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED
    attempts = task(run, "ask").attempts
    assert len(attempts) == 1 and attempts[0].executor_id == "executor-a"
    finisher = [e for e in await history(mesh, run_id) if e.type == E.RUN_EVENT_TYPE_CLAIMED]
    assert [e.actor.id for e in finisher] == ["executor-a", "executor-b"]


async def test_a_child_run_that_suspends_is_followed_by_its_parent(gates: Gates) -> None:
    mesh, fake = gates.mesh, gates.fake
    mesh.workflows.definitions["child"] = workflow(govern("ask"), name="child")
    ref = W.Step(id="sub", workflow_ref=W.WorkflowRef(workflow_name="child", version=1))
    parent = workflow(ref, atomic("after", "core.echo", {"done": True}), name="parent")
    async with gates.executor():
        run_id = await mesh.start(parent)
        await asyncio.wait_for(fake.created.wait(), WAIT_S)
        child_id = fake.creates[0].run_id
        assert child_id != run_id
        await gates.suspended(child_id)
        assert (await mesh.get(run_id)).state == R.WORKFLOW_RUN_STATE_RUNNING  # it waits
        await fake.decide("ap-1", A.APPROVAL_STATE_APPROVED)
        await gates.redispatch(child_id)
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure
    assert (await mesh.get(child_id)).state == R.WORKFLOW_RUN_STATE_SUCCEEDED
    assert task(run, "after").state == T.TASK_RUN_STATE_SUCCEEDED


async def test_a_cancel_left_pending_by_a_suspending_holder_is_applied(mesh: Mesh) -> None:
    """The cancel came while the holder was still running the step that
    suspends: the ledger kept it pending for the holder, which then suspended
    and let go; the executor applies it. (A cancel arriving once the run is
    SUSPENDED is applied by the ledger at once.)"""
    run_id = await mesh.create(gated())
    claim = await mesh.stub.ClaimRun(
        pb.ClaimRunRequest(
            request_id=f"c-{run_id}",
            run_id=run_id,
            executor_id="executor-x",
            lease_duration=Duration(seconds=30),
        )
    )
    settings = ClientSettings(service_token=mesh.credentials.service_token)
    async with open_channel(mesh.ledger_addr, settings=settings) as channel:
        ledger = Ledger(channel, executor_id="executor-x")
        fence = ledger.fence(claim)
        await fence.transition_run(R.WORKFLOW_RUN_STATE_RUNNING)
        assert not await mesh.control(run_id, run_pb2.CONTROL_ACTION_CANCEL, "late")  # held
        await fence.transition_run(R.WORKFLOW_RUN_STATE_SUSPENDED)
        await fence.release("suspended")
        worker = Worker(
            settings=mesh.settings("executor-x"),
            ledger=ledger,
            nc=mesh.nc,
            js=mesh.nc.jetstream(),
            registry=VerbRegistry.default(plugins=[]),
        )
        why = await late_cancel(worker, run_id)
        assert why is not None and why.reason == F.FAILURE_REASON_CANCELLED
        run = await mesh.get(run_id)
        assert run.state == R.WORKFLOW_RUN_STATE_CANCELLED
        assert not run.claim.executor_id
        assert await late_cancel(worker, run_id) is None  # nothing left to do
