"""Health gate, cleanup verification and quarantine: faults of the simulated phone
quarantine it with evidence; an operator returns it once the fault is cleared."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from stepline.api.device_broker.v1 import device_broker_pb2 as pb
from stepline.common.testing import eventually
from stepline.phone.testing import PhoneFactory

from .conftest import AVAILABLE, CLEANING, QUARANTINED, Mesh, MeshFactory


def evidence_of(device: pb.Device) -> dict[str, Any]:
    return json_format.MessageToDict(device.quarantine.evidence)


def failed_names(evidence: dict[str, Any]) -> set[str]:
    return {check["name"] for check in evidence["failed_checks"]}


async def quarantined_again(mesh: Mesh, serial: str, after: pb.Device) -> pb.Device:
    """The device once a quarantine newer than ``after``'s is recorded."""
    found: list[pb.Device] = []

    async def check() -> bool:
        found[:] = [await mesh.device(serial)]
        return (
            found[0].state == QUARANTINED
            and found[0].quarantine.quarantine_time.ToDatetime()
            > after.quarantine.quarantine_time.ToDatetime()
        )

    await eventually(check, what=f"{serial} quarantined again", timeout_s=20.0)
    return found[0]


async def release_device(mesh: Mesh, serial: str, request_id: str) -> pb.ReleaseDeviceResponse:
    return await mesh.operator.ReleaseDevice(
        pb.ReleaseDeviceRequest(request_id=request_id, serial=serial, reason="fixed by ops")
    )


@pytest.mark.parametrize(
    ("fault", "check"), [("low_battery", "battery"), ("no_boot", "boot_completed")]
)
async def test_failing_health_check_quarantines_until_an_operator_returns_it(
    broker_mesh: MeshFactory, phones: PhoneFactory, fault: str, check: str
) -> None:
    (phone,) = phones(1)
    async with broker_mesh(health_freshness_s=1.0) as mesh:
        await mesh.wait_available([phone.address])
        phone.set_fault(fault)
        device = await mesh.wait_state(phone.address, QUARANTINED)
        assert device.quarantine.reason == "health_check_failed"
        assert device.quarantine.actor.id == "system:device-broker"
        assert check in failed_names(evidence_of(device))
        assert not device.health.healthy
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.lease(timeout_s=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # returned while the fault is still there: cleaned, checked, quarantined again
        response = await release_device(mesh, phone.address, "return-1")
        assert response.device.state == CLEANING
        again = await quarantined_again(mesh, phone.address, device)
        assert check in failed_names(evidence_of(again))
        phone.clear_fault()
        await release_device(mesh, phone.address, "return-2")
        device = await mesh.wait_state(phone.address, AVAILABLE)
        assert device.health.healthy
        names = {c.name for c in device.health.checks}
        assert {"screen_capture", "shell_responsive"} <= names  # full checks for operators
        assert (await mesh.lease()).lease.serial == phone.address


async def test_failed_cleanup_quarantines_with_the_evidence(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh() as mesh:
        await mesh.wait_available([phone.address])
        lease = (await mesh.lease(executor="executor-7")).lease
        phone.set_fault("cleanup_fail")
        released = await mesh.release(lease, message="posted twice")
        assert released.device.state == CLEANING
        device = await mesh.wait_state(phone.address, QUARANTINED)
        evidence = evidence_of(device)
        assert device.quarantine.reason == "cleanup_failed"
        assert "apps_cleared" in failed_names(evidence)
        clear = [c for c in evidence["cleanup"]["commands"] if c["command"].startswith("pm clear ")]
        assert clear and clear[0]["output"] == "Failed" and clear[0]["exit_code"] == 1
        assert evidence["lease"]["lease_id"] == lease.lease_id
        assert evidence["lease"]["executor_id"] == "executor-7"
        assert evidence["lease"]["holder_message"] == "posted twice"
        row = await mesh.running.broker.store.pool.fetchrow(
            "SELECT cleanup_result FROM leases WHERE lease_id = $1", lease.lease_id
        )
        assert row["cleanup_result"] == "quarantined"
        # only a quarantined device can be returned; replays answer the same
        phone.clear_fault()
        first = await release_device(mesh, phone.address, "return-1")
        assert await release_device(mesh, phone.address, "return-1") == first
        await mesh.wait_state(phone.address, AVAILABLE)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await release_device(mesh, phone.address, "return-2")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (await mesh.lease()).lease.token == lease.token + 1


async def test_device_fault_runs_full_checks_after_cleanup(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh() as mesh:
        await mesh.wait_available([phone.address])
        lease = (await mesh.lease()).lease
        await mesh.release(lease, pb.RELEASE_OUTCOME_DEVICE_FAULT, message="taps ignored")
        device = await mesh.wait_state(phone.address, AVAILABLE)
        names = {c.name for c in device.health.checks}
        assert {"screen_capture", "shell_responsive", "window_manager"} <= names
        # a real fault reported by the holder: quarantined with the holder's report
        lease = (await mesh.lease()).lease
        phone.set_fault("storage_full")
        await mesh.release(lease, pb.RELEASE_OUTCOME_DEVICE_FAULT, message="disk full?")
        device = await mesh.wait_state(phone.address, QUARANTINED)
        evidence = evidence_of(device)
        assert device.quarantine.reason == "health_check_failed"
        assert "storage_free" in failed_names(evidence)
        assert evidence["lease"]["outcome"] == "RELEASE_OUTCOME_DEVICE_FAULT"
        assert evidence["lease"]["holder_message"] == "disk full?"


async def test_hung_device_is_quarantined(broker_mesh: MeshFactory, phones: PhoneFactory) -> None:
    (phone,) = phones(1)
    async with broker_mesh(health_freshness_s=1.0, adb_timeout_s=0.5) as mesh:
        await mesh.wait_available([phone.address])
        phone.set_fault("hang")
        device = await mesh.wait_state(phone.address, QUARANTINED)
        assert "adb_reachable" in failed_names(evidence_of(device))
        phone.clear_fault()


async def test_operator_quarantine_revokes_the_lease(
    broker_mesh: MeshFactory, phones: PhoneFactory
) -> None:
    (phone,) = phones(1)
    async with broker_mesh() as mesh:
        await mesh.wait_available([phone.address])
        lease = (await mesh.lease()).lease
        evidence = Struct()
        evidence.update({"ticket": "OPS-1"})
        request = pb.QuarantineDeviceRequest(
            request_id="q1", serial=phone.address, reason="screen cracked", evidence=evidence
        )
        response = await mesh.operator.QuarantineDevice(request)
        device = response.device
        assert device.state == QUARANTINED and not device.HasField("lease")
        assert device.quarantine.reason == "screen cracked"
        assert device.quarantine.actor.id == "alice"
        assert list(device.quarantine.actor.roles) == ["operator"]
        assert evidence_of(device) == {"ticket": "OPS-1"}
        assert await mesh.operator.QuarantineDevice(request) == response
        request.reason = "something else"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.operator.QuarantineDevice(request)
        assert info.value.code() == grpc.StatusCode.ABORTED
        for call in (
            mesh.service.Renew(
                pb.RenewRequest(request_id="r", lease_id=lease.lease_id, token=lease.token)
            ),
            mesh.release(lease),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "revoked" in (info.value.details() or "")
        await release_device(mesh, phone.address, "back")
        await mesh.wait_state(phone.address, AVAILABLE)
