"""Background loops of a service: periodic passes and their orderly stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any

log = logging.getLogger(__name__)

Loop = tuple[str, Callable[[], Coroutine[Any, Any, object]]]


async def every(interval_s: float, step: Callable[[], Awaitable[object]], name: str) -> None:
    """Run ``step`` every ``interval_s`` until cancelled; a failed pass is logged."""
    while True:
        try:
            await step()
        except Exception:
            log.exception("%s: pass failed; next in %ss", name, interval_s)
        await asyncio.sleep(interval_s)


def periodic(name: str, interval_s: float, step: Callable[[], Awaitable[object]]) -> Loop:
    """A loop for :func:`background` running ``step`` every ``interval_s``."""
    return name, lambda: every(interval_s, step, name)


async def stop(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` until they are done, then log the errors they ended with.

    Cancelled again while any runs on: on Python 3.11, ``asyncio.wait_for``
    (also inside nats-py) can lose a cancellation that arrives as its result
    does, and a single cancel would leave the task running.
    """
    tasks = list(tasks)
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s ended with an error", task.get_name(), exc_info=task.exception())


@contextlib.asynccontextmanager
async def background(loops: Iterable[Loop]) -> AsyncIterator[None]:
    """Run each ``(name, coroutine function)`` as a task while the block runs."""
    tasks = [asyncio.create_task(run(), name=name) for name, run in loops]
    try:
        yield
    finally:
        await stop(tasks)
