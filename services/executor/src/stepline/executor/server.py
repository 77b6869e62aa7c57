"""The executor process: a stateless worker that pulls jobs from ``STEPLINE_JOBS``.

It serves only ``grpc.health.v1`` (and reflection). This first cut connects to
JetStream and makes sure the streams and the shared pull consumer exist; the
step loop arrives with the run-execution work.
"""

from __future__ import annotations

import contextlib

from stepline.common import jetstream
from stepline.common.client import open_channel
from stepline.common.server import GrpcHost, serve_until_stopped
from stepline.executor.config import ExecutorSettings

JOBS_CONSUMER = "executors"


async def serve(settings: ExecutorSettings) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nc = await jetstream.connect(
            settings.nats.url, name=f"stepline-executor-{settings.executor_id}"
        )
        stack.push_async_callback(nc.drain)
        js = nc.jetstream()
        streams = settings.nats.streams
        await jetstream.ensure_streams(js, streams)
        await jetstream.ensure_pull_consumer(js, stream=streams.jobs, durable=JOBS_CONSUMER)
        for address in (settings.ledger_addr, settings.device_broker_addr, settings.approvals_addr):
            channel = open_channel(address, settings=settings.client)
            stack.push_async_callback(channel.close)
        await serve_until_stopped(GrpcHost(settings=settings.server))
