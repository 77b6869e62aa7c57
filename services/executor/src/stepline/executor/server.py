"""The executor process: a stateless worker that pulls jobs from ``STEPLINE_JOBS``.

It serves only ``grpc.health.v1`` (and reflection). Jobs come from the shared
durable pull consumer ``executors``; at most ``max_concurrent_runs`` run at
once (runs waiting on their chunks do not count). A job is acked when its run
is done with this executor (terminal, paused, claim lost or not claimable) and
kept alive with in-progress acks meanwhile. On stop the executor pulls no more
jobs, lets runs reach a step boundary within the grace period, releases their
claims and naks their jobs so another executor continues them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
import nats.errors
from nats.aio.msg import Msg

from stepline.api.common.v1 import workflow_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.scheduler.v1 import workflow_service_pb2 as wpb
from stepline.api.scheduler.v1 import workflow_service_pb2_grpc
from stepline.common import jetstream
from stepline.common.client import open_channel, rpc
from stepline.common.server import GrpcHost, serving, wait_until_stopped
from stepline.executor.chunks import execute_chunk_job
from stepline.executor.config import ExecutorSettings
from stepline.executor.control import Control
from stepline.executor.devices import DeviceBroker
from stepline.executor.govern import Approvals
from stepline.executor.ledger import Ledger
from stepline.executor.runner import ACK, Worker, WorkflowResolver, execute_run_job
from stepline.executor.verbs.registry import VerbRegistry

log = logging.getLogger(__name__)

JOBS_CONSUMER = "executors"
FETCH_TIMEOUT_S = 1.0


class SchedulerWorkflows:
    """Child workflow definitions from the scheduler's WorkflowService."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = workflow_service_pb2_grpc.WorkflowServiceStub(channel)

    async def get(self, name: str, version: int) -> workflow_pb2.WorkflowDefinition:
        response = await rpc(
            self.stub.GetWorkflow(wpb.GetWorkflowRequest(name=name, version=version))
        )
        return response.workflow.definition


class JobLoop:
    """Pulls jobs and runs each in its own task, within the concurrency limit."""

    def __init__(self, worker: Worker, subscription: object) -> None:
        self.worker = worker
        self.subscription = subscription
        self.active: dict[asyncio.Task[None], Control] = {}
        # Set when the executor stops taking jobs: the pull loop ends after its
        # fetch in flight (no pull request is left open on the server to
        # swallow a job) and naks what that fetch still brought.
        self.stopping = asyncio.Event()

    def free(self) -> int:
        limit = self.worker.settings.max_concurrent_runs + self.worker.parked
        return limit - len(self.active)

    async def pull(self) -> None:
        changed = self.worker.capacity_changed
        while not self.stopping.is_set():
            changed.clear()
            free = self.free()
            if free <= 0:
                await changed.wait()
                continue
            try:
                messages = await self.subscription.fetch(batch=free, timeout=FETCH_TIMEOUT_S)  # type: ignore[attr-defined]
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            for msg in messages:
                if self.stopping.is_set():  # back to the stream for another executor
                    with contextlib.suppress(Exception):
                        await msg.nak()
                    continue
                control = Control()
                task = asyncio.create_task(self.handle(msg, control), name=f"job-{msg.subject}")
                self.active[task] = control
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.active.pop(task, None)
        self.worker.capacity_changed.set()

    async def handle(self, msg: Msg, control: Control) -> None:
        job = await jetstream.parse_or_term(msg, events_pb2.RunJob, what="job")
        if job is None:
            return
        delivered = msg.metadata.num_delivered if msg.metadata else 0
        executor = self.worker.settings.executor_id
        try:
            if job.chunk_id:
                request_id = f"claim:{job.chunk_id}:{job.dispatch_epoch}:{delivered}:{executor}"
                disposition = await execute_chunk_job(
                    self.worker, job, request_id=request_id, control=control, beat=msg.in_progress
                )
            else:
                request_id = f"claim:{job.run_id}:{job.dispatch_epoch}:{delivered}:{executor}"
                disposition = await execute_run_job(
                    self.worker, job, request_id=request_id, control=control, beat=msg.in_progress
                )
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.nak())
            raise
        except Exception:
            log.exception("job for run %s failed in the executor; redelivering", job.run_id)
            await msg.nak(delay=5)
            return
        if disposition == ACK:
            await msg.ack()
        else:
            await msg.nak()

    async def drain(self, grace_s: float) -> None:
        """Runs stop at their next step boundary; after the grace they are cut off."""
        for control in self.active.values():
            control.drain()
        tasks = list(self.active)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


