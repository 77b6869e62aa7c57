"""The approvals service: human approval gates for GOVERN steps.

It serves ``ApprovalsService`` over gRPC and the inbound decision webhook over
HTTP (:mod:`stepline.approvals.inbound`), and runs beside them:

* the event publisher and the ledger recorder (:mod:`stepline.approvals.outbox`),
* the webhook sender (:mod:`stepline.approvals.webhooks`),
* the expiry sweeper (:meth:`ApprovalStore.expire_due`),
* the run-endings listener (:mod:`stepline.approvals.runs`).

Permissions: CreateApproval needs the role ``service`` (executors) or
``admin``; CancelApproval ``service``, ``operator`` or ``admin``;
subscriptions and deliveries ``operator`` or ``admin``. Any authenticated
principal may read requests; Approve and Reject are open to the principals the
request's policy names (see :mod:`stepline.approvals.policy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import httpx
from aiohttp import web

from stepline.api.approvals.v1 import approvals_pb2 as pb
from stepline.api.approvals.v1 import approvals_pb2_grpc
from stepline.api.ledger.v1 import ledger_pb2_grpc
from stepline.approvals.config import ApprovalsSettings
from stepline.approvals.idempotency import RequestKey
from stepline.approvals.inbound import DecisionEndpoint
from stepline.approvals.outbox import EventPublisher, LedgerRecorder, Pulse, drain_forever
from stepline.approvals.runs import RunEndings
from stepline.approvals.secret_store import SecretStore
from stepline.approvals.store import ApprovalStore
from stepline.approvals.subscriptions import SubscriptionStore
from stepline.approvals.webhooks import WebhookSender
from stepline.common import jetstream
from stepline.common.auth import current_principal, require_role
from stepline.common.client import open_channel
from stepline.common.config import parse_address
from stepline.common.db import create_pool, load_migrations
from stepline.common.loops import Loop, background
from stepline.common.requests import fingerprint
from stepline.common.server import GrpcHost, load_authenticator, serving, wait_until_stopped

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ApprovalsService"].full_name
CREATE_ROLES = ("service", "admin")
CANCEL_ROLES = ("service", "operator", "admin")
MANAGE_ROLES = ("operator", "admin")
Context = grpc.aio.ServicerContext[Any, Any]


class ApprovalsServicer(approvals_pb2_grpc.ApprovalsServiceServicer):
    def __init__(self, store: ApprovalStore, subscriptions: SubscriptionStore) -> None:
        self.store = store
        self.subscriptions = subscriptions

    async def CreateApproval(
        self, request: pb.CreateApprovalRequest, context: Context
    ) -> pb.CreateApprovalResponse:
        caller = require_role(*CREATE_ROLES)
        return await self.store.create(request, caller)

    async def GetApproval(
        self, request: pb.GetApprovalRequest, context: Context
    ) -> pb.GetApprovalResponse:
        current_principal()
        return pb.GetApprovalResponse(approval=await self.store.get(request.approval_id))

    async def ListApprovals(
        self, request: pb.ListApprovalsRequest, context: Context
    ) -> pb.ListApprovalsResponse:
        return await self.store.list(request, current_principal())

    async def _decide(
        self, request: pb.ApproveRequest | pb.RejectRequest, method: str, outcome: int
    ) -> pb.Approval:
        caller = current_principal()
        key = RequestKey.of(method, request.request_id, fingerprint(request, caller.id))
        return await self.store.decide(
            approval_id=request.approval_id,
            actor=caller,
            outcome=outcome,
            reason=request.reason,
            channel=pb.DECISION_CHANNEL_GRPC,
            key=key,
        )

    async def Approve(self, request: pb.ApproveRequest, context: Context) -> pb.ApproveResponse:
        approval = await self._decide(request, "Approve", pb.DECISION_OUTCOME_APPROVED)
        return pb.ApproveResponse(approval=approval)

    async def Reject(self, request: pb.RejectRequest, context: Context) -> pb.RejectResponse:
        approval = await self._decide(request, "Reject", pb.DECISION_OUTCOME_REJECTED)
        return pb.RejectResponse(approval=approval)

    async def CancelApproval(
        self, request: pb.CancelApprovalRequest, context: Context
    ) -> pb.CancelApprovalResponse:
        return await self.store.cancel(request, require_role(*CANCEL_ROLES))

    async def CreateSubscription(
        self, request: pb.CreateSubscriptionRequest, context: Context
    ) -> pb.CreateSubscriptionResponse:
        return await self.subscriptions.create(request, require_role(*MANAGE_ROLES))

    async def ListSubscriptions(
        self, request: pb.ListSubscriptionsRequest, context: Context
    ) -> pb.ListSubscriptionsResponse:
        require_role(*MANAGE_ROLES)
        return await self.subscriptions.list(request)

    async def DeleteSubscription(
        self, request: pb.DeleteSubscriptionRequest, context: Context
    ) -> pb.DeleteSubscriptionResponse:
        return await self.subscriptions.delete(request, require_role(*MANAGE_ROLES))

    async def ListDeliveries(
        self, request: pb.ListDeliveriesRequest, context: Context
    ) -> pb.ListDeliveriesResponse:
        require_role(*MANAGE_ROLES)
        return await self.subscriptions.deliveries(request)


@dataclass(frozen=True)
class Approvals:
    """The running service: its gRPC host, the webhook port and its stores."""

    host: GrpcHost
    webhook_port: int
    pool: asyncpg.Pool
    store: ApprovalStore
    subscriptions: SubscriptionStore

    @property
    def port(self) -> int:
        return self.host.port


@contextlib.asynccontextmanager
async def _webhook_server(app: web.Application, listen: str) -> AsyncIterator[int]:
    host, port = parse_address(listen, name="STEPLINE_APPROVALS_WEBHOOK_LISTEN")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = int(runner.addresses[0][1])
        log.info("approvals webhook endpoint listening on %s:%d", host, bound)
        yield bound
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running(settings: ApprovalsSettings) -> AsyncIterator[Approvals]:
    """The service serving (gRPC, webhook endpoint, background loops) until the block exits."""
    hooks = settings.webhooks
    secrets = SecretStore.from_file(hooks.secrets_file)
    if hooks.inbound_secret not in secrets:
        log.warning(
            "no secret named %r in the secrets file: inbound decisions will be refused",
            hooks.inbound_secret,
        )
    authenticator = load_authenticator(settings.server)  # for gRPC calls and inbound actors
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_pool(
            settings.database_url,
            schema=settings.schema,
            migrations=load_migrations("stepline.approvals"),
        )
        stack.push_async_callback(pool.close)
        nc = await jetstream.connect(settings.nats.url, name="stepline-approvals")
        stack.push_async_callback(nc.drain)
        js = nc.jetstream()
        streams = settings.nats.streams
        await jetstream.ensure_streams(js, streams)
        channel = open_channel(settings.ledger_addr, settings=settings.client)
        stack.push_async_callback(channel.close)
        client = httpx.AsyncClient(follow_redirects=False)
        stack.push_async_callback(client.aclose)

        pulse = Pulse()
        store = ApprovalStore(pool, pulse=pulse)
        subscriptions = SubscriptionStore(pool, secrets=secrets)
        publisher = EventPublisher(pool=pool, js=js, streams=streams)
        recorder = LedgerRecorder(
            pool=pool,
            ledger=ledger_pb2_grpc.LedgerServiceStub(channel),
            call_timeout_s=settings.client.default_timeout_s,
        )
        sender = WebhookSender(pool=pool, secrets=secrets, settings=hooks, client=client)
        endings = RunEndings(store=store, js=js, streams=streams)
        await endings.start()
        stack.push_async_callback(endings.close)

        async def sweep() -> float:
            done = await store.expire_due()
            await store.forget_inbound(older_than_s=2 * hooks.tolerance_s)
            return 0.0 if done else settings.sweep_interval_s

        poll = settings.outbox_poll_s
        loops: list[Loop] = [
            (
                "approvals-events",
                lambda: drain_forever("events", publisher.publish_pending, pulse.listener(), poll),
            ),
            (
                "approvals-ledger",
                lambda: drain_forever("ledger", recorder.record_due, pulse.listener(), poll),
            ),
            (
                "approvals-webhooks",
                lambda: drain_forever("webhooks", sender.deliver_due, pulse.listener(), poll),
            ),
            ("approvals-run-endings", endings.run),
        ]
        if settings.sweep_interval_s > 0:
            loops.append(
                (
                    "approvals-expiry",
                    lambda: drain_forever(
                        "expiry", sweep, asyncio.Event(), settings.sweep_interval_s
                    ),
                )
            )

        servicer = ApprovalsServicer(store, subscriptions)
        host = GrpcHost(settings=settings.server, authenticator=authenticator)
        host.add(
            SERVICE_NAME,
            lambda server: approvals_pb2_grpc.add_ApprovalsServiceServicer_to_server(
                servicer, server
            ),
        )
        endpoint = DecisionEndpoint(
            store=store,
            secrets=secrets,
            settings=hooks,
            principals=authenticator.principals_by_id(),
        )
        async with (
            background(loops),
            _webhook_server(endpoint.app(), hooks.listen) as webhook_port,
            serving(host),
        ):
            yield Approvals(
                host=host,
                webhook_port=webhook_port,
                pool=pool,
                store=store,
                subscriptions=subscriptions,
            )


async def serve(settings: ApprovalsSettings) -> None:
    async with running(settings) as service:
        await wait_until_stopped(service.host)
