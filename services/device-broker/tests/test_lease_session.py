"""LeaseSession: Lease, Renew and Release on one stream, through the real adb
server and gRPC: answers by request_id as they are ready, errors per request,
authorization at the stream's opening, end of input and cancellation."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from stepline.api.device_broker.v1 import device_broker_pb2 as pb
from stepline.phone.testing import PhoneFactory

from .conftest import (
    AVAILABLE,
    LEASED,
    NO_CLEANUP,
    MeshFactory,
    lease_request,
    release_request,
)

Session = grpc.aio.StreamStreamCall[pb.LeaseSessionRequest, pb.LeaseSessionResponse]


def lease(request_id: str, *, max_wait_s: float | None = None) -> pb.LeaseSessionRequest:
    request = pb.LeaseSessionRequest(lease=lease_request(request_id=request_id))
    if max_wait_s is not None:
        request.max_wait.FromNanoseconds(int(max_wait_s * 1e9))
    return request


async def finish(session: Session) -> None:
    """Close the client's side; the stream then ends, every answer given."""
    await session.done_writing()
    assert await session.read() is grpc.aio.EOF


async def answer(session: Session) -> pb.LeaseSessionResponse:
    response = await session.read()
    assert response is not grpc.aio.EOF, "the stream ended"
    assert isinstance(response, pb.LeaseSessionResponse)
    return response


