"""Approval requests over gRPC: policies, quorum, races, expiry, cancel, and what
every change leaves behind (the run's history in the ledger, events on NATS)."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from stepline.api.approvals.v1 import approvals_pb2 as pb
from stepline.api.common.v1 import run_pb2, workflow_pb2
from stepline.api.ledger.v1 import ledger_pb2
from stepline.common.testing import eventually

from .conftest import Event, Harness, policy

S = pb.ApprovalState


async def refused(call: object, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


async def decision_rows(h: Harness, approval_id: str) -> list[tuple[str, int]]:
    rows = await h.pool.fetch(
        "SELECT actor_id, outcome FROM decisions WHERE approval_id = $1 ORDER BY decide_time",
        approval_id,
    )
    return [(r["actor_id"], r["outcome"]) for r in rows]


async def history(h: Harness, run_id: str) -> list[run_pb2.RunEvent]:
    response = await h.ledger.GetRunHistory(ledger_pb2.GetRunHistoryRequest(run_id=run_id))
    return [
        e for e in response.events if e.type == run_pb2.RUN_EVENT_TYPE_APPROVAL_DECISION_RECORDED
    ]


async def test_quorum_of_two_needs_two_distinct_principals(harness: Harness) -> None:
    h = harness
    approval = await h.create(policy=policy(required=2))
    assert approval.state == S.APPROVAL_STATE_PENDING

    first = await h.approve("bob", approval.approval_id, "looks right")
    assert first.state == S.APPROVAL_STATE_PENDING
    again = await h.approve("bob", approval.approval_id, "still right")
    assert again.state == S.APPROVAL_STATE_PENDING  # the same principal counts once
    assert [d.actor.id for d in again.decisions] == ["bob"]

    final = await h.approve("carol", approval.approval_id, "agreed")
    assert final.state == S.APPROVAL_STATE_APPROVED
    assert final.HasField("decide_time")
    assert [(d.actor.id, d.outcome, d.reason, d.channel) for d in final.decisions] == [
        ("bob", pb.DECISION_OUTCOME_APPROVED, "looks right", pb.DECISION_CHANNEL_GRPC),
        ("carol", pb.DECISION_OUTCOME_APPROVED, "agreed", pb.DECISION_CHANNEL_GRPC),
    ]
    assert list(final.decisions[0].actor.roles) == ["approver"]
    assert (await h.get(approval.approval_id)) == final

    # Every decision is in the run's history, with the state after it.
    recorded = await eventually(
        lambda: _history_of(h, approval.run_id, 2), what="two decisions in the ledger"
    )
    assert [(e.actor.id, e.task_id, dict(e.payload)) for e in recorded] == [
        (
            "bob",
            approval.task_id,
            {
                "approval_id": approval.approval_id,
                "outcome": "approved",
                "reason": "looks right",
                "channel": "grpc",
                "approval_state": "PENDING",
            },
        ),
        (
            "carol",
            approval.task_id,
            {
                "approval_id": approval.approval_id,
                "outcome": "approved",
                "reason": "agreed",
                "channel": "grpc",
                "approval_state": "APPROVED",
            },
        ),
    ]
    # No decision after the final one.
    details = await refused(
        h.as_("erin").Approve(
            pb.ApproveRequest(request_id="late", approval_id=approval.approval_id)
        ),
        grpc.StatusCode.PERMISSION_DENIED,  # erin started the run
    )
    assert "started the run" in details
    details = await refused(
        h.as_("admin").Reject(
            pb.RejectRequest(request_id="late-2", approval_id=approval.approval_id, reason="no")
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "APPROVED" in details


async def _history_of(h: Harness, run_id: str, count: int) -> list[run_pb2.RunEvent] | None:
    events = await history(h, run_id)
    return events if len(events) >= count else None


async def test_one_rejection_rejects_and_needs_a_reason(harness: Harness) -> None:
    h = harness
    approval = await h.create(policy=policy(required=2))
    await h.approve("bob", approval.approval_id)
    details = await refused(
        h.as_("carol").Reject(
            pb.RejectRequest(request_id="r1", approval_id=approval.approval_id, reason="  ")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "reason is required" in details
    assert await decision_rows(h, approval.approval_id) == [("bob", pb.DECISION_OUTCOME_APPROVED)]

    rejected = await h.reject("carol", approval.approval_id, "amount too high")
    assert rejected.state == S.APPROVAL_STATE_REJECTED
    assert rejected.decisions[-1].reason == "amount too high"
    await refused(
        h.as_("bob").Approve(pb.ApproveRequest(request_id="r2", approval_id=approval.approval_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    recorded = await eventually(lambda: _history_of(h, approval.run_id, 2), what="ledger")
    assert recorded[-1].payload["outcome"] == "rejected"
    assert recorded[-1].payload["approval_state"] == "REJECTED"


async def test_the_initiator_may_not_decide_unless_the_policy_allows_it(
    harness: Harness,
) -> None:
    h = harness
    approval = await h.create(initiator="erin")
    details = await refused(
        h.as_("erin").Approve(pb.ApproveRequest(request_id="e1", approval_id=approval.approval_id)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert "allow_initiator" in details
    assert await decision_rows(h, approval.approval_id) == []
    # Separation of duties binds administrators too.
    as_admin = await h.create(initiator="admin")
    await refused(
        h.as_("admin").Approve(
            pb.ApproveRequest(request_id="a1", approval_id=as_admin.approval_id)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )

    allowed = await h.create(initiator="erin", policy=policy(allow_initiator=True))
    assert (await h.approve("erin", allowed.approval_id)).state == S.APPROVAL_STATE_APPROVED


async def test_only_the_principals_the_policy_names_may_decide(harness: Harness) -> None:
    h = harness
    approval = await h.create(policy=policy(roles=(), principals=("carol",)))
    for who in ("dave", "bob", "alice", "stepline-services"):
        details = await refused(
            h.as_(who).Approve(
                pb.ApproveRequest(request_id=f"x-{who}", approval_id=approval.approval_id)
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert "is not an approver" in details
        await refused(
            h.as_(who).Reject(
                pb.RejectRequest(
                    request_id=f"y-{who}", approval_id=approval.approval_id, reason="no"
                )
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    assert await decision_rows(h, approval.approval_id) == []
    assert (await h.get(approval.approval_id)).state == S.APPROVAL_STATE_PENDING
    # admin is always an approver (break-glass), as is a named principal.
    assert (await h.approve("carol", approval.approval_id)).state == S.APPROVAL_STATE_APPROVED
    other = await h.create(policy=policy(roles=(), principals=("carol",)))
    assert (await h.approve("admin", other.approval_id)).state == S.APPROVAL_STATE_APPROVED


async def test_racing_approvals_and_rejections_reach_exactly_one_outcome(
    harness: Harness,
) -> None:
    h = harness
    outcomes = set()
    for round_ in range(12):
        approval = await h.create(policy=policy(required=2))
        calls = [
            h.approve("bob", approval.approval_id),
            h.approve("carol", approval.approval_id),
            h.reject("admin", approval.approval_id, "stop"),
            h.approve("admin", approval.approval_id),
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                assert isinstance(result, grpc.aio.AioRpcError), result
                assert result.code() == grpc.StatusCode.FAILED_PRECONDITION, round_
        final = await h.get(approval.approval_id)
        assert final.state in (S.APPROVAL_STATE_APPROVED, S.APPROVAL_STATE_REJECTED)
        outcomes.add(final.state)
        # The decisions recorded are consistent with the one outcome: the last
        # decision made it final, nothing was recorded after it.
        rows = await h.pool.fetch(
            "SELECT state_after FROM decisions WHERE approval_id = $1 ORDER BY decide_time",
            approval.approval_id,
        )
        states = [r["state_after"] for r in rows]
        assert states[-1] == final.state
        assert all(s == S.APPROVAL_STATE_PENDING for s in states[:-1])
        decided = await h.pool.fetchval(
            "SELECT count(*) FROM event_outbox WHERE subject = $1",
            f"approval.{approval.run_id}",
        )
        assert decided == 2  # requested + decided, once
    assert outcomes  # (which outcome wins each round depends on the race)


async def test_expired_requests_refuse_decisions_and_are_marked_by_the_sweeper(
    harness: Harness,
) -> None:
    h = harness
    gate = policy(expiry_s=0.3)
    gate.expiry_outcome = workflow_pb2.APPROVAL_EXPIRY_OUTCOME_FAILED
    approval = await h.create(policy=gate)
    assert approval.policy.expiry_outcome == workflow_pb2.APPROVAL_EXPIRY_OUTCOME_FAILED
    assert approval.HasField("expire_time")
    assert approval.expire_time.ToDatetime() > approval.create_time.ToDatetime()

    async def expired() -> pb.Approval | None:
        got = await h.get(approval.approval_id)
        return got if got.state == S.APPROVAL_STATE_EXPIRED else None

    final = await eventually(expired, what="the sweeper to expire the request")
    assert final.HasField("decide_time")
    details = await refused(
        h.as_("bob").Approve(
            pb.ApproveRequest(request_id="late", approval_id=approval.approval_id)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "EXPIRED" in details
    assert await decision_rows(h, approval.approval_id) == []
    events = await eventually(
        lambda: _decided_events(h, approval.run_id), what="the ApprovalDecided event"
    )
    assert [e.event.approval_decided.state for e in events] == [S.APPROVAL_STATE_EXPIRED]
    assert events[0].event.actor.id == "system:approvals"


@pytest.mark.approvals_settings(sweep_interval_s=0)  # no sweeper
async def test_a_decision_after_expiry_is_refused_even_without_the_sweeper(
    harness: Harness,
) -> None:
    h = harness
    approval = await h.create(policy=policy(expiry_s=0.2))
    await asyncio.sleep(0.25)
    await refused(
        h.as_("bob").Approve(
            pb.ApproveRequest(request_id="late", approval_id=approval.approval_id)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert (await h.get(approval.approval_id)).state == S.APPROVAL_STATE_EXPIRED
    assert await decision_rows(h, approval.approval_id) == []


async def _decided_events(h: Harness, run_id: str) -> list[Event] | None:
    events = [
        e
        for e in await h.approval_events()
        if e.event.run_id == run_id and e.event.WhichOneof("payload") == "approval_decided"
    ]
    return events or None


async def test_cancel_closes_a_pending_request_once(harness: Harness) -> None:
    h = harness
    approval = await h.create()
    request = pb.CancelApprovalRequest(
        request_id="c1", approval_id=approval.approval_id, reason="not needed"
    )
    await refused(h.as_("bob").CancelApproval(request), grpc.StatusCode.PERMISSION_DENIED)
    cancelled = (await h.as_("alice").CancelApproval(request)).approval
    assert cancelled.state == S.APPROVAL_STATE_CANCELLED
    replay = (await h.as_("alice").CancelApproval(request)).approval
    assert replay == cancelled
    again = await h.as_("stepline-services").CancelApproval(
        pb.CancelApprovalRequest(request_id="c2", approval_id=approval.approval_id)
    )
    assert again.approval.state == S.APPROVAL_STATE_CANCELLED
    await refused(
        h.as_("bob").Approve(pb.ApproveRequest(request_id="a", approval_id=approval.approval_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    row = await h.pool.fetchrow(
        "SELECT closed_by, close_reason FROM approvals WHERE approval_id = $1",
        approval.approval_id,
    )
    assert (row["closed_by"], row["close_reason"]) == ("alice", "not needed")

    decided = await eventually(lambda: _decided_events(h, approval.run_id), what="event")
    await asyncio.sleep(0.2)  # give a duplicate the chance to show up
    decided = await _decided_events(h, approval.run_id)
    assert decided is not None and len(decided) == 1

    approved = await h.create()
    await h.approve("bob", approved.approval_id)
    await refused(
        h.as_("alice").CancelApproval(
            pb.CancelApprovalRequest(request_id="c3", approval_id=approved.approval_id)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


async def test_events_requested_and_decided_are_published_once_each(harness: Harness) -> None:
    h = harness
    approval = await h.create(policy=policy(required=2))
    await h.approve("bob", approval.approval_id)
    await h.approve("carol", approval.approval_id)
    streams = h.settings.nats.streams

    async def both() -> list[Event] | None:
        mine = [e for e in await h.approval_events() if e.event.run_id == approval.run_id]
        return mine if len(mine) >= 2 else None

    events = await eventually(both, what="two approval events")
    await asyncio.sleep(0.2)  # a duplicate publish would show up by now
    events = [e for e in await h.approval_events() if e.event.run_id == approval.run_id]
    assert [e.event.WhichOneof("payload") for e in events] == [
        "approval_requested",
        "approval_decided",
    ]
    requested, decided = events[0].event, events[1].event
    assert requested.approval_requested.approval_id == approval.approval_id
    assert requested.approval_requested.task_id == approval.task_id
    assert requested.approval_requested.workflow_name == "payout"
    assert requested.actor.id == "stepline-services"
    assert decided.approval_decided.state == S.APPROVAL_STATE_APPROVED
    assert decided.actor.id == "carol"
    for e in events:
        assert e.subject == streams.subject("events", "approval", approval.run_id)
        assert e.msg_id == e.event.event_id
    assert len({e.msg_id for e in events}) == 2
    assert (
        await h.pool.fetchval("SELECT count(*) FROM event_outbox WHERE publish_time IS NULL") == 0
    )


async def test_create_is_idempotent_on_request_id_and_validates_its_input(
    harness: Harness,
) -> None:
    h = harness
    run_id, task_id = await h.ledger_run()
    first = await h.create(run_id=run_id, task_id=task_id, request_id="k1")
    second = await h.create(run_id=run_id, task_id=task_id, request_id="k1")
    assert second == first
    assert await h.pool.fetchval("SELECT count(*) FROM approvals") == 1
    await refused(
        h.as_("stepline-services").CreateApproval(
            pb.CreateApprovalRequest(
                request_id="k1",
                run_id=run_id,
                task_id=task_id,
                step_id="other",
                workflow_name="payout",
                policy=policy(),
            )
        ),
        grpc.StatusCode.ABORTED,
    )
    bad = pb.CreateApprovalRequest(
        request_id="k2",
        run_id=run_id,
        task_id=task_id,
        step_id="gate",
        workflow_name="payout",
        policy=workflow_pb2.ApprovalPolicy(required_approvals=2),
    )
    details = await refused(
        h.as_("stepline-services").CreateApproval(bad), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "approver_principals or approver_roles is required" in details
    bad.policy.CopyFrom(policy(roles=(), principals=("bob",), required=2))
    details = await refused(
        h.as_("stepline-services").CreateApproval(bad), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "can never be reached" in details
    await refused(
        h.as_("bob").CreateApproval(
            pb.CreateApprovalRequest(
                request_id="k3",
                run_id=run_id,
                task_id=task_id,
                step_id="gate",
                workflow_name="payout",
                policy=policy(),
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert await h.pool.fetchval("SELECT count(*) FROM approvals") == 1


async def test_approve_is_idempotent_on_request_id(harness: Harness) -> None:
    h = harness
    approval = await h.create(policy=policy(required=2))
    request = pb.ApproveRequest(request_id="same", approval_id=approval.approval_id, reason="ok")
    first = await h.as_("bob").Approve(request)
    await h.approve("carol", approval.approval_id)
    replay = await h.as_("bob").Approve(request)
    assert replay == first  # the original answer, although the request is APPROVED now
    request.reason = "other"
    await refused(h.as_("bob").Approve(request), grpc.StatusCode.ABORTED)
    assert len(await decision_rows(h, approval.approval_id)) == 2


async def test_list_filters_actionable_and_pages_newest_first(harness: Harness) -> None:
    h = harness
    run_id, task_id = await h.ledger_run()
    created = []
    for index in range(5):
        created.append(
            await h.create(
                run_id=run_id,
                task_id=task_id,
                request_id=f"list-{index}",
                policy=policy(roles=(), principals=("bob", "carol"), required=2)
                if index % 2
                else policy(),
            )
        )
    await h.approve("bob", created[1].approval_id)
    await h.reject("carol", created[0].approval_id, "no")

    seen: list[str] = []
    token = ""
    while True:
        page = await h.as_("dave").ListApprovals(
            pb.ListApprovalsRequest(run_id=run_id, page_size=2, page_token=token)
        )
        seen += [a.approval_id for a in page.approvals]
        token = page.next_page_token
        if not token:
            break
    assert seen == [a.approval_id for a in reversed(created)]

    pending = await h.as_("dave").ListApprovals(
        pb.ListApprovalsRequest(states=[S.APPROVAL_STATE_PENDING])
    )
    assert {a.approval_id for a in pending.approvals} == {a.approval_id for a in created[1:]}

    async def actionable(who: str) -> list[str]:
        page = await h.as_(who).ListApprovals(pb.ListApprovalsRequest(actionable_only=True))
        return [a.approval_id for a in page.approvals]

    ids = [a.approval_id for a in created]
    assert await actionable("carol") == [ids[4], ids[3], ids[2], ids[1]]
    assert await actionable("bob") == [ids[4], ids[3], ids[2]]  # bob approved ids[1]
    assert await actionable("dave") == []
    assert await actionable("erin") == []  # the initiator
    assert await actionable("admin") == [ids[4], ids[3], ids[2], ids[1]]
    await refused(
        h.as_("dave").ListApprovals(pb.ListApprovalsRequest(page_token="garbage")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    missing = str(uuid.uuid4())
    await refused(
        h.as_("dave").GetApproval(pb.GetApprovalRequest(approval_id=missing)),
        grpc.StatusCode.NOT_FOUND,
    )
