"""The broker's background work: everything that talks to phones.

* the inventory scan (every ``scan_interval_s``): lists each adb server's
  devices, registers new ones, marks vanished ones OFFLINE, and
  ``adb connect``s the configured addresses that are not connected;
* the health checker: re-checks AVAILABLE devices before their last check
  leaves the freshness window (a lease needs a fresh, passing check);
  a device failing it is quarantined with the evidence;
* cleanup: one task per CLEANING device runs its pool's cleanup profile, the
  verification and the health checks, then makes it AVAILABLE, or quarantines
  it with the evidence, or OFFLINE if adb lost it;
* the reaper: ends leases whose holder stopped renewing them.

adb calls are blocking and run in threads (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import adbutils

from stepline.api.device_broker.v1 import device_broker_pb2 as pb
from stepline.common.errors import SteplineError
from stepline.common.loops import every
from stepline.device_broker import convert
from stepline.device_broker.broker import Broker
from stepline.device_broker.config import DeviceBrokerSettings
from stepline.device_broker.events import BROKER_ACTOR
from stepline.device_broker.model import AVAILABLE, CLEANING, OFFLINE, Entry
from stepline.device_broker.phones import Phones, Report, Seen, Unreachable

log = logging.getLogger(__name__)

REAP_INTERVAL_S = 0.5
REAP_SAFETY_S = 5.0
CONNECT_WAIT_S = 2.0
FULL_CHECK_REASONS = frozenset({"device_fault", "operator"})


def _now() -> datetime:
    return datetime.now(UTC)


def _at(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


class Upkeep:
    def __init__(self, *, broker: Broker, phones: Phones, settings: DeviceBrokerSettings) -> None:
        self.broker = broker
        self.phones = phones
        self.settings = settings
        self._cleaning: dict[str, asyncio.Task[None]] = {}
        self._checks: set[asyncio.Task[None]] = set()
        broker.on_cleaning = self.clean

    # --- lifecycle -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Upkeep]:
        """Scan once (so the inventory is known when serving starts), resume the
        cleanups a previous run left, then keep everything going in the background."""
        for entry in self.broker.entries.values():
            if entry.state == CLEANING:
                self.clean(entry)
        try:
            await self.scan()
        except Exception:
            log.exception("first inventory scan failed; retrying in the background")
        interval = self.settings.scan_interval_s
        loops = [
            asyncio.create_task(every(interval, self.scan, "inventory scan"), name="broker-scan"),
            asyncio.create_task(
                every(interval, self.check_health, "health check"), name="broker-health"
            ),
            asyncio.create_task(self.reap_forever(), name="broker-reaper"),
        ]
        try:
            yield self
        finally:
            tasks = [*loops, *self._cleaning.values(), *self._checks]
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def reap_forever(self) -> None:
        """End expired leases close to their expiry (at most REAP_INTERVAL_S late),
        and every REAP_SAFETY_S whatever the view says."""
        last = time.monotonic()
        while True:
            upcoming = self.broker.next_expiry()
            delay = REAP_INTERVAL_S if upcoming is None else upcoming - time.time() + 0.01
            # (a floor, so that a database clock a little behind ours causes no spin)
            await asyncio.sleep(min(max(delay, 0.05), REAP_INTERVAL_S))
            upcoming = self.broker.next_expiry()
            due = upcoming is not None and upcoming <= time.time()
            if due or time.monotonic() - last >= REAP_SAFETY_S:
                last = time.monotonic()
                try:
                    await self.broker.reap()
                except Exception:
                    log.exception("reaping expired leases failed")

    # --- inventory -------------------------------------------------------------------

    async def _list(self) -> dict[str, Seen]:
        listed: dict[str, Seen] = {}
        for server in self.phones.servers:
            try:
                seen = await asyncio.to_thread(self.phones.devices, server)
            except (SteplineError, adbutils.AdbError, OSError) as exc:
                log.warning("adb server %s does not answer: %s", server, exc)
                continue
            for device in seen:
                listed.setdefault(device.serial, device)
        return listed

    async def _reconnect(self, address: str, seen: Seen | None) -> bool:
        """``adb connect`` (after dropping a stale ``offline`` transport); True if
        adb says it is connected."""
        try:
            if seen is not None:
                await asyncio.to_thread(self.phones.disconnect, address)
            answer = await asyncio.to_thread(self.phones.connect, address)
        except (SteplineError, adbutils.AdbError, OSError) as exc:
            log.debug("adb connect %s failed: %s", address, exc)
            return False
        log.debug("adb connect %s: %s", address, answer)
        return "connected to" in answer

    async def scan(self) -> None:
        listed = await self._list()
        missing = [
            address
            for address in self.settings.device_addresses
            if address not in listed or listed[address].state == "offline"
        ]
        if missing:
            results = await asyncio.gather(*(self._reconnect(a, listed.get(a)) for a in missing))
            connected = {a for a, ok in zip(missing, results, strict=True) if ok}
            deadline = time.monotonic() + CONNECT_WAIT_S
            listed = await self._list()
            # a fresh transport takes a moment to reach `device`: wait for it briefly
            while any(a not in listed or not listed[a].online for a in connected):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
                listed = await self._list()
        online = [seen for seen in listed.values() if seen.online]
        for seen in online:
            entry = self.broker.entries.get(seen.serial)
            if entry is None:
                await self._register(seen)
            elif not entry.online or entry.state == OFFLINE:
                row = await self.broker.store.came_online(seen.serial, seen.adb_server)
                log.info("device %s is back online", seen.serial)
                self.broker.apply_row(entry, row)
        for entry in list(self.broker.entries.values()):
            found = listed.get(entry.serial)
            if entry.online and (found is None or not found.online):
                await self._offline(entry)
        now = await self.broker.store.seen([seen.serial for seen in online])
        if now is not None:
            for seen in online:
                self.broker.entries[seen.serial].last_seen = now

    async def _register(self, seen: Seen) -> None:
        model, product = seen.model, seen.product
        try:
            model, product = await asyncio.to_thread(
                self.phones.describe, seen.adb_server, seen.serial
            )
        except (Unreachable, SteplineError, adbutils.AdbError, OSError) as exc:
            log.warning("device %s: cannot read its product properties: %s", seen.serial, exc)
        pool = self.settings.pool_of(seen.serial)
        row = await self.broker.store.add_device(
            serial=seen.serial,
            adb_server=seen.adb_server,
            model=model or seen.model,
            product=product or seen.product,
            pool=pool,
            labels=self.settings.labels_of(seen.serial),
            profile=self.settings.profile_of(pool),
        )
        if row is not None:
            log.info("new device %s (%s) in pool %s", seen.serial, model, pool)
            self.broker.add(row)

    async def _offline(self, entry: Entry) -> None:
        row = await self.broker.store.went_offline(entry.serial)
        log.warning("device %s is offline", entry.serial)
        self.broker.apply_row(entry, row)

    # --- health ----------------------------------------------------------------------

    async def check_health(self) -> None:
        """Start a check of every AVAILABLE device whose health is not fresh enough."""
        now = time.time()
        refresh_after = self.settings.health_freshness_s / 2
        for entry in list(self.broker.entries.values()):
            if (
                entry.state == AVAILABLE
                and entry.online
                and not entry.checking
                and (not entry.healthy or entry.health_age_s(now) >= refresh_after)
            ):
                entry.checking = True
                task = asyncio.create_task(self._check(entry), name=f"health-{entry.serial}")
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)

    async def _check(self, entry: Entry) -> None:
        try:
            report = await asyncio.to_thread(
                self.phones.health, entry.adb_server, entry.serial, self.settings.health
            )
            health = convert.health_report(report)
            if not report.passed:
                if report.unreachable and await self._gone(entry):
                    await self._offline(entry)
                    return
                evidence = {"failed_checks": _failed(report), "health": report.to_json()}
                if entry.state == AVAILABLE and await self.broker.quarantine(
                    entry,
                    reason="health_check_failed",
                    evidence=evidence,
                    actor=BROKER_ACTOR,
                    only_from=(AVAILABLE,),
                    health=health,
                ):
                    return
            await self.broker.store.record_health(
                entry.serial, convert.health_to_json(health), _at(report.finished)
            )
            self.broker.health_checked(entry, health)
        except Exception:
            log.exception("health check of %s failed", entry.serial)
        finally:
            entry.checking = False

    async def _gone(self, entry: Entry) -> bool:
        """After an adb error: True if the adb server no longer has the device
        online (dropped), False if it does (the device itself does not answer)."""
        state = await asyncio.to_thread(self.phones.adb_state, entry.adb_server, entry.serial)
        return state != "device"

    # --- cleanup ---------------------------------------------------------------------

    def clean(self, entry: Entry) -> None:
        """Make sure a cleanup task works on ``entry`` (it entered CLEANING)."""
        running = self._cleaning.get(entry.serial)
        if running is not None and not running.done():
            return  # it sees the new cleaning generation and starts over
        task = asyncio.create_task(self._clean_loop(entry), name=f"cleanup-{entry.serial}")
        self._cleaning[entry.serial] = task

    async def _clean_loop(self, entry: Entry) -> None:
        while entry.state == CLEANING:
            try:
                if not entry.online:  # cleaned when it comes back
                    row = await self.broker.store.lost_while_cleaning(entry.serial)
                    if row is not None:
                        self.broker.apply_row(entry, row)
                    return
                await self._clean_once(entry, entry.cleaning_generation)
            except Exception:
                log.exception("cleanup of %s failed; retrying", entry.serial)
                await asyncio.sleep(self.settings.scan_interval_s)

    async def _clean_once(self, entry: Entry, generation: int) -> None:
        context = await self.broker.store.cleaning_context(entry.serial)
        reason: str = context["cleaning_reason"] or entry.cleaning_reason
        baseline = context["baseline_packages"]
        lease_id: str | None = context["cleaning_lease_id"]
        started = _now()
        cleanup, packages = await asyncio.to_thread(
            self.phones.clean,
            entry.adb_server,
            entry.serial,
            profile=entry.profile,
            baseline=list(baseline) if baseline is not None else None,
            session_dirs=self.settings.session_dirs,
            accept_missing=reason == "operator",
        )
        health: Report | None = None
        if not cleanup.unreachable:  # also after a failed cleanup: it may explain it
            health = await asyncio.to_thread(
                self.phones.health,
                entry.adb_server,
                entry.serial,
                self.settings.health,
                full=reason in FULL_CHECK_REASONS,
            )
        finished = _now()
        if generation != entry.cleaning_generation or entry.state != CLEANING:
            return  # the device changed meanwhile: this result is stale
        unreachable = cleanup.unreachable or (health is not None and health.unreachable)
        if unreachable and await self._gone(entry):
            row = await self.broker.store.lost_while_cleaning(entry.serial)
            if row is not None:
                log.warning("device %s went offline during cleanup", entry.serial)
                self.broker.apply_row(entry, row)
            return
        health_proto = convert.health_report(health) if health is not None else None
        healthy = health is not None and health.passed
        if cleanup.passed and health is not None and health.passed and health_proto is not None:
            version = await self.broker.store.finish_cleaning(
                entry.serial,
                health=convert.health_to_json(health_proto),
                health_time=_at(health.finished),
                baseline=packages,
                lease_id=lease_id,
                started=started,
                finished=finished,
            )
            if version is not None:
                log.info(
                    "device %s clean (%s, %.0f ms)",
                    entry.serial,
                    reason,
                    (finished - started).total_seconds() * 1000,
                )
                self.broker.apply(entry, version, state=AVAILABLE, health=health_proto)
            return
        await self.broker.quarantine(
            entry,
            reason="health_check_failed"
            if health is not None and not healthy
            else "cleanup_failed",
            evidence=_cleanup_evidence(reason, context, cleanup, health),
            actor=BROKER_ACTOR,
            only_from=(CLEANING,),
            health=health_proto,
            cleanup=(lease_id, started, finished) if lease_id is not None else None,
        )


def _failed(report: Report) -> list[dict[str, Any]]:
    return [check.to_json() for check in report.failed_checks()]


def _cleanup_evidence(
    reason: str, context: Any, cleanup: Report, health: Report | None
) -> dict[str, Any]:
    evidence: dict[str, Any] = {
        "cleaning_reason": reason,
        "failed_checks": _failed(cleanup) + (_failed(health) if health is not None else []),
        "cleanup": cleanup.to_json(),
    }
    if health is not None:
        evidence["health"] = health.to_json()
    if context["cleaning_lease_id"] is not None:
        evidence["lease"] = {
            "lease_id": context["cleaning_lease_id"],
            "executor_id": context["executor_id"],
            "run_id": context["run_id"],
            "task_id": context["task_id"],
            "end_reason": context["end_reason"],
            "outcome": pb.ReleaseOutcome.Name(pb.ReleaseOutcome.ValueType(context["outcome"] or 0)),
            "holder_message": context["message"],
        }
    return evidence
