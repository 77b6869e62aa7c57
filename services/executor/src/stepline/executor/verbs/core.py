"""The ``core.*`` verbs: control flow and test helpers that touch nothing outside.

``core.range`` and ``core.items`` are generators (ChunkedDispatch); the rest
are ordinary verbs. Args arrive already rendered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from stepline.api.common.v1 import common_pb2
from stepline.executor.verbs.arguments import Args, invalid, shown
from stepline.executor.verbs.base import VerbContext, VerbError

#: seconds between heartbeats of ``core.sleep`` unless args.heartbeat_s says otherwise
SLEEP_HEARTBEAT_S = 10.0


async def noop(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
    """Does nothing; returns ``{}``."""
    Args("core.noop", args, known=())
    return {}


async def echo(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
    """Returns its (rendered) args as its output."""
    if not isinstance(args, Mapping):
        raise invalid("core.echo", f"args must be a mapping, got {shown(args)}")
    return dict(args)


async def sleep(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
    """Waits ``args.seconds``, heart-beating every ``args.heartbeat_s``; stops at
    once when cancelled. Returns ``{"slept": seconds}``."""
    parsed = Args("core.sleep", args, known=("seconds", "heartbeat_s"))
    seconds = parsed.number("seconds")
    interval = parsed.positive("heartbeat_s", SLEEP_HEARTBEAT_S)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (remaining := deadline - loop.time()) > 0:
        await asyncio.sleep(min(remaining, interval))
        if ctx.heartbeat is not None and deadline - loop.time() > 0:
            await ctx.heartbeat()
    return {"slept": seconds}


def _failure_reason(name: str) -> int:
    """``"timeout"`` or ``"FAILURE_REASON_TIMEOUT"`` as the enum value."""
    upper = name.upper()
    full = upper if upper.startswith("FAILURE_REASON_") else f"FAILURE_REASON_{upper}"
    reasons = dict(common_pb2.FailureReason.items())
    if full == "FAILURE_REASON_UNSPECIFIED" or full not in reasons:
        accepted = [
            key.removeprefix("FAILURE_REASON_").lower()
            for key in reasons
            if key != "FAILURE_REASON_UNSPECIFIED"
        ]
        raise invalid("core.fail", f"args.reason {shown(name)} is not one of {', '.join(accepted)}")
    return reasons[full]


async def fail(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
    """Fails the step with ``args.message`` and ``args.reason`` (default verb_error)."""
    parsed = Args("core.fail", args, known=("message", "reason"))
    message = parsed.text("message")
    reason = parsed.text("reason", "verb_error")
    raise VerbError(message, reason=_failure_reason(reason))


async def range_(ctx: VerbContext, args: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Generator: ``args.count`` records ``{"index": i, "value": start + i}``."""
    parsed = Args("core.range", args, known=("count", "start"))
    count = parsed.integer("count", minimum=0)
    start = parsed.integer("start", 0)
    return [{"index": index, "value": start + index} for index in range(count)]


async def items(ctx: VerbContext, args: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Generator: one record ``{"index": i, "item": x}`` per element of ``args.items``."""
    parsed = Args("core.items", args, known=("items",))
    return [{"index": index, "item": item} for index, item in enumerate(parsed.array("items"))]
