"""The approvals service's gRPC server: human approval gates for GOVERN steps.

This first cut connects its PostgreSQL schema, JetStream and a channel to the
ledger, and serves ``ApprovalsService`` with health and reflection; requests,
decisions and webhooks arrive with the approvals work.
"""

from __future__ import annotations

import contextlib

from stepline.api.approvals.v1 import approvals_pb2, approvals_pb2_grpc
from stepline.approvals.config import ApprovalsSettings
from stepline.common import jetstream
from stepline.common.client import open_channel
from stepline.common.db import create_pool
from stepline.common.server import GrpcHost, serve_until_stopped

SERVICE_NAME = approvals_pb2.DESCRIPTOR.services_by_name["ApprovalsService"].full_name


class ApprovalsServicer(approvals_pb2_grpc.ApprovalsServiceServicer):
    """``ApprovalsService``; RPCs not written yet answer UNIMPLEMENTED."""


async def serve(settings: ApprovalsSettings) -> None:
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_pool(settings.database_url, schema=settings.schema, migrations=[])
        stack.push_async_callback(pool.close)
        nc = await jetstream.connect(settings.nats.url, name="stepline-approvals")
        stack.push_async_callback(nc.drain)
        ledger = open_channel(settings.ledger_addr, settings=settings.client)
        stack.push_async_callback(ledger.close)
        approvals_servicer = ApprovalsServicer()  # type: ignore[abstract]  # RPCs arrive with their issue
        host = GrpcHost(settings=settings.server)
        host.add(
            SERVICE_NAME,
            lambda server: approvals_pb2_grpc.add_ApprovalsServiceServicer_to_server(
                approvals_servicer, server
            ),
        )
        await serve_until_stopped(host)
