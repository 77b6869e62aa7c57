"""GOVERN steps: approval gates (DESIGN.md §6).

At a GOVERN step the executor asks the approvals service for a decision
(``CreateApproval``, idempotent on ``<task_id>:<attempt>``) and, while the
request is PENDING, the task is SUSPENDED with the approval id. Then either:

* (default) the step returns ``Halt("suspend")``: the run goes SUSPENDED
  (:func:`suspend`), its claim is released and its job acked. When the
  request reaches a final state the scheduler dispatches the run again; the
  executor that claims it finds the SUSPENDED task, reads the decision
  (``GetApproval``) and ends the step. A decision that came while the run was
  being suspended (the scheduler skips a run that is not SUSPENDED yet) is
  found by :func:`suspend`, which looks once more after the run went
  SUSPENDED and, if so, goes on under the same claim;
* (``hold_device``) the executor keeps its claim, and the device of the
  enclosing span, and waits in-process (events on
  ``stepline.events.approval.<run_id>``, with ``GetApproval`` polled as a
  fallback) with the run SUSPENDED meanwhile.

Decisions: APPROVED ends the step SUCCEEDED with output ``{approval_id, state,
decisions}``; REJECTED fails it (REJECTED, with the decider's reason);
EXPIRED ends it TIMED_OUT or FAILED (``expiry_outcome``, reason
APPROVAL_EXPIRED); CANCELLED (the run is being cancelled) cancels the run.
A request still PENDING when the run is dispatched (a spurious dispatch)
suspends the run again.

Task and run writes made here carry request ids derived from the approval
id, because one claim may pass through SUSPENDED and back more than once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from nats.aio.msg import Msg

from stepline.api.approvals.v1 import approvals_pb2 as apb
from stepline.api.approvals.v1 import approvals_pb2_grpc
from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    SteplineError,
    Unavailable,
    from_rpc_error,
)
from stepline.executor.attempts import Halt, Target, end_failed
from stepline.executor.ledger import Fence, failure, struct
from stepline.executor.verbs.base import VerbError
from stepline.executor.verbs.templating import render

if TYPE_CHECKING:
    from stepline.executor.runner import Execution, Worker

log = logging.getLogger(__name__)

A = apb.ApprovalState
T = common_pb2.TaskRunState
R = common_pb2.WorkflowRunState
F = common_pb2.FailureReason
C = run_pb2.ControlAction
Resp = TypeVar("Resp")

_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_RETRIES = 4
#: a held wait polls GetApproval from this delay, doubling up to the maximum,
#: in case an ApprovalDecided event was missed
POLL_INITIAL_S = 0.5
POLL_MAX_S = 10.0
#: how often a held wait looks at drain and the run's deadline
TICK_S = 1.0


class Approvals:
    """Calls to ``ApprovalsService``; transient failures are retried a few times."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = approvals_pb2_grpc.ApprovalsServiceStub(channel)

    async def _call(self, method: Callable[[Any], Awaitable[Resp]], request: Any) -> Resp:
        for attempt in range(_RETRIES):
            try:
                return await method(request)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _TRANSIENT and attempt + 1 < _RETRIES:
                    log.warning("approvals call failed (%s), retrying", exc.code().name)
                    await asyncio.sleep(0.2 * 2**attempt)
                    continue
                raise from_rpc_error(exc) from None
        raise AssertionError("unreachable")

    async def create(self, request: apb.CreateApprovalRequest) -> apb.Approval:
        response = await self._call(self.stub.CreateApproval, request)
        return response.approval

    async def get(self, approval_id: str) -> apb.Approval:
        response = await self._call(
            self.stub.GetApproval, apb.GetApprovalRequest(approval_id=approval_id)
        )
        return response.approval


def state_name(state: int) -> str:
    return A.Name(state).removeprefix("APPROVAL_STATE_")  # type: ignore[arg-type]


