"""LedgerService over real loopback gRPC: statuses for bad input, and who may call."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.api.ledger.v1 import ledger_pb2_grpc
from stepline.common.auth import Authenticator, Principal
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings, ServerSettings
from stepline.common.server import GrpcHost
from stepline.ledger.server import SERVICE_NAME, LedgerServicer

from .conftest import Ledger, create_request

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
