"""A release that hands its device straight to the next waiting Lease call
(cleanup profile ``none``): one statement ends the old lease and grants the new
one, and the device never shows AVAILABLE in between."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from stepline.api.device_broker.v1 import device_broker_pb2 as pb
from stepline.common.auth import Principal
from stepline.phone.testing import PhoneFactory

from .conftest import AVAILABLE, LEASED, NO_CLEANUP, Mesh, MeshFactory


async def _device_row(mesh: Mesh, serial: str) -> tuple[int, int, str | None]:
    row = await mesh.running.broker.store.pool.fetchrow(
        "SELECT version, state, lease_id FROM devices WHERE serial = $1", serial
    )
    return row["version"], row["state"], row["lease_id"]


async def test_release_hands_the_phone_to_the_waiting_call(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh(cleanup_profiles=NO_CLEANUP) as mesh:
        await mesh.wait_available([phone.address])
        held = (await mesh.lease(executor="first")).lease
        waiting = asyncio.ensure_future(mesh.lease(executor="second", timeout_s=20))
        await mesh.wait_waiters(1)
        version_before, _, _ = await _device_row(mesh, phone.address)

        released = await mesh.release(held, message="done")
        granted = (await asyncio.wait_for(waiting, 10)).lease

        assert granted.serial == phone.address and granted.token == held.token + 1
        assert granted.holder.executor_id == "second"
        # the releaser sees the device as it is now, not the next holder's lease
        assert released.device.state == LEASED and not released.device.HasField("lease")
        # one write of the device row: no AVAILABLE between the two leases
        version, state, lease_id = await _device_row(mesh, phone.address)
        assert (version, state, lease_id) == (version_before + 1, LEASED, granted.lease_id)
        rows = await mesh.running.broker.store.pool.fetch(
            "SELECT lease_id, token, end_reason, outcome, message, cleanup_result,"
            " release_request_id, grant_time, end_time FROM leases ORDER BY token"
        )
        old, new = rows
        assert (old["lease_id"], old["end_reason"], old["message"]) == (
            held.lease_id,
            "released",
            "done",
        )
        assert old["cleanup_result"] == "skipped"
        assert old["release_request_id"] == f"release-{held.lease_id}"
        assert new["lease_id"] == granted.lease_id and new["end_time"] is None
        assert old["end_time"] <= new["grant_time"]
        device = await mesh.device(phone.address)
        assert device.lease.lease_id == granted.lease_id and device.lease.token == granted.token

        # the handed-over lease is an ordinary one: fenced, released, replayed
        again = await mesh.release(held)  # the first release again: a replay
        assert again.device.serial == phone.address
        await mesh.release(granted)
        await mesh.wait_state(phone.address, AVAILABLE)


async def test_a_hand_over_that_cannot_grant_falls_back_to_a_release(
    broker_mesh: MeshFactory, phones: PhoneFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The waiting call reuses the request id of a lease that has ended: the
    hand-over's insert fails, so the device is released the usual way and the
    waiting call gets the answer its own grant gives (FAILED_PRECONDITION)."""
    (phone,) = phones(1)
    async with broker_mesh(cleanup_profiles=NO_CLEANUP) as mesh:
        await mesh.wait_available([phone.address])
        ended = (await mesh.lease(request_id="used")).lease
        await mesh.release(ended)
        held = (await mesh.lease(executor="first")).lease
        waiting = asyncio.ensure_future(mesh.lease(request_id="used", timeout_s=20))
        await mesh.wait_waiters(1)

        with caplog.at_level(logging.INFO, logger="stepline.device_broker.broker"):
            released = await mesh.release(held)

        tried = [r.getMessage() for r in caplog.records if "handing device" in r.getMessage()]
        assert len(tried) == 1 and "leases_request_id_key" in tried[0]  # the path taken
        assert released.device.state == AVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(waiting, 10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "has ended" in (info.value.details() or "")
        _, state, lease_id = await _device_row(mesh, phone.address)
        assert (state, lease_id) == (AVAILABLE, None)
        ends = await mesh.running.broker.store.pool.fetch(
            "SELECT end_reason FROM leases WHERE lease_id = $1", held.lease_id
        )
        assert [row["end_reason"] for row in ends] == ["released"]
        assert mesh.waiters == 0
        assert (await mesh.lease(executor="later")).lease.token == held.token + 1


async def test_two_releases_at_once_hand_over_to_one_waiter_once(
    broker_mesh: MeshFactory, phones: PhoneFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Two releases served in the same turn of the event loop, one waiting call:
    the first release hands its phone over, the second one sees the waiter taken
    and releases its phone the usual way (no second, failing hand-over)."""
    serials = sorted(phone.address for phone in phones(2))
    async with broker_mesh(cleanup_profiles=NO_CLEANUP) as mesh:
        await mesh.wait_available(serials)
        held = [(await mesh.lease(executor=f"holder-{n}")).lease for n in range(2)]
        broker = mesh.running.broker
        waiting = asyncio.ensure_future(mesh.lease(executor="waiter", timeout_s=20))
        await mesh.wait_waiters(1)
        actor = Principal("executor", frozenset({"service"}))
        requests = [
            pb.ReleaseRequest(
                request_id=f"release-{lease.lease_id}",
                lease_id=lease.lease_id,
                token=lease.token,
                outcome=pb.RELEASE_OUTCOME_COMPLETED,
            )
            for lease in held
        ]
        with caplog.at_level(logging.INFO, logger="stepline.device_broker.broker"):
            answers = await asyncio.gather(*(broker.release(r, actor) for r in requests))
            granted = (await asyncio.wait_for(waiting, 10)).lease
        assert not [r for r in caplog.records if "handing device" in r.getMessage()]
        assert sorted(a.device.state for a in answers) == sorted([LEASED, AVAILABLE])
        handed = next(a.device.serial for a in answers if a.device.state == LEASED)
        assert granted.serial == handed and granted.holder.executor_id == "waiter"
        other = next(s for s in serials if s != handed)
        assert (await mesh.device(other)).state == AVAILABLE
        count = await broker.store.pool.fetchval("SELECT count(*) FROM leases")
        assert count == 3