@contextlib.asynccontextmanager
async def running(
    settings: ExecutorSettings,
    *,
    registry: VerbRegistry | None = None,
    workflows: WorkflowResolver | None = None,
) -> AsyncIterator[GrpcHost]:
    """The executor pulling and running jobs until the block exits (then it drains)."""
    if registry is None:
        registry = VerbRegistry.default(http_allowed_hosts=settings.http_allowed_hosts)
    async with contextlib.AsyncExitStack() as stack:
        nc = await jetstream.connect(
            settings.nats.url, name=f"stepline-executor-{settings.executor_id}"
        )
        stack.push_async_callback(nc.drain)
        js = nc.jetstream()
        streams = settings.nats.streams
        await jetstream.ensure_streams(js, streams)
        await jetstream.ensure_pull_consumer(
            js, stream=streams.jobs, durable=JOBS_CONSUMER, ack_wait_s=settings.ack_wait_s
        )
        channel = open_channel(settings.ledger_addr, settings=settings.client)
        stack.push_async_callback(channel.close)
        if workflows is None and settings.scheduler_addr:
            scheduler = open_channel(settings.scheduler_addr, settings=settings.client)
            stack.push_async_callback(scheduler.close)
            workflows = SchedulerWorkflows(scheduler)
        devices = None
        if settings.device_broker_addr:
            broker = open_channel(settings.device_broker_addr, settings=settings.client)
            stack.push_async_callback(broker.close)
            devices = DeviceBroker(
                broker,
                executor_id=settings.executor_id,
                ttl_s=settings.device_ttl_s,
                wait_s=settings.device_wait_s,
                adb_timeout_s=settings.adb_timeout_s,
            )
            stack.push_async_callback(devices.close)  # before its channel closes
        approvals = None
        if settings.approvals_addr:
            approvals_channel = open_channel(settings.approvals_addr, settings=settings.client)
            stack.push_async_callback(approvals_channel.close)
            approvals = Approvals(approvals_channel)
        worker = Worker(
            settings=settings,
            ledger=Ledger(channel, executor_id=settings.executor_id),
            nc=nc,
            js=js,
            registry=registry,
            workflows=workflows,
            devices=devices,
            approvals=approvals,
        )
        subscription = await js.pull_subscribe_bind(JOBS_CONSUMER, stream=streams.jobs)
        stack.push_async_callback(subscription.unsubscribe)
        loop = JobLoop(worker, subscription)
        host = GrpcHost(settings=settings.server)
        async with serving(host):
            puller = asyncio.create_task(loop.pull(), name="executor-pull")
            try:
                yield host
            finally:
                log.info("executor %s draining", settings.executor_id)
                loop.stopping.set()
                worker.capacity_changed.set()  # wake a pull loop waiting for room
                await asyncio.gather(
                    _stop_pulling(puller), loop.drain(settings.server.shutdown_grace_s)
                )


async def _stop_pulling(puller: asyncio.Task[None]) -> None:
    """Let the pull loop end after its fetch in flight; cut it off if that hangs."""
    try:
        await asyncio.wait_for(asyncio.shield(puller), FETCH_TIMEOUT_S + 5)
    except TimeoutError:
        puller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await puller
    except Exception:
        log.exception("the executor's pull loop failed")


async def serve(settings: ExecutorSettings) -> None:
    async with running(settings) as host:
        await wait_until_stopped(host)
