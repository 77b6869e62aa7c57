"""The ledger's gRPC server: the only writer of run state.

This first cut connects the ledger's dependencies (its PostgreSQL schema, with
migrations applied, and JetStream) and serves ``LedgerService`` with health and
reflection; the RPCs themselves arrive with the ledger's schema.
"""

from __future__ import annotations

import contextlib
import logging

from stepline.api.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from stepline.common import jetstream
from stepline.common.db import create_pool
from stepline.common.server import GrpcHost, serve_until_stopped
from stepline.ledger.config import LedgerSettings

log = logging.getLogger(__name__)

SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    """``LedgerService``; RPCs not written yet answer UNIMPLEMENTED."""


async def serve(settings: LedgerSettings) -> None:
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_pool(settings.database_url, schema=settings.schema, migrations=[])
        stack.push_async_callback(pool.close)
        nc = await jetstream.connect(settings.nats.url, name="stepline-ledger")
        stack.push_async_callback(nc.drain)
        await jetstream.ensure_streams(nc.jetstream(), settings.nats.streams)
        ledger_servicer = LedgerServicer()  # type: ignore[abstract]  # RPCs arrive with their issue
        host = GrpcHost(settings=settings.server)
        host.add(
            SERVICE_NAME,
            lambda server: ledger_pb2_grpc.add_LedgerServiceServicer_to_server(
                ledger_servicer, server
            ),
        )
        await serve_until_stopped(host)
