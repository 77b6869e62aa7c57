"""LedgerService over real loopback gRPC: statuses for bad input, and who may call."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.api.ledger.v1 import ledger_pb2_grpc
from stepline.common.auth import Authenticator, Principal
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings, ServerSettings
from stepline.common.server import GrpcHost
from stepline.ledger.server import SERVICE_NAME, LedgerServicer

from .conftest import ACTOR, Ledger, claimed_run, create_request

E = run_pb2.RunEventType
SERVICE_TOKEN = "service-token"
USER_TOKEN = "user-token"


@pytest.fixture
async def ledger_target(ledger: Ledger) -> AsyncIterator[str]:
    host = GrpcHost(
        settings=ServerSettings(service="ledger", shutdown_grace_s=0.5),
        authenticator=Authenticator.from_tokens(
            [
                (SERVICE_TOKEN, Principal("executor", frozenset({"service"}))),
                (USER_TOKEN, Principal("alice", frozenset({"operator"}))),
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


def stub(target: str, token: str) -> tuple[grpc.aio.Channel, ledger_pb2_grpc.LedgerServiceStub]:
    channel = open_channel(target, settings=ClientSettings(), token=token)
    return channel, ledger_pb2_grpc.LedgerServiceStub(channel)


async def test_bad_requests_get_pointed_statuses(ledger: Ledger, ledger_target: str) -> None:
    channel, ledger_stub = stub(ledger_target, SERVICE_TOKEN)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ledger_stub.CreateRun(pb.CreateRunRequest(request_id="x"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "definition.name is required" in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ledger_stub.GetRun(pb.GetRunRequest(run_id="missing"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        created = await ledger_stub.CreateRun(create_request("over-grpc"))
        assert created.created
        fetched = await ledger_stub.GetRun(pb.GetRunRequest(run_id=created.run.run_id))
        assert fetched.run.workflow_name == "wf"
    assert await ledger.pool.fetchval("SELECT count(*) FROM runs") == 1


async def test_only_services_may_call_the_ledger(ledger: Ledger, ledger_target: str) -> None:
    channel, ledger_stub = stub(ledger_target, USER_TOKEN)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ledger_stub.CreateRun(create_request())
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await ledger.pool.fetchval("SELECT count(*) FROM runs") == 0


def _task_item(run_id: str, epoch: int, step: str, state: int, rid: str) -> pb.StepTransition:
    return pb.StepTransition(
        task=pb.TransitionTaskRequest(
            request_id=rid,
            run_id=run_id,
            task_id=f"{run_id}/{step}",
            epoch=epoch,
            actor=ACTOR,
            state=state,  # type: ignore[arg-type]
        )
    )


async def test_apply_transitions_answers_each_item_apart(
    ledger: Ledger, ledger_target: str
) -> None:
    """Items of several runs share one call; a refused item is answered with its
    own status and message and leaves the others applied."""
    first, first_epoch = await claimed_run(ledger, "batch-1")
    second, second_epoch = await claimed_run(ledger, "batch-2")
    running = common_pb2.TASK_RUN_STATE_RUNNING
    request = pb.ApplyTransitionsRequest(
        transitions=[
            _task_item(first, first_epoch, "a", running, "t1"),
            _task_item(second, second_epoch + 1, "a", running, "t2"),  # not the claim's epoch
            _task_item(second, second_epoch, "nope", running, "t3"),  # no such task
            pb.StepTransition(),  # no change set
            _task_item(second, second_epoch, "a", running, "t4"),
        ]
    )
    channel, ledger_stub = stub(ledger_target, SERVICE_TOKEN)
    async with channel:
        response = await ledger_stub.ApplyTransitions(request)
        kinds = [r.WhichOneof("result") for r in response.results]
        assert kinds == ["task", "error", "error", "error", "task"]
        assert response.results[0].task.task.state == running
        errors = [r.error for r in response.results if r.HasField("error")]
        assert [e.code for e in errors] == [
            grpc.StatusCode.FAILED_PRECONDITION.value[0],
            grpc.StatusCode.NOT_FOUND.value[0],
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
        ]
        assert errors[0].message.startswith("transitions[1]: ")
        assert "nope" in errors[1].message
        assert errors[2].message == "transitions[3]: set task, chunk or run"
        # A replay of the whole call applies nothing twice.
        again = await ledger_stub.ApplyTransitions(request)
        assert again.results[0] == response.results[0]
        for bad in (
            pb.ApplyTransitionsRequest(),
            pb.ApplyTransitionsRequest(transitions=[pb.StepTransition()] * 1001),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ledger_stub.ApplyTransitions(bad)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "1 to 1000" in (info.value.details() or "")
    states = await ledger.pool.fetch(
        "SELECT task_id, state FROM tasks WHERE state <> $1 ORDER BY task_id",
        common_pb2.TASK_RUN_STATE_PENDING,
    )
    assert [(s["task_id"], s["state"]) for s in states] == sorted(
        [(f"{first}/a", running), (f"{second}/a", running)]
    )


async def test_apply_transitions_ends_a_run_with_its_last_step(
    ledger: Ledger, ledger_target: str
) -> None:
    """A run item goes in order after its run's task items: the last step's end,
    the run's end and the claim's release are one call and one commit."""
    run_id, epoch = await claimed_run(ledger, "run-item", steps=("a",))
    running, succeeded = common_pb2.TASK_RUN_STATE_RUNNING, common_pb2.TASK_RUN_STATE_SUCCEEDED
    run_end = pb.TransitionRunRequest(
        request_id="end",
        run_id=run_id,
        epoch=epoch,
        actor=ACTOR,
        state=common_pb2.WORKFLOW_RUN_STATE_SUCCEEDED,
        release_claim=True,
        release_reason="terminal",
    )
    channel, ledger_stub = stub(ledger_target, SERVICE_TOKEN)
    async with channel:
        early = await ledger_stub.ApplyTransitions(
            pb.ApplyTransitionsRequest(transitions=[pb.StepTransition(run=run_end)])
        )
        assert early.results[0].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "PENDING" in early.results[0].error.message  # the run is not RUNNING yet
        started = pb.TransitionRunRequest()
        started.CopyFrom(run_end)
        started.request_id, started.release_claim = "start", False
        started.state = common_pb2.WORKFLOW_RUN_STATE_RUNNING
        response = await ledger_stub.ApplyTransitions(
            pb.ApplyTransitionsRequest(
                transitions=[
                    pb.StepTransition(run=started),
                    _task_item(run_id, epoch, "a", running, "a-run"),
                    _task_item(run_id, epoch, "a", succeeded, "a-done"),
                    pb.StepTransition(run=run_end),
                ]
            )
        )
    kinds = [r.WhichOneof("result") for r in response.results]
    assert kinds == ["run", "task", "task", "run"]
    end = response.results[-1].run
    assert end.run.state == common_pb2.WORKFLOW_RUN_STATE_SUCCEEDED
    assert end.run.claim.executor_id == ""
    rows = await ledger.pool.fetch(
        "SELECT type, xid::text AS xid FROM events WHERE run_id = $1 AND sequence >= $2"
        " ORDER BY sequence",
        run_id,
        end.event_sequence - 1,
    )
    assert [r["type"] for r in rows] == [
        E.RUN_EVENT_TYPE_TASK_STATE_CHANGED,  # a SUCCEEDED
        E.RUN_EVENT_TYPE_RUN_STATE_CHANGED,
        E.RUN_EVENT_TYPE_CLAIM_RELEASED,
    ]
    assert len({r["xid"] for r in rows}) == 1  # one commit
