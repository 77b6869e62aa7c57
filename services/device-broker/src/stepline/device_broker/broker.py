"""The broker's core: leases, their wait queue, and every change of a device's state.

A Lease call takes a free matching device from the in-memory view (or waits for
one in arrival order), then commits the grant in one statement; no adb work
happens on that path. Health checks, cleanup and the inventory scan run in the
background (:mod:`stepline.device_broker.upkeep`) and report here.

A release without cleanup (profile ``none``) while a Lease call waits for such
a device hands the device over: one statement ends the lease and grants the
next one (the device stays LEASED, with the next token), instead of a release
and then a grant. If that statement changes nothing or fails, the release goes
the usual way and the waiting call grants for itself.

Changes reach the view through :meth:`Broker.apply`, which takes the device
row's version from the database, so the view follows the commit order even
when concurrent calls finish in another order.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import asyncpg
from google.protobuf.duration_pb2 import Duration

from stepline.api.common.v1 import common_pb2
from stepline.api.device_broker.v1 import device_broker_pb2 as pb
from stepline.common import paging
from stepline.common.auth import Principal
from stepline.common.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from stepline.common.requests import fingerprint
from stepline.device_broker import convert
from stepline.device_broker.config import DeviceBrokerSettings
from stepline.device_broker.events import DeviceEvents
from stepline.device_broker.model import (
    AVAILABLE,
    CLEANING,
    LEASED,
    OFFLINE,
    QUARANTINED,
    Ask,
    Entry,
    LiveLease,
    Selector,
    Waiter,
    state_name,
)
from stepline.device_broker.store import Granted, Row, Store

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_ID_LENGTH = 256
MAX_MESSAGE_LENGTH = 4096
MAX_EVIDENCE_BYTES = 64 * 1024
MIN_TTL_S = 1.0
RELEASE_OUTCOMES = frozenset(pb.ReleaseOutcome.values())


# --- validation ----------------------------------------------------------------------


def require(value: str, name: str) -> str:
    if not value:
        raise InvalidArgument(f"{name} is required")
    return limit(value, name)


def limit(value: str, name: str, maximum: int = MAX_ID_LENGTH) -> str:
    if len(value) > maximum:
        raise InvalidArgument(f"{name} is {len(value)} characters; the limit is {maximum}")
    return value


def seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def describe(selector: Selector) -> str:
    parts = [
        f"{name}={value!r}"
        for name, value in (
            ("pool", selector.pool),
            ("model", selector.model),
            ("account", selector.account),
        )
        if value
    ]
    parts += [f"label {key}={value!r}" for key, value in selector.labels]
    return ", ".join(parts) or "any device"


def proto_principal(principal: Principal) -> common_pb2.Principal:
    return common_pb2.Principal(id=principal.id, roles=sorted(principal.roles))


def shielded(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """Run ``coro`` to its end even if the caller is cancelled (a commit and the
    view's update must not be split); its error is still seen by the caller."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return asyncio.shield(task)


class Broker:
    """Leases, the wait queue and the in-memory view of the devices."""

    def __init__(
        self, *, store: Store, settings: DeviceBrokerSettings, events: DeviceEvents
    ) -> None:
        self.store = store
        self.settings = settings
        self.events = events
        self.entries: dict[str, Entry] = {}
        self._leases: dict[str, LiveLease] = {}
        self._by_request: dict[str, LiveLease] = {}
        self._pending: dict[str, asyncio.Future[None]] = {}
        #: devices that are AVAILABLE, online and healthy, least recently freed first
        self._free: dict[str, Entry] = {}
        #: Lease calls waiting, in arrival order
        self._waiters: dict[Waiter, None] = {}
        #: called when a device enters CLEANING (the upkeep starts its cleanup)
        self.on_cleaning: Callable[[Entry], None] = lambda entry: None

    # --- the view --------------------------------------------------------------------

    async def load(self) -> None:
        """Build the view from the database (at start)."""
        devices, leases = await self.store.load()
        for row in devices:
            entry = convert.entry(row)
            self._configure(entry)
            if (entry.pool, dict(entry.labels), entry.profile) != (
                row["pool"],
                dict(row["labels"] or {}),
                row["cleanup_profile"],
            ):
                await self.store.configure(
                    entry.serial, pool=entry.pool, labels=entry.labels, profile=entry.profile
                )
            self.entries[entry.serial] = entry
        for row in leases:
            live = convert.live_lease(row)
            owner = self.entries.get(live.serial)
            if owner is not None and owner.state == LEASED:
                owner.lease = live
                self._remember_lease(live)
        for entry in self.entries.values():
            self._offer(entry)
        log.info("loaded %d device(s) and %d live lease(s)", len(self.entries), len(self._leases))

    def _configure(self, entry: Entry) -> None:
        entry.pool = self.settings.pool_of(entry.serial)
        entry.labels = self.settings.labels_of(entry.serial)
        entry.profile = self.settings.profile_of(entry.pool)

    def add(self, row: Row) -> Entry:
        """A device registered now (state CLEANING: intake)."""
        entry = convert.entry(row)
        entry.version = 0
        self.entries[entry.serial] = entry
        self.apply_row(entry, row)
        return entry

    def apply_row(self, entry: Entry, row: Row) -> bool:
        return self.apply(
            entry,
            row["version"],
            state=row["state"],
            online=row["online"],
            account=row["bound_account"],
            cleaning_reason=row["cleaning_reason"],
        )

    def apply(
        self,
        entry: Entry,
        version: int,
        *,
        state: int | None = None,
        online: bool | None = None,
        account: str | None = None,
        health: pb.HealthReport | None = None,
        cleaning_reason: str | None = None,
        lease: LiveLease | None = None,
    ) -> bool:
        """Apply a committed change of ``entry``'s row at ``version``; ignored (False)
        if the view already reflects a later one."""
        if version <= entry.version:
            return False
        entry.version = version
        previous = entry.state
        if online is not None:
            entry.online = online
        if account is not None:
            entry.account = account
        if health is not None:
            entry.health = health
        if state is not None:
            entry.state = state
        if lease is not None:
            entry.lease = lease
            self._remember_lease(lease)
        if entry.state != LEASED and entry.lease is not None:
            self._forget_lease(entry.lease)
            entry.lease = None
        if entry.state == CLEANING:
            if previous != CLEANING:
                entry.cleaning_generation += 1
                entry.cleaning_reason = cleaning_reason or entry.cleaning_reason
            self.on_cleaning(entry)  # starts a cleanup unless one is running
        self._offer(entry)
        return True

    def health_checked(self, entry: Entry, health: pb.HealthReport) -> None:
        entry.health = health
        self._offer(entry)

    def _remember_lease(self, lease: LiveLease) -> None:
        self._leases[lease.lease_id] = lease
        self._by_request[lease.request_id] = lease

    def _forget_lease(self, lease: LiveLease) -> None:
        self._leases.pop(lease.lease_id, None)
        self._by_request.pop(lease.request_id, None)

    def next_expiry(self) -> float | None:
        """Wall-clock time of the earliest lease expiry, if any lease is live."""
        if not self._leases:
            return None
        return min(lease.expire_time.timestamp() for lease in self._leases.values())

    # --- matching --------------------------------------------------------------------

    def _offer(self, entry: Entry) -> None:
        """``entry`` may have become free: give it to the first waiter it satisfies."""
        serial = entry.serial
        if entry.reserved:
            return
        if not (entry.state == AVAILABLE and entry.online and entry.healthy):
            self._free.pop(serial, None)
            return
        waiter = self._next_holder(entry)
        if waiter is not None:
            del self._waiters[waiter]
            self._free.pop(serial, None)
            entry.reserved = True
            waiter.future.set_result(entry)
            return
        if self._fresh(entry):
            self._free.pop(serial, None)  # to the end: least recently freed first
        # (a health check too old for a grant: it keeps its place until the
        # health checker refreshes it)
        self._free.setdefault(serial, entry)

    def _fresh(self, entry: Entry) -> bool:
        """Whether ``entry``'s last health check is young enough for a grant."""
        return entry.health_age_s(time.time()) < self.settings.health_freshness_s

    def _next_holder(self, entry: Entry) -> Waiter | None:
        """The first waiting Lease call that ``entry`` can serve, if it is online
        and its health allows a grant now. Its state is the caller's business: an
        AVAILABLE device (:meth:`_offer`), or a leased one about to be released
        without cleanup (:meth:`release`)."""
        if not (entry.online and entry.healthy and self._fresh(entry)):
            return None
        for waiter in self._waiters:
            if (
                waiter.selector.matches(entry)
                and not waiter.future.done()
                and waiter.handover is None
            ):
                return waiter
        return None

    def _take(self, selector: Selector) -> Entry | None:
        now = time.time()
        for serial, entry in self._free.items():
            if selector.matches(entry) and entry.grantable(now, self.settings.health_freshness_s):
                del self._free[serial]
                entry.reserved = True
                return entry
        return None

    def _unreserve(self, entry: Entry) -> None:
        entry.reserved = False
        self._offer(entry)

    def _satisfiable(self, selector: Selector) -> None:
        if any(selector.matches(entry) for entry in self.entries.values()):
            return
        if selector.account:
            raise FailedPrecondition(
                f"no device matching {describe(selector)}: account {selector.account!r} "
                "is not bound to such a device (see BindAccount)"
            )
        raise FailedPrecondition(
            f"no registered device matches {describe(selector)}"
            + (" (devices bound to an account serve only that account)" if self.entries else "")
        )

    async def _wait(self, ask: Ask, deadline: float) -> Entry | pb.LeaseResponse:
        remaining = deadline - time.monotonic()
        future: asyncio.Future[Entry | pb.LeaseResponse] = (
            asyncio.get_running_loop().create_future()
        )
        waiter = Waiter(ask, future)
        if remaining > 0:
            self._waiters[waiter] = None
            try:
                await asyncio.wait({future}, timeout=remaining)
                if not future.done() and waiter.handover is not None:
                    # Its statement is in flight: wait for it to settle (it sets
                    # the answer if it granted; if not, the deadline has passed).
                    await waiter.handover.wait()
            except asyncio.CancelledError:
                self._abandon(waiter)
                raise
            if future.done():
                return future.result()
            self._abandon(waiter)
        selector = ask.selector
        matching = [e for e in self.entries.values() if selector.matches(e)]
        states = ", ".join(f"{e.serial} {state_name(e.state)}" for e in matching[:10])
        raise DeadlineExceeded(
            f"no device matching {describe(selector)} became free before the call's deadline"
            f" ({len(matching)} matching: {states})"
        )

    def _abandon(self, waiter: Waiter) -> None:
        self._waiters.pop(waiter, None)
        if waiter.future.done() and not waiter.future.cancelled():
            got = waiter.future.result()
            if isinstance(got, Entry):
                self._unreserve(got)
            # (a lease handed over to a call that has gone lapses after its TTL,
            # as one granted to a call cancelled during its grant)
        else:
            waiter.future.cancel()

    # --- Lease, Renew, Release -------------------------------------------------------

    def _ttl(self, duration: Duration, name: str) -> float:
        ttl = seconds(duration)
        if ttl == 0:
            return self.settings.default_lease_s
        if ttl < MIN_TTL_S:
            raise InvalidArgument(f"{name} must be at least {MIN_TTL_S:g}s (or unset), got {ttl}s")
        return min(ttl, self.settings.max_lease_s)

    async def lease(
        self, request: pb.LeaseRequest, *, wait_s: float, actor: Principal
    ) -> pb.LeaseResponse:
        require(request.request_id, "request_id")
        require(request.holder.executor_id, "holder.executor_id")
        for name in ("run_id", "task_id", "chunk_id"):
            limit(getattr(request.holder, name), f"holder.{name}")
        for name in ("pool", "model", "account"):
            limit(getattr(request.selector, name), f"selector.{name}")
        for key, value in request.selector.labels.items():
            limit(key, "selector.labels key")
            limit(value, f"selector.labels[{key!r}]")
        ttl_s = self._ttl(request.ttl, "ttl")
        digest = fingerprint(request)
        while (pending := self._pending.get(request.request_id)) is not None:
            await asyncio.wait({pending})  # the same request is being served: its result
        live = self._by_request.get(request.request_id)
        if live is not None:
            return self._replay(live, digest)
        ask = Ask(request, Selector.from_proto(request.selector), digest, ttl_s, actor)
        self._satisfiable(ask.selector)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = done
        try:
            deadline = time.monotonic() + wait_s
            while True:
                got = self._take(ask.selector) or await self._wait(ask, deadline)
                if isinstance(got, pb.LeaseResponse):
                    return got  # a release handed its device over
                response = await shielded(self._grant(got, ask))
                if response is not None:
                    return response
        finally:
            del self._pending[request.request_id]
            done.set_result(None)

    def _replay(self, live: LiveLease, digest: str) -> pb.LeaseResponse:
        if live.fingerprint != digest:
            raise Aborted(
                f"request_id {live.request_id!r} was already used for a different lease "
                "request; use a new request_id for a new lease"
            )
        return pb.LeaseResponse(lease=live.to_proto(), device=self.entries[live.serial].to_proto())

    async def _grant(self, entry: Entry, ask: Ask) -> pb.LeaseResponse | None:
        lease_id = str(uuid.uuid4())
        try:
            granted = await self.store.grant(entry.serial, lease_id, ask)
        except asyncpg.UniqueViolationError as exc:
            self._unreserve(entry)
            if exc.constraint_name == "leases_request_id_key":
                return await self._replay_ended(ask.request.request_id, ask.fingerprint)
            raise
        except BaseException:
            self._unreserve(entry)
            raise
        entry.reserved = False
        if granted is None:  # the view was behind: reload the row and match again
            row = await self.store.device_row(entry.serial)
            if row is not None:
                entry.version = min(entry.version, row["version"] - 1)  # take it as it is
                self.apply_row(entry, row)
            self._offer(entry)
            return None
        return self._leased(entry, ask, lease_id, granted)

    def _leased(self, entry: Entry, ask: Ask, lease_id: str, granted: Granted) -> pb.LeaseResponse:
        """A committed grant into the view; its event; the Lease call's answer."""
        live = LiveLease(
            lease_id=lease_id,
            request_id=ask.request.request_id,
            fingerprint=ask.fingerprint,
            serial=entry.serial,
            token=granted.token,
            holder=ask.request.holder,
            account=ask.selector.account,
            grant_time=granted.grant_time,
            expire_time=granted.expire_time,
        )
        self.apply(entry, granted.version, state=LEASED, lease=live)
        self.events.leased(live, proto_principal(ask.actor))
        return pb.LeaseResponse(lease=live.to_proto(), device=entry.to_proto())

    async def _replay_ended(self, request_id: str, digest: str) -> pb.LeaseResponse:
        row = await self.store.lease_by_request(request_id)
        if row is None or row["fingerprint"] != digest:
            raise Aborted(
                f"request_id {request_id!r} was already used for a different lease "
                "request; use a new request_id for a new lease"
            )
        live = self._leases.get(row["lease_id"])
        if live is not None:
            return self._replay(live, digest)
        raise FailedPrecondition(
            f"request_id {request_id!r} already got lease {row['lease_id']}, which has ended "
            f"({row['end_reason']}); use a new request_id for a new lease"
        )

    async def renew(self, request: pb.RenewRequest) -> pb.RenewResponse:
        require(request.request_id, "request_id")
        require(request.lease_id, "lease_id")
        if request.token <= 0:
            raise InvalidArgument("token is required (the lease's fencing token)")
        ttl_s = self._ttl(request.ttl, "ttl")
        row = await self.store.renew(request.lease_id, request.token, ttl_s)
        if row is None:
            raise await self._lease_gone(request.lease_id, request.token)
        live = self._leases.get(request.lease_id)
        if live is not None:
            live.expire_time = row["expire_time"]
        return pb.RenewResponse(lease=convert.live_lease(row).to_proto())

    async def _lease_gone(self, lease_id: str, token: int) -> Exception:
        """Why a lease operation found no live lease with that token."""
        row = await self.store.lease(lease_id)
        if row is None:
            return NotFound(f"lease {lease_id!r} does not exist")
        if row["token"] != token:
            return FailedPrecondition(
                f"stale fencing token {token} for lease {lease_id}: its token is {row['token']}; "
                "stop using the device"
            )
        if row["end_time"] is not None:
            return FailedPrecondition(
                f"lease {lease_id} has ended ({row['end_reason']}); stop using the device"
            )
        return FailedPrecondition(
            f"lease {lease_id} expired at {row['expire_time'].isoformat()}; stop using the device"
        )

    async def release(self, request: pb.ReleaseRequest, actor: Principal) -> pb.ReleaseResponse:
        require(request.request_id, "request_id")
        require(request.lease_id, "lease_id")
        if request.token <= 0:
            raise InvalidArgument("token is required (the lease's fencing token)")
        if request.outcome not in RELEASE_OUTCOMES:
            raise InvalidArgument(f"outcome {request.outcome} is not a ReleaseOutcome")
        limit(request.message, "message", MAX_MESSAGE_LENGTH)
        live = self._leases.get(request.lease_id)
        if live is None or live.token != request.token:
            return await self._release_replay(request)
        entry = self.entries[live.serial]
        fault = request.outcome == pb.RELEASE_OUTCOME_DEVICE_FAULT
        quick = entry.profile == "none" and not fault and entry.online
        waiter = self._next_holder(entry) if quick else None
        if waiter is not None:
            # marked now, not in the task below: a release served before that
            # task starts must not pick the same waiter
            waiter.handover = asyncio.Event()
            return await shielded(self._hand_over(entry, live, request, waiter, actor))
        return await shielded(
            self._release(
                entry,
                live,
                request,
                next_state=AVAILABLE if quick else CLEANING,
                reason="device_fault" if fault else "released",
                actor=actor,
            )
        )

    async def _release(
        self,
        entry: Entry,
        live: LiveLease,
        request: pb.ReleaseRequest,
        *,
        next_state: int,
        reason: str,
        actor: Principal,
    ) -> pb.ReleaseResponse:
        row = await self.store.release(
            lease_id=live.lease_id,
            token=live.token,
            outcome=request.outcome,
            message=request.message,
            request_id=request.request_id,
            next_state=next_state,
            cleaning_reason=reason,
        )
        if row is None:
            return await self._release_replay(request)
        self.apply(entry, row["version"], state=row["state"], cleaning_reason=reason)
        self._released(live, request, actor)
        return pb.ReleaseResponse(device=entry.to_proto())

    def _released(self, live: LiveLease, request: pb.ReleaseRequest, actor: Principal) -> None:
        """The event of a lease ended by its holder's Release."""
        self.events.released(
            serial=live.serial,
            lease_id=live.lease_id,
            run_id=live.holder.run_id,
            outcome=request.outcome,
            actor=proto_principal(actor),
        )

    async def _hand_over(
        self,
        entry: Entry,
        live: LiveLease,
        request: pb.ReleaseRequest,
        waiter: Waiter,
        actor: Principal,
    ) -> pb.ReleaseResponse:
        """Release ``live`` and grant its device to ``waiter`` (whose
        ``handover`` the caller set) in one statement. If that statement
        changes nothing or fails, the release goes the usual way and the waiter
        stays in line (a failed grant is then its own)."""
        lease_id = str(uuid.uuid4())
        try:
            granted = await self.store.hand_over(
                lease_id=live.lease_id,
                token=live.token,
                outcome=request.outcome,
                message=request.message,
                request_id=request.request_id,
                next_lease_id=lease_id,
                ask=waiter.ask,
            )
        except Exception as exc:
            log.info("handing device %s over failed (%s); releasing it", entry.serial, exc)
            granted = None
        finally:
            assert waiter.handover is not None
            waiter.handover.set()
            waiter.handover = None
        if granted is None:
            return await self._release(
                entry, live, request, next_state=AVAILABLE, reason="released", actor=actor
            )
        self._waiters.pop(waiter, None)
        self._forget_lease(live)  # _leased puts the new one in its place
        self._released(live, request, actor)
        answer = self._leased(entry, waiter.ask, lease_id, granted)
        if not waiter.future.done():
            waiter.future.set_result(answer)
        else:
            log.warning(
                "lease %s of device %s went to a Lease call that has gone; it lapses after its TTL",
                lease_id,
                entry.serial,
            )
        device = entry.to_proto()
        device.ClearField("lease")  # the next holder's, not the releaser's business
        return pb.ReleaseResponse(device=device)

    async def _release_replay(self, request: pb.ReleaseRequest) -> pb.ReleaseResponse:
        row = await self.store.lease(request.lease_id)
        if (
            row is not None
            and row["token"] == request.token
            and row["release_request_id"] == request.request_id
        ):
            device = await self.store.device_row(row["serial"])
            assert device is not None
            return pb.ReleaseResponse(device=convert.device(device))
        raise await self._lease_gone(request.lease_id, request.token)

    async def reap(self) -> int:
        """End leases past their expiry (dead holders); their devices are cleaned."""
        rows = await self.store.reap()
        for row in rows:
            entry = self.entries.get(row["serial"])
            if entry is not None:
                self.apply(entry, row["version"], state=CLEANING, cleaning_reason="expired")
            log.info("lease %s of %s expired; cleaning the device", row["lease_id"], row["serial"])
            self.events.released(
                serial=row["serial"], lease_id=row["lease_id"], run_id=row["run_id"], expired=True
            )
        return len(rows)

    # --- operators -------------------------------------------------------------------

    def _entry(self, serial: str) -> Entry:
        require(serial, "serial")
        entry = self.entries.get(serial)
        if entry is None:
            raise NotFound(f"device {serial!r} is not in the inventory")
        return entry

    async def quarantine(
        self,
        entry: Entry,
        *,
        reason: str,
        evidence: Mapping[str, Any],
        actor: common_pb2.Principal,
        only_from: tuple[int, ...] | None = None,
        health: pb.HealthReport | None = None,
        cleanup: tuple[str, Any, Any] | None = None,
    ) -> bool:
        """Quarantine ``entry`` (automatic: health or cleanup failed); False if it was
        no longer in one of ``only_from``."""
        result = await self.store.quarantine(
            entry.serial,
            reason=reason,
            evidence=evidence,
            actor_id=actor.id,
            actor_roles=list(actor.roles),
            only_from=only_from,
            health=convert.health_to_json(health) if health is not None else None,
            health_time=health.check_time.ToDatetime() if health is not None else None,
            cleanup=cleanup,
        )
        if result is None:
            return False
        self._quarantined(entry, result.version, result.revoked_lease, reason, evidence, actor)
        if health is not None:
            entry.health = health
        return True

    def _quarantined(
        self,
        entry: Entry,
        version: int,
        revoked: Row | None,
        reason: str,
        evidence: Mapping[str, Any],
        actor: common_pb2.Principal,
    ) -> None:
        self.apply(entry, version, state=QUARANTINED)
        log.warning("device %s quarantined: %s", entry.serial, reason)
        if revoked is not None:
            self.events.released(
                serial=entry.serial,
                lease_id=revoked["lease_id"],
                run_id=revoked["run_id"],
                actor=actor,
            )
        self.events.quarantined(serial=entry.serial, reason=reason, evidence=evidence, actor=actor)

    async def quarantine_device(
        self, request: pb.QuarantineDeviceRequest, actor: Principal
    ) -> pb.QuarantineDeviceResponse:
        require(request.request_id, "request_id")
        require(request.reason, "reason")
        if request.evidence.ByteSize() > MAX_EVIDENCE_BYTES:
            raise InvalidArgument(f"evidence is over {MAX_EVIDENCE_BYTES} bytes")
        entry = self._entry(request.serial)
        evidence = convert.struct_to_json(request.evidence)
        who = proto_principal(actor)
        async with self.store.pool.acquire() as conn, conn.transaction():
            replay = await self.store.replayed(conn, request, pb.QuarantineDeviceResponse)
            if replay is not None:
                return replay
            result = await self.store.quarantine(
                entry.serial,
                reason=request.reason,
                evidence=evidence,
                actor_id=who.id,
                actor_roles=list(who.roles),
                conn=conn,
            )
            assert result is not None
            row = await self.store.device_row(entry.serial, conn)
            assert row is not None
            response = pb.QuarantineDeviceResponse(device=convert.device(row))
            await self.store.remember(conn, request, response)
        self._quarantined(
            entry, result.version, result.revoked_lease, request.reason, evidence, who
        )
        return response

    async def release_device(
        self, request: pb.ReleaseDeviceRequest, actor: Principal
    ) -> pb.ReleaseDeviceResponse:
        require(request.request_id, "request_id")
        require(request.reason, "reason")
        limit(request.reason, "reason", MAX_MESSAGE_LENGTH)
        entry = self._entry(request.serial)
        async with self.store.pool.acquire() as conn, conn.transaction():
            replay = await self.store.replayed(conn, request, pb.ReleaseDeviceResponse)
            if replay is not None:
                return replay
            locked = await self.store.lock_device(conn, entry.serial)
            assert locked is not None
            if locked["state"] != QUARANTINED:
                raise FailedPrecondition(
                    f"device {entry.serial} is {state_name(locked['state'])}; "
                    "only a QUARANTINED device can be returned to service"
                )
            if not locked["online"]:
                raise FailedPrecondition(
                    f"device {entry.serial} is not reachable through adb; "
                    "reconnect it before returning it to service"
                )
            row = await self.store.return_to_service(
                conn, entry.serial, actor_id=actor.id, reason=request.reason
            )
            assert row is not None
            view = await self.store.device_row(entry.serial, conn)
            assert view is not None
            response = pb.ReleaseDeviceResponse(device=convert.device(view))
            await self.store.remember(conn, request, response)
        log.info("device %s returned to service by %s: %s", entry.serial, actor.id, request.reason)
        self.apply_row(entry, row)
        return response

    async def bind(
        self, request: pb.BindAccountRequest, actor: Principal
    ) -> pb.BindAccountResponse:
        require(request.request_id, "request_id")
        account = require(request.account, "account")
        entry = self._entry(request.serial)
        async with self.store.pool.acquire() as conn, conn.transaction():
            replay = await self.store.replayed(conn, request, pb.BindAccountResponse)
            if replay is not None:
                return replay
            locked = await self.store.lock_device(conn, entry.serial)
            assert locked is not None
            row: Row | None = None
            if locked["bound_account"] != account:
                if locked["bound_account"]:
                    raise FailedPrecondition(
                        f"device {entry.serial} is bound to account {locked['bound_account']!r}; "
                        "unbind it first"
                    )
                other = await self.store.bound_elsewhere(conn, account, entry.serial)
                if other is not None:
                    raise FailedPrecondition(
                        f"account {account!r} is bound to device {other}; "
                        "an account is never bound to two devices"
                    )
                active = await self.store.live_leases_of_account(conn, account)
                if active:
                    raise FailedPrecondition(
                        f"account {account!r} is in use on device {active[0]['serial']} "
                        f"(lease {active[0]['lease_id']}); bind it after that lease ends"
                    )
                try:
                    row = await self.store.set_binding(
                        conn, entry.serial, account, actor_id=actor.id
                    )
                except asyncpg.UniqueViolationError:
                    raise FailedPrecondition(
                        f"account {account!r} is bound to another device"
                    ) from None
            view = await self.store.device_row(entry.serial, conn)
            assert view is not None
            response = pb.BindAccountResponse(device=convert.device(view))
            await self.store.remember(conn, request, response)
        if row is not None:
            log.info("device %s bound to account %r by %s", entry.serial, account, actor.id)
            self.apply_row(entry, row)
        return response

    async def unbind(
        self, request: pb.UnbindAccountRequest, actor: Principal
    ) -> pb.UnbindAccountResponse:
        require(request.request_id, "request_id")
        limit(request.account, "account")
        entry = self._entry(request.serial)
        async with self.store.pool.acquire() as conn, conn.transaction():
            replay = await self.store.replayed(conn, request, pb.UnbindAccountResponse)
            if replay is not None:
                return replay
            locked = await self.store.lock_device(conn, entry.serial)
            assert locked is not None
            bound: str = locked["bound_account"]
            if request.account and bound != request.account:
                raise FailedPrecondition(
                    f"device {entry.serial} is bound to "
                    + (f"account {bound!r}" if bound else "no account")
                    + f", not to {request.account!r}"
                )
            row: Row | None = None
            if bound:
                active = [
                    lease
                    for lease in await self.store.live_leases_of_account(conn, bound)
                    if lease["serial"] == entry.serial
                ]
                if active:
                    raise FailedPrecondition(
                        f"device {entry.serial} is leased for account {bound!r} "
                        f"(lease {active[0]['lease_id']}); unbind it after that lease ends"
                    )
                row = await self.store.set_binding(conn, entry.serial, "", actor_id=actor.id)
            view = await self.store.device_row(entry.serial, conn)
            assert view is not None
            response = pb.UnbindAccountResponse(device=convert.device(view))
            await self.store.remember(conn, request, response)
        if row is not None:
            log.info("device %s unbound from account %r by %s", entry.serial, bound, actor.id)
            self.apply_row(entry, row)
        return response

    # --- reads -----------------------------------------------------------------------

    async def get_device(self, request: pb.GetDeviceRequest) -> pb.GetDeviceResponse:
        require(request.serial, "serial")
        row = await self.store.device_row(request.serial)
        if row is None:
            raise NotFound(f"device {request.serial!r} is not in the inventory")
        return pb.GetDeviceResponse(device=convert.device(row))

    async def list_devices(self, request: pb.ListDevicesRequest) -> pb.ListDevicesResponse:
        size = paging.page_size(request.page_size)
        for state in request.states:
            if state == common_pb2.DEVICE_STATE_UNSPECIFIED or state not in (
                AVAILABLE,
                LEASED,
                CLEANING,
                QUARANTINED,
                OFFLINE,
            ):
                raise InvalidArgument(f"states: {state} is not a DeviceState")
        for name in ("pool", "model", "account"):
            limit(getattr(request, name), name)
        rows = await self.store.list_devices(
            pool=request.pool,
            states=list(request.states),
            model=request.model,
            labels=dict(request.labels),
            account=request.account,
            after=paging.decode_value(request.page_token, "after", str) or "",
            limit=size + 1,
        )
        response = pb.ListDevicesResponse(devices=[convert.device(row) for row in rows[:size]])
        if len(rows) > size:
            response.next_page_token = paging.encode_token(after=rows[size - 1]["serial"])
        return response
