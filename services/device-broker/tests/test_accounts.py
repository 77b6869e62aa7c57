"""Account bindings, a broker restart, and device events."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from nats.aio.client import Client as NATS

from stepline.api.device_broker.v1 import device_broker_pb2 as pb
from stepline.api.events.v1 import events_pb2
from stepline.common.jetstream import Streams
from stepline.phone.testing import PhoneFactory

from .conftest import AVAILABLE, LEASED, Mesh, MeshFactory


async def bind(mesh: Mesh, request_id: str, serial: str, account: str) -> pb.Device:
    response = await mesh.operator.BindAccount(
        pb.BindAccountRequest(request_id=request_id, serial=serial, account=account)
    )
    return response.device


async def unbind(mesh: Mesh, request_id: str, serial: str, account: str = "") -> pb.Device:
    response = await mesh.operator.UnbindAccount(
        pb.UnbindAccountRequest(request_id=request_id, serial=serial, account=account)
    )
    return response.device


async def refused(call: object, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


async def test_account_binding(broker_mesh: MeshFactory, phones: PhoneFactory) -> None:
    s0, s1, s2 = sorted(phone.address for phone in phones(3))
    async with broker_mesh() as mesh:
        await mesh.wait_available([s0, s1, s2])
        assert (await bind(mesh, "b1", s0, "acct-a")).bound_account == "acct-a"
        assert (await bind(mesh, "b2", s0, "acct-a")).bound_account == "acct-a"  # already so
        assert "never bound to two" in await refused(bind(mesh, "b3", s1, "acct-a"))
        assert "unbind it first" in await refused(bind(mesh, "b4", s0, "acct-b"))
        assert [d.serial for d in await mesh.devices(account="acct-a")] == [s0]
        # leases for the account get its phone, and only leases for it do
        for_a = (await mesh.lease(account="acct-a")).lease
        assert for_a.serial == s0 and for_a.account == "acct-a"
        assert "not bound" in await refused(mesh.lease(account="acct-b"))
        await mesh.release(for_a)
        await mesh.wait_available([s0])
        others = [(await mesh.lease()).lease for _ in range(2)]
        assert sorted(lease.serial for lease in others) == [s1, s2]
        await refused(mesh.lease(timeout_s=0.5), grpc.StatusCode.DEADLINE_EXCEEDED)
        # the account is active on s0: it cannot move while the lease lives
        for_a = (await mesh.lease(account="acct-a")).lease
        assert "after that lease ends" in await refused(unbind(mesh, "u1", s0))
        assert "not to 'acct-z'" in await refused(unbind(mesh, "u2", s0, "acct-z"))
        await mesh.release(for_a)
        assert (await unbind(mesh, "u3", s0, "acct-a")).bound_account == ""
        assert (await bind(mesh, "b5", s1, "acct-a")).bound_account == "acct-a"
        await mesh.release(others[0] if others[0].serial == s1 else others[1])
        await mesh.wait_available([s0, s1])
        assert (await mesh.lease(account="acct-a")).lease.serial == s1
        assert (await mesh.lease()).lease.serial == s0


async def test_restart_keeps_tokens_leases_and_bindings(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh() as mesh:
        await mesh.wait_available([phone.address])
        await mesh.release((await mesh.lease()).lease)
        await mesh.wait_available([phone.address])
        await bind(mesh, "b1", phone.address, "acct-x")
        held = (await mesh.lease(request_id="held", account="acct-x", ttl_s=120)).lease
        assert held.token == 2
    async with broker_mesh() as mesh:
        device = await mesh.device(phone.address)
        assert device.state == LEASED and device.lease == held
        assert device.bound_account == "acct-x"
        replay = await mesh.lease(request_id="held", account="acct-x", ttl_s=120)
        assert replay.lease == held
        await mesh.release(held)
        await mesh.wait_available([phone.address])
        again = (await mesh.lease(account="acct-x")).lease
        assert again.token == 3


async def test_device_events_are_published(
    broker_mesh: MeshFactory, phones: PhoneFactory, nats_client: NATS, streams: Streams
) -> None:
    (phone,) = phones(1)
    received: asyncio.Queue[events_pb2.Event] = asyncio.Queue()

    async def on_message(msg: object) -> None:
        received.put_nowait(events_pb2.Event.FromString(msg.data))  # type: ignore[attr-defined]

    await nats_client.subscribe(streams.subject("events", "device", ">"), cb=on_message)
    async with broker_mesh() as mesh:
        await mesh.wait_available([phone.address])
        lease = (await mesh.lease()).lease
        await mesh.release(lease)
        leased = await asyncio.wait_for(received.get(), 5)
        assert leased.device_leased.lease_id == lease.lease_id
        assert leased.device_leased.token == lease.token
        assert leased.run_id == "run-1" and leased.actor.id == "stepline-services"
        released = await asyncio.wait_for(received.get(), 5)
        assert released.device_released.lease_id == lease.lease_id
        assert released.device_released.outcome == pb.RELEASE_OUTCOME_COMPLETED
        await mesh.wait_state(phone.address, AVAILABLE)


async def test_a_second_broker_waits_for_the_first(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    second_up = asyncio.Event()
    stop_second = asyncio.Event()

    async def second() -> None:
        async with broker_mesh() as mesh:
            second_up.set()
            await mesh.wait_available([phone.address])
            await stop_second.wait()

    async with broker_mesh() as first:
        await first.wait_available([phone.address])
        task = asyncio.ensure_future(second())
        with pytest.raises(TimeoutError):  # it waits for the lock while the first serves
            await asyncio.wait_for(asyncio.shield(second_up.wait()), 1.5)
    await asyncio.wait_for(second_up.wait(), 10)
    stop_second.set()
    await task
