"""A test mesh for the executor: the real ledger in-process, NATS, and
executors started in-process, with runs created through the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.api.ledger.v1 import ledger_pb2_grpc
from stepline.common import jetstream
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings, NatsSettings, ServerSettings
from stepline.common.jetstream import Streams
from stepline.common.plan import plan
from stepline.common.states import RUN_TERMINAL
from stepline.common.testing import Credentials
from stepline.executor.config import ExecutorSettings
from stepline.executor.server import running as executor_running
from stepline.executor.verbs.base import VerbContext, VerbError
from stepline.executor.verbs.registry import VerbRegistry
from stepline.ledger.config import LedgerSettings
from stepline.ledger.server import running as ledger_running

R = common_pb2.WorkflowRunState
OPERATOR = common_pb2.Principal(id="user:alice", roles=["operator"])
WAIT_S = 20.0


@dataclass
class Probe:
    """Test verbs' shared state: calls seen, gates to hold a step open."""

    calls: list[tuple[str, Any]] = field(default_factory=list)
    flaky_failures: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)


def test_registry(probe: Probe) -> VerbRegistry:
    registry = VerbRegistry.default(plugins=[])

    async def flaky(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
        probe.calls.append(("flaky", ctx.attempt_number))
        if ctx.attempt_number <= probe.flaky_failures:
            raise VerbError(f"flaky failure {ctx.attempt_number}")
        return {"attempt": ctx.attempt_number}

    async def record(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
        probe.calls.append(("record", (ctx.extras.get("executor_id"), args["value"])))
        return {"double": args["value"] * 2}

    async def gate(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
        probe.started.set()
        await probe.gate.wait()
        return {"opened": True}

    registry.register("test.flaky", flaky)
    registry.register("test.record", record)
    registry.register("test.gate", gate)
    return registry


class Workflows:
    def __init__(self) -> None:
        self.definitions: dict[str, workflow_pb2.WorkflowDefinition] = {}

    async def get(self, name: str, version: int) -> workflow_pb2.WorkflowDefinition:
        return self.definitions[name]


@dataclass
class Mesh:
    ledger_addr: str
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub
    nc: NATS
    streams: Streams
    credentials: Credentials
    nats_url: str
    probe: Probe
    workflows: Workflows

    def settings(self, executor_id: str, **overrides: Any) -> ExecutorSettings:
        return ExecutorSettings(
            server=ServerSettings(
                service="executor", auth_file=self.credentials.auth_file, shutdown_grace_s=5
            ),
            client=ClientSettings(service_token=self.credentials.service_token),
            nats=NatsSettings(url=self.nats_url, stream_prefix=self.streams.prefix),
            ledger_addr=self.ledger_addr,
            executor_id=executor_id,
            **overrides,
        )

    def executor(self, executor_id: str = "executor-1", **overrides: Any) -> Any:
        return executor_running(
            self.settings(executor_id, **overrides),
            registry=test_registry(self.probe),
            workflows=self.workflows,
        )

    async def create(
        self, definition: workflow_pb2.WorkflowDefinition, inputs: Mapping[str, Any] | None = None
    ) -> str:
        if not definition.version:
            definition.version = 1
        request = pb.CreateRunRequest(
            request_id=str(uuid.uuid4()),
            definition=definition,
            initiator=OPERATOR,
            tasks=plan(definition),
        )
        request.inputs.update(dict(inputs or {}))
        created = await self.stub.CreateRun(request)
        return created.run.run_id

    async def publish(self, run_id: str, epoch: int = 1) -> None:
        await jetstream.publish_proto(
            self.nc.jetstream(),
            self.streams.subject("jobs", "run"),
            events_pb2.RunJob(run_id=run_id, dispatch_epoch=epoch),
            msg_id=f"run:{run_id}:{epoch}",
        )

    async def start(
        self, definition: workflow_pb2.WorkflowDefinition, inputs: Mapping[str, Any] | None = None
    ) -> str:
        run_id = await self.create(definition, inputs)
        await self.publish(run_id)
        return run_id

    async def wait_event(self, run_id: str, kind: str, match: Any) -> events_pb2.Event:
        """The first event of ``kind`` for the run (from the stream's start) that ``match``es."""
        js = self.nc.jetstream()
        sub = await js.subscribe(
            self.streams.subject("events", kind, run_id), ordered_consumer=True
        )
        try:
            async with asyncio.timeout(WAIT_S):
                while True:
                    msg = await sub.next_msg(timeout=WAIT_S)
                    event = events_pb2.Event.FromString(msg.data)
                    if match(event):
                        return event
        finally:
            await sub.unsubscribe()

    async def wait_run(self, run_id: str, *states: int) -> run_pb2.WorkflowRun:
        wanted = states or RUN_TERMINAL
        await self.wait_event(run_id, "run", lambda e: e.run_state_changed.to_state in wanted)
        return await self.get(run_id)

    async def get(self, run_id: str) -> run_pb2.WorkflowRun:
        response = await self.stub.GetRun(
            pb.GetRunRequest(run_id=run_id, view=run_pb2.RUN_VIEW_TASKS)
        )
        return response.run

    async def control(self, run_id: str, action: int, reason: str = "test") -> bool:
        response = await self.stub.RequestControl(
            pb.RequestControlRequest(
                request_id=str(uuid.uuid4()),
                run_id=run_id,
                action=action,  # type: ignore[arg-type]
                actor=OPERATOR,
                reason=reason,
            )
        )
        return response.applied


@pytest.fixture
async def mesh(
    database_url: str, nats_url: str, streams: Streams, credentials: Credentials
) -> AsyncIterator[Mesh]:
    settings = LedgerSettings(
        server=ServerSettings(service="ledger", auth_file=credentials.auth_file),
        database_url=database_url,
        nats=NatsSettings(url=nats_url, stream_prefix=streams.prefix),
    )
    async with contextlib.AsyncExitStack() as stack:
        host = await stack.enter_async_context(ledger_running(settings))
        addr = f"127.0.0.1:{host.port}"
        channel = open_channel(
            addr, settings=ClientSettings(service_token=credentials.service_token)
        )
        stack.push_async_callback(channel.close)
        nc = await jetstream.connect(nats_url, name="executor-test")
        stack.push_async_callback(nc.close)
        yield Mesh(
            ledger_addr=addr,
            stub=ledger_pb2_grpc.LedgerServiceStub(channel),
            nc=nc,
            streams=streams,
            credentials=credentials,
            nats_url=nats_url,
            probe=Probe(),
            workflows=Workflows(),
        )


def workflow(*steps: workflow_pb2.Step, **fields: Any) -> workflow_pb2.WorkflowDefinition:
    return workflow_pb2.WorkflowDefinition(
        name=fields.pop("name", "wf"),
        version=1,
        allowed_verbs=fields.pop("allowed_verbs", ["core.*", "test.*"]),
        steps=list(steps),
        **fields,
    )


def atomic(
    step_id: str, verb: str, args: Mapping[str, Any] | None = None, **fields: Any
) -> workflow_pb2.Step:
    step = workflow_pb2.Step(id=step_id, atomic=workflow_pb2.AtomicOp(verb=verb), **fields)
    step.atomic.args.update(dict(args or {}))
    return step
