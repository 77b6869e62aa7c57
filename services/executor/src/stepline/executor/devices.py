"""Devices for steps: leases from the device broker (DESIGN.md §5).

A step that declares ``device`` (a DeviceRequirement) gets a device for itself
or, with ``span_until_step_id``, for every step of the same step list through
that one (a *span*). The lease is taken when the first attempt in the span
starts its verb, so an attempt that follows a lost or faulty device gets a
fresh one; it is renewed every third of its TTL while held and released when
the span's last step ends or the run stops early (failure, cancel, timeout,
drain, pause), with the outcome the broker uses to decide on extra health
checks. If the executor dies the lease lapses after its TTL and the broker
reclaims the device.

A verb sees the lease as ``VerbContext.device`` (:class:`DeviceLease`): its
adb serial, fencing token and :meth:`DeviceLease.adb`. Blocking adbutils calls
go through :meth:`DeviceLease.call`, which runs them in a thread and notes
transport errors as a device fault. If the broker refuses a renewal (the lease
expired or was revoked), the running verb is stopped and its attempt fails
with FAILURE_REASON_DEVICE_LOST.

A chunked step's ``device`` is per chunk: each chunk job leases its own device
for its attempts (holder with the chunk id, artifacts under the chunk claim).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import adbutils
import grpc
from adbutils.errors import AdbConnectionError, AdbError, AdbTimeout

from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.device_broker.v1 import device_broker_pb2 as dpb
from stepline.api.device_broker.v1 import device_broker_pb2_grpc
from stepline.common import adb
from stepline.common.config import parse_address
from stepline.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    SteplineError,
    Unavailable,
)
from stepline.common.lease_session import ANSWER_MARGIN_S, LeaseSession
from stepline.executor.ledger import Fence, duration
from stepline.executor.verbs.base import VerbContext, VerbError
from stepline.executor.verbs.templating import render

if TYPE_CHECKING:
    from stepline.executor.attempts import Halt

log = logging.getLogger(__name__)

T = TypeVar("T")
F = common_pb2.FailureReason
RO = dpb.ReleaseOutcome
#: key of VerbContext.extras under which a verb finds its attempt's :class:`Artifacts`
ARTIFACTS = "artifacts"
#: retries of a broker call that failed with UNAVAILABLE
_RETRIES = 4
#: texts of adb server errors that mean the device itself is gone
_GONE = ("not found", "offline", "unauthorized", "closed", "no devices")


def _left_s(expire_time: Any) -> float:
    """Seconds from now until a protobuf Timestamp."""
    return float((expire_time.ToDatetime(tzinfo=UTC) - datetime.now(UTC)).total_seconds())


def describe(selector: dpb.DeviceSelector) -> str:
    """A selector for people: ``pool=default, model=Pixel 7``."""
    parts = [f"{name}={getattr(selector, name)}" for name in ("pool", "model", "account")]
    parts = [p for p in parts if not p.endswith("=")]
    parts += [f"label {k}={v}" for k, v in sorted(selector.labels.items())]
    return ", ".join(parts) or "any device"


class DeviceBroker:
    """The executor's client of DeviceBrokerService: its Lease, Renew and Release
    requests go on one :class:`LeaseSession` (one stream for the executor
    process); :meth:`close` it at shutdown."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        executor_id: str,
        ttl_s: float = 30.0,
        wait_s: float = 60.0,
        adb_timeout_s: float = 30.0,
    ) -> None:
        self.session = LeaseSession(device_broker_pb2_grpc.DeviceBrokerServiceStub(channel))
        self.executor_id = executor_id
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self.adb_timeout_s = adb_timeout_s

    async def close(self) -> None:
        """Close the lease session (the executor is shutting down)."""
        await self.session.close()

    async def call(self, send: Callable[..., Awaitable[T]], request: Any, *, budget_s: float) -> T:
        """``send(request, timeout_s=...)``: one request on the session, retried on
        UNAVAILABLE (the same request id; the session opens a new stream) while
        time is left."""
        loop = asyncio.get_running_loop()
        end = loop.time() + budget_s
        for attempt in range(_RETRIES):
            try:
                return await send(request, timeout_s=max(end - loop.time(), 0.1))
            except Unavailable:
                if attempt + 1 >= _RETRIES or loop.time() + 0.2 * 2**attempt >= end:
                    raise
                await asyncio.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")

    async def _lease(self, request: dpb.LeaseRequest, *, timeout_s: float) -> dpb.LeaseResponse:
        """One try of a lease: the broker waits up to ``timeout_s`` for a device,
        then answers DEADLINE_EXCEEDED itself."""
        return await self.session.lease(
            request, max_wait_s=timeout_s, timeout_s=timeout_s + ANSWER_MARGIN_S
        )

    async def lease(
        self, *, request_id: str, selector: dpb.DeviceSelector, holder: dpb.LeaseHolder
    ) -> DeviceLease:
        """A device matching ``selector``, waiting up to ``wait_s``; VerbError
        (DEVICE_UNAVAILABLE) if none could be had."""
        request = dpb.LeaseRequest(
            request_id=request_id, selector=selector, holder=holder, ttl=duration(self.ttl_s)
        )
        wanted = describe(selector)
        try:
            response = await self.call(self._lease, request, budget_s=self.wait_s)
        except DeadlineExceeded:
            raise VerbError(
                f"no device ({wanted}) became free within {self.wait_s:g}s "
                "(STEPLINE_EXECUTOR_DEVICE_WAIT_S)",
                reason=F.FAILURE_REASON_DEVICE_UNAVAILABLE,
                details={"selector": wanted},
            ) from None
        except FailedPrecondition as exc:
            raise VerbError(
                f"no device can serve this step ({wanted}): {exc}",
                reason=F.FAILURE_REASON_DEVICE_UNAVAILABLE,
                details={"selector": wanted},
            ) from None
        except InvalidArgument as exc:
            raise VerbError(
                f"the step's device requirement was refused: {exc}",
                reason=F.FAILURE_REASON_INVALID_INPUT,
            ) from None
        except SteplineError as exc:
            raise VerbError(
                f"could not lease a device ({wanted}) from the device broker: {exc}",
                reason=F.FAILURE_REASON_DEVICE_UNAVAILABLE,
            ) from None
        lease = DeviceLease(self, response.lease, response.device)
        log.info("leased device %s (lease %s)", lease.serial, lease.lease_id)
        lease.start()
        return lease


