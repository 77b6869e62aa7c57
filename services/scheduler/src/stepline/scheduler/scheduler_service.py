"""``SchedulerService``: starting, steering, reading and watching runs; schedules.

Starting a run follows DESIGN.md §2: authenticate, check ``start`` on the
definition, validate the inputs, then the pre-flight commit (ledger
``CreateRun``), and only after it returned publish the run's job. A publish
that fails leaves the run PENDING; the reconciler dispatches it later.

Permissions on a workflow (``stepline.scheduler.access``): ``start`` to start
or rerun a run and to manage its schedules, ``cancel`` to cancel, pause or
resume, ``read`` to see runs, their events and schedules.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext

from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.ledger.v1 import ledger_pb2
from stepline.api.scheduler.v1 import scheduler_service_pb2 as pb
from stepline.api.scheduler.v1 import scheduler_service_pb2_grpc
from stepline.common import auth
from stepline.common.client import rpc
from stepline.common.errors import (
    Aborted,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from stepline.common.jetstream import Streams, publish_proto
from stepline.scheduler import access
from stepline.scheduler.definitions import locate_steps, plan, validate_inputs
from stepline.scheduler.workflows import WorkflowStore

if TYPE_CHECKING:
    from stepline.api.ledger.v1.ledger_pb2_grpc import LedgerServiceAsyncStub
    from stepline.scheduler.schedules import ScheduleStore
    from stepline.scheduler.watch import RunWatcher

log = logging.getLogger(__name__)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]
R = common_pb2.WorkflowRunState
C = run_pb2.ControlAction
SCHEDULER_ID = "stepline-scheduler"


# --- small shared pieces -------------------------------------------------------------


def principal_proto(principal: auth.Principal) -> common_pb2.Principal:
    return common_pb2.Principal(id=principal.id, roles=sorted(principal.roles))


def principal_of(message: common_pb2.Principal) -> auth.Principal:
    return auth.Principal(message.id, frozenset(message.roles))


def scheduler_actor() -> common_pb2.Principal:
    """The scheduler itself, as the actor of the dispatches it records."""
    return common_pb2.Principal(id=SCHEDULER_ID, roles=["service"])


def require(value: str, name: str) -> str:
    if not value:
        raise InvalidArgument(f"{name} is required")
    return value


def now_timestamp() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


class Jobs:
    """Publishes jobs to ``STEPLINE_JOBS`` with the ids of contract 8, so that a
    retried publish is stored once while a redispatch (new epoch) is not."""

    def __init__(self, js: JetStreamContext, streams: Streams) -> None:
        self._js = js
        self._streams = streams

    async def publish_run(self, run_id: str, dispatch_epoch: int) -> None:
        job = events_pb2.RunJob(
            run_id=run_id, dispatch_epoch=dispatch_epoch, enqueue_time=now_timestamp()
        )
        await publish_proto(
            self._js,
            self._streams.subject("jobs", "run"),
            job,
            msg_id=f"run:{run_id}:{dispatch_epoch}",
        )

    async def try_publish_run(self, run_id: str, dispatch_epoch: int) -> bool:
        """Publish; on failure log and return False (the reconciler redispatches)."""
        try:
            await self.publish_run(run_id, dispatch_epoch)
        except Exception as exc:
            log.warning(
                "run %s: publishing its job (epoch %d) failed: %s; it stays PENDING "
                "until the reconciler dispatches it",
                run_id,
                dispatch_epoch,
                exc,
            )
            return False
        return True


def basic_view(run: run_pb2.WorkflowRun) -> run_pb2.WorkflowRun:
    result = run_pb2.WorkflowRun()
    result.CopyFrom(run)
    result.ClearField("tasks")
    result.ClearField("definition")
    return result


# --- the run operations -------------------------------------------------------------


class Runs:
    """Run operations shared by the RPCs, the cron ticker and the reconciler."""

    def __init__(
        self, *, workflows: WorkflowStore, ledger: LedgerServiceAsyncStub, jobs: Jobs
    ) -> None:
        self.workflows = workflows
        self.ledger = ledger
        self.jobs = jobs

    async def start(
        self,
        request: pb.StartRunRequest,
        principal: auth.Principal,
        *,
        schedule_id: str = "",
    ) -> pb.StartRunResponse:
        require(request.workflow_name, "workflow_name")
        if request.workflow_version < 0:
            raise InvalidArgument("workflow_version must be 0 (latest) or a version number")
        version = await self.workflows.get(request.workflow_name, request.workflow_version)
        definition = version.definition
        access.check(definition, "start", principal)
        inputs = validate_inputs(definition, request.inputs)
        create = ledger_pb2.CreateRunRequest(
            request_id=request.request_id or f"start:{uuid.uuid4()}",
            definition=definition,
            inputs=inputs,
            labels={**definition.labels, **request.labels},
            initiator=principal_proto(principal),
            schedule_id=schedule_id,
            tasks=await self._resolved_plan(definition),
            view=run_pb2.RUN_VIEW_BASIC,  # StartRun answers the run without its tasks
        )
        created = await rpc(self.ledger.CreateRun(create))
        run = basic_view(created.run)
        if created.created:
            await self.jobs.try_publish_run(run.run_id, run.dispatch_epoch)
        return pb.StartRunResponse(run=run, created=created.created)

    async def _resolved_plan(
        self, definition: workflow_pb2.WorkflowDefinition
    ) -> list[ledger_pb2.PlannedTask]:
        """The plan, with each WorkflowRef's version 0 pinned to the child's latest."""
        tasks = plan(definition)
        refs = {
            step.id: step.workflow_ref
            for _, step in locate_steps(definition.steps)
            if step.WhichOneof("kind") == "workflow_ref"
        }
        for task in tasks:
            ref = refs.get(task.step_id)
            if ref is not None and task.child_workflow_version == 0:
                child = await self.workflows.get(ref.workflow_name, 0)
                task.child_workflow_version = child.definition.version
        return tasks

    async def definition_of(self, run: run_pb2.WorkflowRun) -> workflow_pb2.WorkflowDefinition:
        if run.HasField("definition"):
            return run.definition
        version = await self.workflows.get(run.workflow_name, run.workflow_version)
        return version.definition

    async def get_checked(
        self,
        run_id: str,
        action: str,
        principal: auth.Principal,
        *,
        view: run_pb2.RunView.ValueType = run_pb2.RUN_VIEW_UNSPECIFIED,
    ) -> run_pb2.WorkflowRun:
        """The run, if ``principal`` may ``action`` it (NOT_FOUND / PERMISSION_DENIED)."""
        require(run_id, "run_id")
        response = await rpc(
            self.ledger.GetRun(
                ledger_pb2.GetRunRequest(run_id=run_id, view=view or run_pb2.RUN_VIEW_BASIC)
            )
        )
        access.check(await self.definition_of(response.run), action, principal)
        return response.run

    async def control(
        self,
        *,
        request_id: str,
        run_id: str,
        action: run_pb2.ControlAction.ValueType,
        reason: str,
        principal: auth.Principal,
    ) -> ledger_pb2.RequestControlResponse:
        await self.get_checked(run_id, "cancel", principal)
        return await rpc(
            self.ledger.RequestControl(
                ledger_pb2.RequestControlRequest(
                    request_id=request_id or f"control:{uuid.uuid4()}",
                    run_id=run_id,
                    action=action,
                    actor=principal_proto(principal),
                    reason=reason,
                )
            )
        )

    async def redispatch(
        self, run: run_pb2.WorkflowRun, *, request_id: str, reason: str
    ) -> int | None:
        """Record a new dispatch epoch (compare-and-set) and publish its job.

        Returns the new epoch, or None when someone else dispatched first.
        """
        try:
            dispatched = await rpc(
                self.ledger.RecordDispatch(
                    ledger_pb2.RecordDispatchRequest(
                        request_id=request_id,
                        run_id=run.run_id,
                        expected_dispatch_epoch=run.dispatch_epoch,
                        actor=scheduler_actor(),
                        reason=reason,
                    )
                )
            )
        except Aborted as exc:
            log.info("run %s: not dispatched again: %s", run.run_id, exc)
            return None
        await self.jobs.try_publish_run(run.run_id, dispatched.dispatch_epoch)
        return dispatched.dispatch_epoch


# --- the servicer -------------------------------------------------------------------


class SchedulerServicer(scheduler_service_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, *, runs: Runs, schedules: ScheduleStore, watcher: RunWatcher) -> None:
        self.runs = runs
        self.schedules = schedules
        self.watcher = watcher

    async def StartRun(self, request: pb.StartRunRequest, context: Context) -> pb.StartRunResponse:
        return await self.runs.start(request, auth.current_principal())

    async def CancelRun(
        self, request: pb.CancelRunRequest, context: Context
    ) -> pb.CancelRunResponse:
        response = await self.runs.control(
            request_id=request.request_id,
            run_id=request.run_id,
            action=C.CONTROL_ACTION_CANCEL,
            reason=request.reason,
            principal=auth.current_principal(),
        )
        return pb.CancelRunResponse(run=response.run)

    async def PauseRun(self, request: pb.PauseRunRequest, context: Context) -> pb.PauseRunResponse:
        response = await self.runs.control(
            request_id=request.request_id,
            run_id=request.run_id,
            action=C.CONTROL_ACTION_PAUSE,
            reason=request.reason,
            principal=auth.current_principal(),
        )
        return pb.PauseRunResponse(run=response.run)

    async def ResumeRun(
        self, request: pb.ResumeRunRequest, context: Context
    ) -> pb.ResumeRunResponse:
        request_id = request.request_id or f"resume:{uuid.uuid4()}"
        response = await self.runs.control(
            request_id=request_id,
            run_id=request.run_id,
            action=C.CONTROL_ACTION_RESUME,
            reason=request.reason,
            principal=auth.current_principal(),
        )
        run = response.run
        if response.applied and run.state == R.WORKFLOW_RUN_STATE_PAUSED:
            # Nobody holds a paused run: an executor continues it once dispatched.
            epoch = await self.runs.redispatch(
                run, request_id=f"resume:{request_id}", reason="resumed"
            )
            if epoch is not None:
                run.dispatch_epoch = epoch
        return pb.ResumeRunResponse(run=run)

    async def RerunFrom(
        self, request: pb.RerunFromRequest, context: Context
    ) -> pb.RerunFromResponse:
        principal = auth.current_principal()
        require(request.step_id, "step_id")
        await self.runs.get_checked(request.run_id, "start", principal)
        response = await rpc(
            self.runs.ledger.RerunFrom(
                ledger_pb2.RerunFromRequest(
                    request_id=request.request_id or f"rerun:{uuid.uuid4()}",
                    run_id=request.run_id,
                    step_id=request.step_id,
                    failed_chunks_only=request.failed_chunks_only,
                    actor=principal_proto(principal),
                    reason=request.reason,
                )
            )
        )
        run = basic_view(response.run)
        # The ledger reopened the run under a new dispatch epoch; publish its job.
        await self.runs.jobs.try_publish_run(run.run_id, run.dispatch_epoch)
        return pb.RerunFromResponse(run=run)

    async def GetRun(self, request: pb.GetRunRequest, context: Context) -> pb.GetRunResponse:
        run = await self.runs.get_checked(
            request.run_id, "read", auth.current_principal(), view=request.view
        )
        return pb.GetRunResponse(run=run)

    async def ListRuns(self, request: pb.ListRunsRequest, context: Context) -> pb.ListRunsResponse:
        principal = auth.current_principal()
        response = await rpc(
            self.runs.ledger.ListRuns(
                ledger_pb2.ListRunsRequest(
                    filter=request.filter,
                    page_size=request.page_size,
                    page_token=request.page_token,
                )
            )
        )
        readable: dict[tuple[str, int], bool] = {}
        result = pb.ListRunsResponse(next_page_token=response.next_page_token)
        for run in response.runs:
            key = (run.workflow_name, run.workflow_version)
            if key not in readable:
                readable[key] = await self._may_read(run, principal)
            if readable[key]:
                result.runs.append(run)
        return result

    async def _may_read(self, run: run_pb2.WorkflowRun, principal: auth.Principal) -> bool:
        try:
            access.check(await self.runs.definition_of(run), "read", principal)
        except NotFound:
            return principal.has_role("admin")
        except PermissionDenied:
            return False
        return True

    async def WatchRun(
        self, request: pb.WatchRunRequest, context: Context
    ) -> AsyncIterator[pb.WatchRunResponse]:
        await self.runs.get_checked(request.run_id, "read", auth.current_principal())
        if request.after_sequence < 0:
            raise InvalidArgument("after_sequence must not be negative")
        async for event in self.watcher.watch(request.run_id, request.after_sequence):
            yield pb.WatchRunResponse(event=event)

    # --- schedules -------------------------------------------------------------------

    async def CreateSchedule(
        self, request: pb.CreateScheduleRequest, context: Context
    ) -> pb.CreateScheduleResponse:
        schedule = await self.schedules.create(
            request.schedule,
            request_id=request.request_id,
            paused=request.paused,
            principal=auth.current_principal(),
        )
        return pb.CreateScheduleResponse(schedule=schedule)

    async def GetSchedule(
        self, request: pb.GetScheduleRequest, context: Context
    ) -> pb.GetScheduleResponse:
        schedule = await self.schedules.get(request.schedule_id)
        await self._check_schedule(schedule, "read")
        return pb.GetScheduleResponse(schedule=schedule)

    async def ListSchedules(
        self, request: pb.ListSchedulesRequest, context: Context
    ) -> pb.ListSchedulesResponse:
        principal = auth.current_principal()
        schedules, token = await self.schedules.list(
            workflow_name=request.workflow_name,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        result = pb.ListSchedulesResponse(next_page_token=token)
        for schedule in schedules:
            try:
                await self._check_schedule(schedule, "read", principal)
            except (NotFound, PermissionDenied):
                continue
            result.schedules.append(schedule)
        return result

    async def PauseSchedule(
        self, request: pb.PauseScheduleRequest, context: Context
    ) -> pb.PauseScheduleResponse:
        await self._check_schedule(await self.schedules.get(request.schedule_id), "start")
        schedule = await self.schedules.set_paused(request.schedule_id, paused=True)
        return pb.PauseScheduleResponse(schedule=schedule)

    async def ResumeSchedule(
        self, request: pb.ResumeScheduleRequest, context: Context
    ) -> pb.ResumeScheduleResponse:
        await self._check_schedule(await self.schedules.get(request.schedule_id), "start")
        schedule = await self.schedules.set_paused(request.schedule_id, paused=False)
        return pb.ResumeScheduleResponse(schedule=schedule)

    async def DeleteSchedule(
        self, request: pb.DeleteScheduleRequest, context: Context
    ) -> pb.DeleteScheduleResponse:
        try:
            schedule = await self.schedules.get(request.schedule_id)
        except NotFound:
            return pb.DeleteScheduleResponse()  # already deleted: a retry is a no-op
        await self._check_schedule(schedule, "start")
        await self.schedules.delete(request.schedule_id)
        return pb.DeleteScheduleResponse()

    async def _check_schedule(
        self, schedule: pb.Schedule, action: str, principal: auth.Principal | None = None
    ) -> None:
        version = await self.runs.workflows.get(schedule.workflow_name, 0)
        access.check(version.definition, action, principal or auth.current_principal())
