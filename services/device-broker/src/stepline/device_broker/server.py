"""The device broker's gRPC server: leases cloud phones found through adb servers.

``running`` opens PostgreSQL (schema ``device_broker``, migrated), NATS (device
events), checks that every adb server answers, becomes the active broker of the
database (a second broker on the same database waits, NOT_SERVING, until the
first stops), loads its state, scans the inventory once, then serves
``DeviceBrokerService`` while the upkeep (scan, health checks, cleanup, lease
expiry) runs in the background.

Who may call: Lease/Renew/Release/LeaseSession need the role ``service`` or
``admin``; QuarantineDevice/ReleaseDevice/BindAccount/UnbindAccount ``operator``
or ``admin``; ListDevices/GetDevice any authenticated caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc

from stepline.api.device_broker.v1 import device_broker_pb2 as pb
from stepline.api.device_broker.v1 import device_broker_pb2_grpc
from stepline.common import adb, jetstream
from stepline.common.auth import Principal, current_principal, require_role
from stepline.common.db import create_pool, load_migrations
from stepline.common.errors import InvalidArgument, status_of
from stepline.common.lease_session import SESSION_OPEN
from stepline.common.server import GrpcHost, serving, wait_until_stopped
from stepline.device_broker.broker import Broker, seconds
from stepline.device_broker.config import DeviceBrokerSettings
from stepline.device_broker.events import DeviceEvents
from stepline.device_broker.phones import Phones
from stepline.device_broker.pools import lease_pools
from stepline.device_broker.store import Store
from stepline.device_broker.upkeep import Upkeep

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DeviceBrokerService"].full_name
HOLDER_ROLES = ("service", "admin")
OPERATOR_ROLES = ("operator", "admin")
#: a waiting Lease answers this long before the caller's deadline, so the
#: caller gets the broker's DEADLINE_EXCEEDED (with its explanation)
DEADLINE_MARGIN_S = 0.05
LOCK_POLL_S = 1.0
LOCK_CHECK_S = 5.0
Context = grpc.aio.ServicerContext[Any, Any]


class DeviceBrokerServicer(device_broker_pb2_grpc.DeviceBrokerServiceServicer):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def ListDevices(
        self, request: pb.ListDevicesRequest, context: Context
    ) -> pb.ListDevicesResponse:
        current_principal()
        return await self.broker.list_devices(request)

    async def GetDevice(
        self, request: pb.GetDeviceRequest, context: Context
    ) -> pb.GetDeviceResponse:
        current_principal()
        return await self.broker.get_device(request)

    async def Lease(self, request: pb.LeaseRequest, context: Context) -> pb.LeaseResponse:
        actor = require_role(*HOLDER_ROLES)
        wait_s = self.broker.settings.max_wait_s
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = min(wait_s, max(0.0, remaining - DEADLINE_MARGIN_S))
        return await self.broker.lease(request, wait_s=wait_s, actor=actor)

    async def Renew(self, request: pb.RenewRequest, context: Context) -> pb.RenewResponse:
        require_role(*HOLDER_ROLES)
        return await self.broker.renew(request)

    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.ReleaseResponse:
        actor = require_role(*HOLDER_ROLES)
        return await self.broker.release(request, actor)

    async def LeaseSession(
        self, request_iterator: AsyncIterable[pb.LeaseSessionRequest], context: Context
    ) -> AsyncIterator[pb.LeaseSessionResponse]:
        """Serve each request in its own task (a Lease may wait while later
        requests are answered) and yield the answers as they are ready. When the
        client closes its side, the requests in flight are answered first; when
        the call is cancelled, they are cancelled with it."""
        actor = require_role(*HOLDER_ROLES)
        await context.send_initial_metadata((SESSION_OPEN,))  # see SESSION_OPEN
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining - DEADLINE_MARGIN_S
        answers: asyncio.Queue[pb.LeaseSessionResponse | None] = asyncio.Queue()
        in_flight: set[asyncio.Task[None]] = set()

        async def serve(request: pb.LeaseSessionRequest) -> None:
            answers.put_nowait(await self._answer(request, actor, deadline))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(serve(request))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                while in_flight:
                    await asyncio.wait(set(in_flight))
            finally:
                answers.put_nowait(None)  # the end, or reading failed: see below

        reader = asyncio.create_task(read(), name="lease-session-reader")
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # raises if reading the requests failed
        finally:
            tasks = (reader, *in_flight)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _answer(
        self, request: pb.LeaseSessionRequest, actor: Principal, deadline: float | None
    ) -> pb.LeaseSessionResponse:
        """The answer to one request of a LeaseSession: its own RPC's response, or
        the error that RPC would have returned (the same status as the unary
        call's: :func:`status_of`)."""
        kind = request.WhichOneof("request")
        answer = pb.LeaseSessionResponse()
        try:
            if kind is None:
                raise InvalidArgument("a LeaseSessionRequest needs one of lease, renew or release")
            answer.request_id = getattr(request, kind).request_id
            if kind == "lease":
                wait_s = self._session_wait_s(request, deadline)
                response = await self.broker.lease(request.lease, wait_s=wait_s, actor=actor)
                answer.lease.CopyFrom(response)
            elif kind == "renew":
                answer.renew.CopyFrom(await self.broker.renew(request.renew))
            else:
                answer.release.CopyFrom(await self.broker.release(request.release, actor))
        except Exception as exc:  # this request's failure only: the stream goes on
            status, message = status_of(exc)
            answer.error.code = status.value[0]
            answer.error.message = message
        return answer

    def _session_wait_s(self, request: pb.LeaseSessionRequest, deadline: float | None) -> float:
        """How long a Lease on a session may wait: its ``max_wait`` (unset: the
        broker's maximum; zero: not at all), at most the broker's maximum, never
        past the stream's deadline."""
        wait_s = self.broker.settings.max_wait_s
        if request.HasField("max_wait"):
            max_wait = request.max_wait
            if max_wait.seconds < 0 or max_wait.nanos < 0:
                raise InvalidArgument(f"max_wait must not be negative, got {seconds(max_wait)}s")
            wait_s = min(wait_s, seconds(max_wait))
        if deadline is not None:
            wait_s = min(wait_s, max(0.0, deadline - time.monotonic()))
        return wait_s

    async def QuarantineDevice(
        self, request: pb.QuarantineDeviceRequest, context: Context
    ) -> pb.QuarantineDeviceResponse:
        actor = require_role(*OPERATOR_ROLES)
        return await self.broker.quarantine_device(request, actor)

    async def ReleaseDevice(
        self, request: pb.ReleaseDeviceRequest, context: Context
    ) -> pb.ReleaseDeviceResponse:
        actor = require_role(*OPERATOR_ROLES)
        return await self.broker.release_device(request, actor)

    async def BindAccount(
        self, request: pb.BindAccountRequest, context: Context
    ) -> pb.BindAccountResponse:
        actor = require_role(*OPERATOR_ROLES)
        return await self.broker.bind(request, actor)

    async def UnbindAccount(
        self, request: pb.UnbindAccountRequest, context: Context
    ) -> pb.UnbindAccountResponse:
        actor = require_role(*OPERATOR_ROLES)
        return await self.broker.unbind(request, actor)


@contextlib.asynccontextmanager
async def active(dsn: str, schema: str) -> AsyncIterator[asyncio.Event]:
    """Hold the database's broker lock: live wait queues are in memory and one
    cleanup at a time may work on a device, so one broker at a time works on a
    database; a second one waits here. Yields an event set if the lock's
    connection is lost (the lock with it): the broker must then stop."""
    conn = await asyncpg.connect(dsn, timeout=10)
    lost = asyncio.Event()

    async def watch() -> None:
        while True:
            await asyncio.sleep(LOCK_CHECK_S)
            try:
                await conn.fetchval("SELECT 1", timeout=LOCK_CHECK_S)
            except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                log.error("lost the broker lock's database connection: %s", exc)
                lost.set()
                return

    watcher: asyncio.Task[None] | None = None
    try:
        key = f"stepline:{schema}:active"
        waited = False
        while not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
            if not waited:
                log.warning("another device broker is active on this database; waiting")
                waited = True
            await asyncio.sleep(LOCK_POLL_S)
        watcher = asyncio.create_task(watch(), name="device-broker-lock")
        yield lost
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        with contextlib.suppress(asyncpg.PostgresError, OSError):
            await conn.close()


@dataclass(frozen=True)
class Running:
    """A broker serving: its gRPC host and, for tests and tools in the same
    process, its core."""

    host: GrpcHost
    broker: Broker
    upkeep: Upkeep


@contextlib.asynccontextmanager
async def started(settings: DeviceBrokerSettings) -> AsyncIterator[Running]:
    """The device broker serving, with its upkeep, until the block exits."""
    async with contextlib.AsyncExitStack() as stack:
        for host_name, port in settings.adb_servers:
            version = await asyncio.to_thread(
                adb.server_version, host_name, port, timeout_s=settings.adb_timeout_s
            )
            log.info("adb server %s:%d answers (version %d)", host_name, port, version)
        phones = Phones(settings.adb_servers, timeout_s=settings.adb_timeout_s)
        pool = await create_pool(
            settings.database_url,
            schema=settings.schema,
            migrations=load_migrations("stepline.device_broker"),
            min_size=2,
            max_size=10,
        )
        stack.push_async_callback(pool.close)
        leases = await stack.enter_async_context(
            lease_pools(settings.database_url, settings.schema)
        )
        nc = await jetstream.connect(settings.nats.url, name="stepline-device-broker")
        stack.push_async_callback(nc.drain)
        await jetstream.ensure_streams(nc.jetstream(), settings.nats.streams)
        lock_lost = await stack.enter_async_context(active(settings.database_url, settings.schema))
        events = await stack.enter_async_context(
            DeviceEvents(nc, settings.nats.streams).publishing()
        )
        store = Store(pool, hot=leases.hot, relaxed=leases.relaxed)
        broker = Broker(store=store, settings=settings, events=events)
        await broker.load()
        upkeep = await stack.enter_async_context(
            Upkeep(broker=broker, phones=phones, settings=settings).running()
        )
        host = GrpcHost(settings=settings.server)
        servicer = DeviceBrokerServicer(broker)
        host.add(
            SERVICE_NAME,
            lambda server: device_broker_pb2_grpc.add_DeviceBrokerServiceServicer_to_server(
                servicer, server
            ),
        )

        async def stop_when_lock_lost() -> None:
            await lock_lost.wait()
            host.request_stop()

        guard = asyncio.create_task(stop_when_lock_lost(), name="device-broker-lock-guard")
        stack.callback(guard.cancel)
        async with serving(host):
            yield Running(host, broker, upkeep)


@contextlib.asynccontextmanager
async def running(settings: DeviceBrokerSettings) -> AsyncIterator[GrpcHost]:
    """The device broker serving until the block exits (see :func:`started`)."""
    async with started(settings) as broker:
        yield broker.host


async def serve(settings: DeviceBrokerSettings) -> None:
    async with running(settings) as host:
        await wait_until_stopped(host)
