"""Following runs: a run that ends takes its PENDING approval requests with it.

The ledger's relay publishes every run state change to
``stepline.events.run.<run_id>`` on ``STEPLINE_EVENTS`` (an ``Event`` with
``run_state_changed``). A durable pull consumer, shared by all replicas, reads
them; when a run reaches a terminal state (SUCCEEDED, FAILED, CANCELLED,
TIMED_OUT) its PENDING requests created before that moment (give or take a
few seconds of clock difference) are CANCELLED. A
message is acked once handled, so a crash or a database error makes JetStream
deliver it again; cancelling is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC

import nats.errors
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from stepline.api.common.v1 import common_pb2
from stepline.api.events.v1 import events_pb2
from stepline.approvals.store import ApprovalStore
from stepline.common import jetstream
from stepline.common.jetstream import Streams
from stepline.common.states import RUN_TERMINAL

log = logging.getLogger(__name__)

CONSUMER = "approvals-run-endings"
FETCH_TIMEOUT_S = 1.0
R = common_pb2.WorkflowRunState


class RunEndings:
    """Cancels the PENDING requests of runs that end."""

    def __init__(
        self, *, store: ApprovalStore, js: JetStreamContext, streams: Streams, batch: int = 64
    ) -> None:
        self._store = store
        self._js = js
        self._streams = streams
        self._batch = batch
        self._subscription: JetStreamContext.PullSubscription | None = None

    async def start(self) -> None:
        await jetstream.ensure_pull_consumer(
            self._js,
            stream=self._streams.events,
            durable=CONSUMER,
            filter_subject=self._streams.subject("events", "run", ">"),
        )
        self._subscription = await self._js.pull_subscribe_bind(
            CONSUMER, stream=self._streams.events
        )

    async def close(self) -> None:
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None

    async def run(self) -> None:
        """Handle run events until cancelled (call :meth:`start` first)."""
        assert self._subscription is not None, "start() first"
        while True:
            try:
                messages = await self._subscription.fetch(
                    batch=self._batch, timeout=FETCH_TIMEOUT_S
                )
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except Exception as exc:  # NATS reconnecting, ...: try again shortly
                log.warning("reading run events failed (%s); retrying in 1s", exc)
                await asyncio.sleep(1.0)
                continue
            for msg in messages:
                await self.handle(msg)

    async def handle(self, msg: Msg) -> None:
        event = events_pb2.Event()
        try:
            event.ParseFromString(msg.data)
        except DecodeError:
            log.error("unreadable event on %s; dropped", msg.subject)
            await msg.term()
            return
        change = event.run_state_changed
        if (
            event.WhichOneof("payload") != "run_state_changed"
            or change.to_state not in RUN_TERMINAL
        ):
            await msg.ack()
            return
        state = common_pb2.WorkflowRunState.Name(change.to_state).removeprefix(
            "WORKFLOW_RUN_STATE_"
        )
        try:
            cancelled = await self._store.cancel_for_run(
                event.run_id, state_name=state, ended=event.time.ToDatetime(tzinfo=UTC)
            )
        except Exception:
            log.exception("closing the requests of run %s failed; will retry", event.run_id)
            await msg.nak(delay=1)
            return
        if cancelled:
            log.info("run %s ended %s: cancelled %d approval(s)", event.run_id, state, cancelled)
        await msg.ack()
