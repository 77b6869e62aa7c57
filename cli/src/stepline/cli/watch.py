"""Following a run's event stream (SchedulerService.WatchRun).

The scheduler ends the stream after the run is terminal and its last event
was sent. A stream is opened with a deadline of :data:`WINDOW_S` and reopened
after the last sequence seen when that deadline passes, so a long run can be
followed for as long as it takes. With ``idle_s`` the stream is left once no
event has arrived for that long: the history so far of a run that is still
going. With ``stop`` it is left after the first event ``stop`` accepts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc

from stepline.api.common.v1 import run_pb2
from stepline.api.scheduler.v1 import scheduler_service_pb2 as pb
from stepline.cli.connect import Scheduler

WINDOW_S = 3600.0


async def follow(
    scheduler: Scheduler,
    run_id: str,
    *,
    on_event: Callable[[run_pb2.RunEvent], None],
    after_sequence: int = 0,
    idle_s: float | None = None,
    stop: Callable[[run_pb2.RunEvent], bool] | None = None,
) -> int:
    """Call ``on_event`` for each event after ``after_sequence``, in order, until
    the stream ends (or is idle for ``idle_s``, or ``stop`` is true of an event);
    returns the last sequence seen."""
    last = after_sequence
    while True:
        opened = time.monotonic()
        call = scheduler.runs.WatchRun(
            pb.WatchRunRequest(run_id=run_id, after_sequence=last), timeout=WINDOW_S
        )
        try:
            while True:
                read = call.read()
                try:
                    message = await (read if idle_s is None else asyncio.wait_for(read, idle_s))
                except TimeoutError:
                    return last
                if message is grpc.aio.EOF:
                    return last
                assert isinstance(message, pb.WatchRunResponse)
                if message.event.sequence <= last:
                    continue  # already seen before a reopen
                last = message.event.sequence
                on_event(message.event)
                if stop is not None and stop(message.event):
                    return last
        except grpc.aio.AioRpcError as exc:
            window_ended = time.monotonic() - opened >= WINDOW_S * 0.9
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED or not window_ended:
                raise
        finally:
            call.cancel()
