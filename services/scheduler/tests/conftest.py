"""Fixtures for the scheduler's tests: the ledger and the scheduler running
in-process on real PostgreSQL and NATS, with stubs to call them and a reader of
the jobs stream (no executor: tests look at the ledger and at the jobs)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pytest
from google.protobuf.duration_pb2 import Duration
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from stepline.api.common.v1 import workflow_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.ledger.v1 import ledger_pb2_grpc
from stepline.api.scheduler.v1 import (
    scheduler_service_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from stepline.common import jetstream
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings, NatsSettings, ServerSettings
from stepline.common.jetstream import MSG_ID_HEADER, Streams
from stepline.common.testing import Credentials
from stepline.ledger.config import LedgerSettings
from stepline.ledger.server import running as ledger_running
from stepline.scheduler.config import SchedulerSettings
from stepline.scheduler.server import running as scheduler_running

if TYPE_CHECKING:
    from stepline.api.ledger.v1.ledger_pb2_grpc import LedgerServiceAsyncStub
    from stepline.api.scheduler.v1.scheduler_service_pb2_grpc import SchedulerServiceAsyncStub
    from stepline.api.scheduler.v1.workflow_service_pb2_grpc import WorkflowServiceAsyncStub


@dataclass
class Job:
    job: events_pb2.RunJob
    msg_id: str
    subject: str


@dataclass
class Mesh:
    settings: SchedulerSettings  # the scheduler's (its loops are off)
    credentials: Credentials
    scheduler: SchedulerServiceAsyncStub  # as alice (operator)
    workflows: WorkflowServiceAsyncStub  # as alice (operator)
    ledger: LedgerServiceAsyncStub  # as a service
    nc: NATS

    async def jobs(self) -> list[Job]:
        """Every job on the jobs stream, in publish order (none is consumed here)."""
        js = self.nc.jetstream()
        streams = self.settings.nats.streams
        info = await js.stream_info(streams.jobs)
        result: list[Job] = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            if info.state.messages == 0:
                break
            try:
                msg = await js.get_msg(streams.jobs, seq)
            except NotFoundError:
                continue
            job = events_pb2.RunJob()
            job.ParseFromString(msg.data or b"")
            result.append(Job(job, (msg.headers or {}).get(MSG_ID_HEADER, ""), msg.subject or ""))
        return result

    async def register(
        self, definition: workflow_pb2.WorkflowDefinition
    ) -> workflow_pb2.WorkflowDefinition:
        response = await self.workflows.RegisterWorkflow(
            workflow_service_pb2.RegisterWorkflowRequest(definition=definition)
        )
        return response.workflow.definition


def hello(
    name: str = "hello",
    *,
    permissions: workflow_pb2.WorkflowPermissions | None = None,
    run_timeout: Duration | None = None,
) -> workflow_pb2.WorkflowDefinition:
    """Two steps and two inputs: ``who`` (string, required), ``times`` (int, default 1)."""
    definition = workflow_pb2.WorkflowDefinition(
        name=name, allowed_verbs=["core.*"], permissions=permissions, run_timeout=run_timeout
    )
    definition.input_schema.fields.add(
        name="who", type=workflow_pb2.INPUT_TYPE_STRING, required=True
    )
    times = definition.input_schema.fields.add(name="times", type=workflow_pb2.INPUT_TYPE_INT)
    times.default.number_value = 1
    definition.steps.add(id="greet", atomic=workflow_pb2.AtomicOp(verb="core.noop"))
    definition.steps.add(id="bye", atomic=workflow_pb2.AtomicOp(verb="core.noop"))
    return definition


@pytest.fixture
def scheduler_settings(
    database_url: str, nats_url: str, streams: Streams, credentials: Credentials
) -> SchedulerSettings:
    """Settings with the ticker and the reconciler off (tests drive them); the
    ledger address is filled in by ``mesh``."""
    return SchedulerSettings(
        server=ServerSettings(
            service="scheduler", auth_file=credentials.auth_file, shutdown_grace_s=1.0
        ),
        client=ClientSettings(service_token=credentials.service_token),
        database_url=database_url,
        nats=NatsSettings(url=nats_url, stream_prefix=streams.prefix),
        ledger_addr="127.0.0.1:0",
        tick_interval_s=0,
        reconcile_interval_s=0,
        watch_poll_s=30.0,  # long: a watch test must be served by live events
    )


@pytest.fixture
async def mesh(
    scheduler_settings: SchedulerSettings, credentials: Credentials
) -> AsyncIterator[Mesh]:
    ledger_settings = LedgerSettings(
        server=ServerSettings(service="ledger", auth_file=credentials.auth_file),
        database_url=scheduler_settings.database_url,
        nats=scheduler_settings.nats,
    )
    async with contextlib.AsyncExitStack() as stack:
        ledger_host = await stack.enter_async_context(ledger_running(ledger_settings))
        settings = replace(scheduler_settings, ledger_addr=f"127.0.0.1:{ledger_host.port}")
        host = await stack.enter_async_context(scheduler_running(settings))
        target = f"127.0.0.1:{host.port}"
        as_user = ClientSettings(service_token=credentials.user_token)
        user = await stack.enter_async_context(open_channel(target, settings=as_user))
        service = await stack.enter_async_context(
            open_channel(settings.ledger_addr, settings=settings.client)
        )
        nc = await jetstream.connect(settings.nats.url, name="scheduler-tests")
        stack.push_async_callback(nc.close)
        yield Mesh(
            settings=settings,
            credentials=credentials,
            scheduler=scheduler_service_pb2_grpc.SchedulerServiceStub(user),
            workflows=workflow_service_pb2_grpc.WorkflowServiceStub(user),
            ledger=ledger_pb2_grpc.LedgerServiceStub(service),
            nc=nc,
        )