async def test_lease_renew_and_release_on_one_stream(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh() as mesh:
        await mesh.wait_available([phone.address])
        session = mesh.service.LeaseSession(timeout=60)
        await session.write(lease("l1"))
        granted = await answer(session)
        assert granted.request_id == "l1" and granted.WhichOneof("response") == "lease"
        held = granted.lease.lease
        assert held.serial == phone.address and held.token == 1
        assert granted.lease.device.state == LEASED
        device = await mesh.device(phone.address)
        assert device.state == LEASED and device.lease.lease_id == held.lease_id
        renew = pb.RenewRequest(
            request_id="n1", lease_id=held.lease_id, token=held.token, ttl=Duration(seconds=90)
        )
        await session.write(pb.LeaseSessionRequest(renew=renew))
        renewed = await answer(session)
        assert renewed.request_id == "n1" and renewed.WhichOneof("response") == "renew"
        assert renewed.renew.lease.expire_time.ToDatetime() > held.expire_time.ToDatetime()
        await session.write(pb.LeaseSessionRequest(release=release_request(held, request_id="r1")))
        released = await answer(session)
        assert released.request_id == "r1" and released.WhichOneof("response") == "release"
        assert released.release.device.serial == phone.address
        await finish(session)
        assert await session.code() == grpc.StatusCode.OK
        await mesh.wait_state(phone.address, AVAILABLE)
        row = await mesh.running.broker.store.pool.fetchrow(
            "SELECT end_reason FROM leases WHERE lease_id = $1", held.lease_id
        )
        assert row["end_reason"] == "released"


async def test_a_release_is_answered_while_a_lease_on_the_stream_waits(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    # the standard cleanup runs between the release and the next grant
    async with broker_mesh() as mesh:
        await mesh.wait_available([phone.address])
        session = mesh.service.LeaseSession(timeout=60)
        await session.write(lease("first"))
        first = await answer(session)
        assert first.request_id == "first"
        await session.write(lease("second"))
        await mesh.wait_waiters(1)
        await session.write(
            pb.LeaseSessionRequest(release=release_request(first.lease.lease, request_id="done"))
        )
        released = await answer(session)
        assert released.request_id == "done" and released.WhichOneof("response") == "release"
        assert mesh.waiters == 1  # answered while the second lease waits
        second = await answer(session)
        assert second.request_id == "second" and second.WhichOneof("response") == "lease"
        assert second.lease.lease.serial == phone.address
        assert second.lease.lease.token == first.lease.lease.token + 1
        device = await mesh.device(phone.address)
        assert device.lease.lease_id == second.lease.lease.lease_id
        await finish(session)


async def test_an_error_answers_its_request_only(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh(cleanup_profiles=NO_CLEANUP) as mesh:
        await mesh.wait_available([phone.address])
        session = mesh.service.LeaseSession(timeout=60)
        await session.write(pb.LeaseSessionRequest())
        empty = await answer(session)
        assert empty.request_id == "" and empty.WhichOneof("response") == "error"
        assert empty.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "needs one of lease, renew or release" in empty.error.message
        await session.write(lease("negative", max_wait_s=-1))
        negative = await answer(session)
        assert negative.request_id == "negative"
        assert negative.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "max_wait must not be negative" in negative.error.message
        await session.write(pb.LeaseSessionRequest(lease=pb.LeaseRequest(request_id="no-holder")))
        invalid = await answer(session)
        assert invalid.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "holder.executor_id" in invalid.error.message
        await session.write(lease("l1"))
        held = (await answer(session)).lease.lease
        stale = release_request(held, request_id="stale", token=held.token + 1)
        await session.write(pb.LeaseSessionRequest(release=stale))
        refused = await answer(session)
        assert refused.request_id == "stale" and refused.WhichOneof("response") == "error"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.service.Release(stale)  # the unary Release says the same
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.error.code == info.value.code().value[0]
        assert refused.error.message == info.value.details()
        assert "stale fencing token" in refused.error.message
        await session.write(pb.LeaseSessionRequest(release=release_request(held, request_id="r1")))
        released = await answer(session)
        assert released.request_id == "r1" and released.WhichOneof("response") == "release"
        assert (await mesh.device(phone.address)).state == AVAILABLE
        await finish(session)
        assert await session.code() == grpc.StatusCode.OK


async def test_who_may_open_a_session(broker_mesh: MeshFactory, phones: PhoneFactory) -> None:
    (phone,) = phones(1)
    async with broker_mesh() as mesh:
        await mesh.wait_available([phone.address])
        for stub, code in (
            (mesh.operator, grpc.StatusCode.PERMISSION_DENIED),
            (mesh.anonymous, grpc.StatusCode.UNAUTHENTICATED),
        ):
            # The stream is refused as it opens, before any message: a write
            # would race the refusal, and a write that loses the race makes
            # the client library end the call with its own INTERNAL status.
            session = stub.LeaseSession(timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await session.read()
            assert info.value.code() == code
            assert await session.code() == code
        assert (await mesh.device(phone.address)).state == AVAILABLE
        session = mesh.admin.LeaseSession(timeout=10)
        await session.write(lease("l2"))
        granted = await answer(session)
        assert granted.lease.lease.token == 1
        await finish(session)
        assert (await mesh.device(phone.address)).state == LEASED


async def test_max_wait_bounds_a_waiting_lease(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh() as mesh:
        await mesh.wait_available([phone.address])
        held = (await mesh.lease()).lease
        session = mesh.service.LeaseSession(timeout=60)
        started = time.monotonic()
        await session.write(lease("short", max_wait_s=0.5))
        refused = await answer(session)
        waited = time.monotonic() - started
        assert refused.request_id == "short"
        assert refused.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert "became free" in refused.error.message
        assert 0.4 < waited < 2.0
        assert mesh.waiters == 0
        assert (await mesh.device(phone.address)).lease.lease_id == held.lease_id
        await finish(session)


async def test_closing_the_stream_answers_what_is_in_flight(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh(cleanup_profiles=NO_CLEANUP) as mesh:
        await mesh.wait_available([phone.address])
        held = (await mesh.lease()).lease
        session = mesh.service.LeaseSession(timeout=60)
        await session.write(lease("waits"))
        await session.done_writing()
        await mesh.wait_waiters(1)
        await mesh.release(held)
        granted = await answer(session)
        assert granted.request_id == "waits" and granted.lease.lease.token == held.token + 1
        assert await session.read() is grpc.aio.EOF
        assert await session.code() == grpc.StatusCode.OK


async def test_cancelling_the_stream_abandons_a_waiting_lease(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh(cleanup_profiles=NO_CLEANUP) as mesh:
        await mesh.wait_available([phone.address])
        held = (await mesh.lease()).lease
        session = mesh.service.LeaseSession(timeout=60)
        await session.write(lease("abandoned"))
        await mesh.wait_waiters(1)
        session.cancel()
        await mesh.wait_waiters(0)
        await mesh.release(held)
        device = await mesh.wait_state(phone.address, AVAILABLE)
        assert not device.HasField("lease")
        again = (await mesh.lease()).lease
        assert again.token == held.token + 1


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (NotImplementedError("not yet"), grpc.StatusCode.UNIMPLEMENTED),
        (RuntimeError("secret detail"), grpc.StatusCode.INTERNAL),
    ],
)
async def test_a_session_answers_an_unexpected_error_as_the_unary_call_does(
    broker_mesh: MeshFactory,
    phones: PhoneFactory,
    monkeypatch: pytest.MonkeyPatch,
    raised: Exception,
    code: grpc.StatusCode,
) -> None:
    (phone,) = phones(1)
    async with broker_mesh(cleanup_profiles=NO_CLEANUP) as mesh:
        await mesh.wait_available([phone.address])
        held = (await mesh.lease()).lease
        renew = pb.RenewRequest(request_id="n1", lease_id=held.lease_id, token=held.token)

        async def fail(request: pb.RenewRequest) -> pb.RenewResponse:
            raise raised

        monkeypatch.setattr(mesh.running.broker, "renew", fail)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.service.Renew(renew)
        assert info.value.code() == code
        session = mesh.service.LeaseSession(timeout=60)
        await session.write(pb.LeaseSessionRequest(renew=renew))
        refused = await answer(session)
        assert refused.request_id == "n1" and refused.WhichOneof("response") == "error"
        assert refused.error.code == code.value[0]
        assert refused.error.message == info.value.details()
        assert "secret" not in refused.error.message
        await session.write(pb.LeaseSessionRequest(release=release_request(held)))
        released = await answer(session)  # the stream goes on
        assert released.WhichOneof("response") == "release"
        await finish(session)


async def test_renew_and_release_ignore_max_wait(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh(cleanup_profiles=NO_CLEANUP) as mesh:
        await mesh.wait_available([phone.address])
        held = (await mesh.lease()).lease
        negative = Duration(seconds=-1)
        renew = pb.RenewRequest(request_id="n1", lease_id=held.lease_id, token=held.token)
        session = mesh.service.LeaseSession(timeout=60)
        await session.write(pb.LeaseSessionRequest(renew=renew, max_wait=negative))
        renewed = await answer(session)
        assert renewed.request_id == "n1" and renewed.WhichOneof("response") == "renew"
        release = release_request(held, request_id="r1")
        await session.write(pb.LeaseSessionRequest(release=release, max_wait=negative))
        released = await answer(session)
        assert released.request_id == "r1" and released.WhichOneof("response") == "release"
        assert (await mesh.device(phone.address)).state == AVAILABLE
        await finish(session)


async def test_a_zero_max_wait_does_not_wait(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    """max_wait is how long a Lease may wait: zero, not at all (a device that is
    free is granted, else DEADLINE_EXCEEDED at once); unset, the broker's
    maximum (see test_a_release_is_answered_while_a_lease_on_the_stream_waits)."""
    (phone,) = phones(1)
    async with broker_mesh(cleanup_profiles=NO_CLEANUP) as mesh:
        await mesh.wait_available([phone.address])
        held = (await mesh.lease()).lease
        session = mesh.service.LeaseSession(timeout=60)
        started = time.monotonic()
        await session.write(lease("busy", max_wait_s=0))
        refused = await asyncio.wait_for(answer(session), 5)
        assert time.monotonic() - started < 1.0
        assert refused.request_id == "busy"
        assert refused.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert "became free" in refused.error.message
        assert mesh.waiters == 0
        await mesh.release(held)
        await mesh.wait_state(phone.address, AVAILABLE)
        await session.write(lease("free", max_wait_s=0))
        granted = await asyncio.wait_for(answer(session), 5)
        assert granted.request_id == "free" and granted.WhichOneof("response") == "lease"
        assert granted.lease.lease.token == held.token + 1
        await finish(session)
