"""Holding a claim: renewals, in-progress acks, and the control actions that
reach the holder (cancel, pause, resume) from RenewClaim and STEPLINE_EVENTS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from stepline.api.common.v1 import run_pb2
from stepline.api.events.v1 import events_pb2
from stepline.common.errors import FailedPrecondition, SteplineError
from stepline.common.jetstream import Streams
from stepline.executor.ledger import Fence

log = logging.getLogger(__name__)

C = run_pb2.ControlAction
Beat = Callable[[], Awaitable[None]]


class Control:
    """What the holder of a claim must react to.

    ``stop`` is set on cancel or loss of the claim: a running verb is
    interrupted at once, unless it was registered ``cancellable=False``: such a
    verb is interrupted only by ``interrupt``, set on loss of the claim alone
    (a cancel then takes effect at the step boundary after it). ``pause`` and
    ``draining`` are honoured at the next step boundary.
    """

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.interrupt = asyncio.Event()
        self.cancelled = False
        self.lost = False
        self.pause = False
        self.draining = False
        self.reason = ""
        self.children: list[Control] = []

    def apply(self, action: int, reason: str = "") -> None:
        if action == C.CONTROL_ACTION_CANCEL and not self.cancelled:
            log.info("cancel requested%s", f": {reason}" if reason else "")
            self.cancelled, self.reason = True, reason
            self.stop.set()
        elif action == C.CONTROL_ACTION_PAUSE:
            self.pause = True
        elif action == C.CONTROL_ACTION_RESUME:
            self.pause = False  # a pause not yet applied is withdrawn
        for child in self.children:
            child.apply(action, reason)

    def lose(self) -> None:
        self.lost = True
        self.interrupt.set()
        self.stop.set()

    def stopper(self, *, cancellable: bool) -> asyncio.Event:
        """The event that interrupts a running verb: ``stop`` for a cancellable
        one, ``interrupt`` (loss of the claim) for one that is not."""
        return self.stop if cancellable else self.interrupt

    def drain(self) -> None:
        self.draining = True
        for child in self.children:
            child.drain()

    def child(self) -> Control:
        result = Control()
        if self.cancelled:
            result.apply(C.CONTROL_ACTION_CANCEL, self.reason)
        result.draining = self.draining
        self.children.append(result)
        return result


@contextlib.asynccontextmanager
async def holding(
    fence: Fence,
    control: Control,
    *,
    nc: NATS,
    streams: Streams,
    lease_s: float,
    beat: Beat | None,
    beat_every_s: float,
) -> AsyncIterator[None]:
    """Renew ``fence``'s claim every half lease and call ``beat`` (in-progress
    acks) while the block runs; feed control events for the run into ``control``."""

    async def on_event(msg: Msg) -> None:
        event = events_pb2.Event()
        try:
            event.ParseFromString(msg.data)
        except Exception:  # a malformed event must not stop the run
            log.warning("unreadable control event on %s", msg.subject)
            return
        if event.HasField("run_control"):
            control.apply(event.run_control.action, event.run_control.reason)

    subscription = await nc.subscribe(
        streams.subject("events", "control", fence.run_id), cb=on_event
    )
    task = asyncio.create_task(
        _keep(fence, control, lease_s=lease_s, beat=beat, beat_every_s=beat_every_s),
        name=f"claim-keeper-{fence.run_id}",
    )
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()


async def _keep(
    fence: Fence, control: Control, *, lease_s: float, beat: Beat | None, beat_every_s: float
) -> None:
    loop = asyncio.get_running_loop()
    renew_every = lease_s / 2
    next_renew = loop.time() + renew_every
    sequence = 0
    while True:
        await asyncio.sleep(min(beat_every_s, renew_every))
        if beat is not None:
            with contextlib.suppress(Exception):
                await beat()
        if loop.time() < next_renew:
            continue
        sequence += 1
        try:
            renewed = await fence.renew(lease_s, sequence)
        except FailedPrecondition as exc:
            log.warning("claim lost: %s", exc)
            control.lose()
            return
        except SteplineError as exc:
            log.warning("claim renewal failed, retrying: %s", exc)
            continue
        next_renew = loop.time() + renew_every
        if renewed.pending_control:
            control.apply(renewed.pending_control)
