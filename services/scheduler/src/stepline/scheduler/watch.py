"""Following one run's events: its history from the ledger, then live ones.

The watcher subscribes to the run's subjects on ``STEPLINE_EVENTS``
(``stepline.events.*.<run_id>``, as the ledger's relay publishes them) *before*
it reads the history, so no event falls between the two. Events are sent in
sequence order, each once: a live event already sent is dropped, and a gap
(a live event further ahead than the next sequence, or no event for
``poll_s``) is filled from the ledger's log, which is the truth. The stream
ends after the run's terminal event, or when the run was already terminal
and everything up to its last event was sent.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import nats.errors
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.ledger.v1 import ledger_pb2
from stepline.common.client import rpc
from stepline.common.jetstream import Streams
from stepline.common.states import RUN_TERMINAL

if TYPE_CHECKING:
    from stepline.api.ledger.v1.ledger_pb2_grpc import LedgerServiceAsyncStub

log = logging.getLogger(__name__)

R = common_pb2.WorkflowRunState
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"})
HISTORY_PAGE = 500


def is_terminal_event(event: run_pb2.RunEvent) -> bool:
    """Whether ``event`` moved its run to a terminal state."""
    if event.type != run_pb2.RUN_EVENT_TYPE_RUN_STATE_CHANGED:
        return False
    to_state = event.payload.fields.get("to_state")
    return to_state is not None and to_state.string_value in TERMINAL


class RunWatcher:
    def __init__(
        self,
        *,
        ledger: LedgerServiceAsyncStub,
        nc: NATS,
        streams: Streams,
        poll_s: float = 5.0,
    ) -> None:
        self._ledger = ledger
        self._nc = nc
        self._streams = streams
        self._poll_s = poll_s

    async def watch(self, run_id: str, after_sequence: int = 0) -> AsyncIterator[run_pb2.RunEvent]:
        """Events of ``run_id`` after ``after_sequence``, ending after the terminal one."""
        sub = await self._nc.subscribe(self._streams.subject("events", "*", run_id))
        try:
            got = await rpc(
                self._ledger.GetRun(
                    ledger_pb2.GetRunRequest(run_id=run_id, view=run_pb2.RUN_VIEW_BASIC)
                )
            )
            last = after_sequence
            async for event in self._history(run_id, last):
                yield event
                last = event.sequence
                if is_terminal_event(event):
                    return
            if got.run.state in RUN_TERMINAL:
                return  # everything up to (and past) its end was in the history
            while True:
                live = await self._next_live(sub)
                if live is not None and live.sequence <= last:
                    continue  # already sent
                if live is not None and live.sequence == last + 1:
                    events = [live]
                else:  # a gap, or quiet for a while: read the ledger's log
                    events = [e async for e in self._history(run_id, last)]
                for event in events:
                    yield event
                    last = event.sequence
                    if is_terminal_event(event):
                        return
        finally:
            await sub.unsubscribe()

    async def _next_live(self, sub: Subscription) -> run_pb2.RunEvent | None:
        try:
            msg = await sub.next_msg(timeout=self._poll_s)
        except nats.errors.TimeoutError:
            return None
        envelope = events_pb2.Event()
        try:
            envelope.ParseFromString(msg.data)
        except DecodeError:
            log.warning("undecodable event on %s dropped", msg.subject)
            return None
        if not envelope.HasField("record"):
            return None
        return envelope.record

    async def _history(self, run_id: str, after: int) -> AsyncIterator[run_pb2.RunEvent]:
        while True:
            page = await rpc(
                self._ledger.GetRunHistory(
                    ledger_pb2.GetRunHistoryRequest(
                        run_id=run_id, after_sequence=after, page_size=HISTORY_PAGE
                    )
                )
            )
            for event in page.events:
                yield event
                after = event.sequence
            if not page.events or after >= page.last_sequence:
                return
