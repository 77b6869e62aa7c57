"""The shared LeaseSession client (stepline.common.lease_session) against the real
broker: answers routed by request_id, errors raised as their SteplineError,
concurrent requests on one stream, timeouts, a broker that stops and one that
comes back, and closing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from stepline.api.device_broker.v1 import device_broker_pb2 as pb
from stepline.api.device_broker.v1 import device_broker_pb2_grpc
from stepline.common import embedded
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings
from stepline.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from stepline.common.lease_session import LeaseSession
from stepline.common.testing import Credentials
from stepline.device_broker.config import DeviceBrokerSettings
from stepline.phone.testing import PhoneFactory

from .conftest import (
    AVAILABLE,
    LEASED,
    NO_CLEANUP,
    MeshFactory,
    lease_request,
    release_request,
)


async def test_lease_renew_and_release_through_the_client(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh(cleanup_profiles=NO_CLEANUP) as mesh:
        await mesh.wait_available([phone.address])
        async with LeaseSession(mesh.service) as session:
            granted = await session.lease(lease_request(request_id="l1"), timeout_s=10)
            held = granted.lease
            assert held.serial == phone.address and held.token == 1
            assert granted.device.state == LEASED
            renew = pb.RenewRequest(
                request_id="n1", lease_id=held.lease_id, token=held.token, ttl=Duration(seconds=90)
            )
            renewed = await session.renew(renew, timeout_s=10)
            assert renewed.lease.expire_time.ToDatetime() > held.expire_time.ToDatetime()
            # a replay is answered as the first time (the broker's idempotency)
            again = await session.lease(lease_request(request_id="l1"), timeout_s=10)
            assert again.lease.lease_id == held.lease_id
            released = await session.release(release_request(held, request_id="r1"), timeout_s=10)
            assert released.device.serial == phone.address
            with pytest.raises(FailedPrecondition, match="has ended"):
                await session.lease(lease_request(request_id="l1"), timeout_s=10)
        await mesh.wait_state(phone.address, AVAILABLE)


async def test_an_error_answer_raises_its_error_and_the_session_goes_on(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh(cleanup_profiles=NO_CLEANUP) as mesh:
        await mesh.wait_available([phone.address])
        async with LeaseSession(mesh.service) as session:
            with pytest.raises(InvalidArgument, match=r"holder\.executor_id"):
                await session.lease(pb.LeaseRequest(request_id="no-holder"), timeout_s=10)
            with pytest.raises(InvalidArgument, match="needs a request_id"):
                await session.lease(pb.LeaseRequest(), timeout_s=10)
            held = (await session.lease(lease_request(request_id="l1"), timeout_s=10)).lease
            stale = release_request(held, request_id="stale", token=held.token + 1)
            with pytest.raises(FailedPrecondition, match="stale fencing token"):
                await session.release(stale, timeout_s=10)
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="became free"):  # the broker's answer
                await session.lease(lease_request(request_id="l2"), max_wait_s=0.3, timeout_s=10)
            assert time.monotonic() - started < 3
            await session.release(release_request(held, request_id="r1"), timeout_s=10)
            assert (await mesh.device(phone.address)).state == AVAILABLE


async def test_a_release_is_answered_while_a_lease_on_the_same_client_waits(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh(cleanup_profiles=NO_CLEANUP) as mesh:
        await mesh.wait_available([phone.address])
        async with LeaseSession(mesh.service) as session:
            first = (await session.lease(lease_request(request_id="first"), timeout_s=10)).lease
            second = asyncio.create_task(
                session.lease(lease_request(request_id="second"), max_wait_s=20, timeout_s=30)
            )
            await mesh.wait_waiters(1)
            released = await session.release(
                release_request(first, request_id="done"), timeout_s=10
            )
            assert released.device.serial == phone.address
            granted = (await asyncio.wait_for(second, 10)).lease
            assert granted.serial == phone.address and granted.token == first.token + 1
            assert (await mesh.device(phone.address)).lease.lease_id == granted.lease_id


async def test_no_answer_in_time_raises_deadline_exceeded(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh(cleanup_profiles=NO_CLEANUP) as mesh:
        await mesh.wait_available([phone.address])
        held = (await mesh.lease()).lease
        async with LeaseSession(mesh.service) as session:
            request = lease_request(request_id="late")
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded, match=r"did not answer lease 'late' within 0\.5s"):
                await session.lease(request, max_wait_s=20, timeout_s=0.5)
            assert 0.4 < time.monotonic() - started < 2
            assert mesh.waiters == 1  # the broker still waits for it
            await mesh.release(held)
            # the late grant goes to no one: the client gives it back at once
            await mesh.wait_state(phone.address, AVAILABLE)
            rows = await mesh.running.broker.store.pool.fetch(
                "SELECT request_id, token, outcome, end_reason FROM leases ORDER BY token"
            )
            late = rows[-1]
            assert (late["request_id"], late["token"]) == ("late", held.token + 1)
            assert late["outcome"] == pb.RELEASE_OUTCOME_ABANDONED
            assert late["end_reason"] == "released"
            # the phone serves the next caller
            granted = (await session.lease(lease_request(), timeout_s=10)).lease
            assert granted.token == held.token + 2


async def test_a_stopped_broker_fails_what_is_pending_and_a_new_one_serves(
    broker_mesh: MeshFactory,
    broker_settings: DeviceBrokerSettings,
    credentials: Credentials,
    phones: PhoneFactory,
) -> None:
    (phone,) = phones(1)
    port = embedded.free_port()
    server = replace(broker_settings.server, listen=f"127.0.0.1:{port}")
    settings = ClientSettings(service_token=credentials.service_token)
    async with open_channel(f"127.0.0.1:{port}", settings=settings) as channel:
        session = LeaseSession(device_broker_pb2_grpc.DeviceBrokerServiceStub(channel))
        request = lease_request(request_id="across-restart")
        async with broker_mesh(server=server, cleanup_profiles=NO_CLEANUP) as mesh:
            await mesh.wait_available([phone.address])
            held = (await mesh.lease()).lease
            waiting = asyncio.create_task(session.lease(request, max_wait_s=30, timeout_s=40))
            await mesh.wait_waiters(1)
        with pytest.raises(Unavailable, match="lease session"):
            await asyncio.wait_for(waiting, 10)
        async with broker_mesh(server=server, cleanup_profiles=NO_CLEANUP) as mesh:
            await mesh.release(held)
            await mesh.wait_available([phone.address])
            # as a caller retries: the same request, on a new stream once the
            # channel has reconnected
            await asyncio.wait_for(channel.channel_ready(), 15)
            granted = (await session.lease(request, timeout_s=10)).lease
            assert granted.serial == phone.address and granted.token == held.token + 1
            await session.release(release_request(granted, request_id="r1"), timeout_s=10)
            await session.close()
        with pytest.raises(Unavailable, match="closed"):
            await session.lease(lease_request(), timeout_s=1)


async def test_close_fails_what_is_pending(broker_mesh: MeshFactory, phones: PhoneFactory) -> None:
    (phone,) = phones(1)
    async with broker_mesh(cleanup_profiles=NO_CLEANUP) as mesh:
        await mesh.wait_available([phone.address])
        held = (await mesh.lease()).lease
        session = LeaseSession(mesh.service)
        waiting = asyncio.create_task(
            session.lease(lease_request(request_id="w"), max_wait_s=30, timeout_s=40)
        )
        await mesh.wait_waiters(1)
        await session.close(grace_s=0.2)
        with pytest.raises(Unavailable, match="closed"):
            await waiting
        # the stream is cancelled: the broker abandons the waiting lease
        await mesh.wait_waiters(0)
        await mesh.release(held)
        await mesh.wait_state(phone.address, AVAILABLE)


async def test_a_refused_session_raises_the_broker_s_refusal(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    """The client writes only once the broker has said the session is open: a
    write racing the refusal would end the call with the client library's own
    INTERNAL status, and the caller would see Unavailable instead of why."""
    (phone,) = phones(1)
    async with broker_mesh(cleanup_profiles=NO_CLEANUP) as mesh:
        await mesh.wait_available([phone.address])
        for stub, error in ((mesh.operator, PermissionDenied), (mesh.anonymous, Unauthenticated)):
            for attempt in range(40):
                async with LeaseSession(stub) as session:
                    with pytest.raises(error):
                        await session.lease(lease_request(request_id=f"r{attempt}"), timeout_s=10)
        assert (await mesh.device(phone.address)).state == AVAILABLE


class _BrokerWithoutMarker(device_broker_pb2_grpc.DeviceBrokerServiceServicer):
    """A broker from before SESSION_OPEN: it sends nothing before its first answer."""

    async def LeaseSession(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.LeaseSessionRequest], context: object
    ) -> AsyncIterator[pb.LeaseSessionResponse]:
        async for request in request_iterator:
            yield pb.LeaseSessionResponse(
                request_id=request.lease.request_id,
                error=pb.LeaseSessionError(
                    code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message="no devices here"
                ),
            )


async def test_a_broker_without_the_open_marker_is_still_served() -> None:
    server = grpc.aio.server()
    device_broker_pb2_grpc.add_DeviceBrokerServiceServicer_to_server(_BrokerWithoutMarker(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = device_broker_pb2_grpc.DeviceBrokerServiceStub(channel)
            async with LeaseSession(stub) as session:  # type: ignore[arg-type]
                # written after a short wait for the marker, not held until timeout_s
                with pytest.raises(FailedPrecondition, match="no devices here"):
                    await session.lease(lease_request(request_id="old"), timeout_s=10)
    finally:
        await server.stop(None)
