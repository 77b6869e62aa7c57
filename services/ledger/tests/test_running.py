"""The ledger as the other services' tests use it: ``running()`` in-process."""

from __future__ import annotations

from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.api.ledger.v1 import ledger_pb2_grpc
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings, NatsSettings, ServerSettings
from stepline.common.jetstream import Streams
from stepline.common.testing import Credentials
from stepline.ledger.config import LedgerSettings
from stepline.ledger.server import running

from .conftest import create_request


async def test_running_serves_the_ledger_with_auth(
    database_url: str, nats_url: str, streams: Streams, credentials: Credentials
) -> None:
    settings = LedgerSettings(
        server=ServerSettings(service="ledger", auth_file=credentials.auth_file),
        database_url=database_url,
        nats=NatsSettings(url=nats_url, stream_prefix=streams.prefix),
    )
    async with running(settings) as host:
        channel = open_channel(
            f"127.0.0.1:{host.port}",
            settings=ClientSettings(service_token=credentials.service_token),
        )
        async with channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            created = await stub.CreateRun(create_request("via-running"))
            fetched = await stub.GetRun(pb.GetRunRequest(run_id=created.run.run_id))
    assert fetched.run.workflow_name == "wf"
