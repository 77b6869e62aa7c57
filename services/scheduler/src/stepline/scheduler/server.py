"""The scheduler's gRPC server: definitions, triggers and run control.

It serves ``WorkflowService`` and ``SchedulerService`` and runs loops beside
them, all safe in every replica at once: the cron ticker (schedules claimed in
PostgreSQL, see :mod:`stepline.scheduler.schedules`), the reconciler
(redispatch of orphaned runs, see :mod:`stepline.scheduler.reconciler`), and
the wake-up of runs suspended at a GOVERN step once their approval is decided
(the ApprovalDecided listener and its sweep, see :mod:`stepline.scheduler.suspended`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from stepline.api.approvals.v1 import approvals_pb2_grpc
from stepline.api.ledger.v1 import ledger_pb2_grpc
from stepline.api.scheduler.v1 import (
    scheduler_service_pb2,
    scheduler_service_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from stepline.common import jetstream
from stepline.common.client import open_channel
from stepline.common.db import create_pool, load_migrations
from stepline.common.loops import background, periodic
from stepline.common.server import GrpcHost, serving, wait_until_stopped
from stepline.scheduler.config import SchedulerSettings
from stepline.scheduler.reconciler import Reconciler
from stepline.scheduler.scheduler_service import Jobs, Runs, SchedulerServicer
from stepline.scheduler.schedules import Clock, ScheduleStore, Ticker, wall_clock
from stepline.scheduler.suspended import ApprovalListener, SuspendedSweep
from stepline.scheduler.watch import RunWatcher
from stepline.scheduler.workflow_service import WorkflowServicer
from stepline.scheduler.workflows import WorkflowStore

if TYPE_CHECKING:
    from stepline.api.approvals.v1.approvals_pb2_grpc import ApprovalsServiceAsyncStub

log = logging.getLogger(__name__)

SCHEDULER_SERVICE = scheduler_service_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name
WORKFLOW_SERVICE = workflow_service_pb2.DESCRIPTOR.services_by_name["WorkflowService"].full_name


@dataclass(frozen=True)
class Scheduler:
    """The scheduler's parts, connected: what the server and its loops share."""

    pool: asyncpg.Pool
    nc: NATS
    js: JetStreamContext
    workflows: WorkflowStore
    runs: Runs
    schedules: ScheduleStore
    watcher: RunWatcher
    #: the approvals service (None without STEPLINE_APPROVALS_ADDR)
    approvals: ApprovalsServiceAsyncStub | None = None


@contextlib.asynccontextmanager
async def connected(
    settings: SchedulerSettings, *, clock: Clock = wall_clock
) -> AsyncIterator[Scheduler]:
    """Pool (migrated), NATS with the streams, the ledger channel, and the stores."""
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_pool(
            settings.database_url,
            schema=settings.schema,
            migrations=load_migrations("stepline.scheduler"),
        )
        stack.push_async_callback(pool.close)
        nc = await jetstream.connect(settings.nats.url, name="stepline-scheduler")
        stack.push_async_callback(nc.drain)
        js = nc.jetstream()
        await jetstream.ensure_streams(js, settings.nats.streams)
        channel = open_channel(settings.ledger_addr, settings=settings.client)
        stack.push_async_callback(channel.close)
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        approvals = None
        if settings.approvals_addr:
            approvals_channel = open_channel(settings.approvals_addr, settings=settings.client)
            stack.push_async_callback(approvals_channel.close)
            approvals = approvals_pb2_grpc.ApprovalsServiceStub(approvals_channel)
        workflows = WorkflowStore(pool)
        runs = Runs(workflows=workflows, ledger=ledger, jobs=Jobs(js, settings.nats.streams))
        yield Scheduler(
            pool=pool,
            nc=nc,
            js=js,
            workflows=workflows,
            runs=runs,
            schedules=ScheduleStore(pool, runs, clock=clock),
            watcher=RunWatcher(
                ledger=ledger, nc=nc, streams=settings.nats.streams, poll_s=settings.watch_poll_s
            ),
            approvals=approvals,
        )


@contextlib.asynccontextmanager
async def running(settings: SchedulerSettings) -> AsyncIterator[GrpcHost]:
    """The scheduler serving, with its ticker and reconciler, until the block exits."""
    async with connected(settings) as parts:
        servicer = SchedulerServicer(
            runs=parts.runs, schedules=parts.schedules, watcher=parts.watcher
        )
        workflow_servicer = WorkflowServicer(parts.workflows)
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
                servicer, server
            ),
        )
        ticker = Ticker(parts.schedules)
        reconciler = Reconciler(parts.runs, grace_s=settings.orphan_grace_s)
        loops: list[tuple[str, float, Callable[[], Awaitable[object]]]] = [
            ("scheduler-cron-ticker", settings.tick_interval_s, ticker.tick),
            ("scheduler-reconciler", settings.reconcile_interval_s, reconciler.reconcile),
        ]
        if settings.approval_listener:
            listener = ApprovalListener(parts.runs, parts.js, settings.nats.streams)
            # runs until cancelled; restarted a second after a failure
            loops.append(("scheduler-approval-listener", 1.0, listener.run))
        if parts.approvals is not None:
            sweep = SuspendedSweep(parts.runs, parts.approvals, grace_s=settings.orphan_grace_s)
            loops.append(
                ("scheduler-suspended-sweep", settings.suspended_sweep_interval_s, sweep.sweep)
            )
        running_loops = [periodic(*loop) for loop in loops if loop[1] > 0]
        async with serving(host), background(running_loops):
            yield host


async def serve(settings: SchedulerSettings) -> None:
    async with running(settings) as host:
        await wait_until_stopped(host)
