"""RecordApprovalDecision: a decision on a GOVERN task's approval request, kept in
the run's history without changing any state."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.api.ledger.v1 import ledger_pb2_grpc
from stepline.common.auth import Authenticator, Principal
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings, ServerSettings
from stepline.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from stepline.common.server import GrpcHost
from stepline.ledger import queries
from stepline.ledger.events import subject_kind
from stepline.ledger.server import SERVICE_NAME, LedgerServicer
from stepline.ledger.stats import get_stats

from .conftest import ACTOR, EXECUTOR, Ledger, create_request

R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState
E = run_pb2.RunEventType
APPROVER = common_pb2.Principal(id="bob", roles=["approver"])
_ids = itertools.count()


def rid() -> str:
    return f"req-{next(_ids)}"


async def govern_run(ledger: Ledger) -> tuple[str, int]:
    """A claimed run of steps a (atomic), approve (GOVERN), c; returns (run_id, epoch)."""
    request = create_request(rid(), steps=("a", "approve", "c"))
    request.tasks[1].kind = workflow_pb2.STEP_KIND_GOVERN
    request.tasks[1].verb = ""
    created = await ledger.store.create_run(request)
    run_id = created.run.run_id
    claim = await ledger.store.claim_run(
        pb.ClaimRunRequest(
            request_id=rid(),
            run_id=run_id,
            executor_id=EXECUTOR,
            lease_duration=Duration(seconds=30),
        )
    )
    return run_id, claim.claim.epoch


def decision(run_id: str, step: str = "approve", **extra: Any) -> pb.RecordApprovalDecisionRequest:
    request = pb.RecordApprovalDecisionRequest(
        request_id=rid(),
        run_id=run_id,
        task_id=f"{run_id}/{step}",
        approval_id="appr-1",
        actor=APPROVER,
        outcome="approved",
        reason="looks right",
        channel="grpc",
        approval_state="PENDING",
    )
    for key, value in extra.items():
        if isinstance(value, common_pb2.Principal):
            getattr(request, key).CopyFrom(value)
        else:
            setattr(request, key, value)
    return request


async def snapshot(ledger: Ledger, run_id: str) -> tuple[Any, ...]:
    """Everything a decision must leave alone (and the counts it adds to)."""
    run = await ledger.pool.fetchrow(
        "SELECT state, claim_epoch, claim_executor, pending_control FROM runs WHERE run_id = $1",
        run_id,
    )
    tasks = await ledger.pool.fetch(
        "SELECT state, approval_id, output FROM tasks WHERE run_id = $1 ORDER BY ordinal", run_id
    )
    counts = await ledger.pool.fetchrow(
        "SELECT (SELECT count(*) FROM events) AS e,"
        " (SELECT count(*) FROM events e, relay_position p"
        "  WHERE (e.xid, e.run_id, e.sequence) > (p.xid, p.run_id, p.sequence)) AS o,"
        " (SELECT count(*) FROM requests) AS q, (SELECT count(*) FROM attempts) AS a"
    )
    return tuple(run), [tuple(t) for t in tasks], tuple(counts)


async def move(
    ledger: Ledger, run_id: str, epoch: int, step: str, state: int, **extra: Any
) -> None:
    request = pb.TransitionTaskRequest(
        request_id=rid(),
        run_id=run_id,
        task_id=f"{run_id}/{step}",
        epoch=epoch,
        actor=ACTOR,
        state=state,  # type: ignore[arg-type]
        **extra,
    )
    await ledger.store.transition_task(request)


async def test_a_decision_is_appended_with_its_decider_and_changes_no_state(
    ledger: Ledger,
) -> None:
    run_id, _ = await govern_run(ledger)
    before = await snapshot(ledger, run_id)
    last = await ledger.pool.fetchval("SELECT last_sequence FROM runs WHERE run_id = $1", run_id)

    request = decision(run_id, channel="webhook")
    response = await ledger.store.record_approval_decision(request)

    event = response.event
    assert event.type == E.RUN_EVENT_TYPE_APPROVAL_DECISION_RECORDED
    assert (event.run_id, event.sequence, event.task_id) == (run_id, last + 1, f"{run_id}/approve")
    assert event.actor == APPROVER  # the decider, not the calling service
    assert dict(event.payload) == {
        "approval_id": "appr-1",
        "outcome": "approved",
        "reason": "looks right",
        "channel": "webhook",
        "approval_state": "PENDING",
    }
    history = await queries.get_run_history(
        ledger.pool, pb.GetRunHistoryRequest(run_id=run_id, after_sequence=last)
    )
    assert list(history.events) == [event]
    assert history.last_sequence == last + 1
    assert subject_kind(event.type) == "task"  # published as stepline.events.task.<run_id>

    run_before, tasks_before, (events, waiting, requests, attempts) = before
    assert await snapshot(ledger, run_id) == (
        run_before,
        tasks_before,
        (events + 1, waiting + 1, requests + 1, attempts),
    )

    # A replay returns the same event and appends nothing; a conflicting one is refused.
    after = await snapshot(ledger, run_id)
    assert await ledger.store.record_approval_decision(request) == response
    conflicting = decision(run_id, outcome="rejected")
    conflicting.request_id = request.request_id
    with pytest.raises(Aborted, match="already used"):
        await ledger.store.record_approval_decision(conflicting)
    assert await snapshot(ledger, run_id) == after


async def test_any_state_of_the_govern_task_is_accepted(ledger: Ledger) -> None:
    run_id, epoch = await govern_run(ledger)
    await ledger.store.record_approval_decision(decision(run_id))  # PENDING
    await ledger.store.transition_run(
        pb.TransitionRunRequest(
            request_id=rid(),
            run_id=run_id,
            epoch=epoch,
            actor=ACTOR,
            state=R.WORKFLOW_RUN_STATE_RUNNING,
        )
    )
    await move(ledger, run_id, epoch, "approve", T.TASK_RUN_STATE_RUNNING)
    await move(ledger, run_id, epoch, "approve", T.TASK_RUN_STATE_SUSPENDED, approval_id="appr-1")
    await ledger.store.record_approval_decision(decision(run_id))  # SUSPENDED
    await move(ledger, run_id, epoch, "approve", T.TASK_RUN_STATE_RUNNING)
    await move(ledger, run_id, epoch, "approve", T.TASK_RUN_STATE_SUCCEEDED)
    # Also after the claim is gone: decisions are not fenced by the executor's claim.
    await ledger.store.release_claim(
        pb.ReleaseClaimRequest(request_id=rid(), run_id=run_id, executor_id=EXECUTOR, epoch=epoch)
    )
    await ledger.store.record_approval_decision(
        decision(run_id, outcome="rejected", approval_state="APPROVAL_STATE_REJECTED")
    )
    history = await queries.get_run_history(ledger.pool, pb.GetRunHistoryRequest(run_id=run_id))
    decided = [e for e in history.events if e.type == E.RUN_EVENT_TYPE_APPROVAL_DECISION_RECORDED]
    assert [e.payload["approval_state"] for e in decided] == ["PENDING", "PENDING", "REJECTED"]
    assert [e.sequence for e in history.events] == list(range(1, history.last_sequence + 1))


REFUSALS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"step": "a"}, FailedPrecondition, r"is not a GOVERN step \(its kind is ATOMIC\)"),
    ({"step": "nope"}, NotFound, "is not part of run"),
    ({"run_id": "missing"}, NotFound, "run 'missing' does not exist"),
    ({"outcome": "maybe"}, InvalidArgument, "outcome must be one of approved, rejected"),
    ({"outcome": "APPROVED"}, InvalidArgument, "outcome must be one of approved, rejected"),
    ({"outcome": ""}, InvalidArgument, "outcome is required"),
    ({"channel": "email"}, InvalidArgument, "channel must be one of grpc, webhook"),
    ({"approval_state": ""}, InvalidArgument, "approval_state is required"),
    ({"approval_state": "DONE"}, InvalidArgument, "approval_state must be one of PENDING"),
    ({"approval_id": ""}, InvalidArgument, "approval_id is required"),
    ({"request_id": ""}, InvalidArgument, "request_id is required"),
    ({"actor": common_pb2.Principal()}, InvalidArgument, "actor.id is required"),
    ({"reason": "x" * (64 * 1024 + 1)}, InvalidArgument, "reason is 65537 characters"),
]


async def test_refusals_write_nothing(ledger: Ledger) -> None:
    run_id, _ = await govern_run(ledger)
    before = await snapshot(ledger, run_id)
    for change, error, message in REFUSALS:
        fields = dict(change)
        request = decision(run_id, fields.pop("step", "approve"))
        for key, value in fields.items():
            if isinstance(value, common_pb2.Principal):
                getattr(request, key).CopyFrom(value)
            else:
                setattr(request, key, value)
        with pytest.raises(error, match=message):
            await ledger.store.record_approval_decision(request)
    assert await snapshot(ledger, run_id) == before


SERVICE_TOKEN, APPROVER_TOKEN, ADMIN_TOKEN = "service-token", "approver-token", "admin-token"


@pytest.fixture
async def ledger_target(ledger: Ledger) -> AsyncIterator[str]:
    host = GrpcHost(
        settings=ServerSettings(service="ledger", shutdown_grace_s=0.5),
        authenticator=Authenticator.from_tokens(
            [
                (SERVICE_TOKEN, Principal("approvals", frozenset({"service"}))),
                (APPROVER_TOKEN, Principal("bob", frozenset({"approver", "operator"}))),
                (ADMIN_TOKEN, Principal("root", frozenset({"admin"}))),
            ]
        ),
    )
    servicer = LedgerServicer(ledger.store)
    host.add(
        SERVICE_NAME,
        lambda server: ledger_pb2_grpc.add_LedgerServiceServicer_to_server(servicer, server),
    )
    port = await host.start()
    await host.set_serving(True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await host.stop()


async def test_only_services_and_admins_may_record_decisions(
    ledger: Ledger, ledger_target: str
) -> None:
    run_id, _ = await govern_run(ledger)
    before = await snapshot(ledger, run_id)
    async with open_channel(
        ledger_target, settings=ClientSettings(), token=APPROVER_TOKEN
    ) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RecordApprovalDecision(decision(run_id))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await snapshot(ledger, run_id) == before

    for token in (SERVICE_TOKEN, ADMIN_TOKEN):
        async with open_channel(ledger_target, settings=ClientSettings(), token=token) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            response = await stub.RecordApprovalDecision(decision(run_id))
            assert response.event.actor == APPROVER
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.RecordApprovalDecision(decision(run_id, step="a"))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.RecordApprovalDecision(decision(run_id, outcome="ok"))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.RecordApprovalDecision(decision("missing"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_approval_latency_ignores_decision_events(ledger: Ledger) -> None:
    """GetStats pairs a GOVERN task's move into SUSPENDED with its move out of it;
    decisions recorded in between do not count as moves."""
    run_id, epoch = await govern_run(ledger)
    await ledger.store.transition_run(
        pb.TransitionRunRequest(
            request_id=rid(),
            run_id=run_id,
            epoch=epoch,
            actor=ACTOR,
            state=R.WORKFLOW_RUN_STATE_RUNNING,
        )
    )
    await move(ledger, run_id, epoch, "approve", T.TASK_RUN_STATE_RUNNING)
    await move(ledger, run_id, epoch, "approve", T.TASK_RUN_STATE_SUSPENDED, approval_id="appr-1")
    await ledger.store.record_approval_decision(decision(run_id))
    await ledger.store.record_approval_decision(
        decision(run_id, actor=common_pb2.Principal(id="carol"), approval_state="APPROVED")
    )
    await move(ledger, run_id, epoch, "approve", T.TASK_RUN_STATE_RUNNING)
    await move(ledger, run_id, epoch, "approve", T.TASK_RUN_STATE_SUCCEEDED)

    moves = await ledger.pool.fetch(
        "SELECT time, payload->>'to_state' AS to_state FROM events"
        " WHERE run_id = $1 AND task_id = $2 AND type = $3 ORDER BY sequence",
        run_id,
        f"{run_id}/approve",
        E.RUN_EVENT_TYPE_TASK_STATE_CHANGED,
    )
    suspended = next(m["time"] for m in moves if m["to_state"] == "SUSPENDED")
    resumed = next(m["time"] for m in moves if m["time"] > suspended)
    window = await ledger.pool.fetchrow(
        "SELECT min(time) - interval '1 hour' AS start, max(time) + interval '1 hour' AS end"
        " FROM events WHERE run_id = $1",
        run_id,
    )
    request = pb.GetStatsRequest()
    request.window.start_time.FromDatetime(window["start"])
    request.window.end_time.FromDatetime(window["end"])
    stats = await get_stats(ledger.pool, request)
    latency = stats.total.approval_latency
    assert latency.count == 1
    assert latency.max.ToTimedelta() == resumed - suspended
    assert latency.max.ToTimedelta() > timedelta(0)