def approval_output(approval: apb.Approval) -> dict[str, Any]:
    """The output of an approved GOVERN step."""
    return {
        "approval_id": approval.approval_id,
        "state": state_name(approval.state),
        "decisions": [
            {
                "actor": d.actor.id,
                "outcome": apb.DecisionOutcome.Name(d.outcome).removeprefix("DECISION_OUTCOME_"),
                "reason": d.reason,
                "time": d.decide_time.ToJsonString() if d.HasField("decide_time") else "",
            }
            for d in approval.decisions
        ],
    }


def rejection(approval: apb.Approval) -> common_pb2.Failure:
    rejected = [d for d in approval.decisions if d.outcome == apb.DECISION_OUTCOME_REJECTED]
    if rejected:
        decider = rejected[-1]
        message = f"approval {approval.approval_id} was rejected by {decider.actor.id}"
        message += f": {decider.reason}" if decider.reason else ""
    else:
        decider = None
        message = f"approval {approval.approval_id} was rejected"
    why = failure(F.FAILURE_REASON_REJECTED, message)
    why.details.update({"approval_id": approval.approval_id})
    if decider is not None:
        why.details.update({"rejected_by": decider.actor.id, "reason": decider.reason})
    return why


def expiry(
    approval: apb.Approval, policy: workflow_pb2.ApprovalPolicy
) -> tuple[int, common_pb2.Failure]:
    """The task state and failure of an expired request, per ``expiry_outcome``."""
    when = f" at {approval.expire_time.ToJsonString()}" if approval.HasField("expire_time") else ""
    why = failure(
        F.FAILURE_REASON_APPROVAL_EXPIRED,
        f"approval {approval.approval_id} expired{when} without a decision",
    )
    why.details.update({"approval_id": approval.approval_id})
    failed = policy.expiry_outcome == workflow_pb2.APPROVAL_EXPIRY_OUTCOME_FAILED
    return (T.TASK_RUN_STATE_FAILED if failed else T.TASK_RUN_STATE_TIMED_OUT), why


async def run_govern(ex: Execution, step: workflow_pb2.Step, task: run_pb2.TaskRun) -> Halt | None:
    """Advance one GOVERN task (PENDING, RUNNING or SUSPENDED)."""
    return await Gate(ex, step, task).run()


