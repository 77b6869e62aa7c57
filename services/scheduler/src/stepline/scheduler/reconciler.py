"""The reconciler: no run is lost because a job message was.

Every ``interval`` it asks the ledger for orphaned runs (``ListOrphanedRuns``:
claim expired or released while work remains, never claimed within the grace
period, or past the run's deadline with nobody to end it) and:

* dispatches a claim-expired or never-claimed run again: ``RecordDispatch``
  (compare-and-set on the dispatch epoch, so of several reconcilers one wins;
  its request id is derived from the epoch it saw, so a replica racing with
  the same view gets the same new epoch and publishes the same, deduplicated,
  job) and then a ``RunJob`` under the new epoch. An executor still holding a
  job of an older epoch is refused by ``ClaimRun``.
* ends a run past its deadline as TIMED_OUT (reason DEADLINE_EXCEEDED): the
  ledger only lets a claim holder move a run, and only ``RUNNING →
  TIMED_OUT``, so the reconciler claims the run for itself, moves it to
  RUNNING first if it was PENDING, PAUSED or SUSPENDED (recorded with the
  reason ``deadline_passed``), then to TIMED_OUT.

A SUSPENDED run waits for a person and is no orphan (unless past its
deadline); it is dispatched again when its approval is decided, by
:mod:`stepline.scheduler.suspended` (the ApprovalDecided listener, and a
sweep for decisions whose event was lost).

Chunks are not reconciled here: ``ListOrphanedRuns`` lists runs only, and the
chunks of a run are dispatched by the executor that holds the run.

The ledger lists a run as never claimed by its creation time, and a claim
expired for as long as nobody claims it, so the same run keeps being listed
until an executor takes it. The reconciler therefore does not dispatch one run
again before ``grace_s`` has passed since its own last dispatch of it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from google.protobuf.duration_pb2 import Duration

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.ledger.v1 import ledger_pb2
from stepline.common.client import rpc
from stepline.common.errors import FailedPrecondition, SteplineError
from stepline.scheduler.scheduler_service import Runs, scheduler_actor

if TYPE_CHECKING:
    from stepline.api.ledger.v1.ledger_pb2_grpc import LedgerServiceAsyncStub

log = logging.getLogger(__name__)

R = common_pb2.WorkflowRunState
Orphan = ledger_pb2.OrphanReason
RECONCILER_ID = "stepline-scheduler-reconciler"
_REASONS = {
    Orphan.ORPHAN_REASON_CLAIM_EXPIRED: "claim_expired",
    Orphan.ORPHAN_REASON_NEVER_CLAIMED: "never_claimed",
}


class Reconciler:
    def __init__(self, runs: Runs, *, grace_s: float, page_size: int = 100) -> None:
        self.runs = runs
        self.grace_s = grace_s
        self.page_size = page_size
        # run_id -> (dispatch epoch this replica published, monotonic time)
        self._recent: dict[str, tuple[int, float]] = {}

    @property
    def ledger(self) -> LedgerServiceAsyncStub:
        return self.runs.ledger

    async def reconcile(self) -> int:
        """One pass over the orphaned runs; returns how many were acted on."""
        acted = 0
        token = ""
        grace = Duration()
        grace.FromNanoseconds(max(1, int(self.grace_s * 1e9)))
        while True:
            page = await rpc(
                self.ledger.ListOrphanedRuns(
                    ledger_pb2.ListOrphanedRunsRequest(
                        grace_period=grace, page_size=self.page_size, page_token=token
                    )
                )
            )
            for orphan in page.runs:
                try:
                    if await self._handle(orphan):
                        acted += 1
                except SteplineError as exc:
                    log.warning("orphaned run %s: %s", orphan.run.run_id, exc)
            token = page.next_page_token
            if not token:
                break
        self._forget_old()
        return acted

    async def _handle(self, orphan: ledger_pb2.OrphanedRun) -> bool:
        run = orphan.run
        if orphan.reason == Orphan.ORPHAN_REASON_DEADLINE_PASSED:
            return await self.time_out(run)
        recent = self._recent.get(run.run_id)
        if (
            recent is not None
            and recent[0] >= run.dispatch_epoch
            and time.monotonic() - recent[1] < self.grace_s
        ):
            return False  # dispatched by us a moment ago; give an executor time
        reason = _REASONS.get(orphan.reason, "orphaned")
        epoch = await self.runs.redispatch(
            run,
            request_id=f"reconcile:{run.run_id}:{run.dispatch_epoch}",
            reason=reason,
        )
        if epoch is None:
            return False
        self._recent[run.run_id] = (epoch, time.monotonic())
        log.info("run %s dispatched again (%s) under epoch %d", run.run_id, reason, epoch)
        return True

    async def time_out(self, run: run_pb2.WorkflowRun) -> bool:
        """End ``run`` TIMED_OUT under a claim of the reconciler's own; False if
        it cannot be claimed now (an executor holds it, or it just ended)."""
        key = f"deadline:{run.run_id}"
        try:
            claimed = await rpc(
                self.ledger.ClaimRun(
                    ledger_pb2.ClaimRunRequest(
                        request_id=f"{key}:claim:{run.claim.epoch}",
                        run_id=run.run_id,
                        executor_id=RECONCILER_ID,
                        lease_duration=Duration(seconds=30),
                    )
                )
            )
        except FailedPrecondition as exc:
            log.info("run %s past its deadline not ended now: %s", run.run_id, exc)
            return False
        epoch = claimed.claim.epoch
        actor = scheduler_actor()
        if claimed.run.state != R.WORKFLOW_RUN_STATE_RUNNING:
            await rpc(
                self.ledger.TransitionRun(
                    ledger_pb2.TransitionRunRequest(
                        request_id=f"{key}:{epoch}:running",
                        run_id=run.run_id,
                        epoch=epoch,
                        actor=actor,
                        state=R.WORKFLOW_RUN_STATE_RUNNING,
                        reason="deadline_passed",
                    )
                )
            )
        await rpc(
            self.ledger.TransitionRun(
                ledger_pb2.TransitionRunRequest(
                    request_id=f"{key}:{epoch}:timed_out",
                    run_id=run.run_id,
                    epoch=epoch,
                    actor=actor,
                    state=R.WORKFLOW_RUN_STATE_TIMED_OUT,
                    failure=common_pb2.Failure(
                        reason=common_pb2.FAILURE_REASON_DEADLINE_EXCEEDED,
                        message="the run passed its run_timeout",
                    ),
                    reason="deadline_passed",
                )
            )
        )
        log.warning("run %s passed its deadline: ended TIMED_OUT", run.run_id)
        return True

    def _forget_old(self) -> None:
        limit = time.monotonic() - self.grace_s
        for run_id in [r for r, (_, at) in self._recent.items() if at < limit]:
            del self._recent[run_id]
