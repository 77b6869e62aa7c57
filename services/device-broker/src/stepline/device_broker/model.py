"""The broker's in-memory view of its devices, live leases and waiting requests.

PostgreSQL holds the truth (and enforces one live lease per device); this view
is what the lease path reads so that granting takes one database statement and
no adb work. Only the broker's event loop touches it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from stepline.api.common.v1 import common_pb2
from stepline.api.device_broker.v1 import device_broker_pb2 as pb
from stepline.common.auth import Principal

S = common_pb2.DeviceState
AVAILABLE = S.DEVICE_STATE_AVAILABLE
LEASED = S.DEVICE_STATE_LEASED
CLEANING = S.DEVICE_STATE_CLEANING
QUARANTINED = S.DEVICE_STATE_QUARANTINED
OFFLINE = S.DEVICE_STATE_OFFLINE


def state_name(state: int) -> str:
    if state not in S.values():
        return str(state)
    return S.Name(S.ValueType(state)).removeprefix("DEVICE_STATE_")


@dataclass(frozen=True)
class Selector:
    """Which devices may serve a lease (DeviceSelector, validated)."""

    pool: str = ""
    model: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    account: str = ""

    @classmethod
    def from_proto(cls, selector: pb.DeviceSelector) -> Selector:
        return cls(
            pool=selector.pool,
            model=selector.model,
            labels=tuple(sorted(selector.labels.items())),
            account=selector.account,
        )

    def matches(self, device: Entry) -> bool:
        """Whether ``device`` could serve the lease, whatever its state. A device
        bound to an account serves that account's leases only."""
        if device.account != self.account:
            return False
        if self.pool and device.pool != self.pool:
            return False
        if self.model and device.model != self.model:
            return False
        return all(device.labels.get(key) == value for key, value in self.labels)


@dataclass
class LiveLease:
    lease_id: str
    request_id: str
    fingerprint: str
    serial: str
    token: int
    holder: pb.LeaseHolder
    account: str
    grant_time: datetime
    expire_time: datetime

    def to_proto(self) -> pb.Lease:
        lease = pb.Lease(
            lease_id=self.lease_id,
            serial=self.serial,
            token=self.token,
            account=self.account,
        )
        lease.holder.CopyFrom(self.holder)
        lease.grant_time.FromDatetime(self.grant_time)
        lease.expire_time.FromDatetime(self.expire_time)
        return lease


@dataclass(eq=False)
class Entry:
    """One device as the broker sees it right now."""

    serial: str
    adb_server: str
    pool: str
    profile: str
    state: int
    #: the database row's version this view reflects (see store.py)
    version: int = 0
    model: str = ""
    product: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    online: bool = True
    account: str = ""
    health: pb.HealthReport | None = None
    last_seen: datetime | None = None
    lease: LiveLease | None = None
    #: picked for a waiting request; its grant statement is in flight
    reserved: bool = False
    #: bumped on every entry into CLEANING, so a cleanup that finishes after
    #: the device was cleaned again (or quarantined and released) is discarded
    cleaning_generation: int = 0
    cleaning_reason: str = ""
    #: a health check runs in the background
    checking: bool = False

    @property
    def healthy(self) -> bool:
        return self.health is not None and self.health.healthy

    def health_age_s(self, now: float) -> float:
        if self.health is None or not self.health.HasField("check_time"):
            return float("inf")
        return now - self.health.check_time.ToMicroseconds() / 1e6

    def grantable(self, now: float, freshness_s: float) -> bool:
        return (
            self.state == AVAILABLE
            and self.online
            and not self.reserved
            and self.healthy
            and self.health_age_s(now) < freshness_s
        )

    def to_proto(self) -> pb.Device:
        """The device as the lease path knows it (quarantine evidence comes from
        the database: see :mod:`stepline.device_broker.convert`)."""
        device = pb.Device(
            serial=self.serial,
            adb_server=self.adb_server,
            model=self.model,
            product=self.product,
            pool=self.pool,
            labels=dict(self.labels),
            state=S.ValueType(self.state),
            bound_account=self.account,
            cleanup_profile=self.profile,
        )
        if self.lease is not None and self.state == LEASED:
            device.lease.CopyFrom(self.lease.to_proto())
        if self.health is not None:
            device.health.CopyFrom(self.health)
        if self.last_seen is not None:
            device.last_seen_time.FromDatetime(self.last_seen)
        return device


@dataclass(frozen=True)
class Ask:
    """A Lease call's request, validated: what its grant writes."""

    request: pb.LeaseRequest
    selector: Selector
    fingerprint: str
    ttl_s: float
    actor: Principal


@dataclass(eq=False)
class Waiter:
    """A Lease call waiting for a device; served in arrival order among those a
    freed device can satisfy. Its future gets a reserved device (the call then
    commits the grant), or the answer itself when a release handed the device
    over to it."""

    ask: Ask
    future: asyncio.Future[Entry | pb.LeaseResponse]
    since: float = field(default_factory=time.monotonic)
    #: while a release hands its device over to this call (statement in
    #: flight): an event set when that hand-over settles, granted or not
    handover: asyncio.Event | None = None

    @property
    def selector(self) -> Selector:
        return self.ask.selector