class Gate:
    """One GOVERN task within one claim."""

    def __init__(self, ex: Execution, step: workflow_pb2.Step, task: run_pb2.TaskRun) -> None:
        self.ex = ex
        self.step = step
        self.task = task
        self.target = Target(ex.fence, task.task_id)
        self.state: int = task.state  # the task's state as written so far

    async def run(self) -> Halt | None:
        number = await self._attempt()
        approvals = self.ex.worker.approvals
        if approvals is None:
            why = failure(
                F.FAILURE_REASON_INTERNAL,
                "this executor has no approvals service (STEPLINE_APPROVALS_ADDR)",
            )
            return await self._end(number, T.TASK_RUN_STATE_FAILED, why)
        try:
            approval = await self._approval(approvals, number)
        except VerbError as exc:
            return await self._end(
                number, T.TASK_RUN_STATE_FAILED, failure(exc.reason, exc.message)
            )
        except (Unavailable, DeadlineExceeded):
            raise  # the job is redelivered; the request is idempotent
        except InvalidArgument as exc:
            why = failure(F.FAILURE_REASON_INVALID_INPUT, f"approval request refused: {exc}")
            return await self._end(number, T.TASK_RUN_STATE_FAILED, why)
        except SteplineError as exc:
            why = failure(F.FAILURE_REASON_INTERNAL, f"approvals service: {exc}")
            return await self._end(number, T.TASK_RUN_STATE_FAILED, why)
        if approval.state == A.APPROVAL_STATE_PENDING:
            await self._suspend_task(approval)
            if not self.step.govern.hold_device:
                log.info("waiting for approval %s; the run suspends", approval.approval_id)
                return Halt("suspend")
            held = await self._hold(approvals, approval)
            if isinstance(held, Halt):
                return held
            approval = held
        return await self._decided(approval, number)

    async def _attempt(self) -> int:
        """The attempt waiting for the decision: the first for a PENDING task, the
        open one otherwise, or a new one after a failure paused the run."""
        task = self.task
        if task.state == T.TASK_RUN_STATE_PENDING:
            await self.target.write(T.TASK_RUN_STATE_RUNNING)
            self.state = T.TASK_RUN_STATE_RUNNING
            return 1
        last = task.attempts[-1] if task.attempts else None
        if last is not None and last.state == T.TASK_RUN_STATE_RUNNING:
            return last.attempt_number
        number = (last.attempt_number if last is not None else 0) + 1
        await self.target.write(
            T.TASK_RUN_STATE_RUNNING,
            attempt=pb.AttemptUpdate(
                attempt_number=number, state=T.TASK_RUN_STATE_RUNNING, reason="operator_resume"
            ),
        )
        return number

    async def _approval(self, approvals: Approvals, number: int) -> apb.Approval:
        """The request of this attempt: read back for a SUSPENDED task, created (or,
        the call being idempotent, found again) otherwise."""
        task = self.task
        if self.state == T.TASK_RUN_STATE_SUSPENDED and task.approval_id:
            return await approvals.get(task.approval_id)
        ex = self.ex
        run = ex.run_record
        return await approvals.create(
            apb.CreateApprovalRequest(
                request_id=f"{task.task_id}:{number}",
                run_id=run.run_id,
                task_id=task.task_id,
                step_id=self.step.id,
                workflow_name=ex.definition.name,
                labels=dict(run.labels),
                policy=self.step.govern.policy,
                context=struct(self.context()),
                initiator=run.initiator,
            )
        )

    def context(self) -> dict[str, Any]:
        """The values of the step's context_keys (VerbError INVALID_INPUT if one is missing)."""
        ex = self.ex
        return {
            key: render("{{ " + key + " }}", inputs=ex.inputs, outputs=ex.outputs)
            for key in self.step.govern.context_keys
        }

    async def _decided(self, approval: apb.Approval, number: int) -> Halt | None:
        approval_id = approval.approval_id
        if approval.state == A.APPROVAL_STATE_APPROVED:
            if self.state == T.TASK_RUN_STATE_SUSPENDED:
                await self._write_task(T.TASK_RUN_STATE_RUNNING, f"{approval_id}:decided")
            output = approval_output(approval)
            await self.target.write(T.TASK_RUN_STATE_SUCCEEDED, output=output)
            self.ex.outputs[self.step.id] = output
            log.info("approval %s approved", approval_id)
            return None
        if approval.state == A.APPROVAL_STATE_REJECTED:
            return await self._end(number, T.TASK_RUN_STATE_FAILED, rejection(approval))
        if approval.state == A.APPROVAL_STATE_EXPIRED:
            state, why = expiry(approval, self.step.govern.policy)
            return await self._end(number, state, why)
        if approval.state == A.APPROVAL_STATE_CANCELLED:
            # Withdrawn: no decision can come any more, so the run ends CANCELLED
            # (normally the run was cancelled first and the request closed with it).
            why = failure(
                F.FAILURE_REASON_CANCELLED, f"approval request {approval_id} was cancelled"
            )
            self.ex.control.apply(C.CONTROL_ACTION_CANCEL, why.message)
            await self.target.write(T.TASK_RUN_STATE_CANCELLED, failure=why)
            return Halt("cancel", why)
        why = failure(
            F.FAILURE_REASON_INTERNAL,
            f"approval {approval_id} is in an unknown state {approval.state}",
        )
        return await self._end(number, T.TASK_RUN_STATE_FAILED, why)

    async def _end(self, number: int, state: int, why: common_pb2.Failure) -> Halt:
        log.info("govern step ends %s: %s", T.Name(state), why.message)  # type: ignore[arg-type]
        return await end_failed(self.target, number, state, why, pause_policy=self.ex.pause_policy)

    async def _suspend_task(self, approval: apb.Approval) -> None:
        if self.state != T.TASK_RUN_STATE_SUSPENDED:
            await self._write_task(
                T.TASK_RUN_STATE_SUSPENDED,
                f"{approval.approval_id}:suspended",
                approval_id=approval.approval_id,
            )

    async def _write_task(self, state: int, key: str, *, approval_id: str = "") -> None:
        fence = self.ex.fence
        await fence.ledger.call(
            fence.ledger.stub.TransitionTask,
            pb.TransitionTaskRequest(
                request_id=f"{fence.run_id}:{fence.epoch}:govern:{self.task.task_id}:{key}",
                run_id=fence.run_id,
                task_id=self.task.task_id,
                epoch=fence.epoch,
                actor=fence.actor,
                state=state,  # type: ignore[arg-type]
                approval_id=approval_id,
            ),
        )
        self.state = state

    # --- hold_device: waiting under the claim -------------------------------------

    async def _hold(self, approvals: Approvals, approval: apb.Approval) -> apb.Approval | Halt:
        """Wait for the decision with the claim held and the run SUSPENDED; the run
        is RUNNING again when this returns (unless the claim was lost or the run
        is cancelled: it goes from SUSPENDED to CANCELLED)."""
        approval_id = approval.approval_id
        log.info("waiting for approval %s under the claim (hold_device)", approval_id)
        await write_run(
            self.ex.fence, R.WORKFLOW_RUN_STATE_SUSPENDED, f"{approval_id}:held", "suspended"
        )
        outcome = await self._wait(approvals, approval_id)
        control = self.ex.control
        if outcome == "lost":
            return Halt("lost")
        if outcome == "cancel":  # SUSPENDED -> CANCELLED; the ledger cancels the task with it
            return Halt("cancel", failure(F.FAILURE_REASON_CANCELLED, control.reason))
        await write_run(
            self.ex.fence, R.WORKFLOW_RUN_STATE_RUNNING, f"{approval_id}:woken", "resumed"
        )
        if isinstance(outcome, apb.Approval):
            return outcome
        if outcome == "deadline":
            why = failure(F.FAILURE_REASON_DEADLINE_EXCEEDED, "the run exceeded its run_timeout")
            await self.target.write(T.TASK_RUN_STATE_TIMED_OUT, failure=why)
            return Halt("deadline", why)
        return Halt("suspend")  # drain: another executor continues after the decision

    async def _wait(self, approvals: Approvals, approval_id: str) -> apb.Approval | str:
        """The decided request, or why the wait stopped: lost, cancel, deadline, drain."""
        ex = self.ex
        worker = ex.worker
        control = ex.control
        decided = asyncio.Event()

        async def on_event(msg: Msg) -> None:
            event = events_pb2.Event()
            try:
                event.ParseFromString(msg.data)
            except Exception:  # a malformed event must not stop the wait
                log.warning("unreadable approval event on %s", msg.subject)
                return
            if event.HasField("approval_decided") and (
                event.approval_decided.approval_id == approval_id
            ):
                decided.set()

        subject = worker.streams.subject("events", "approval", ex.run_id)
        subscription = await worker.nc.subscribe(subject, cb=on_event)
        loop = asyncio.get_running_loop()
        delay = POLL_INITIAL_S
        try:
            while True:
                decided.clear()  # before the read: an event from now on wakes the wait
                try:
                    current = await approvals.get(approval_id)
                except (Unavailable, DeadlineExceeded) as exc:
                    log.warning("approval %s could not be read (%s); waiting on", approval_id, exc)
                else:
                    if current.state != A.APPROVAL_STATE_PENDING:
                        return current
                poll_at = loop.time() + delay
                delay = min(delay * 2, POLL_MAX_S)
                while not decided.is_set() and loop.time() < poll_at:
                    if control.lost:
                        return "lost"
                    if control.cancelled:
                        return "cancel"
                    if control.draining:
                        return "drain"
                    if ex.deadline is not None and loop.time() >= ex.deadline:
                        return "deadline"
                    bound = min(TICK_S, poll_at - loop.time())
                    if ex.deadline is not None:
                        bound = min(bound, ex.deadline - loop.time())
                    await _first(decided.wait(), control.stop.wait(), within_s=max(bound, 0.0))
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()


