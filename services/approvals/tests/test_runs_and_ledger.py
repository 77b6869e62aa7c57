"""The approvals service and the ledger: a run that ends closes its requests, and a
decision made while the ledger is down reaches the run's history once it is back."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from stepline.api.approvals.v1 import approvals_pb2 as pb
from stepline.api.approvals.v1 import approvals_pb2_grpc
from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from stepline.approvals.config import ApprovalsSettings
from stepline.approvals.server import running as approvals_running
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings, ServerSettings
from stepline.common.embedded import free_port
from stepline.common.testing import eventually
from stepline.ledger.config import LedgerSettings
from stepline.ledger.server import running as ledger_running

from .conftest import Harness

S = pb.ApprovalState


async def test_a_run_that_ends_cancels_its_pending_requests(harness: Harness) -> None:
    h = harness
    run_id, task_id = await h.ledger_run()
    pending = await h.create(run_id=run_id, task_id=task_id, request_id="p")
    decided = await h.create(run_id=run_id, task_id=task_id, request_id="d")
    await h.approve("bob", decided.approval_id)
    elsewhere = await h.create()

    response = await h.ledger.RequestControl(
        ledger_pb2.RequestControlRequest(
            request_id=str(uuid.uuid4()),
            run_id=run_id,
            action=run_pb2.CONTROL_ACTION_CANCEL,
            actor=common_pb2.Principal(id="alice", roles=["operator"]),
            reason="not needed",
        )
    )
    assert response.run.state == common_pb2.WORKFLOW_RUN_STATE_CANCELLED

    async def cancelled() -> pb.Approval | None:
        got = await h.get(pending.approval_id)
        return got if got.state == S.APPROVAL_STATE_CANCELLED else None

    closed = await eventually(cancelled, what="the request to be cancelled")
    assert closed.HasField("decide_time")
    assert (await h.get(decided.approval_id)).state == S.APPROVAL_STATE_APPROVED
    assert (await h.get(elsewhere.approval_id)).state == S.APPROVAL_STATE_PENDING
    row = await h.pool.fetchrow(
        "SELECT closed_by, close_reason FROM approvals WHERE approval_id = $1",
        pending.approval_id,
    )
    assert (row["closed_by"], row["close_reason"]) == (
        "system:approvals",
        "the run ended CANCELLED",
    )

    async def decided_events() -> list[Any] | None:
        found = [
            e.event.approval_decided
            for e in await h.approval_events()
            if e.event.WhichOneof("payload") == "approval_decided"
            and e.event.approval_decided.approval_id == pending.approval_id
        ]
        return found or None

    [event] = await eventually(decided_events, what="ApprovalDecided(CANCELLED)")
    assert event.state == S.APPROVAL_STATE_CANCELLED
    assert event.task_id == task_id


async def test_a_decision_reaches_the_ledger_after_an_outage(
    approvals_settings: ApprovalsSettings, auth_file: Path, tokens: dict[str, str]
) -> None:
    port = free_port()
    ledger_settings = LedgerSettings(
        server=ServerSettings(
            service="ledger", listen=f"127.0.0.1:{port}", auth_file=auth_file, shutdown_grace_s=0.5
        ),
        database_url=approvals_settings.database_url,
        nats=approvals_settings.nats,
    )
    # wait_for_ready: the restarted ledger's address may still be in gRPC's
    # reconnect backoff when the test calls it.
    as_service = ClientSettings(service_token=tokens["stepline-services"], wait_for_ready=True)
    initiator = common_pb2.Principal(id="erin", roles=["approver"])

    async def ledger_stub_call(call: Any) -> Any:
        async with open_channel(f"127.0.0.1:{port}", settings=as_service) as channel:
            return await call(ledger_pb2_grpc.LedgerServiceStub(channel))

    async with ledger_running(ledger_settings):
        definition = ledger_pb2.CreateRunRequest(
            request_id="run-1",
            initiator=initiator,
            tasks=[
                ledger_pb2.PlannedTask(
                    step_id="gate", step_path="gate", kind=workflow_pb2.STEP_KIND_GOVERN
                )
            ],
        )
        definition.definition.name = "payout"
        definition.definition.version = 1
        created = await ledger_stub_call(lambda stub: stub.CreateRun(definition))
    run_id, task_id = created.run.run_id, created.run.tasks[0].task_id

    settings = replace(approvals_settings, ledger_addr=f"127.0.0.1:{port}")
    async with contextlib.AsyncExitStack() as stack:
        service = await stack.enter_async_context(approvals_running(settings))
        channel = await stack.enter_async_context(
            open_channel(f"127.0.0.1:{service.port}", settings=as_service)
        )
        stub = approvals_pb2_grpc.ApprovalsServiceStub(channel)
        bob_channel = await stack.enter_async_context(
            open_channel(
                f"127.0.0.1:{service.port}", settings=ClientSettings(service_token=tokens["bob"])
            )
        )
        as_bob = approvals_pb2_grpc.ApprovalsServiceStub(bob_channel)
        approval = (
            await stub.CreateApproval(
                pb.CreateApprovalRequest(
                    request_id="a",
                    run_id=run_id,
                    task_id=task_id,
                    step_id="gate",
                    workflow_name="payout",
                    policy={"approver_roles": ["approver"]},  # type: ignore[arg-type]
                    initiator=initiator,
                )
            )
        ).approval
        await as_bob.Approve(
            pb.ApproveRequest(request_id="b", approval_id=approval.approval_id, reason="yes")
        )

        async def failing() -> Any:
            row = await service.pool.fetchrow("SELECT * FROM ledger_outbox")
            return row if row is not None and row["attempts"] >= 1 and row["last_error"] else None

        row = await eventually(failing, what="a failed attempt to reach the ledger")
        assert row["done_time"] is None and not row["given_up"]
        assert "Unavailable" in row["last_error"]

        async with ledger_running(ledger_settings):

            async def recorded() -> Any:
                response = await ledger_stub_call(
                    lambda s: s.GetRunHistory(ledger_pb2.GetRunHistoryRequest(run_id=run_id))
                )
                found = [
                    e
                    for e in response.events
                    if e.type == run_pb2.RUN_EVENT_TYPE_APPROVAL_DECISION_RECORDED
                ]
                return found or None

            [event] = await eventually(recorded, timeout_s=30, what="the decision in history")
            assert event.actor.id == "bob"
            assert event.payload["approval_state"] == "APPROVED"
            done = await eventually(
                lambda: service.pool.fetchrow(
                    "SELECT decision_id::text FROM ledger_outbox WHERE done_time IS NOT NULL"
                ),
                what="the outbox row marked done",
            )
            assert done["decision_id"] == await service.pool.fetchval(
                "SELECT decision_id::text FROM decisions"
            )
