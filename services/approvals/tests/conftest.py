"""Fixtures for the approvals tests: the ledger and the approvals service running
in-process on real PostgreSQL and NATS, stubs per principal, a webhook receiver
(a real aiohttp server on a free loopback port) and helpers to sign requests."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from aiohttp import web
from google.protobuf.duration_pb2 import Duration
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from stepline.api.approvals.v1 import approvals_pb2 as pb
from stepline.api.approvals.v1 import approvals_pb2_grpc
from stepline.api.common.v1 import common_pb2, workflow_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from stepline.approvals.config import ApprovalsSettings, WebhookSettings
from stepline.approvals.server import Approvals
from stepline.approvals.server import running as approvals_running
from stepline.common import jetstream
from stepline.common.auth import Authenticator, Principal, new_token
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings, NatsSettings, ServerSettings
from stepline.common.jetstream import MSG_ID_HEADER, Streams
from stepline.ledger.config import LedgerSettings
from stepline.ledger.server import running as ledger_running

if TYPE_CHECKING:
    from stepline.api.approvals.v1.approvals_pb2_grpc import ApprovalsServiceAsyncStub
    from stepline.api.ledger.v1.ledger_pb2_grpc import LedgerServiceAsyncStub

HOOK_SECRET = "hook-secret-value"
INBOUND_SECRET = "inbound-secret-value"

#: principal id -> roles; each gets its own token.
PRINCIPALS: dict[str, tuple[str, ...]] = {
    "admin": ("admin",),
    "stepline-services": ("service",),
    "alice": ("operator",),
    "bob": ("approver",),
    "carol": ("approver",),
    "dave": (),
    "erin": ("approver",),  # starts the runs in these tests
}


@dataclass
class Event:
    subject: str
    msg_id: str
    event: events_pb2.Event


@dataclass
class Harness:
    service: Approvals
    settings: ApprovalsSettings
    ledger: LedgerServiceAsyncStub  # as the services' principal
    nc: NATS
    stubs: dict[str, ApprovalsServiceAsyncStub]

    @property
    def pool(self) -> asyncpg.Pool:
        return self.service.pool

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.service.webhook_port}"

    def as_(self, principal: str) -> ApprovalsServiceAsyncStub:
        return self.stubs[principal]

    async def events(self) -> list[Event]:
        """Every message on this test's events stream, in order."""
        js = self.nc.jetstream()
        streams = self.settings.nats.streams
        info = await js.stream_info(streams.events)
        found: list[Event] = []
        if info.state.messages == 0:
            return found
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(streams.events, seq)
            except NotFoundError:
                continue
            event = events_pb2.Event()
            event.ParseFromString(msg.data or b"")
            found.append(
                Event(msg.subject or "", (msg.headers or {}).get(MSG_ID_HEADER, ""), event)
            )
        return found

    async def approval_events(self) -> list[Event]:
        return [e for e in await self.events() if ".events.approval." in e.subject]

    async def ledger_run(self, *, initiator: str = "erin") -> tuple[str, str]:
        """A run in the ledger with one GOVERN step; returns (run_id, task_id)."""
        definition = workflow_pb2.WorkflowDefinition(name="payout", version=1)
        definition.steps.add(
            id="gate",
            govern=workflow_pb2.Govern(
                policy=workflow_pb2.ApprovalPolicy(approver_roles=["approver"])
            ),
        )
        created = await self.ledger.CreateRun(
            ledger_pb2.CreateRunRequest(
                request_id=str(uuid.uuid4()),
                definition=definition,
                initiator=common_pb2.Principal(id=initiator, roles=list(PRINCIPALS[initiator])),
                tasks=[
                    ledger_pb2.PlannedTask(
                        step_id="gate", step_path="gate", kind=workflow_pb2.STEP_KIND_GOVERN
                    )
                ],
            )
        )
        return created.run.run_id, created.run.tasks[0].task_id

    async def create(
        self,
        *,
        run_id: str = "",
        task_id: str = "",
        policy: workflow_pb2.ApprovalPolicy | None = None,
        initiator: str = "erin",
        workflow_name: str = "payout",
        labels: dict[str, str] | None = None,
        context: dict[str, Any] | None = None,
        request_id: str = "",
    ) -> pb.Approval:
        if not run_id:
            run_id, task_id = await self.ledger_run(initiator=initiator)
        request = pb.CreateApprovalRequest(
            request_id=request_id or f"{task_id}:1",
            run_id=run_id,
            task_id=task_id,
            step_id="gate",
            workflow_name=workflow_name,
            labels=labels or {},
            policy=policy or workflow_pb2.ApprovalPolicy(approver_roles=["approver"]),
            initiator=common_pb2.Principal(id=initiator, roles=list(PRINCIPALS[initiator])),
        )
        request.context.update(context or {"amount": 125})
        response = await self.as_("stepline-services").CreateApproval(request)
        return response.approval

    async def approve(self, principal: str, approval_id: str, reason: str = "ok") -> pb.Approval:
        response = await self.as_(principal).Approve(
            pb.ApproveRequest(request_id=str(uuid.uuid4()), approval_id=approval_id, reason=reason)
        )
        return response.approval

    async def reject(self, principal: str, approval_id: str, reason: str) -> pb.Approval:
        response = await self.as_(principal).Reject(
            pb.RejectRequest(request_id=str(uuid.uuid4()), approval_id=approval_id, reason=reason)
        )
        return response.approval

    async def get(self, approval_id: str) -> pb.Approval:
        response = await self.as_("admin").GetApproval(
            pb.GetApprovalRequest(approval_id=approval_id)
        )
        return response.approval