class DeviceLease:
    """One leased device, as a verb sees it (``VerbContext.device``)."""

    def __init__(self, broker: DeviceBroker, lease: dpb.Lease, device: dpb.Device) -> None:
        self.broker = broker
        self.lease_id = lease.lease_id
        self.token = lease.token
        self.serial = device.serial or lease.serial
        self.info = device
        self.adb_server = device.adb_server
        self.adb_timeout_s = broker.adb_timeout_s
        #: set when the lease is no longer ours: verbs must stop using the device
        self.lost = asyncio.Event()
        self.lost_reason = ""
        #: the first adb transport error a verb saw (release reports DEVICE_FAULT)
        self.fault = ""
        self.released = False
        self._adb: adbutils.AdbDevice | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._expires_at = asyncio.get_running_loop().time() + _left_s(lease.expire_time)

    @property
    def usable(self) -> bool:
        return not (self.lost.is_set() or self.fault or self.released)

    def adb(self) -> adbutils.AdbDevice:
        """The adbutils device (blocking: call from a thread, e.g. via :meth:`call`)."""
        if self._adb is None:
            host, port = parse_address(self.adb_server, name="the device's adb server")
            client = adb.client(host, port, timeout_s=self.adb_timeout_s)
            self._adb = client.device(self.serial)
        return self._adb

    #: the name the issue uses for :meth:`adb`
    device = adb

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a thread; an adb transport error marks the
        device faulty and becomes a VerbError naming the device."""
        if self.lost.is_set():
            raise self._lost_error()
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (AdbTimeout, AdbConnectionError, OSError) as exc:
            self.note_fault(f"{type(exc).__name__}: {exc}")
            raise VerbError(
                f"device {self.serial} stopped answering: {type(exc).__name__}: {exc}",
                details={"serial": self.serial},
            ) from None
        except AdbError as exc:
            text = str(exc)
            if any(word in text.lower() for word in _GONE):
                self.note_fault(text)
            raise VerbError(
                f"device {self.serial}: adb error: {text}", details={"serial": self.serial}
            ) from None
        except Unavailable as exc:  # the adb server itself is not there
            self.note_fault(str(exc))
            raise VerbError(
                f"device {self.serial}: {exc}", details={"serial": self.serial}
            ) from None

    def note_fault(self, text: str) -> None:
        if not self.fault:
            log.warning("device %s fault: %s", self.serial, text)
            self.fault = text

    def _lost_error(self) -> VerbError:
        return VerbError(
            f"the lease of device {self.serial} was lost: {self.lost_reason}",
            reason=F.FAILURE_REASON_DEVICE_LOST,
            details={"serial": self.serial, "lease_id": self.lease_id},
        )

    async def guard(self, work: Awaitable[T]) -> T:
        """Await ``work``; if the lease is lost meanwhile, cancel it and raise
        VerbError (DEVICE_LOST)."""
        task = asyncio.ensure_future(work)
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if task.done() and not task.cancelled() and not self.lost.is_set():
            return task.result()
        raise self._lost_error()

    # renewals

    def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew(), name=f"device-lease-{self.lease_id}")

    def _lose(self, reason: str) -> None:
        log.warning("device %s: lease %s lost: %s", self.serial, self.lease_id, reason)
        self.lost_reason = reason
        self.lost.set()

    async def _renew(self) -> None:
        loop = asyncio.get_running_loop()
        ttl = self.broker.ttl_s
        every = max(min(ttl, self._expires_at - loop.time()) / 3, 0.05)
        sequence = 0
        while True:
            await asyncio.sleep(every)
            sequence += 1
            request = dpb.RenewRequest(
                request_id=f"{self.lease_id}:renew:{sequence}",
                lease_id=self.lease_id,
                token=self.token,
                ttl=duration(ttl),
            )
            try:
                response = await self.broker.call(
                    self.broker.session.renew, request, budget_s=max(every, 1.0)
                )
            except FailedPrecondition as exc:
                self._lose(f"the broker refused to renew it: {exc.message}")
                return
            except SteplineError as exc:
                if loop.time() >= self._expires_at:
                    self._lose(f"it expired while the broker could not be reached ({exc})")
                    return
                log.warning("device %s: lease renewal failed, retrying: %s", self.serial, exc)
                continue
            left = _left_s(response.lease.expire_time)
            self._expires_at = loop.time() + left
            every = max(min(ttl, left) / 3, 0.05)

    async def release(self, outcome: int, message: str = "") -> None:
        """End the lease (once); errors are logged: the TTL reclaims the device."""
        if self.released:
            return
        self.released = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self.fault and outcome != RO.RELEASE_OUTCOME_DEVICE_FAULT:
            outcome = RO.RELEASE_OUTCOME_DEVICE_FAULT
            message = f"{message}; " if message else ""
            message += f"adb error during the lease: {self.fault}"
        request = dpb.ReleaseRequest(
            request_id=f"{self.lease_id}:release",
            lease_id=self.lease_id,
            token=self.token,
            outcome=outcome,  # type: ignore[arg-type]
            message=message[:2000],
        )
        try:
            await self.broker.call(self.broker.session.release, request, budget_s=10.0)
        except FailedPrecondition as exc:
            log.info("device %s: lease %s already ended: %s", self.serial, self.lease_id, exc)
        except SteplineError as exc:
            log.warning(
                "device %s: could not release lease %s (its TTL will): %s",
                self.serial,
                self.lease_id,
                exc,
            )
        else:
            log.info("released device %s (%s)", self.serial, RO.Name(outcome))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Artifacts:
    """Stores files of one attempt with its task's (or chunk's) record; verbs
    find it as ``ctx.extras["artifacts"]``."""

    fence: Fence
    task_id: str
    attempt_number: int

    async def put(self, name: str, content_type: str, content: bytes) -> run_pb2.Artifact:
        return await self.fence.put_artifact(
            self.task_id, self.attempt_number, name, content_type, content
        )


@dataclass
class _Span:
    requirement: workflow_pb2.DeviceRequirement
    last: str
    lease: DeviceLease | None = None


def outcome_of(halt: Halt | None) -> int:
    """How a span ended, for the broker: COMPLETED when its work ended (even if a
    step failed), ABANDONED when it was cut short."""
    if halt is None or (
        halt.kind in ("failed", "policy_pause")
        and halt.state != common_pb2.TASK_RUN_STATE_TIMED_OUT
    ):
        return RO.RELEASE_OUTCOME_COMPLETED
    return RO.RELEASE_OUTCOME_ABANDONED


class DeviceSpans:
    """The device spans of one execution (a run's, or one chunk's)."""

    def __init__(
        self,
        broker: DeviceBroker | None,
        fence: Fence,
        *,
        executor_id: str,
        chunk_id: str = "",
    ) -> None:
        self.broker = broker
        self.fence = fence
        self.executor_id = executor_id
        self.chunk_id = chunk_id
        self._spans: dict[str, _Span] = {}

    def plan(self, steps: Sequence[workflow_pb2.Step], *, chunk: bool = False) -> None:
        """Note the spans declared in one step list. A chunked step's device is
        for its chunks (see :mod:`stepline.executor.devices`), unless ``chunk``."""
        ids = [step.id for step in steps]
        for index, step in enumerate(steps):
            if not step.HasField("device") or step.id in self._spans:
                continue
            if step.WhichOneof("kind") == "chunked" and not chunk:
                continue
            until = step.device.span_until_step_id
            end = ids.index(until, index + 1) if until and until in ids[index + 1 :] else index
            span = _Span(step.device, last=ids[end])
            for inner in steps[index : end + 1]:
                self._spans.setdefault(inner.id, span)

    def covers(self, step_id: str) -> bool:
        """Whether ``step_id`` runs in a device span."""
        return step_id in self._spans

    async def run(
        self,
        step: workflow_pb2.Step,
        ctx: VerbContext,
        call: Callable[[VerbContext], Awaitable[T]],
    ) -> T:
        """``call(ctx)`` with the attempt's artifacts and, in a span, its device."""
        ctx.extras.setdefault(ARTIFACTS, Artifacts(self.fence, ctx.task_id, ctx.attempt_number))
        span = self._spans.get(step.id)
        if span is None:
            return await call(ctx)
        lease = await self._acquire(span, ctx)
        ctx.device = lease
        try:
            return await lease.guard(call(ctx))
        finally:
            if not lease.usable and span.lease is lease:
                # A faulty or lost device is not used again; a retry leases anew.
                span.lease = None
                await asyncio.shield(
                    lease.release(RO.RELEASE_OUTCOME_DEVICE_FAULT, f"step {step.id} failed")
                )

    async def _acquire(self, span: _Span, ctx: VerbContext) -> DeviceLease:
        if span.lease is not None:
            if span.lease.usable:
                return span.lease
            lease, span.lease = span.lease, None
            await asyncio.shield(lease.release(RO.RELEASE_OUTCOME_DEVICE_FAULT))
            if lease.lost.is_set():
                raise lease._lost_error()
        if self.broker is None:
            raise VerbError(
                "this step needs a device but the executor has no device broker "
                "(STEPLINE_DEVICE_BROKER_ADDR)",
                reason=F.FAILURE_REASON_DEVICE_UNAVAILABLE,
            )
        requirement = span.requirement
        account = ""
        if requirement.account:
            account = str(render(requirement.account, inputs=ctx.inputs, outputs=ctx.outputs))
        selector = dpb.DeviceSelector(
            pool=requirement.pool,
            model=requirement.model,
            labels=dict(requirement.labels),
            account=account,
        )
        holder = dpb.LeaseHolder(
            executor_id=self.executor_id,
            run_id=ctx.run_id,
            task_id=ctx.task_id,
            chunk_id=self.chunk_id,
        )
        request_id = f"lease:{self.chunk_id or ctx.task_id}:{ctx.attempt_number}"
        span.lease = await self.broker.lease(
            request_id=request_id, selector=selector, holder=holder
        )
        return span.lease

    async def passed(self, step_id: str, halt: Halt | None) -> None:
        """After a step: release its span's lease if the step ends the span or the
        sequence stops here."""
        span = self._spans.get(step_id)
        if span is None or span.lease is None or (halt is None and step_id != span.last):
            return
        lease, span.lease = span.lease, None
        why = "" if halt is None else f"{halt.kind} at step {step_id}"
        await asyncio.shield(lease.release(outcome_of(halt), why))

    async def close(self) -> None:
        """Release every lease still held (the execution ended or was interrupted)."""
        held = {id(s.lease): s.lease for s in self._spans.values() if s.lease is not None}
        for span in self._spans.values():
            span.lease = None
        for lease in held.values():
            await asyncio.shield(lease.release(RO.RELEASE_OUTCOME_ABANDONED, "execution ended"))
