"""Attempts of one task or chunk: running a verb under the step's timeout, the
run's deadline and cancellation; retries with backoff; recovery of an attempt
interrupted by a lost executor (DESIGN.md §2)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.executor.control import Control
from stepline.executor.ledger import Fence, failure, struct
from stepline.executor.verbs.base import VerbError

log = logging.getLogger(__name__)

T = common_pb2.TaskRunState
F = common_pb2.FailureReason
DEFAULT_RETRY_ON = frozenset(
    {
        F.FAILURE_REASON_VERB_ERROR,
        F.FAILURE_REASON_TIMEOUT,
        F.FAILURE_REASON_EXECUTOR_LOST,
        F.FAILURE_REASON_DEVICE_LOST,
    }
)


@dataclass(frozen=True)
class Halt:
    """Why a sequence of steps stopped before its end.

    kind: ``failed`` (a step ended ``state`` with ``failure``), ``policy_pause``
    (a step failed under FAILURE_POLICY_PAUSE_RUN; its task stays RUNNING),
    ``pause``, ``cancel``, ``drain``, ``lost`` (the claim), ``deadline`` (the
    run's run_timeout) or ``skipped`` (a sibling branch failed).
    """

    kind: str
    failure: common_pb2.Failure | None = None
    state: int = 0


@dataclass(frozen=True)
class Target:
    """The task or chunk whose attempts are recorded."""

    fence: Fence
    owner_id: str
    chunk: bool = False

    async def write(self, state: int, **kwargs: Any) -> pb.StepTransitionResult:
        return await self.fence.transition_step(self.owner_id, state, chunk=self.chunk, **kwargs)


def to_dict(message: Any) -> dict[str, Any]:
    return dict(json_format.MessageToDict(message)) if message is not None else {}


def as_output(value: Any) -> dict[str, Any]:
    """A verb's result as a task output (a JSON object), or a VERB_ERROR."""
    if not isinstance(value, Mapping):
        raise VerbError(f"the verb returned {type(value).__name__}, not a mapping")
    try:
        struct(value)
    except (ValueError, TypeError) as exc:
        raise VerbError(f"the verb's output is not JSON: {exc}") from None
    return dict(value)


def seconds(value: Any) -> float:
    return float(value.ToTimedelta().total_seconds())


def retryable(policy: workflow_pb2.RetryPolicy, reason: int, attempt: int) -> bool:
    reasons = frozenset(policy.retry_on) or DEFAULT_RETRY_ON
    return attempt < policy.max_attempts and reason in reasons


def backoff_s(policy: workflow_pb2.RetryPolicy, attempt: int) -> float:
    """Delay before attempt ``attempt + 1``."""
    delay = seconds(policy.initial_backoff) * (policy.backoff_multiplier or 2.0) ** (attempt - 1)
    cap = seconds(policy.max_backoff)
    return min(delay, cap) if cap else delay


def ended_state(why: common_pb2.Failure) -> common_pb2.TaskRunState.ValueType:
    """The state an attempt ends in after ``why``: TIMED_OUT for the step's
    timeout or the run's deadline, FAILED otherwise."""
    timed_out = why.reason in (F.FAILURE_REASON_TIMEOUT, F.FAILURE_REASON_DEADLINE_EXCEEDED)
    return T.TASK_RUN_STATE_TIMED_OUT if timed_out else T.TASK_RUN_STATE_FAILED


async def invoke(
    call: Awaitable[Any],
    *,
    control: Control,
    timeout_s: float,
    deadline: float | None,
    cancellable: bool = True,
) -> tuple[Any, common_pb2.Failure | None]:
    """Run one attempt's call; ``(value, None)`` or ``(None, failure)``.

    A cancel or the loss of the claim interrupts the call at once. With
    ``cancellable=False`` only the loss of the claim does: a cancel lets the
    call run to its end (or to its timeout) and its outcome stands. Cancelling
    the task that awaits this (executor shutdown) interrupts the call either way.
    """
    loop = asyncio.get_running_loop()
    limit = timeout_s or None
    run_left = None if deadline is None else max(deadline - loop.time(), 0.0)
    by_deadline = run_left is not None and (limit is None or run_left < limit)
    bound = run_left if by_deadline else limit
    interrupt = control.stopper(cancellable=cancellable)
    task = asyncio.ensure_future(call)
    stopper = asyncio.ensure_future(interrupt.wait())
    try:
        await asyncio.wait({task, stopper}, timeout=bound, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task.done() and not task.cancelled() and not interrupt.is_set():
        exc = task.exception()
        if exc is None:
            return task.result(), None
        if isinstance(exc, VerbError):
            result = failure(exc.reason, exc.message)
            if exc.details:
                result.details.update(exc.details)
            return None, result
        log.info("verb raised %s: %s", type(exc).__name__, exc)
        return None, failure(F.FAILURE_REASON_VERB_ERROR, f"{type(exc).__name__}: {exc}")
    if interrupt.is_set():
        return None, failure(F.FAILURE_REASON_CANCELLED, control.reason or "the run was cancelled")
    if by_deadline:
        return None, failure(F.FAILURE_REASON_DEADLINE_EXCEEDED, "the run exceeded its run_timeout")
    return None, failure(F.FAILURE_REASON_TIMEOUT, f"the attempt exceeded its timeout of {limit}s")


async def start(
    target: Target,
    step: workflow_pb2.Step,
    item: run_pb2.TaskRun | run_pb2.ChunkRun,
    *,
    pause_policy: bool,
    after: pb.StepTransition | None = None,
) -> int | Halt:
    """Open the attempt to run next: the first one for a PENDING item; for a
    RUNNING one, a new attempt after an interruption (``executor_lost``) or
    after a failure that paused the run (``operator_resume``). Returns its
    number, or the Halt when an interrupted step may not run again. ``after``
    (the previous step's end, not yet sent) is sent first, in the same call.

    A PENDING task starts only if no control action is pending for its run
    (``unless_control_pending``): a pause or cancel asked for while the
    previous step ran is honoured here, even before its event arrives."""
    if item.state == T.TASK_RUN_STATE_PENDING:
        result = await target.write(
            T.TASK_RUN_STATE_RUNNING, after=after, unless_control_pending=not target.chunk
        )
        if not target.chunk and result.task.task.state == T.TASK_RUN_STATE_PENDING:
            pending = result.task.pending_control
            return Halt("cancel" if pending == run_pb2.CONTROL_ACTION_CANCEL else "pause")
        return 1
    if after is not None:
        await target.fence.apply_changes([after])
    last = item.attempts[-1] if item.attempts else None
    number = last.attempt_number if last is not None else 0
    if last is None or last.state != T.TASK_RUN_STATE_RUNNING:
        await target.write(
            T.TASK_RUN_STATE_RUNNING,
            attempt=pb.AttemptUpdate(
                attempt_number=number + 1, state=T.TASK_RUN_STATE_RUNNING, reason="operator_resume"
            ),
        )
        return number + 1
    if step.idempotent or retryable(step.retry, F.FAILURE_REASON_EXECUTOR_LOST, number):
        lost = failure(F.FAILURE_REASON_EXECUTOR_LOST, "the executor running this attempt was lost")
        log.info("attempt %d was interrupted; starting attempt %d", number, number + 1)
        await target.write(
            T.TASK_RUN_STATE_RUNNING,
            attempt=pb.AttemptUpdate(
                attempt_number=number, state=T.TASK_RUN_STATE_FAILED, failure=lost
            ),
        )
        await target.write(
            T.TASK_RUN_STATE_RUNNING,
            attempt=pb.AttemptUpdate(
                attempt_number=number + 1, state=T.TASK_RUN_STATE_RUNNING, reason="executor_lost"
            ),
        )
        return number + 1
    interrupted = failure(
        F.FAILURE_REASON_INTERRUPTED,
        f"attempt {number} was interrupted when its executor was lost; the step is not "
        "idempotent and has no retry left",
    )
    return await end_failed(
        target, number, T.TASK_RUN_STATE_FAILED, interrupted, pause_policy=pause_policy
    )


async def end_failed(
    target: Target, number: int, state: int, why: common_pb2.Failure, *, pause_policy: bool
) -> Halt:
    """End an item unsuccessfully, or under PAUSE_RUN only its attempt."""
    if pause_policy:
        await target.write(
            T.TASK_RUN_STATE_RUNNING,
            attempt=pb.AttemptUpdate(attempt_number=number, state=state, failure=why),  # type: ignore[arg-type]
        )
        return Halt("policy_pause", why, state)
    await target.write(state, failure=why)
    return Halt("failed", why, state)


async def run_attempts(
    target: Target,
    step: workflow_pb2.Step,
    first: int,
    call: Callable[[int], Awaitable[Any]],
    *,
    control: Control,
    deadline: float | None,
    pause_policy: bool,
    cancellable: bool = True,
) -> tuple[Any, Halt | None]:
    """Run attempts from ``first`` (already open) until one succeeds or no retry
    is left. On success the attempt is left open for the caller to end with
    the output; every other ending is written here.

    ``cancellable=False``: a cancel does not interrupt a running attempt (see
    :func:`invoke`). A success is returned as usual (the run stops at the next
    step boundary); a failure is recorded as the item's end (FAILED, or
    TIMED_OUT for a timeout) without retry, and the sequence halts as cancelled.
    """
    number = first
    timeout_s = seconds(step.timeout)
    while True:
        value, why = await invoke(
            call(number),
            control=control,
            timeout_s=timeout_s,
            deadline=deadline,
            cancellable=cancellable,
        )
        if why is None:
            return value, None
        if control.lost:
            return None, Halt("lost")
        if control.cancelled:
            if why.reason == F.FAILURE_REASON_CANCELLED:  # interrupted by the cancel
                await target.write(T.TASK_RUN_STATE_CANCELLED, failure=why)
            else:  # a verb that let the cancel wait ended unsuccessfully on its own
                await target.write(ended_state(why), failure=why)
            return None, Halt("cancel", why)
        if why.reason == F.FAILURE_REASON_DEADLINE_EXCEEDED:
            await target.write(T.TASK_RUN_STATE_TIMED_OUT, failure=why)
            return None, Halt("deadline", why)
        state = ended_state(why)
        if not retryable(step.retry, why.reason, number):
            halt = await end_failed(target, number, state, why, pause_policy=pause_policy)
            return None, halt
        log.info("attempt %d failed (%s); retrying", number, why.message)
        await target.write(
            T.TASK_RUN_STATE_RUNNING,
            attempt=pb.AttemptUpdate(attempt_number=number, state=state, failure=why),
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(control.stop.wait(), backoff_s(step.retry, number))
        if control.lost:
            return None, Halt("lost")
        if control.cancelled:
            cancelled = failure(F.FAILURE_REASON_CANCELLED, control.reason or "cancelled")
            await target.write(T.TASK_RUN_STATE_CANCELLED, failure=cancelled)
            return None, Halt("cancel", cancelled)
        number += 1
        await target.write(
            T.TASK_RUN_STATE_RUNNING,
            attempt=pb.AttemptUpdate(
                attempt_number=number, state=T.TASK_RUN_STATE_RUNNING, reason="retry"
            ),
        )
