"""Fixtures for the device broker's tests: the broker running in-process on real
PostgreSQL, NATS and the session's adb server, called over loopback gRPC, with
simulated phones (``phones`` fixture of stepline.phone.testing)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import pytest
from google.protobuf.duration_pb2 import Duration

from stepline.api.common.v1 import common_pb2
from stepline.api.device_broker.v1 import device_broker_pb2 as pb
from stepline.api.device_broker.v1 import device_broker_pb2_grpc
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings, NatsSettings, ServerSettings
from stepline.common.jetstream import Streams
from stepline.common.testing import Credentials, eventually
from stepline.device_broker.config import DeviceBrokerSettings
from stepline.device_broker.server import Running, started

if TYPE_CHECKING:
    from stepline.api.device_broker.v1.device_broker_pb2_grpc import DeviceBrokerServiceAsyncStub

S = common_pb2.DeviceState
AVAILABLE = S.DEVICE_STATE_AVAILABLE
LEASED = S.DEVICE_STATE_LEASED
CLEANING = S.DEVICE_STATE_CLEANING
QUARANTINED = S.DEVICE_STATE_QUARANTINED
OFFLINE = S.DEVICE_STATE_OFFLINE


@dataclass
class Mesh:
    settings: DeviceBrokerSettings
    running: Running
    service: DeviceBrokerServiceAsyncStub  # role service (an executor)
    operator: DeviceBrokerServiceAsyncStub  # alice, role operator
    admin: DeviceBrokerServiceAsyncStub
    anonymous: DeviceBrokerServiceAsyncStub  # no token

    async def devices(self, **filters: Any) -> list[pb.Device]:
        response = await self.operator.ListDevices(pb.ListDevicesRequest(**filters))
        return list(response.devices)

    async def device(self, serial: str) -> pb.Device:
        return (await self.operator.GetDevice(pb.GetDeviceRequest(serial=serial))).device

    async def wait_state(self, serial: str, state: int, *, timeout_s: float = 20.0) -> pb.Device:
        """The device once it is in ``state`` (polls GetDevice)."""
        last: list[pb.Device] = []

        async def check() -> pb.Device | None:
            with contextlib.suppress(Exception):
                last[:] = [await self.device(serial)]
            return last[0] if last and last[0].state == state else None

        device: pb.Device = await eventually(
            check, what=lambda: f"{serial} {S.Name(state)} (last: {last})", timeout_s=timeout_s
        )
        return device

    async def wait_available(self, serials: list[str], *, timeout_s: float = 20.0) -> None:
        for serial in serials:
            await self.wait_state(serial, AVAILABLE, timeout_s=timeout_s)

    async def lease(
        self,
        *,
        request_id: str | None = None,
        executor: str = "executor-1",
        ttl_s: float = 30.0,
        timeout_s: float = 10.0,
        pool: str = "",
        model: str = "",
        labels: dict[str, str] | None = None,
        account: str = "",
    ) -> pb.LeaseResponse:
        return await self.service.Lease(
            lease_request(
                request_id=request_id,
                executor=executor,
                ttl_s=ttl_s,
                pool=pool,
                model=model,
                labels=labels,
                account=account,
            ),
            timeout=timeout_s,
        )

    async def release(
        self,
        lease: pb.Lease,
        outcome: int = pb.RELEASE_OUTCOME_COMPLETED,
        *,
        message: str = "",
        request_id: str | None = None,
    ) -> pb.ReleaseResponse:
        return await self.service.Release(
            release_request(lease, outcome, message=message, request_id=request_id)
        )

    @property
    def waiters(self) -> int:
        """How many Lease calls wait for a device in the broker now."""
        return len(self.running.broker._waiters)

    async def wait_waiters(self, n: int, *, timeout_s: float = 20.0) -> None:
        """Until exactly ``n`` Lease calls wait for a device."""

        async def check() -> bool:
            return self.waiters == n

        await eventually(check, what=f"{n} waiting Lease call(s)", timeout_s=timeout_s)


#: the cleanup profiles of a broker whose released phones are free at once
NO_CLEANUP = {"default": "none"}


def lease_request(
    *,
    request_id: str | None = None,
    executor: str = "executor-1",
    ttl_s: float = 30.0,
    pool: str = "",
    model: str = "",
    labels: dict[str, str] | None = None,
    account: str = "",
) -> pb.LeaseRequest:
    return pb.LeaseRequest(
        request_id=request_id or f"lease-{uuid.uuid4()}",
        selector=pb.DeviceSelector(pool=pool, model=model, labels=labels or {}, account=account),
        holder=pb.LeaseHolder(executor_id=executor, run_id="run-1", task_id="task-1"),
        ttl=Duration(seconds=int(ttl_s), nanos=int((ttl_s % 1) * 1e9)),
    )


def release_request(
    lease: pb.Lease,
    outcome: int = pb.RELEASE_OUTCOME_COMPLETED,
    *,
    message: str = "",
    request_id: str | None = None,
    token: int | None = None,
) -> pb.ReleaseRequest:
    """A Release of ``lease`` (``token``: another token than the lease's)."""
    return pb.ReleaseRequest(
        request_id=request_id or f"release-{lease.lease_id}",
        lease_id=lease.lease_id,
        token=lease.token if token is None else token,
        outcome=outcome,  # type: ignore[arg-type]
        message=message,
    )


class MeshFactory(Protocol):
    def __call__(self, **overrides: Any) -> contextlib.AbstractAsyncContextManager[Mesh]: ...


@pytest.fixture
def broker_settings(
    database_url: str,
    nats_url: str,
    streams: Streams,
    credentials: Credentials,
    adb_server: tuple[str, int],
) -> DeviceBrokerSettings:
    """Fast settings: scans every 0.1 s, 2 s adb timeout."""
    return DeviceBrokerSettings(
        server=ServerSettings(
            service="device-broker", auth_file=credentials.auth_file, shutdown_grace_s=0.5
        ),
        database_url=database_url,
        nats=NatsSettings(url=nats_url, stream_prefix=streams.prefix),
        adb_servers=(adb_server,),
        scan_interval_s=0.1,
        health_freshness_s=30.0,
        adb_timeout_s=2.0,
    )


@pytest.fixture
def broker_mesh(broker_settings: DeviceBrokerSettings, credentials: Credentials) -> MeshFactory:
    """``async with broker_mesh(**settings_overrides) as mesh``: a broker serving."""

    @contextlib.asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Mesh]:
        settings = replace(broker_settings, **overrides)
        async with contextlib.AsyncExitStack() as stack:
            running = await stack.enter_async_context(started(settings))
            target = f"127.0.0.1:{running.host.port}"

            def stub(token: str | None) -> DeviceBrokerServiceAsyncStub:
                channel = open_channel(target, settings=ClientSettings(service_token=token))
                stack.push_async_callback(channel.close)
                return device_broker_pb2_grpc.DeviceBrokerServiceStub(channel)

            yield Mesh(
                settings=settings,
                running=running,
                service=stub(credentials.service_token),
                operator=stub(credentials.user_token),
                admin=stub(credentials.admin_token),
                anonymous=stub(None),
            )

    return start
