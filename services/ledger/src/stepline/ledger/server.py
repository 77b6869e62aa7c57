"""The ledger's gRPC server: the only writer of run state.

Writes go through the :class:`GroupCommitter` (concurrent writes share
commits); reads use the pool. The event relay runs beside the server and
publishes committed events to ``STEPLINE_EVENTS``; every commit wakes it. Only Stepline services and
administrators may call the ledger.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.api.ledger.v1 import ledger_pb2_grpc
from stepline.common import jetstream
from stepline.common.auth import require_role
from stepline.common.db import create_pool, load_migrations
from stepline.common.loops import background
from stepline.common.server import GrpcHost, serving, wait_until_stopped
from stepline.ledger import artifacts, queries
from stepline.ledger.committer import MAX_ALONE, GroupCommitter
from stepline.ledger.config import LedgerSettings, with_room_for_artifacts
from stepline.ledger.relay import EventRelay
from stepline.ledger.stats import get_stats
from stepline.ledger.store import LedgerStore

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LedgerService"].full_name
CALLER_ROLES = ("service", "admin")
Context = grpc.aio.ServicerContext[Any, Any]


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, store: LedgerStore) -> None:
        self.store = store
        self.pool = store.pool

    async def CreateRun(
        self, request: pb.CreateRunRequest, context: Context
    ) -> pb.CreateRunResponse:
        require_role(*CALLER_ROLES)
        return await self.store.create_run(request)

    async def CreateChunks(
        self, request: pb.CreateChunksRequest, context: Context
    ) -> pb.CreateChunksResponse:
        require_role(*CALLER_ROLES)
        return await self.store.create_chunks(request)

    async def RecordDispatch(
        self, request: pb.RecordDispatchRequest, context: Context
    ) -> pb.RecordDispatchResponse:
        require_role(*CALLER_ROLES)
        return await self.store.record_dispatch(request)

    async def ClaimRun(self, request: pb.ClaimRunRequest, context: Context) -> pb.ClaimRunResponse:
        require_role(*CALLER_ROLES)
        return await self.store.claim_run(request)

    async def RenewClaim(
        self, request: pb.RenewClaimRequest, context: Context
    ) -> pb.RenewClaimResponse:
        require_role(*CALLER_ROLES)
        return await self.store.renew_claim(request)

    async def ReleaseClaim(
        self, request: pb.ReleaseClaimRequest, context: Context
    ) -> pb.ReleaseClaimResponse:
        require_role(*CALLER_ROLES)
        return await self.store.release_claim(request)

    async def TransitionRun(
        self, request: pb.TransitionRunRequest, context: Context
    ) -> pb.TransitionRunResponse:
        require_role(*CALLER_ROLES)
        return await self.store.transition_run(request)

    async def TransitionTask(
        self, request: pb.TransitionTaskRequest, context: Context
    ) -> pb.TransitionTaskResponse:
        require_role(*CALLER_ROLES)
        return await self.store.transition_task(request)

    async def TransitionChunk(
        self, request: pb.TransitionChunkRequest, context: Context
    ) -> pb.TransitionChunkResponse:
        require_role(*CALLER_ROLES)
        return await self.store.transition_chunk(request)

    async def ApplyTransitions(
        self, request: pb.ApplyTransitionsRequest, context: Context
    ) -> pb.ApplyTransitionsResponse:
        require_role(*CALLER_ROLES)
        return await self.store.apply_transitions(request)

    async def RequestControl(
        self, request: pb.RequestControlRequest, context: Context
    ) -> pb.RequestControlResponse:
        require_role(*CALLER_ROLES)
        return await self.store.request_control(request)

    async def RerunFrom(
        self, request: pb.RerunFromRequest, context: Context
    ) -> pb.RerunFromResponse:
        require_role(*CALLER_ROLES)
        return await self.store.rerun_from(request)

    async def ListOrphanedRuns(
        self, request: pb.ListOrphanedRunsRequest, context: Context
    ) -> pb.ListOrphanedRunsResponse:
        require_role(*CALLER_ROLES)
        return await queries.list_orphaned_runs(self.pool, request)

    async def GetRun(self, request: pb.GetRunRequest, context: Context) -> pb.GetRunResponse:
        require_role(*CALLER_ROLES)
        return await queries.get_run(self.pool, request)

    async def ListRuns(self, request: pb.ListRunsRequest, context: Context) -> pb.ListRunsResponse:
        require_role(*CALLER_ROLES)
        return await queries.list_runs(self.pool, request)

    async def ListChunks(
        self, request: pb.ListChunksRequest, context: Context
    ) -> pb.ListChunksResponse:
        require_role(*CALLER_ROLES)
        return await queries.list_chunks(self.pool, request)

    async def GetRunHistory(
        self, request: pb.GetRunHistoryRequest, context: Context
    ) -> pb.GetRunHistoryResponse:
        require_role(*CALLER_ROLES)
        return await queries.get_run_history(self.pool, request)

    async def GetStats(self, request: pb.GetStatsRequest, context: Context) -> pb.GetStatsResponse:
        require_role(*CALLER_ROLES)
        return await get_stats(self.pool, request)

    async def PutArtifact(
        self, request: pb.PutArtifactRequest, context: Context
    ) -> pb.PutArtifactResponse:
        require_role(*CALLER_ROLES)
        return await self.store.put_artifact(request)

    async def GetArtifact(
        self, request: pb.GetArtifactRequest, context: Context
    ) -> pb.GetArtifactResponse:
        require_role(*CALLER_ROLES)
        return await artifacts.get_artifact(self.pool, request)

    async def RecordApprovalDecision(
        self, request: pb.RecordApprovalDecisionRequest, context: Context
    ) -> pb.RecordApprovalDecisionResponse:
        require_role(*CALLER_ROLES)
        return await self.store.record_approval_decision(request)


@contextlib.asynccontextmanager
async def running(settings: LedgerSettings) -> AsyncIterator[GrpcHost]:
    """The ledger serving (pool, committer, relay, gRPC) until the block exits."""
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_pool(
            settings.database_url,
            schema=settings.schema,
            migrations=load_migrations("stepline.ledger"),
            max_size=settings.commit_shards + MAX_ALONE + 8,
        )
        stack.push_async_callback(pool.close)
        nc = await jetstream.connect(settings.nats.url, name="stepline-ledger")
        stack.push_async_callback(nc.drain)
        js = nc.jetstream()
        await jetstream.ensure_streams(js, settings.nats.streams)
        relay = EventRelay(
            pool=pool, js=js, streams=settings.nats.streams, max_payload=nc.max_payload
        )
        await stack.enter_async_context(background([("ledger-event-relay", relay.run)]))
        committer = GroupCommitter(pool, shards=settings.commit_shards, on_commit=relay.notify)
        await committer.start()
        stack.push_async_callback(committer.close)
        store = LedgerStore(
            pool,
            committer,
            default_lease_s=settings.default_lease_s,
            max_lease_s=settings.max_lease_s,
        )
        host = GrpcHost(settings=with_room_for_artifacts(settings.server))
        host.add(
            SERVICE_NAME,
            lambda server: ledger_pb2_grpc.add_LedgerServiceServicer_to_server(
                LedgerServicer(store), server
            ),
        )
        async with serving(host):
            yield host


async def serve(settings: LedgerSettings) -> None:
    async with running(settings) as host:
        await wait_until_stopped(host)
