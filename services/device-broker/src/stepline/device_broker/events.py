"""Device events on ``STEPLINE_EVENTS`` (``stepline.events.device.<run_id|_>``).

Publishing never delays a lease: events go into a bounded queue that one task
drains. Delivery is best effort (the broker keeps no outbox): an event is lost
if NATS is unreachable for long enough to fill the queue or when the broker
stops before it went out. Each event carries ``Nats-Msg-Id`` (its event id), so
a repeated publish is stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from nats.aio.client import Client as NATS

from stepline.api.common.v1 import common_pb2
from stepline.api.device_broker.v1 import device_broker_pb2 as pb
from stepline.api.events.v1 import events_pb2
from stepline.common.jetstream import CONTENT_TYPE_HEADER, MSG_ID_HEADER, Streams
from stepline.device_broker import convert
from stepline.device_broker.model import LiveLease

log = logging.getLogger(__name__)

QUEUE_LIMIT = 10_000
#: how long the first event of a quiet spell waits for others to share its write
LINGER_S = 0.002
BROKER_ACTOR = common_pb2.Principal(id="system:device-broker")
_SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


class DeviceEvents:
    """Queues device events and publishes them in the background."""

    def __init__(self, nc: NATS | None, streams: Streams) -> None:
        self._nc = nc
        self._streams = streams
        self._queue: asyncio.Queue[tuple[str, events_pb2.Event]] = asyncio.Queue(QUEUE_LIMIT)
        self.dropped = 0

    def _put(self, run_id: str, event: events_pb2.Event) -> None:
        if self._nc is None:
            return
        event.event_id = str(uuid.uuid4())
        event.time.GetCurrentTime()
        event.run_id = run_id
        token = run_id if run_id and _SUBJECT_TOKEN.match(run_id) else "_"
        try:
            self._queue.put_nowait((self._streams.subject("events", "device", token), event))
        except asyncio.QueueFull:
            self.dropped += 1

    def leased(self, lease: LiveLease, actor: common_pb2.Principal) -> None:
        event = events_pb2.Event(actor=actor)
        leased = event.device_leased
        leased.serial, leased.lease_id, leased.token = lease.serial, lease.lease_id, lease.token
        leased.holder.CopyFrom(lease.holder)
        leased.expire_time.FromDatetime(lease.expire_time)
        self._put(lease.holder.run_id, event)

    def released(
        self,
        *,
        serial: str,
        lease_id: str,
        run_id: str,
        outcome: int = pb.RELEASE_OUTCOME_UNSPECIFIED,
        expired: bool = False,
        actor: common_pb2.Principal = BROKER_ACTOR,
    ) -> None:
        event = events_pb2.Event(actor=actor)
        event.device_released.serial = serial
        event.device_released.lease_id = lease_id
        event.device_released.outcome = outcome  # type: ignore[assignment]
        event.device_released.expired = expired
        self._put(run_id, event)

    def quarantined(
        self,
        *,
        serial: str,
        reason: str,
        evidence: Mapping[str, Any],
        actor: common_pb2.Principal = BROKER_ACTOR,
    ) -> None:
        event = events_pb2.Event(actor=actor)
        event.device_quarantined.serial = serial
        event.device_quarantined.reason = reason
        event.device_quarantined.evidence.CopyFrom(convert.struct(evidence))
        self._put("", event)

    async def run(self) -> None:
        """Publish queued events until cancelled.

        After the first event of a quiet spell the task waits ``LINGER_S`` so
        that the events of the calls served meanwhile leave in one socket write
        (the NATS client writes whatever is pending when its flusher runs).
        """
        assert self._nc is not None
        nc = self._nc
        while True:
            first = await self._queue.get()
            await asyncio.sleep(LINGER_S)
            await self._publish(nc, *first)
            while not self._queue.empty():
                await self._publish(nc, *self._queue.get_nowait())

    @staticmethod
    async def _publish(nc: NATS, subject: str, event: events_pb2.Event) -> None:
        headers = {
            MSG_ID_HEADER: event.event_id,
            CONTENT_TYPE_HEADER: f"application/protobuf; proto={event.DESCRIPTOR.full_name}",
        }
        try:
            # core publish: the stream captures the subject; no ack is awaited,
            # so a burst of leases costs no round trips
            await nc.publish(subject, event.SerializeToString(), headers=headers)
        except Exception:
            log.warning("device event %s not published", event.event_id, exc_info=True)

    @contextlib.asynccontextmanager
    async def publishing(self) -> AsyncIterator[DeviceEvents]:
        if self._nc is None:
            yield self
            return
        task = asyncio.create_task(self.run(), name="device-broker-events")
        try:
            yield self
        finally:
            # give queued events a moment to go out, then stop
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drain(), timeout=2.0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _drain(self) -> None:
        while not self._queue.empty():  # noqa: ASYNC110 (the queue has no "empty" event)
            await asyncio.sleep(0.01)
        if self._nc is not None and self._nc.is_connected:
            await self._nc.flush()
