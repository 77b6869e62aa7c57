"""Inventory: devices found through the adb server, reconnected, gone offline."""

from __future__ import annotations

import grpc
import pytest

from stepline.api.device_broker.v1 import device_broker_pb2 as pb
from stepline.common.testing import eventually
from stepline.phone.server import PhoneServer
from stepline.phone.testing import PhoneFactory

from .conftest import AVAILABLE, CLEANING, LEASED, OFFLINE, MeshFactory


async def test_devices_are_listed_from_adb(broker_mesh: MeshFactory, phones: PhoneFactory) -> None:
    started = phones(2, model="Pixel 7")
    serials = sorted(phone.address for phone in started)
    async with broker_mesh() as mesh:
        await mesh.wait_available(serials)
        devices = await mesh.devices()
        assert [d.serial for d in devices] == serials
        for device in devices:
            assert device.model == "Pixel 7"
            assert device.product == "stepline_sim"
            assert device.pool == "default"
            assert device.cleanup_profile == "standard"
            assert device.adb_server == "{}:{}".format(*mesh.settings.adb_servers[0])
            assert device.health.healthy
            names = {check.name for check in device.health.checks}
            assert {"adb_reachable", "boot_completed", "battery", "storage_free"} <= names
            assert device.HasField("last_seen_time")
        # filters and pages
        assert [d.serial for d in await mesh.devices(pool="other")] == []
        assert len(await mesh.devices(states=[AVAILABLE], model="Pixel 7")) == 2
        first = await mesh.operator.ListDevices(pb.ListDevicesRequest(page_size=1))
        assert [d.serial for d in first.devices] == serials[:1]
        second = await mesh.operator.ListDevices(
            pb.ListDevicesRequest(page_size=1, page_token=first.next_page_token)
        )
        assert [d.serial for d in second.devices] == serials[1:]
        assert second.next_page_token == ""
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.device("10.0.0.1:1")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_configured_addresses_are_connected_and_reconnected(
    broker_mesh: MeshFactory,
) -> None:
    with PhoneServer() as phone:
        async with broker_mesh(device_addresses=(phone.address,)) as mesh:
            await mesh.wait_state(phone.address, AVAILABLE)
            phone.set_fault("drop")  # cuts the adb connection and refuses new ones
            await mesh.wait_state(phone.address, OFFLINE)
            phone.clear_fault()
            await mesh.wait_state(phone.address, AVAILABLE)
            phones = mesh.running.upkeep.phones
        phones.disconnect(phone.address)  # the broker connected it: leave no trace


async def test_a_leased_phone_that_drops_is_cleaned_when_it_returns(
    broker_mesh: MeshFactory,
) -> None:
    with PhoneServer() as phone:
        async with broker_mesh(device_addresses=(phone.address,)) as mesh:
            await mesh.wait_state(phone.address, AVAILABLE)
            lease = (await mesh.lease()).lease
            phone.set_fault("drop")
            entry = mesh.running.broker.entries[phone.address]

            async def dropped() -> bool:
                return not entry.online

            await eventually(dropped, what="the broker to see the phone gone", timeout_s=20.0)
            assert (await mesh.device(phone.address)).state == LEASED  # the lease lives on
            released = await mesh.release(lease)
            assert released.device.state in (CLEANING, OFFLINE)
            await mesh.wait_state(phone.address, OFFLINE)
            phone.clear_fault()
            await mesh.wait_state(phone.address, AVAILABLE)
            row = await mesh.running.broker.store.pool.fetchrow(
                "SELECT cleanup_result FROM leases WHERE lease_id = $1", lease.lease_id
            )
            assert row["cleanup_result"] == "clean"
            phones = mesh.running.upkeep.phones
        phones.disconnect(phone.address)
