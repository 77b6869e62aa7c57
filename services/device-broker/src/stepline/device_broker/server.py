"""The device broker's gRPC server: leases cloud phones found through adb servers.

This first cut checks that every configured adb server answers, connects the
broker's PostgreSQL schema and JetStream, and serves ``DeviceBrokerService``
with health and reflection; leasing arrives with the broker's own work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from stepline.api.device_broker.v1 import device_broker_pb2, device_broker_pb2_grpc
from stepline.common import adb, jetstream
from stepline.common.db import create_pool
from stepline.common.server import GrpcHost, serve_until_stopped
from stepline.device_broker.config import DeviceBrokerSettings

log = logging.getLogger(__name__)

SERVICE_NAME = device_broker_pb2.DESCRIPTOR.services_by_name["DeviceBrokerService"].full_name
ADB_TIMEOUT_S = 5.0


class DeviceBrokerServicer(device_broker_pb2_grpc.DeviceBrokerServiceServicer):
    """``DeviceBrokerService``; RPCs not written yet answer UNIMPLEMENTED."""


async def serve(settings: DeviceBrokerSettings) -> None:
    async with contextlib.AsyncExitStack() as stack:
        for host_name, port in settings.adb_servers:
            version = await asyncio.to_thread(
                adb.server_version, host_name, port, timeout_s=ADB_TIMEOUT_S
            )
            log.info("adb server %s:%d answers (version %d)", host_name, port, version)
        pool = await create_pool(settings.database_url, schema=settings.schema, migrations=[])
        stack.push_async_callback(pool.close)
        nc = await jetstream.connect(settings.nats.url, name="stepline-device-broker")
        stack.push_async_callback(nc.drain)
        device_broker_servicer = DeviceBrokerServicer()  # type: ignore[abstract]  # RPCs arrive with their issue
        host = GrpcHost(settings=settings.server)
        host.add(
            SERVICE_NAME,
            lambda server: device_broker_pb2_grpc.add_DeviceBrokerServiceServicer_to_server(
                device_broker_servicer, server
            ),
        )
        await serve_until_stopped(host)
