"""Leases through the real adb server and gRPC: exclusivity, fencing, expiry,
cleanup, waiting, idempotency."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from stepline.api.device_broker.v1 import device_broker_pb2 as pb
from stepline.common import adb
from stepline.phone import build_apk
from stepline.phone.testing import PhoneFactory

from .conftest import AVAILABLE, LEASED, MeshFactory, lease_request


async def test_two_holders_never_hold_one_phone(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    serials = [phone.address for phone in phones(3)]
    async with broker_mesh() as mesh:
        await mesh.wait_available(serials)
        intervals: dict[str, list[tuple[float, float, int]]] = defaultdict(list)

        async def contender(n: int) -> None:
            for cycle in range(2):
                granted = await mesh.lease(executor=f"executor-{n}", timeout_s=60)
                start = time.monotonic()
                await asyncio.sleep(0.005)  # the holder's work
                end = time.monotonic()
                intervals[granted.lease.serial].append((start, end, granted.lease.token))
                await mesh.release(granted.lease, request_id=f"release-{n}-{cycle}")

        await asyncio.gather(*(contender(n) for n in range(20)))
        assert sum(len(held) for held in intervals.values()) == 40
        for serial, held in intervals.items():
            held.sort()
            for (_, end, _), (start, _, _) in itertools.pairwise(held):
                assert end <= start, f"{serial}: two holders at once"
            assert [token for *_, token in held] == list(range(1, len(held) + 1))
        rows = await mesh.running.broker.store.pool.fetch(
            "SELECT serial, grant_time, end_time FROM leases ORDER BY serial, grant_time"
        )
        assert len(rows) == 40
        for previous, current in itertools.pairwise(rows):
            if previous["serial"] == current["serial"]:
                assert previous["end_time"] <= current["grant_time"]


async def test_stale_fencing_token_is_refused(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh() as mesh:
        await mesh.wait_available([phone.address])
        first = (await mesh.lease()).lease
        assert first.token == 1 and first.serial == phone.address
        device = await mesh.device(phone.address)
        assert device.state == LEASED and device.lease.lease_id == first.lease_id
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.service.Renew(
                pb.RenewRequest(request_id="r1", lease_id=first.lease_id, token=first.token + 1)
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "stale fencing token" in (info.value.details() or "")
        renewed = await mesh.service.Renew(
            pb.RenewRequest(
                request_id="r2",
                lease_id=first.lease_id,
                token=first.token,
                ttl=Duration(seconds=60),
            )
        )
        assert renewed.lease.expire_time.ToDatetime() > first.expire_time.ToDatetime()
        await mesh.release(first)
        await mesh.release(first)  # the same request again: a harmless replay
        second = (await mesh.lease(timeout_s=20)).lease
        assert second.serial == phone.address and second.token == 2
        for call in (
            mesh.service.Renew(
                pb.RenewRequest(request_id="r3", lease_id=first.lease_id, token=first.token)
            ),
            mesh.service.Release(
                pb.ReleaseRequest(request_id="x", lease_id=first.lease_id, token=first.token)
            ),
            mesh.service.Renew(
                pb.RenewRequest(request_id="r4", lease_id=second.lease_id, token=first.token)
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (await mesh.device(phone.address)).lease.token == 2


async def test_expired_lease_is_cleaned_and_leased_again(
    broker_mesh: MeshFactory, phones: PhoneFactory, adb_server: tuple[str, int]
) -> None:
    (phone,) = phones(1)
    async with broker_mesh() as mesh:
        await mesh.wait_available([phone.address])
        before = sorted(phone.model.packages)
        lease = (await mesh.lease(ttl_s=1.0, executor="dead-executor")).lease
        # the holder installs an app, leaves session files, signs in, then dies
        device = adb.client(*adb_server).device(lease.serial)
        await asyncio.to_thread(
            device.sync.push, build_apk("com.example.extra"), "/data/local/tmp/stepline/x.apk"
        )
        await asyncio.to_thread(device.sync.push, b"notes", "/sdcard/stepline/run/notes.txt")
        installed = await asyncio.to_thread(
            device.shell, "pm install /data/local/tmp/stepline/x.apk"
        )
        assert "Success" in installed
        with phone.model.lock:
            phone.model.accounts.add("ada")
        assert "com.example.extra" in phone.model.packages
        await mesh.wait_state(phone.address, AVAILABLE, timeout_s=20)
        assert sorted(phone.model.packages) == before
        assert not [
            p
            for p in phone.model.files
            if p.startswith(("/sdcard/stepline", "/data/local/tmp/stepline"))
        ]
        assert phone.model.accounts == set()
        assert phone.model.foreground_package == "com.android.launcher3"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.service.Renew(
                pb.RenewRequest(request_id="late", lease_id=lease.lease_id, token=lease.token)
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "expired" in (info.value.details() or "")
        again = (await mesh.lease()).lease
        assert again.serial == phone.address and again.token == lease.token + 1
        row = await mesh.running.broker.store.pool.fetchrow(
            "SELECT end_reason, cleanup_result FROM leases WHERE lease_id = $1", lease.lease_id
        )
        assert (row["end_reason"], row["cleanup_result"]) == ("expired", "clean")


async def test_keep_accounts_profile_keeps_the_sign_in(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh(cleanup_profiles={"default": "keep_accounts"}) as mesh:
        await mesh.wait_available([phone.address])
        lease = (await mesh.lease()).lease
        with phone.model.lock:
            phone.model.accounts.add("ada")
        phone.shell("mkdir -p /sdcard/stepline && touch /sdcard/stepline/x")
        await mesh.release(lease)
        await mesh.wait_state(phone.address, AVAILABLE)
        assert phone.model.accounts == {"ada"}
        assert not phone.model.is_dir("/sdcard/stepline")


async def test_lease_waits_then_deadline_exceeded(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh() as mesh:
        await mesh.wait_available([phone.address])
        held = (await mesh.lease()).lease
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.lease(timeout_s=0.5)
        waited = time.monotonic() - started
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.3 < waited < 2.0
        assert "became free" in (info.value.details() or "")
        # a waiting call gets the phone as soon as it is clean again
        waiting = asyncio.ensure_future(mesh.lease(timeout_s=20))
        await mesh.release(held)
        granted = (await waiting).lease
        assert granted.serial == phone.address and granted.token == held.token + 1


async def test_waiters_are_served_in_arrival_order(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh(cleanup_profiles={"default": "none"}) as mesh:
        await mesh.wait_available([phone.address])
        held = (await mesh.lease()).lease
        calls = []
        for n in range(4):
            calls.append(asyncio.ensure_future(mesh.lease(executor=f"e{n}", timeout_s=20)))
            # this call is queued before the next one starts
            await mesh.wait_waiters(n + 1)
        order = []
        for call in calls:
            await mesh.release(held)
            response = await asyncio.wait_for(asyncio.shield(call), 10)
            held = response.lease
            order.append(response.lease.holder.executor_id)
            assert all(not other.done() for other in calls[len(order) :])
        assert order == ["e0", "e1", "e2", "e3"]


async def test_a_waiter_the_freed_phone_cannot_serve_does_not_block_others(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    a, b = sorted(phone.address for phone in phones(2))
    labels = {a: {"site": "a"}, b: {"site": "b"}}
    async with broker_mesh(cleanup_profiles={"default": "none"}, device_labels=labels) as mesh:
        await mesh.wait_available([a, b])
        on_a = (await mesh.lease(labels={"site": "a"})).lease
        on_b = (await mesh.lease(labels={"site": "b"})).lease
        wants_a = asyncio.ensure_future(mesh.lease(labels={"site": "a"}, timeout_s=20))
        await mesh.wait_waiters(1)
        wants_any = asyncio.ensure_future(mesh.lease(timeout_s=20))
        await mesh.wait_waiters(2)
        await mesh.release(on_b)
        assert (await asyncio.wait_for(wants_any, 10)).lease.serial == b
        assert not wants_a.done()
        await mesh.release(on_a)
        assert (await asyncio.wait_for(wants_a, 10)).lease.serial == a


async def test_nothing_can_match_fails_at_once(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh(device_labels={phone.address: {"site": "paris"}}) as mesh:
        await mesh.wait_available([phone.address])
        for selector in (
            {"pool": "elsewhere"},
            {"model": "Galaxy S24"},
            {"labels": {"site": "tokyo"}},
            {"account": "nobody"},
        ):
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await mesh.lease(timeout_s=10, **selector)  # type: ignore[arg-type]
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, selector
            assert time.monotonic() - started < 1.0
        granted = await mesh.lease(pool="default", model="Pixel 7", labels={"site": "paris"})
        assert granted.device.labels == {"site": "paris"}


async def test_bad_input_is_invalid_argument(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh() as mesh:
        await mesh.wait_available([phone.address])
        bad_leases = [
            pb.LeaseRequest(holder=pb.LeaseHolder(executor_id="e")),
            pb.LeaseRequest(request_id="x"),
            lease_request(ttl_s=0.5),
            pb.LeaseRequest(
                request_id="x",
                holder=pb.LeaseHolder(executor_id="e"),
                ttl=Duration(seconds=-5),
            ),
            pb.LeaseRequest(request_id="x" * 300, holder=pb.LeaseHolder(executor_id="e")),
        ]
        for request in bad_leases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await mesh.service.Lease(request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        for call in (
            mesh.service.Renew(pb.RenewRequest(request_id="r", lease_id="l")),
            mesh.service.Release(
                pb.ReleaseRequest(request_id="r", lease_id="l", token=1, outcome=99)  # type: ignore[arg-type]
            ),
            mesh.operator.ListDevices(pb.ListDevicesRequest(page_size=-1)),
            mesh.operator.ListDevices(pb.ListDevicesRequest(page_token="nonsense")),
            mesh.operator.ListDevices(pb.ListDevicesRequest(states=[0])),
            mesh.operator.QuarantineDevice(
                pb.QuarantineDeviceRequest(request_id="q", serial=phone.address)
            ),
            mesh.operator.BindAccount(pb.BindAccountRequest(request_id="b", serial=phone.address)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (await mesh.device(phone.address)).state == AVAILABLE
        count = await mesh.running.broker.store.pool.fetchval("SELECT count(*) FROM leases")
        assert count == 0


async def test_lease_is_idempotent_on_request_id(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    phones(2)
    async with broker_mesh() as mesh:
        await mesh.wait_available([d.serial for d in await mesh.devices()])
        first = await mesh.lease(request_id="same")
        again = await mesh.lease(request_id="same")
        assert again.lease == first.lease
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.lease(request_id="same", executor="someone-else")
        assert info.value.code() == grpc.StatusCode.ABORTED
        await mesh.release(first.lease)
        await mesh.wait_available([first.lease.serial])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.lease(request_id="same")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "has ended" in (info.value.details() or "")
        count = await mesh.running.broker.store.pool.fetchval("SELECT count(*) FROM leases")
        assert count == 1


async def test_who_may_call(broker_mesh: MeshFactory, phones: PhoneFactory) -> None:
    (phone,) = phones(1)
    async with broker_mesh() as mesh:
        await mesh.wait_available([phone.address])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.operator.Lease(lease_request())
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        for call in (
            mesh.service.QuarantineDevice(
                pb.QuarantineDeviceRequest(request_id="q", serial=phone.address, reason="x")
            ),
            mesh.service.BindAccount(
                pb.BindAccountRequest(request_id="b", serial=phone.address, account="a")
            ),
            mesh.service.ReleaseDevice(
                pb.ReleaseDeviceRequest(request_id="r", serial=phone.address, reason="x")
            ),
            mesh.service.UnbindAccount(
                pb.UnbindAccountRequest(request_id="u", serial=phone.address)
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.anonymous.ListDevices(pb.ListDevicesRequest())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert len((await mesh.service.ListDevices(pb.ListDevicesRequest())).devices) == 1
        assert (await mesh.admin.Lease(lease_request())).lease.token == 1
        assert (await mesh.device(phone.address)).state == LEASED
