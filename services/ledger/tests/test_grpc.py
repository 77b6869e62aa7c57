"""LedgerService over real loopback gRPC: statuses for bad input, and who may call."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from stepline.api.common.v1 import common_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.api.ledger.v1 import ledger_pb2_grpc
from stepline.common.auth import Authenticator, Principal
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings, ServerSettings
from stepline.common.server import GrpcHost
from stepline.ledger.server import SERVICE_NAME, LedgerServicer

from .conftest import ACTOR, Ledger, claimed_run, create_request

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
            pb.StepTransition(),  # neither task nor chunk
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
        assert errors[2].message == "transitions[3]: set task or chunk"
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