async def _first(*waits: Awaitable[Any], within_s: float) -> None:
    """Return when one of ``waits`` finishes or after ``within_s``; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def write_run(fence: Fence, state: int, key: str, reason: str) -> run_pb2.WorkflowRun:
    """Move the run under ``fence`` with a request id of its own (``key``)."""
    return await fence.transition_run(state, reason=reason, key=f"govern:{key}")


async def suspend(ex: Execution) -> bool:
    """The run stopped at a GOVERN step (``Halt("suspend")``): move it SUSPENDED.

    Then look at its requests once more: one decided while the run was being
    suspended may have been announced when the run was not SUSPENDED yet, or
    still held, and the scheduler dispatches neither. If so the run goes
    RUNNING again under the same claim, its tasks are read back, and True
    says to go on with the steps. False: it stays SUSPENDED (or was stopped
    before: cancel, deadline, lost claim) for ``finish`` to release or end.
    """
    stop = ex.boundary()
    if stop is not None and stop.kind in ("lost", "cancel", "deadline"):
        return False
    ledger = ex.worker.ledger
    run = await ledger.get_run(ex.run_id, view=run_pb2.RUN_VIEW_TASKS)
    waiting = sorted(
        t.approval_id for t in run.tasks if t.state == T.TASK_RUN_STATE_SUSPENDED and t.approval_id
    )
    key = hashlib.sha256(",".join(waiting).encode()).hexdigest()[:16]
    moved = await write_run(
        ex.fence, R.WORKFLOW_RUN_STATE_SUSPENDED, f"{key}:suspended", "suspended"
    )
    ex.run_record.state = moved.state
    if moved.pending_control == C.CONTROL_ACTION_CANCEL:
        # asked while the run was held and not seen yet: nobody else would apply it
        ex.control.apply(C.CONTROL_ACTION_CANCEL, ex.control.reason)
        return False
    if ex.control.draining or not await _decided(ex.worker.approvals, waiting):
        return False
    moved = await write_run(ex.fence, R.WORKFLOW_RUN_STATE_RUNNING, f"{key}:resumed", "resumed")
    ex.run_record.state = moved.state
    full = await ledger.get_run(ex.run_id, view=run_pb2.RUN_VIEW_FULL)
    ex.tasks = {t.step_path: t for t in full.tasks}
    log.info("an approval was decided while the run suspended; going on")
    return True


async def _decided(approvals: Approvals | None, approval_ids: list[str]) -> bool:
    """Whether one of the requests is no longer PENDING (False if unknown)."""
    if approvals is None:
        return False
    for approval_id in approval_ids:
        try:
            approval = await approvals.get(approval_id)
        except SteplineError as exc:
            log.warning("approval %s could not be read: %s", approval_id, exc)
            continue
        if approval.state != A.APPROVAL_STATE_PENDING:
            return True
    return False


async def late_cancel(worker: Worker, run_id: str) -> common_pb2.Failure | None:
    """After a suspended run's claim was released: a cancel asked in the moment
    it was being suspended is left pending on a run nobody holds (the ledger
    applies a cancel at once only to an unheld run). Claim the run back and
    apply it, SUSPENDED -> CANCELLED; returns its failure, or None."""
    try:
        run = await worker.ledger.get_run(run_id)
        if (
            run.state != R.WORKFLOW_RUN_STATE_SUSPENDED
            or run.pending_control != C.CONTROL_ACTION_CANCEL
            or run.claim.executor_id  # someone took it: it applies the cancel
        ):
            return None
        log.info("a cancel came while the run suspended; applying it")
        claim = await worker.ledger.claim(
            request_id=f"claim:{run_id}:late-cancel:{run.claim.epoch}",
            run_id=run_id,
            lease_s=worker.settings.lease_s,
        )
        fence = worker.ledger.fence(claim)
        why = failure(F.FAILURE_REASON_CANCELLED, "cancelled while the run was suspending")
        await fence.transition_run(R.WORKFLOW_RUN_STATE_CANCELLED, failure=why, release="terminal")
    except SteplineError as exc:
        log.warning("run %s: a pending cancel was not applied: %s", run_id, exc)
        return None
    return why
