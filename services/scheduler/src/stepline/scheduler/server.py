"""The scheduler's gRPC server: the API layer for definitions, triggers and run control.

This first cut connects its PostgreSQL schema, JetStream and a channel to the
ledger, and serves ``WorkflowService`` and ``SchedulerService`` with health and
reflection; the RPCs arrive with the run-execution work.
"""

from __future__ import annotations

import contextlib

from stepline.api.scheduler.v1 import (
    scheduler_service_pb2,
    scheduler_service_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from stepline.common import jetstream
from stepline.common.client import open_channel
from stepline.common.db import create_pool
from stepline.common.server import GrpcHost, serve_until_stopped
from stepline.scheduler.config import SchedulerSettings

SCHEDULER_SERVICE = scheduler_service_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name
WORKFLOW_SERVICE = workflow_service_pb2.DESCRIPTOR.services_by_name["WorkflowService"].full_name


class SchedulerServicer(scheduler_service_pb2_grpc.SchedulerServiceServicer):
    """``SchedulerService``; RPCs not written yet answer UNIMPLEMENTED."""


class WorkflowServicer(workflow_service_pb2_grpc.WorkflowServiceServicer):
    """``WorkflowService``; RPCs not written yet answer UNIMPLEMENTED."""


async def serve(settings: SchedulerSettings) -> None:
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_pool(settings.database_url, schema=settings.schema, migrations=[])
        stack.push_async_callback(pool.close)
        nc = await jetstream.connect(settings.nats.url, name="stepline-scheduler")
        stack.push_async_callback(nc.drain)
        await jetstream.ensure_streams(nc.jetstream(), settings.nats.streams)
        ledger = open_channel(settings.ledger_addr, settings=settings.client)
        stack.push_async_callback(ledger.close)
        workflow_servicer = WorkflowServicer()  # type: ignore[abstract]  # RPCs arrive with their issue
        scheduler_servicer = SchedulerServicer()  # type: ignore[abstract]  # RPCs arrive with their issue
        host = GrpcHost(settings=settings.server)
        host.add(
            WORKFLOW_SERVICE,
            lambda server: workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(
                workflow_servicer, server
            ),
        )
        host.add(
            SCHEDULER_SERVICE,
            lambda server: scheduler_service_pb2_grpc.add_SchedulerServiceServicer_to_server(
                scheduler_servicer, server
            ),
        )
        await serve_until_stopped(host)
