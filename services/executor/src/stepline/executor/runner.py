"""Advancing one claimed run through its plan (DESIGN.md §2).

Steps run in definition order; completed steps (SUCCEEDED, SKIPPED) are never
run again and their outputs are reused. Between steps the run honours cancel,
pause, drain and its deadline; a running verb is interrupted at once by a
cancel or the loss of the claim. A verb registered ``cancellable=False`` is
interrupted only by the loss of the claim (or executor shutdown): on a cancel
it runs to its end, its outcome is recorded, and the run ends CANCELLED at the
boundary after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.errors import FailedPrecondition, InvalidArgument, NotFound, SteplineError
from stepline.common.jetstream import Streams
from stepline.common.logs import log_context
from stepline.common.plan import plan
from stepline.common.states import RUN_TERMINAL
from stepline.executor import chunks, govern
from stepline.executor.attempts import (
    Halt,
    Target,
    as_output,
    end_failed,
    run_attempts,
    seconds,
    start,
    to_dict,
)
from stepline.executor.config import ExecutorSettings
from stepline.executor.control import Beat, Control, holding
from stepline.executor.devices import DeviceBroker, DeviceSpans
from stepline.executor.ledger import Fence, Ledger, failure, struct
from stepline.executor.verbs.base import VerbContext, VerbError
from stepline.executor.verbs.registry import VerbRegistry
from stepline.executor.verbs.templating import render

log = logging.getLogger(__name__)

R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState
F = common_pb2.FailureReason
DONE = (T.TASK_RUN_STATE_SUCCEEDED, T.TASK_RUN_STATE_SKIPPED)
ACK, NAK = "ack", "nak"


class WorkflowResolver(Protocol):
    """Where child workflows of WorkflowRef steps come from (the scheduler)."""

    async def get(self, name: str, version: int) -> workflow_pb2.WorkflowDefinition: ...


@dataclass
class Worker:
    """What every run on this executor shares."""

    settings: ExecutorSettings
    ledger: Ledger
    nc: NATS
    js: JetStreamContext
    registry: VerbRegistry
    workflows: WorkflowResolver | None = None
    #: leases devices for steps that declare one (None: such steps fail)
    devices: DeviceBroker | None = None
    #: the approvals service, for GOVERN steps (None: such steps fail)
    approvals: govern.Approvals | None = None
    #: runs waiting on their chunks: they do not count against max_concurrent_runs
    parked: int = 0
    capacity_changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def streams(self) -> Streams:
        return self.settings.nats.streams

    def hold(self, fence: Fence, control: Control, beat: Beat | None) -> Any:
        return holding(
            fence,
            control,
            nc=self.nc,
            streams=self.streams,
            lease_s=self.settings.lease_s,
            beat=beat,
            beat_every_s=self.settings.ack_wait_s / 3,
        )

    @contextlib.contextmanager
    def parking(self) -> Any:
        self.parked += 1
        self.capacity_changed.set()
        try:
            yield
        finally:
            self.parked -= 1


@dataclass(frozen=True)
class RunEnd:
    state: int
    failure: common_pb2.Failure | None = None
    outputs: dict[str, Any] | None = None
    disposition: str = ACK


async def execute_run_job(
    worker: Worker, job: events_pb2.RunJob, *, request_id: str, control: Control, beat: Beat | None
) -> str:
    """Claim the job's run and advance it; returns how to settle the job."""
    with log_context(run_id=job.run_id):
        try:
            claim = await worker.ledger.claim(
                request_id=request_id,
                run_id=job.run_id,
                lease_s=worker.settings.lease_s,
                dispatch_epoch=job.dispatch_epoch,
                # a draining executor stops before a run's first step
                first_task=not control.draining,
            )
        except (NotFound, FailedPrecondition, InvalidArgument) as exc:
            log.info("job dropped: %s", exc)
            return ACK
        end = await execute_claimed(worker, claim, control=control, beat=beat)
        return end.disposition


