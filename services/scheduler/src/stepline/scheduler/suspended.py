"""Waking runs suspended at a GOVERN step once their approval is decided.

A suspended run waits for a person, not for an executor: it holds no claim
and no job. When its approval request reaches a final state (APPROVED,
REJECTED, EXPIRED or CANCELLED) the run is dispatched again, exactly as the
reconciler dispatches an orphan (:meth:`Runs.redispatch`: ``RecordDispatch``
compare-and-set, then a job under the new epoch), and the executor that
claims it reads the decision.

* :class:`ApprovalListener` follows ``ApprovalDecided`` events
  (``stepline.events.approval.>`` on STEPLINE_EVENTS) through a durable pull
  consumer shared by the scheduler replicas. The dispatch's request id is
  derived from the approval id, so a redelivered event (or a second replica)
  replays the same dispatch instead of making another. A run still held by
  an executor (it is releasing its claim right now, or waits under
  ``hold_device`` and sees the decision itself) is looked at again shortly,
  until nobody holds it or it is no longer SUSPENDED. A run that is not
  SUSPENDED yet when the event arrives is left to its executor, which looks
  at its requests once more after suspending the run.
* :class:`SuspendedSweep` is the safety net for a lost event: now and then it
  lists the SUSPENDED runs nobody holds and nothing touched for a grace
  period, and dispatches those whose approval is no longer PENDING
  (``GetApproval`` on the approvals service).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from stepline.api.approvals.v1 import approvals_pb2
from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.ledger.v1 import ledger_pb2
from stepline.common import jetstream
from stepline.common.client import rpc
from stepline.common.errors import NotFound, SteplineError
from stepline.common.jetstream import Streams
from stepline.scheduler.scheduler_service import Runs

if TYPE_CHECKING:
    from stepline.api.approvals.v1.approvals_pb2_grpc import ApprovalsServiceAsyncStub

log = logging.getLogger(__name__)

R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState
A = approvals_pb2.ApprovalState

LISTENER_CONSUMER = "scheduler-approvals"
FETCH_TIMEOUT_S = 1.0
#: deliveries of one event while its run stays held; then the sweep takes over
MAX_DELIVERIES = 100
#: bounds on the wait before a held run's event is looked at again
RETRY_MIN_S = 0.2
RETRY_MAX_S = 2.0
#: wait before an event is tried again after the ledger failed
FAILED_RETRY_S = 3.0

DISPATCHED, NOT_SUSPENDED, HELD, RACED = "dispatched", "not_suspended", "held", "raced"


def held_for_s(claim: run_pb2.Claim, now: datetime | None = None) -> float:
    """Seconds until ``claim`` lapses; 0 when nobody holds it."""
    if not claim.executor_id or not claim.HasField("expire_time"):
        return 0.0
    now = now or datetime.now(UTC)
    left = (claim.expire_time.ToDatetime(tzinfo=UTC) - now).total_seconds()
    return max(left, 0.0)


async def wake(runs: Runs, run: run_pb2.WorkflowRun, *, request_id: str, reason: str) -> str:
    """Dispatch ``run`` again if it is SUSPENDED and nobody holds it.

    Returns DISPATCHED, NOT_SUSPENDED, HELD (an executor holds its claim) or
    RACED (someone else dispatched it first, or this dispatch was made before).
    """
    if run.state != R.WORKFLOW_RUN_STATE_SUSPENDED:
        return NOT_SUSPENDED
    if held_for_s(run.claim) > 0:
        return HELD
    epoch = await runs.redispatch(run, request_id=request_id, reason=reason)
    if epoch is None:
        return RACED
    log.info("run %s dispatched again (%s) under epoch %d", run.run_id, reason, epoch)
    return DISPATCHED


async def get_run(
    runs: Runs, run_id: str, view: int = run_pb2.RUN_VIEW_BASIC
) -> run_pb2.WorkflowRun:
    response = await rpc(
        runs.ledger.GetRun(ledger_pb2.GetRunRequest(run_id=run_id, view=view))  # type: ignore[arg-type]
    )
    return response.run


class ApprovalListener:
    """Dispatches a suspended run when an ApprovalDecided event for it arrives."""

    def __init__(self, runs: Runs, js: JetStreamContext, streams: Streams) -> None:
        self.runs = runs
        self.js = js
        self.streams = streams

    async def run(self) -> None:
        """Consume events until cancelled."""
        streams = self.streams
        await jetstream.ensure_pull_consumer(
            self.js,
            stream=streams.events,
            durable=LISTENER_CONSUMER,
            filter_subject=streams.subject("events", "approval", ">"),
        )
        subscription = await self.js.pull_subscribe_bind(LISTENER_CONSUMER, stream=streams.events)
        try:
            while True:
                try:
                    messages = await subscription.fetch(batch=50, timeout=FETCH_TIMEOUT_S)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                for msg in messages:
                    await self.handle(msg)
        finally:
            await subscription.unsubscribe()

    async def handle(self, msg: Msg) -> None:
        event = await jetstream.parse_or_term(msg, events_pb2.Event, what="event")
        if event is None:
            return
        if not event.HasField("approval_decided") or not event.run_id:
            await msg.ack()
            return
        decided = event.approval_decided
        try:
            run = await get_run(self.runs, event.run_id)
            outcome = await wake(
                self.runs,
                run,
                request_id=f"approval:{decided.approval_id}",
                reason="approval_decided",
            )
        except NotFound:
            log.warning("approval %s decided for unknown run %s", decided.approval_id, event.run_id)
            await msg.ack()
            return
        except SteplineError as exc:
            log.warning("run %s not woken yet: %s", event.run_id, exc)
            await msg.nak(delay=FAILED_RETRY_S)
            return
        if outcome != HELD:
            await msg.ack()
            return
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        if delivered >= MAX_DELIVERIES:
            log.warning(
                "run %s stays held after approval %s was decided; left to the sweep",
                run.run_id,
                decided.approval_id,
            )
            await msg.ack()
            return
        # Look again soon: its holder is about to let go, or acts on the decision.
        delay = min(max(held_for_s(run.claim), RETRY_MIN_S), RETRY_MAX_S)
        await msg.nak(delay=delay)


class SuspendedSweep:
    """The safety net: SUSPENDED runs whose approval was decided but which were
    not dispatched (a lost event) are dispatched now."""

    def __init__(
        self,
        runs: Runs,
        approvals: ApprovalsServiceAsyncStub,
        *,
        grace_s: float,
        page_size: int = 100,
    ) -> None:
        self.runs = runs
        self.approvals = approvals
        self.grace_s = grace_s
        self.page_size = page_size

    async def sweep(self) -> int:
        """One pass; returns how many runs were dispatched."""
        dispatched = 0
        token = ""
        while True:
            page = await rpc(
                self.runs.ledger.ListRuns(
                    ledger_pb2.ListRunsRequest(
                        filter=run_pb2.RunFilter(states=[R.WORKFLOW_RUN_STATE_SUSPENDED]),
                        page_size=self.page_size,
                        page_token=token,
                    )
                )
            )
            for run in page.runs:
                try:
                    if await self._check(run):
                        dispatched += 1
                except SteplineError as exc:
                    log.warning("suspended run %s: %s", run.run_id, exc)
            token = page.next_page_token
            if not token:
                return dispatched

    async def _check(self, run: run_pb2.WorkflowRun) -> bool:
        now = datetime.now(UTC)
        if held_for_s(run.claim, now) > 0:
            return False
        quiet_s = (now - run.update_time.ToDatetime(tzinfo=UTC)).total_seconds()
        if quiet_s < self.grace_s:
            return False  # just suspended, or just dispatched: give it time
        decided = await self.decided(run.run_id)
        if decided is None:
            return False
        outcome = await wake(
            self.runs,
            run,
            request_id=f"sweep:{run.run_id}:{run.dispatch_epoch}",
            reason="approval_decided",
        )
        if outcome == DISPATCHED:
            log.warning(
                "run %s was still suspended after approval %s was decided; dispatched",
                run.run_id,
                decided,
            )
        return outcome == DISPATCHED

    async def decided(self, run_id: str) -> str | None:
        """The id of a decided approval the run waits on, or None."""
        run = await get_run(self.runs, run_id, run_pb2.RUN_VIEW_TASKS)
        for task in run.tasks:
            if task.state != T.TASK_RUN_STATE_SUSPENDED or not task.approval_id:
                continue
            try:
                response = await rpc(
                    self.approvals.GetApproval(
                        approvals_pb2.GetApprovalRequest(approval_id=task.approval_id)
                    )
                )
            except NotFound:
                log.warning("run %s waits on unknown approval %s", run_id, task.approval_id)
                continue
            if response.approval.state != A.APPROVAL_STATE_PENDING:
                return task.approval_id
        return None