def policy(
    *,
    roles: tuple[str, ...] = ("approver",),
    principals: tuple[str, ...] = (),
    required: int = 0,
    allow_initiator: bool = False,
    expiry_s: float | None = None,
) -> workflow_pb2.ApprovalPolicy:
    result = workflow_pb2.ApprovalPolicy(
        approver_roles=list(roles),
        approver_principals=list(principals),
        required_approvals=required,
        allow_initiator=allow_initiator,
    )
    if expiry_s is not None:
        result.expiry.CopyFrom(Duration(seconds=int(expiry_s), nanos=int(expiry_s % 1 * 1e9)))
    return result


@pytest.fixture
def tokens() -> dict[str, str]:
    return {name: new_token() for name in PRINCIPALS}


@pytest.fixture
def auth_file(tmp_path: Path, tokens: dict[str, str]) -> Path:
    path = tmp_path / "auth.json"
    Authenticator.write_file(
        path,
        [(tokens[name], Principal(name, frozenset(roles))) for name, roles in PRINCIPALS.items()],
    )
    return path


@pytest.fixture
def secrets_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({"secrets": {"hooks": HOOK_SECRET, "inbound": INBOUND_SECRET}}))
    return path


@pytest.fixture
def approvals_settings(
    database_url: str,
    nats_url: str,
    streams: Streams,
    auth_file: Path,
    secrets_file: Path,
    tokens: dict[str, str],
) -> ApprovalsSettings:
    """Fast loops: sweeps and polls every few tens of milliseconds, short backoffs."""
    return ApprovalsSettings(
        server=ServerSettings(service="approvals", auth_file=auth_file, shutdown_grace_s=1.0),
        client=ClientSettings(service_token=tokens["stepline-services"], default_timeout_s=5.0),
        database_url=database_url,
        nats=NatsSettings(url=nats_url, stream_prefix=streams.prefix),
        ledger_addr="127.0.0.1:0",  # filled in by `harness`
        webhooks=WebhookSettings(
            secrets_file=secrets_file,
            max_attempts=4,
            initial_backoff_s=0.05,
            max_backoff_s=0.2,
            timeout_s=2.0,
        ),
        sweep_interval_s=0.05,
        outbox_poll_s=0.05,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "approvals_settings(**fields): override ApprovalsSettings fields in `harness`"
    )


@pytest.fixture
async def harness(
    request: pytest.FixtureRequest,
    approvals_settings: ApprovalsSettings,
    auth_file: Path,
    tokens: dict[str, str],
) -> AsyncIterator[Harness]:
    marker = request.node.get_closest_marker("approvals_settings")
    if marker is not None:
        approvals_settings = replace(approvals_settings, **marker.kwargs)
    ledger_settings = LedgerSettings(
        server=ServerSettings(service="ledger", auth_file=auth_file, shutdown_grace_s=1.0),
        database_url=approvals_settings.database_url,
        nats=approvals_settings.nats,
    )
    async with contextlib.AsyncExitStack() as stack:
        ledger_host = await stack.enter_async_context(ledger_running(ledger_settings))
        settings = replace(approvals_settings, ledger_addr=f"127.0.0.1:{ledger_host.port}")
        service = await stack.enter_async_context(approvals_running(settings))
        target = f"127.0.0.1:{service.port}"
        stubs = {}
        for name, token in tokens.items():
            channel = await stack.enter_async_context(
                open_channel(target, settings=ClientSettings(service_token=token))
            )
            stubs[name] = approvals_pb2_grpc.ApprovalsServiceStub(channel)
        ledger_channel = await stack.enter_async_context(
            open_channel(settings.ledger_addr, settings=settings.client)
        )
        nc = await jetstream.connect(settings.nats.url, name="approvals-tests")
        stack.push_async_callback(nc.close)
        yield Harness(
            service=service,
            settings=settings,
            ledger=ledger_pb2_grpc.LedgerServiceStub(ledger_channel),
            nc=nc,
            stubs=stubs,
        )


@dataclass
class Receiver:
    """A webhook subscriber: records every request; answers ``fail_first`` times 500."""

    fail_first: int = 0
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        if len(self.requests) <= self.fail_first:
            return web.Response(status=500, text="not yet")
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    result = Receiver()
    app = web.Application()
    app.router.add_post("/hooks", result.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    result.port = int(runner.addresses[0][1])
    try:
        yield result
    finally:
        await runner.cleanup()