async def execute_claimed(
    worker: Worker,
    claim: pb.ClaimRunResponse,
    *,
    control: Control,
    beat: Beat | None,
    deadline: float | None = None,
) -> RunEnd:
    fence = worker.ledger.fence(claim)
    fence.on_control = control.apply
    execution = Execution(worker, fence, claim.run, control, deadline=deadline)
    if claim.first_task_started:
        execution.opened = claim.run.tasks[0].task_id
    try:
        async with worker.hold(fence, control, beat):
            return await execution.run()
    except asyncio.CancelledError:
        log.info("run interrupted by shutdown; releasing its claim")
        with contextlib.suppress(SteplineError):
            await asyncio.shield(execution.flush_carry())
        with contextlib.suppress(SteplineError):
            await asyncio.shield(fence.release("shutdown"))
        raise


class Execution:
    """One claimed run, advanced step by step."""

    def __init__(
        self,
        worker: Worker,
        fence: Fence,
        run: run_pb2.WorkflowRun,
        control: Control,
        *,
        deadline: float | None = None,
    ) -> None:
        self.worker = worker
        self.fence = fence
        self.run_record = run
        self.definition = run.definition
        self.control = control
        self.deadline = deadline
        self.inputs = to_dict(run.inputs)
        self.tasks = {t.step_path: t for t in run.tasks}
        self.outputs: dict[str, Any] = {}
        self.last_output: dict[str, Any] = {}
        self.pause_policy = self.definition.failure_policy == workflow_pb2.FAILURE_POLICY_PAUSE_RUN
        self.devices = DeviceSpans(worker.devices, fence, executor_id=worker.settings.executor_id)
        # A step's end not sent yet: it goes with the next step's start, in one
        # call and one commit, when nothing happens between them (see _may_carry).
        self.carry: pb.StepTransition | None = None
        self._carry_step = ""  # the step whose end may be carried
        # The task whose first attempt the claim started (ClaimRun's
        # start_first_task): it runs without a start of its own, and no step
        # boundary comes before it: like a step already running, it is
        # interrupted by a cancel or the loss of the claim, and a drain that
        # began after the claim lets it end (an executor asks for it only when
        # not draining). A pause or cancel asked for before the claim kept the
        # ledger from starting it.
        self.opened = ""

    @property
    def run_id(self) -> str:
        return self.run_record.run_id

    async def run(self) -> RunEnd:
        with log_context(run_id=self.run_id):
            try:
                if self.run_record.pending_control:
                    self.control.apply(self.run_record.pending_control)
                halt = await self._start()
                if halt is None:
                    halt = await self.sequence(self.definition.steps, "", None)
                while halt is not None and halt.kind == "suspend" and await govern.suspend(self):
                    halt = await self.sequence(self.definition.steps, "", None)  # decided meanwhile
                await self.devices.close()
                return await self.finish(halt)
            except FailedPrecondition as exc:
                log.warning("run stopped: the ledger refused a write: %s", exc)
                return RunEnd(0, failure(F.FAILURE_REASON_INTERNAL, str(exc)))
            finally:
                await asyncio.shield(self.devices.close())

    async def _start(self) -> Halt | None:
        if self.control.cancelled:
            return Halt("cancel")
        if self.run_record.state != R.WORKFLOW_RUN_STATE_RUNNING:
            self.run_record = await self.fence.transition_run(
                R.WORKFLOW_RUN_STATE_RUNNING,
                reason="claimed"
                if self.run_record.state == R.WORKFLOW_RUN_STATE_PENDING
                else "resumed",
            )
        timeout = seconds(self.definition.run_timeout)
        if timeout:
            started = self.run_record.start_time.ToDatetime(tzinfo=UTC)
            left = timeout - (datetime.now(UTC) - started).total_seconds()
            own = asyncio.get_running_loop().time() + left
            self.deadline = own if self.deadline is None else min(own, self.deadline)
        return None

    def boundary(self) -> Halt | None:
        control = self.control
        if control.lost:
            return Halt("lost")
        if control.cancelled:
            return Halt("cancel")
        if self.deadline is not None and asyncio.get_running_loop().time() >= self.deadline:
            return Halt("deadline")
        if control.draining:
            return Halt("drain")
        if control.pause:
            return Halt("pause")
        return None

    async def sequence(
        self, steps: Any, prefix: str, siblings_failed: asyncio.Event | None
    ) -> Halt | None:
        self.devices.plan(steps)
        for index, step in enumerate(steps):
            path = prefix + step.id
            task = self.tasks[path]
            if task.state in DONE:
                self._record_output(step.id, to_dict(task.output), top=not prefix)
                continue
            if task.state not in (
                T.TASK_RUN_STATE_PENDING,
                T.TASK_RUN_STATE_RUNNING,
                T.TASK_RUN_STATE_SUSPENDED,  # a GOVERN step waiting for its decision
            ):
                return Halt("failed", task.failure, task.state)
            halt = None if task.task_id == self.opened else self.boundary()
            if halt is None and siblings_failed is not None and siblings_failed.is_set():
                halt = Halt("skipped")
            if halt is None:
                following = steps[index + 1] if index + 1 < len(steps) else None
                # only the run's own sequence carries (see _may_carry)
                self._carry_step = path if self._may_carry(prefix, step, following) else ""
                with log_context(task_id=task.task_id):
                    halt = await self.step(step, path, task)
            if halt is not None:
                if halt.kind == "lost":
                    self.carry = None  # the ledger refuses this holder's writes now
                else:
                    await self.flush_carry()
                await self.devices.passed(step.id, halt)
                return halt
            await self.devices.passed(step.id, None)
            if step.id in self.outputs:
                self._record_output(step.id, self.outputs[step.id], top=not prefix)
        return None  # a carried last step's end goes with the run's end (finish)

    def _may_carry(
        self, prefix: str, step: workflow_pb2.Step, following: workflow_pb2.Step | None
    ) -> bool:
        """Whether ``step``'s end may travel with ``following``'s start, or (the
        last step) with the run's end: atomic steps of the run's own sequence
        (not a parallel branch), the next one not started, neither holding a
        device (whose release or lease would come between)."""
        if prefix or step.WhichOneof("kind") != "atomic":
            return False
        if following is None:
            return not self.devices.covers(step.id)
        if following.WhichOneof("kind") != "atomic":
            return False
        nxt = self.tasks.get(following.id)
        return (
            nxt is not None
            and nxt.state == T.TASK_RUN_STATE_PENDING
            and not self.devices.covers(step.id)
            and not self.devices.covers(following.id)
        )

    def take_carry(self) -> pb.StepTransition | None:
        carry, self.carry = self.carry, None
        return carry

    async def flush_carry(self) -> None:
        """Send the carried step end now (before anything else happens)."""
        carry = self.take_carry()
        if carry is not None:
            await self.fence.apply_changes([carry])

    def _record_output(self, step_id: str, output: dict[str, Any], *, top: bool) -> None:
        self.outputs[step_id] = output
        if top:
            self.last_output = output

    async def step(self, step: workflow_pb2.Step, path: str, task: run_pb2.TaskRun) -> Halt | None:
        which = step.WhichOneof("kind")
        if which == "atomic":
            return await self.atomic(step, task)
        if which == "parallel":
            return await self.parallel(step, path, task)
        if which == "workflow_ref":
            return await self.workflow_ref(step, task)
        if which == "chunked":
            return await chunks.run_chunked(self, step, task)
        if which == "govern":
            return await govern.run_govern(self, step, task)
        target = Target(self.fence, task.task_id)
        if task.state == T.TASK_RUN_STATE_PENDING:
            await target.write(T.TASK_RUN_STATE_RUNNING)
        why = failure(
            F.FAILURE_REASON_INTERNAL, f"{which} steps are not supported by this executor"
        )
        return await end_failed(target, 1, T.TASK_RUN_STATE_FAILED, why, pause_policy=False)

    def context(self, step: workflow_pb2.Step, task_id: str, number: int) -> VerbContext:
        return VerbContext(
            run_id=self.run_id,
            task_id=task_id,
            step_id=step.id,
            attempt_number=number,
            workflow_name=self.definition.name,
            inputs=self.inputs,
            outputs=dict(self.outputs),
        )

    async def attempts(
        self,
        target: Target,
        step: workflow_pb2.Step,
        task: run_pb2.TaskRun,
        call: Callable[[int], Awaitable[Any]],
    ) -> tuple[Any, Halt | None]:
        if task.task_id == self.opened:
            self.opened = ""
            first: int | Halt = 1  # started with the claim
        else:
            first = await start(
                target, step, task, pause_policy=self.pause_policy, after=self.take_carry()
            )
        if isinstance(first, Halt):
            return None, first
        return await run_attempts(
            target,
            step,
            first,
            call,
            control=self.control,
            deadline=self.deadline,
            pause_policy=self.pause_policy,
            cancellable=self.cancellable(step),
        )

    def cancellable(self, step: workflow_pb2.Step) -> bool:
        """Whether a cancel interrupts the verb that ``step``'s attempts run (an
        atomic step's verb, a chunked step's generator)."""
        which = step.WhichOneof("kind")
        if which == "atomic":
            name = step.atomic.verb
        elif which == "chunked":
            name = step.chunked.generator_verb
        else:
            return True
        return self.worker.registry.interrupted_by_cancel(name, self.definition.allowed_verbs)

    async def atomic(self, step: workflow_pb2.Step, task: run_pb2.TaskRun) -> Halt | None:
        target = Target(self.fence, task.task_id)
        allowed = list(self.definition.allowed_verbs)

        async def call(number: int) -> dict[str, Any]:
            verb = self.worker.registry.resolve(step.atomic.verb, allowed=allowed)
            args = render(to_dict(step.atomic.args), inputs=self.inputs, outputs=self.outputs)
            ctx = self.context(step, task.task_id, number)
            return as_output(await self.devices.run(step, ctx, lambda c: verb(c, args)))

        output, halt = await self.attempts(target, step, task, call)
        if halt is not None:
            return halt
        if self._carry_step == task.step_path:  # sent with the next step's start
            self.carry = self.fence.step_change(
                task.task_id, T.TASK_RUN_STATE_SUCCEEDED, output=output
            )
        else:
            await target.write(T.TASK_RUN_STATE_SUCCEEDED, output=output)
        self.outputs[step.id] = output
        return None

    async def parallel(
        self, step: workflow_pb2.Step, path: str, task: run_pb2.TaskRun
    ) -> Halt | None:
        target = Target(self.fence, task.task_id)
        if task.state == T.TASK_RUN_STATE_PENDING:
            await target.write(T.TASK_RUN_STATE_RUNNING)
        failed = asyncio.Event()
        halts: list[Halt] = []

        async def branch(b: workflow_pb2.Branch) -> None:
            halt = await self.sequence(b.steps, f"{path}/{b.id}/", failed)
            if halt is not None and halt.kind != "skipped":
                halts.append(halt)
                if halt.kind in ("failed", "policy_pause"):
                    failed.set()

        async with asyncio.TaskGroup() as group:
            for b in step.parallel.branches:
                group.create_task(branch(b))
        if not halts:
            output = {
                b.id: self.outputs.get(b.steps[-1].id, {}) if b.steps else {}
                for b in step.parallel.branches
            }
            await target.write(T.TASK_RUN_STATE_SUCCEEDED, output=output)
            self.outputs[step.id] = output
            return None
        first = next((h for h in halts if h.kind == "failed"), halts[0])
        if first.kind == "failed":
            await target.write(T.TASK_RUN_STATE_FAILED, failure=first.failure)
        elif first.kind == "cancel":
            await target.write(
                T.TASK_RUN_STATE_CANCELLED,
                failure=failure(F.FAILURE_REASON_CANCELLED, self.control.reason or "cancelled"),
            )
        return first

    async def workflow_ref(self, step: workflow_pb2.Step, task: run_pb2.TaskRun) -> Halt | None:
        target = Target(self.fence, task.task_id)
        number = 1
        if task.state == T.TASK_RUN_STATE_PENDING:
            await target.write(T.TASK_RUN_STATE_RUNNING)
        elif task.attempts:
            number = task.attempts[-1].attempt_number
        ref = step.workflow_ref
        try:
            if self.worker.workflows is None:
                raise VerbError(
                    f"cannot resolve child workflow {ref.workflow_name!r}: this executor has "
                    "no scheduler (STEPLINE_SCHEDULER_ADDR)",
                    reason=F.FAILURE_REASON_INTERNAL,
                )
            definition = await self.worker.workflows.get(
                ref.workflow_name, task.child_workflow_version or ref.version
            )
            inputs = render(to_dict(ref.inputs), inputs=self.inputs, outputs=self.outputs)
        except (VerbError, SteplineError) as exc:
            reason = exc.reason if isinstance(exc, VerbError) else F.FAILURE_REASON_CHILD_FAILED
            why = failure(reason, str(exc))
            return await end_failed(
                target, number, T.TASK_RUN_STATE_FAILED, why, pause_policy=self.pause_policy
            )
        created = await self.worker.ledger.create_run(
            pb.CreateRunRequest(
                request_id=f"{task.task_id}:{number}",
                definition=definition,
                inputs=struct(inputs),
                labels=dict(self.run_record.labels),
                initiator=self.run_record.initiator,
                parent_run_id=self.run_id,
                parent_task_id=task.task_id,
                tasks=plan(definition),
            )
        )
        child_id = created.run.run_id
        if not task.child_run_id:
            await target.write(T.TASK_RUN_STATE_RUNNING, child_run_id=child_id)
        limit = seconds(step.timeout)
        deadline = asyncio.get_running_loop().time() + limit if limit else None
        child_control = self.control.child()
        end = await run_child(self.worker, child_id, child_control, deadline=deadline)
        if end.state == R.WORKFLOW_RUN_STATE_SUSPENDED:
            # The child waits for an approval; the executor it is dispatched to
            # after the decision continues it. Wait for its end.
            with self.worker.parking():
                end = await follow(self.worker, child_id, child_control)
        if end.state == R.WORKFLOW_RUN_STATE_SUCCEEDED:
            output = end.outputs or {}
            await target.write(T.TASK_RUN_STATE_SUCCEEDED, output=output)
            self.outputs[step.id] = output
            return None
        if self.control.lost or self.control.cancelled:
            return self.boundary()
        if end.state == 0 or end.disposition == NAK:
            return Halt("drain") if self.control.draining else Halt("lost")
        if end.state == R.WORKFLOW_RUN_STATE_PAUSED:
            return Halt("pause")
        state_name = R.Name(end.state).removeprefix("WORKFLOW_RUN_STATE_")  # type: ignore[arg-type]
        detail = (
            f": {end.failure.message}" if end.failure is not None and end.failure.message else ""
        )
        why = failure(
            F.FAILURE_REASON_CHILD_FAILED, f"child run {child_id} ended {state_name}{detail}"
        )
        why.details.update({"child_run_id": child_id, "child_state": state_name})
        return await end_failed(
            target, number, T.TASK_RUN_STATE_FAILED, why, pause_policy=self.pause_policy
        )

    async def finish(self, halt: Halt | None) -> RunEnd:
        fence = self.fence
        # The last step's end, if it was carried (only when the steps ran to
        # the end): it goes first in the call that ends the run.
        carry = self.take_carry()
        if halt is None and self.control.cancelled:
            # A cancel that came while the last step ran (e.g. a verb that is
            # not cancellable, run to its end) is honoured at the run's end too.
            halt = Halt("cancel")
        if halt is None:
            await fence.transition_run(
                R.WORKFLOW_RUN_STATE_SUCCEEDED,
                outputs=self.last_output,
                release="terminal",
                after=carry,
            )
            return RunEnd(R.WORKFLOW_RUN_STATE_SUCCEEDED, outputs=self.last_output)
        if halt.kind == "lost":
            return RunEnd(0)
        if halt.kind == "suspend":  # see govern.suspend
            if self.run_record.state != R.WORKFLOW_RUN_STATE_SUSPENDED:
                return await self.finish(self.boundary() or Halt("lost"))
            if self.control.lost:
                return RunEnd(0)
            if self.control.cancelled:  # came while it suspended: SUSPENDED -> CANCELLED
                return await self.finish(Halt("cancel"))
            await self._released(RunEnd(R.WORKFLOW_RUN_STATE_SUSPENDED), "suspended")
            why = await govern.late_cancel(self.worker, self.run_id)
            if why is not None:
                return RunEnd(R.WORKFLOW_RUN_STATE_CANCELLED, why)
            return RunEnd(R.WORKFLOW_RUN_STATE_SUSPENDED)
        if halt.kind == "drain":
            return await self._released(
                RunEnd(R.WORKFLOW_RUN_STATE_RUNNING, disposition=NAK), "shutdown"
            )
        if halt.kind in ("pause", "policy_pause"):
            why = halt.failure if halt.kind == "policy_pause" else None
            await fence.transition_run(
                R.WORKFLOW_RUN_STATE_PAUSED, failure=why, reason=halt.kind, release="paused"
            )
            return RunEnd(R.WORKFLOW_RUN_STATE_PAUSED, why)
        if halt.kind == "cancel":
            state = R.WORKFLOW_RUN_STATE_CANCELLED
            why = failure(
                F.FAILURE_REASON_CANCELLED, self.control.reason or "the run was cancelled"
            )
        elif halt.kind == "deadline":
            state = R.WORKFLOW_RUN_STATE_TIMED_OUT
            why = failure(F.FAILURE_REASON_DEADLINE_EXCEEDED, "the run exceeded its run_timeout")
        else:
            timed_out = halt.state == T.TASK_RUN_STATE_TIMED_OUT
            state = R.WORKFLOW_RUN_STATE_TIMED_OUT if timed_out else R.WORKFLOW_RUN_STATE_FAILED
            why = halt.failure or failure(F.FAILURE_REASON_INTERNAL, "a step failed")
        log.info("run ends %s: %s", R.Name(state), why.message)
        await fence.transition_run(state, failure=why, release="terminal", after=carry)
        return RunEnd(state, why)

    async def _released(self, end: RunEnd, reason: str) -> RunEnd:
        try:
            await self.fence.release(reason)
        except SteplineError as exc:
            log.warning("could not release the claim: %s", exc)
        return end


async def run_child(
    worker: Worker, run_id: str, control: Control, *, deadline: float | None
) -> RunEnd:
    """Run a child run inline; if another executor holds it, wait for its end."""
    with log_context(run_id=run_id):
        try:
            claim = await worker.ledger.claim(
                request_id=f"claim:{run_id}:{worker.ledger.executor_id}:{id(control)}",
                run_id=run_id,
                lease_s=worker.settings.lease_s,
            )
        except FailedPrecondition as exc:
            log.info("child run not claimable (%s); following it", exc)
            return await follow(worker, run_id, control)
        return await execute_claimed(worker, claim, control=control, beat=None, deadline=deadline)


async def follow(worker: Worker, run_id: str, control: Control) -> RunEnd:
    """Wait until a run held elsewhere ends (polling with backoff)."""
    delay = 0.1
    while True:
        run = await worker.ledger.get_run(run_id)
        if run.state in RUN_TERMINAL or run.state == R.WORKFLOW_RUN_STATE_PAUSED:
            outputs = to_dict(run.outputs)
            return RunEnd(run.state, run.failure if run.HasField("failure") else None, outputs)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(control.stop.wait(), delay)
        if control.stop.is_set():
            return RunEnd(0)
        delay = min(delay * 2, 2.0)
