"""Following runs: a run that ends takes its PENDING approval requests with it.

The ledger's relay publishes every run state change to
``stepline.events.run.<run_id>`` on ``STEPLINE_EVENTS`` (an ``Event`` with
``run_state_changed``). A durable pull consumer, shared by all replicas, reads
them; when a run reaches a terminal state (SUCCEEDED, FAILED, CANCELLED,
TIMED_OUT) its PENDING requests created before that moment (give or take a
few seconds of clock difference) are CANCELLED.

Most of these events need nothing (about six per run, one terminal), and most
runs have no approval step, so the work is done per fetched batch: the other
events are acked as read, one query finds which of the batch's ended runs have
PENDING requests, and only those runs are closed. Once caught up, the loop
pauses for :data:`PAUSE_S` before the next fetch, so that events gather in the
stream and come in one fetch instead of one round trip each: a request
outlives its run by at most that long (plus the handling).

Each message is acked after its own handling (explicit acks; an ack-all
consumer would let one replica's ack cover messages another replica is still
handling), so a crash or a database error makes JetStream deliver it again;
cancelling is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC

import nats.errors
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
#: most events one fetch takes (the consumer lets 1000 be unacked)
BATCH = 256
#: pause after a fetch that found fewer than BATCH events (caught up)
PAUSE_S = 0.25
#: delay before JetStream delivers again an event whose handling failed
RETRY_DELAY_S = 1.0


class RunEndings:
    """Cancels the PENDING requests of runs that end."""

    def __init__(
        self,
        *,
        store: ApprovalStore,
        js: JetStreamContext,
        streams: Streams,
        pause_s: float = PAUSE_S,
    ) -> None:
        self._store = store
        self._js = js
        self._streams = streams
        self._pause_s = pause_s
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
                messages = await self._subscription.fetch(batch=BATCH, timeout=FETCH_TIMEOUT_S)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except Exception as exc:  # NATS reconnecting, ...: try again shortly
                log.warning("reading run events failed (%s); retrying in 1s", exc)
                await asyncio.sleep(1.0)
                continue
            await self.handle(messages)
            if len(messages) < BATCH:
                await asyncio.sleep(self._pause_s)

    async def handle(self, messages: Sequence[Msg]) -> None:
        """Handle a batch of run events, acking each once handled."""
        endings: list[tuple[Msg, events_pb2.Event]] = []
        for msg in messages:
            event = await jetstream.parse_or_term(msg, events_pb2.Event, what="event")
            if event is None:
                continue
            if (
                event.WhichOneof("payload") == "run_state_changed"
                and event.run_state_changed.to_state in RUN_TERMINAL
            ):
                endings.append((msg, event))
            else:
                await msg.ack()
        if not endings:
            return
        try:
            waiting = await self._store.runs_with_pending([e.run_id for _, e in endings])
        except Exception:
            log.exception("looking up the requests of %d ended run(s) failed", len(endings))
            for msg, _ in endings:
                await msg.nak(delay=RETRY_DELAY_S)
            return
        for msg, event in endings:
            if event.run_id in waiting and not await self._close_requests(event):
                await msg.nak(delay=RETRY_DELAY_S)
            else:
                await msg.ack()

    async def _close_requests(self, event: events_pb2.Event) -> bool:
        """Cancel the PENDING requests of the run that ``event`` ended; False on failure."""
        state = common_pb2.WorkflowRunState.Name(event.run_state_changed.to_state).removeprefix(
            "WORKFLOW_RUN_STATE_"
        )
        try:
            cancelled = await self._store.cancel_for_run(
                event.run_id, state_name=state, ended=event.time.ToDatetime(tzinfo=UTC)
            )
        except Exception:
            log.exception("closing the requests of run %s failed; will retry", event.run_id)
            return False
        if cancelled:
            log.info("run %s ended %s: cancelled %d approval(s)", event.run_id, state, cancelled)
        return True
