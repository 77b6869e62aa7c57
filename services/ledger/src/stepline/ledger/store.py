"""The ledger's writes: pre-flight commit, claims, transitions, control.

Every write is an operation run by the :class:`GroupCommitter` inside a shared
transaction. An operation first replays an earlier response for its request id
if there is one, then locks and reads what it changes, validates (raising
before it writes anything), and only then writes the change, its events and
its idempotency record. Task and chunk transitions, the hot path, are applied
in memory by a :class:`~stepline.ledger.unit.StepUnit` per batch instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar

import asyncpg
from google.protobuf.message import Message

from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SteplineError,
    status_number,
)
from stepline.common.requests import fingerprint
from stepline.ledger import artifacts, convert, states
from stepline.ledger.checks import (
    APPROVAL_STATES,
    DECISION_CHANNELS,
    DECISION_OUTCOMES,
    artifact_content,
    artifact_name,
    check_claim,
    check_current_attempt,
    check_size,
    content_type,
    earlier_response,
    lease_seconds,
    one_of,
    principal,
    require,
    require_failure,
    text,
    validate_step_change,
)
from stepline.ledger.committer import GroupCommitter, in_transaction
from stepline.ledger.events import EventLog, insert_events
from stepline.ledger.unit import (
    ChunkTransition,
    StepMemory,
    StepUnit,
    TaskTransition,
    failure_dict,
    start_first_task,
)

R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState
E = run_pb2.RunEventType
C = run_pb2.ControlAction
M = TypeVar("M", bound=Message)
# Most items one ApplyTransitions call may carry.
MAX_TRANSITIONS_PER_CALL = 1000

# --- reads inside write transactions ---------------------------------------------


async def lock_run_replaying(
    conn: asyncpg.Connection, request: Message, response_type: type[M]
) -> tuple[asyncpg.Record, M | None]:
    """Lock the request's run and look up an earlier response to the same request,
    in one round trip. Returns the run and the earlier response (or None)."""
    run_id: str = request.run_id  # type: ignore[attr-defined]
    request_id: str = request.request_id  # type: ignore[attr-defined]
    row = await conn.fetchrow(
        "SELECT r.*, clock_timestamp() AS now, q.fingerprint AS replay_fingerprint,"
        " q.response AS replay_response FROM runs r"
        " LEFT JOIN requests q ON q.method = $2 AND q.request_id = $3"
        " WHERE r.run_id = $1 FOR UPDATE OF r",
        run_id,
        request.DESCRIPTOR.name,
        request_id,
    )
    if row is None:
        raise NotFound(f"run {run_id!r} does not exist")
    if row["replay_response"] is None:
        return row, None
    return row, earlier_response(
        request, row["replay_fingerprint"], row["replay_response"], response_type
    )


async def replayed(conn: asyncpg.Connection, request: Message, response_type: type[M]) -> M | None:
    """The stored response of an earlier identical request; ABORTED if it differed."""
    method = request.DESCRIPTOR.name
    request_id: str = request.request_id  # type: ignore[attr-defined]
    row = await conn.fetchrow(
        "SELECT fingerprint, response FROM requests WHERE method = $1 AND request_id = $2",
        method,
        request_id,
    )
    if row is None:
        return None
    return earlier_response(request, row["fingerprint"], row["response"], response_type)


class LedgerStore:
    """Applies the ledger's write operations through the group committer."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        committer: GroupCommitter,
        *,
        default_lease_s: float = 30.0,
        max_lease_s: float = 300.0,
    ) -> None:
        self.pool = pool
        self.committer = committer
        self.default_lease_s = default_lease_s
        self.max_lease_s = max_lease_s

    # --- pre-flight commit ---------------------------------------------------------

    async def create_run(self, request: pb.CreateRunRequest) -> pb.CreateRunResponse:
        require(request.request_id, "request_id")
        definition = request.definition
        require(definition.name, "definition.name")
        if definition.version <= 0:
            raise InvalidArgument("definition.version must be set (the pinned version)")
        principal(request.initiator, "initiator")
        if not request.tasks:
            raise InvalidArgument("tasks must list every step of the resolved plan")
        check_size(request.inputs, "inputs")
        view = request.view or run_pb2.RUN_VIEW_TASKS
        if view not in run_pb2.RunView.values():
            raise InvalidArgument(f"view {view} is not a RunView")
        paths: set[str] = set()
        for index, task in enumerate(request.tasks):
            require(task.step_id, f"tasks[{index}].step_id")
            require(task.step_path, f"tasks[{index}].step_path")
            if task.step_path in paths:
                raise InvalidArgument(f"tasks[{index}].step_path {task.step_path!r} is repeated")
            if task.kind == workflow_pb2.STEP_KIND_UNSPECIFIED:
                raise InvalidArgument(f"tasks[{index}].kind is required")
            if task.kind not in workflow_pb2.StepKind.values():
                raise InvalidArgument(f"tasks[{index}].kind {task.kind} is not a StepKind")
            paths.add(task.step_path)

        run_id = str(uuid.uuid4())
        timeout = definition.run_timeout.ToTimedelta().total_seconds() or None
        tasks = [
            (
                f"{run_id}/{t.step_path}",
                t.step_id,
                t.step_path,
                ordinal,
                int(t.kind),
                t.verb,
                t.child_workflow_version,
            )
            for ordinal, t in enumerate(request.tasks)
        ]
        # What a replay finds: the run's id (it answers with the run as it is then).
        stored = pb.CreateRunResponse(run=run_pb2.WorkflowRun(run_id=run_id))

        async def operation(conn: asyncpg.Connection) -> pb.CreateRunResponse:
            log = EventLog(run_id, 0)  # its time: once the creation's turn came
            log.add(
                E.RUN_EVENT_TYPE_RUN_CREATED,
                request.initiator,
                payload={
                    "workflow_name": definition.name,
                    "workflow_version": definition.version,
                    "tasks": len(request.tasks),
                    "request_id": request.request_id,
                },
                typed=(
                    "run_state_changed",
                    events_pb2.RunStateChanged(
                        workflow_name=definition.name,
                        workflow_version=definition.version,
                        to_state=R.WORKFLOW_RUN_STATE_PENDING,
                        parent_run_id=request.parent_run_id,
                    ),
                ),
            )
            # The idempotency record, the run, its tasks, its first event and
            # their read for the response: one statement, its own transaction. A
            # request id already recorded (also by a concurrent creation, on any
            # replica: the insert waits for it to commit) inserts nothing.
            row = await conn.fetchrow(
                _CREATE_RUN_SQL,
                run_id,
                request.request_id,
                definition.name,
                definition.version,
                definition.SerializeToString(deterministic=True),
                R.WORKFLOW_RUN_STATE_PENDING,
                convert.to_dict(request.inputs),
                dict(request.labels),
                request.initiator.id,
                list(request.initiator.roles),
                request.parent_run_id or None,
                request.parent_task_id or None,
                request.schedule_id or None,
                timeout,
                *(list(column) for column in zip(*tasks, strict=True)),
                log.event_rows(),
                request.DESCRIPTOR.name,
                fingerprint(request),
                stored.SerializeToString(),
            )
            if row is not None:
                return pb.CreateRunResponse(run=run_from_row(row, view=view), created=True)
            earlier = await replayed(conn, request, pb.CreateRunResponse)
            # the insert did nothing only because the record exists (never deleted)
            assert earlier is not None
            run = await read_run(conn, earlier.run.run_id, view=view)
            return pb.CreateRunResponse(run=run, created=False)

        # A new run: nothing else of it can be queued yet, and its rows (every
        # task) would hold up a shard's batch.
        return await self.committer.apply_alone(request.request_id, operation)

    # --- claims --------------------------------------------------------------------

    async def claim_run(self, request: pb.ClaimRunRequest) -> pb.ClaimRunResponse:
        require(request.request_id, "request_id")
        require(request.run_id, "run_id")
        require(request.executor_id, "executor_id")
        seconds = lease_seconds(
            request.lease_duration.ToTimedelta().total_seconds(),
            default_s=self.default_lease_s,
            max_s=self.max_lease_s,
        )

        async def operation(
            conn: asyncpg.Connection,
        ) -> tuple[pb.ClaimRunResponse, StepUnit | None]:
            run, earlier = await lock_run_replaying(conn, request, pb.ClaimRunResponse)
            if earlier is not None:
                return earlier, None
            claimable = await _claimable(conn, run, request.chunk_id)
            target, what = claimable.row, claimable.what
            if request.chunk_id and target["state"] in states.TASK_TERMINAL:
                raise FailedPrecondition(f"{what} is {states.task_state_name(target['state'])}")
            if run["state"] in states.RUN_TERMINAL:
                raise FailedPrecondition(
                    f"run {request.run_id} is {states.run_state_name(run['state'])}"
                )
            if request.dispatch_epoch and request.dispatch_epoch < target["dispatch_epoch"]:
                raise FailedPrecondition(
                    f"stale job for {what}: dispatch epoch {request.dispatch_epoch}, "
                    f"current {target['dispatch_epoch']}"
                )
            live = target["claim_executor"] is not None and target["claim_expire"] > run["now"]
            if live and target["claim_executor"] != request.executor_id:
                raise FailedPrecondition(
                    f"{what} is claimed by {target['claim_executor']} "
                    f"until {target['claim_expire'].isoformat()}"
                )
            new = _NewClaim(
                request.executor_id,
                target["claim_epoch"] + 1,
                run["now"],
                run["now"] + timedelta(seconds=seconds),
            )
            log = EventLog(request.run_id, run["last_sequence"])
            holder = common_pb2.Principal(id=request.executor_id)
            log.add(
                E.RUN_EVENT_TYPE_CLAIMED,
                holder,
                chunk_id=request.chunk_id,
                payload={"epoch": new.epoch, "expire_time": new.expire.isoformat()},
            )
            full = run_pb2.RUN_VIEW_FULL
            first: StepUnit | None = None
            if request.chunk_id:
                await conn.execute(
                    f"UPDATE chunks SET {_SET_CLAIM} WHERE chunk_id = $1", request.chunk_id, *new
                )
                response = pb.ClaimRunResponse(run=await read_run(conn, request.run_id, view=full))
            elif (
                request.start
                and run["state"] == R.WORKFLOW_RUN_STATE_PENDING
                and not run["pending_control"]
            ):
                # The claim, the run's start and its read: one statement.
                _, row = await _apply_run_state(
                    conn,
                    run,
                    log,
                    R.WORKFLOW_RUN_STATE_RUNNING,
                    actor=holder,
                    failure=None,
                    outputs=None,
                    reason="claimed",
                    claim=new,
                    with_tasks=True,
                )
                response = pb.ClaimRunResponse(run=run_from_row(row, view=full))
                started = (
                    start_first_task(
                        row, log, request_id=f"{request.request_id}/first-task", actor=holder
                    )
                    if request.start_first_task
                    else None
                )
                if started is not None:
                    first, task = started
                    response.run.tasks[0].CopyFrom(task.task)
                    response.first_task_started = True
            else:
                row = await conn.fetchrow(_CLAIM_RUN_SQL, request.run_id, *new)
                response = pb.ClaimRunResponse(run=run_from_row(row, view=full))
            if request.chunk_id:
                response.chunk.CopyFrom(await read_chunk(conn, request.chunk_id))
                response.claim.CopyFrom(response.chunk.claim)
            else:
                response.claim.CopyFrom(response.run.claim)
            if first is None:
                await log.flush(conn, request=request, response=response)
            else:
                # One statement writes the claim's events, the task's start and the
                # record. Without EventLog's append-order check: the run's row is
                # locked since the claim's first statement, which also took its
                # transaction id, so no newer transaction has appended to the run.
                first.record(request, response)
                await first.flush(conn)
            return response, first

        if request.chunk_id:  # an executor's claims of one run's chunks share batches
            return (await self.committer.submit(request.run_id, operation))[0]
        response, first = await self.committer.apply_alone(
            request.run_id, in_transaction(operation)
        )
        if first is not None:
            # The run's next transitions (its holder's) find its rows in their shard.
            memory = self.committer.memory(request.run_id, StepUnit)
            assert isinstance(memory, StepMemory)
            first.remember(memory)
        return response

    async def renew_claim(self, request: pb.RenewClaimRequest) -> pb.RenewClaimResponse:
        require(request.request_id, "request_id")
        require(request.run_id, "run_id")
        require(request.executor_id, "executor_id")
        seconds = lease_seconds(
            request.lease_duration.ToTimedelta().total_seconds(),
            default_s=self.default_lease_s,
            max_s=self.max_lease_s,
        )

        async def operation(conn: asyncpg.Connection) -> pb.RenewClaimResponse:
            run, earlier = await lock_run_replaying(conn, request, pb.RenewClaimResponse)
            if earlier is not None:
                return earlier
            claimable = await _claimable(conn, run, request.chunk_id)
            target = claimable.row
            check_claim(target, request.epoch, what=claimable.what)
            if target["claim_executor"] != request.executor_id:
                raise FailedPrecondition(f"{claimable.what} is held by another executor")
            expire = run["now"] + timedelta(seconds=seconds)
            await conn.execute(
                f"UPDATE {claimable.table} SET claim_expire = $2 WHERE {claimable.column} = $1",
                claimable.key,
                expire,
            )
            response = pb.RenewClaimResponse(
                pending_control=run["pending_control"] if not request.chunk_id else 0  # type: ignore[arg-type]
            )
            response.claim.executor_id = request.executor_id
            response.claim.epoch = request.epoch
            response.claim.expire_time.FromDatetime(expire)
            if target["claim_time"] is not None:
                response.claim.claim_time.FromDatetime(target["claim_time"])
            await EventLog(request.run_id, run["last_sequence"]).flush(
                conn, request=request, response=response
            )
            return response

        return await self.committer.submit(request.run_id, operation)

    async def release_claim(self, request: pb.ReleaseClaimRequest) -> pb.ReleaseClaimResponse:
        require(request.request_id, "request_id")
        require(request.run_id, "run_id")
        require(request.executor_id, "executor_id")

        async def operation(conn: asyncpg.Connection) -> pb.ReleaseClaimResponse:
            run, earlier = await lock_run_replaying(conn, request, pb.ReleaseClaimResponse)
            if earlier is not None:
                return earlier
            claimable = await _claimable(conn, run, request.chunk_id)
            target = claimable.row
            if request.epoch != target["claim_epoch"]:
                raise FailedPrecondition(
                    f"stale epoch {request.epoch}: claimed under epoch {target['claim_epoch']}"
                )
            await conn.execute(
                # claim_expire keeps the release time: the reconciler gives a
                # released run a grace period before it dispatches it again
                f"UPDATE {claimable.table} SET claim_executor = NULL,"
                f" claim_expire = clock_timestamp() WHERE {claimable.column} = $1",
                claimable.key,
            )
            log = EventLog(request.run_id, run["last_sequence"])
            _add_released(
                log,
                request.executor_id,
                epoch=request.epoch,
                chunk_id=request.chunk_id,
                reason=request.reason,
            )
            response = pb.ReleaseClaimResponse()
            response.claim.epoch = request.epoch
            await log.flush(conn, request=request, response=response)
            return response

        return await self.committer.submit(request.run_id, operation)

    # --- transitions ---------------------------------------------------------------

    async def transition_run(self, request: pb.TransitionRunRequest) -> pb.TransitionRunResponse:
        require(request.request_id, "request_id")
        require(request.run_id, "run_id")
        principal(request.actor)
        target = request.state
        if target == R.WORKFLOW_RUN_STATE_UNSPECIFIED or target not in R.values():
            raise InvalidArgument("state must be a WorkflowRunState")
        if target in states.NEEDS_FAILURE_RUN:
            require_failure(request.failure, states.run_state_name(target))
        check_size(request.outputs, "outputs")

        async def operation(conn: asyncpg.Connection) -> pb.TransitionRunResponse:
            run, earlier = await lock_run_replaying(conn, request, pb.TransitionRunResponse)
            if earlier is not None:
                return earlier
            check_claim(run, request.epoch, what=f"run {request.run_id}")
            log = EventLog(request.run_id, run["last_sequence"])
            sequence, row = await _apply_run_state(
                conn,
                run,
                log,
                target,
                actor=request.actor,
                failure=request.failure if request.HasField("failure") else None,
                outputs=request.outputs if request.HasField("outputs") else None,
                reason=request.reason,
                release=request.release_reason if request.release_claim else None,
            )
            response = pb.TransitionRunResponse(run=convert.run(row), event_sequence=sequence)
            await log.flush(conn, request=request, response=response)
            return response

        return await self.committer.submit(request.run_id, operation)

    async def transition_task(self, request: pb.TransitionTaskRequest) -> pb.TransitionTaskResponse:
        require(request.request_id, "request_id")
        require(request.run_id, "run_id")
        require(request.task_id, "task_id")
        principal(request.actor)
        validate_step_change(request.state, request.failure, request.output, request.attempt)
        if request.unless_control_pending and request.state != T.TASK_RUN_STATE_RUNNING:
            raise InvalidArgument("unless_control_pending is only for state TASK_RUN_STATE_RUNNING")
        return await self.committer.submit(request.run_id, TaskTransition(request))

    async def transition_chunk(
        self, request: pb.TransitionChunkRequest
    ) -> pb.TransitionChunkResponse:
        require(request.request_id, "request_id")
        require(request.run_id, "run_id")
        require(request.chunk_id, "chunk_id")
        principal(request.actor)
        validate_step_change(request.state, request.failure, request.output, request.attempt)
        return await self.committer.submit(request.run_id, ChunkTransition(request))

    async def apply_transitions(
        self, request: pb.ApplyTransitionsRequest
    ) -> pb.ApplyTransitionsResponse:
        """Each item as :meth:`transition_task`, :meth:`transition_chunk` or
        :meth:`transition_run` would apply it, answered apart. The items are
        submitted in request order (a run's shard applies them in that order) and
        share commits."""
        count = len(request.transitions)
        if not 1 <= count <= MAX_TRANSITIONS_PER_CALL:
            raise InvalidArgument(
                f"transitions must hold 1 to {MAX_TRANSITIONS_PER_CALL} items, not {count}"
            )

        async def one(index: int, item: pb.StepTransition) -> pb.StepTransitionResult:
            try:
                change = item.WhichOneof("change")
                if change == "task":
                    return pb.StepTransitionResult(task=await self.transition_task(item.task))
                if change == "chunk":
                    return pb.StepTransitionResult(chunk=await self.transition_chunk(item.chunk))
                if change == "run":
                    return pb.StepTransitionResult(run=await self.transition_run(item.run))
                raise InvalidArgument("set task, chunk or run")
            except SteplineError as exc:
                error = pb.TransitionError(
                    code=status_number(exc), message=f"transitions[{index}]: {exc}"
                )
                return pb.StepTransitionResult(error=error)

        results = await asyncio.gather(
            *(one(index, item) for index, item in enumerate(request.transitions))
        )
        return pb.ApplyTransitionsResponse(results=results)

    # --- chunks, dispatch, control -------------------------------------------------

    async def create_chunks(self, request: pb.CreateChunksRequest) -> pb.CreateChunksResponse:
        require(request.request_id, "request_id")
        require(request.run_id, "run_id")
        require(request.task_id, "task_id")
        principal(request.actor)
        if request.first_index < 0:
            raise InvalidArgument("first_index must not be negative")
        for index, record in enumerate(request.records):
            check_size(record, f"records[{index}]")

        async def operation(conn: asyncpg.Connection) -> pb.CreateChunksResponse:
            run, earlier = await lock_run_replaying(conn, request, pb.CreateChunksResponse)
            if earlier is not None:
                return earlier
            check_claim(run, request.epoch, what=f"run {request.run_id}")
            task = await conn.fetchrow(
                "SELECT * FROM tasks WHERE task_id = $1 AND run_id = $2 FOR UPDATE",
                request.task_id,
                request.run_id,
            )
            if task is None:
                raise NotFound(f"task {request.task_id!r} is not part of run {request.run_id}")
            if task["kind"] != workflow_pb2.STEP_KIND_CHUNKED:
                raise FailedPrecondition(f"task {request.task_id} is not a chunked step")
            if task["state"] != T.TASK_RUN_STATE_RUNNING:
                raise FailedPrecondition(
                    f"task {request.task_id} is {states.task_state_name(task['state'])};"
                    " chunks are recorded while it is RUNNING"
                )
            if task["chunks_complete"]:
                raise FailedPrecondition(f"the chunks of task {request.task_id} are complete")
            if request.first_index != task["chunks_total"]:
                raise FailedPrecondition(
                    f"first_index {request.first_index} leaves a gap or overlap: "
                    f"{task['chunks_total']} chunks are recorded"
                )
            rows = [
                (
                    f"{request.task_id}#{request.first_index + offset}",
                    request.task_id,
                    request.run_id,
                    request.first_index + offset,
                    convert.to_dict(record),
                    T.TASK_RUN_STATE_PENDING,
                )
                for offset, record in enumerate(request.records)
            ]
            await conn.executemany(
                "INSERT INTO chunks (chunk_id, task_id, run_id, index, record, state)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                rows,
            )
            await conn.execute(
                "UPDATE tasks SET chunks_total = chunks_total + $2, chunks_complete = $3"
                " WHERE task_id = $1",
                request.task_id,
                len(rows),
                request.last_batch,
            )
            log = EventLog(request.run_id, run["last_sequence"])
            log.add(
                E.RUN_EVENT_TYPE_CHUNKS_CREATED,
                request.actor,
                task_id=request.task_id,
                payload={
                    "first_index": request.first_index,
                    "count": len(rows),
                    "last_batch": request.last_batch,
                },
            )
            chunks = await conn.fetch(
                "SELECT * FROM chunks WHERE task_id = $1 AND index >= $2 ORDER BY index",
                request.task_id,
                request.first_index,
            )
            response = pb.CreateChunksResponse(
                chunks=[convert.chunk(c, []) for c in chunks],
                counts=await read_chunk_counts(conn, request.task_id),
            )
            await log.flush(conn, request=request, response=response)
            return response

        return await self.committer.submit(request.run_id, operation)

    async def record_dispatch(self, request: pb.RecordDispatchRequest) -> pb.RecordDispatchResponse:
        require(request.request_id, "request_id")
        require(request.run_id, "run_id")
        principal(request.actor)

        async def operation(conn: asyncpg.Connection) -> pb.RecordDispatchResponse:
            run, earlier = await lock_run_replaying(conn, request, pb.RecordDispatchResponse)
            if earlier is not None:
                return earlier
            claimable = await _claimable(conn, run, request.chunk_id)
            target = claimable.row
            if run["state"] in states.RUN_TERMINAL:
                raise FailedPrecondition(
                    f"run {request.run_id} is {states.run_state_name(run['state'])}"
                )
            if request.expected_dispatch_epoch != target["dispatch_epoch"]:
                raise Aborted(
                    f"dispatch epoch of {claimable.what} is {target['dispatch_epoch']}, "
                    f"not {request.expected_dispatch_epoch}: someone else dispatched it"
                )
            epoch = target["dispatch_epoch"] + 1
            await conn.execute(
                f"UPDATE {claimable.table} SET dispatch_epoch = $2 WHERE {claimable.column} = $1",
                claimable.key,
                epoch,
            )
            log = EventLog(request.run_id, run["last_sequence"])
            log.add(
                E.RUN_EVENT_TYPE_DISPATCHED,
                request.actor,
                chunk_id=request.chunk_id,
                payload={"dispatch_epoch": epoch, "reason": request.reason},
            )
            response = pb.RecordDispatchResponse(dispatch_epoch=epoch)
            await log.flush(conn, request=request, response=response)
            return response

        return await self.committer.submit(request.run_id, operation)

    async def request_control(self, request: pb.RequestControlRequest) -> pb.RequestControlResponse:
        require(request.request_id, "request_id")
        require(request.run_id, "run_id")
        principal(request.actor)
        if request.action not in (
            C.CONTROL_ACTION_CANCEL,
            C.CONTROL_ACTION_PAUSE,
            C.CONTROL_ACTION_RESUME,
        ):
            raise InvalidArgument("action must be CANCEL, PAUSE or RESUME")

        async def operation(conn: asyncpg.Connection) -> pb.RequestControlResponse:
            run, earlier = await lock_run_replaying(conn, request, pb.RequestControlResponse)
            if earlier is not None:
                return earlier
            state = run["state"]
            if state in states.RUN_TERMINAL:
                raise FailedPrecondition(
                    f"run {request.run_id} is {states.run_state_name(state)}; it cannot be "
                    f"{C.Name(request.action).removeprefix('CONTROL_ACTION_').lower()}ed"
                )
            live = run["claim_executor"] is not None and run["claim_expire"] > run["now"]
            log = EventLog(request.run_id, run["last_sequence"])
            action_name = C.Name(request.action).removeprefix("CONTROL_ACTION_")
            log.add(
                E.RUN_EVENT_TYPE_CONTROL_REQUESTED,
                request.actor,
                payload={"action": action_name, "reason": request.reason},
                typed=(
                    "run_control",
                    events_pb2.RunControl(action=request.action, reason=request.reason),
                ),
            )
            applied = False
            pending = request.action
            # A SUSPENDED or PAUSED run waits for a person, not for its holder:
            # a cancel applies at once even if an executor still holds the claim
            # (the holder learns of it when its next renewal finds the run ended).
            waiting = state in (R.WORKFLOW_RUN_STATE_SUSPENDED, R.WORKFLOW_RUN_STATE_PAUSED)
            if request.action == C.CONTROL_ACTION_CANCEL and (not live or waiting):
                failure = common_pb2.Failure(
                    reason=common_pb2.FAILURE_REASON_CANCELLED,
                    message=request.reason or f"cancelled by {request.actor.id}",
                )
                await _apply_run_state(
                    conn,
                    run,
                    log,
                    R.WORKFLOW_RUN_STATE_CANCELLED,
                    actor=request.actor,
                    failure=failure,
                    outputs=None,
                    reason=request.reason,
                )
                applied, pending = True, C.CONTROL_ACTION_UNSPECIFIED
            elif request.action == C.CONTROL_ACTION_RESUME:
                if state != R.WORKFLOW_RUN_STATE_PAUSED and (
                    run["pending_control"] != C.CONTROL_ACTION_PAUSE
                ):
                    raise FailedPrecondition(f"run {request.run_id} is not paused")
                # A pause not yet applied is simply withdrawn; a paused run is
                # continued by the executor that claims it next.
                applied = run["pending_control"] == C.CONTROL_ACTION_PAUSE or not live
                pending = C.CONTROL_ACTION_UNSPECIFIED if applied else pending
            elif request.action == C.CONTROL_ACTION_PAUSE and state == R.WORKFLOW_RUN_STATE_PAUSED:
                applied, pending = True, C.CONTROL_ACTION_UNSPECIFIED
            await conn.execute(
                "UPDATE runs SET pending_control = $2 WHERE run_id = $1", request.run_id, pending
            )
            response = pb.RequestControlResponse(
                run=await read_run(conn, request.run_id, view=run_pb2.RUN_VIEW_BASIC),
                applied=applied,
            )
            await log.flush(conn, request=request, response=response)
            return response

        return await self.committer.submit(request.run_id, operation)

    async def rerun_from(self, request: pb.RerunFromRequest) -> pb.RerunFromResponse:
        require(request.request_id, "request_id")
        require(request.run_id, "run_id")
        require(request.step_id, "step_id")
        actor = principal(request.actor)

        async def operation(conn: asyncpg.Connection) -> pb.RerunFromResponse:
            run, earlier = await lock_run_replaying(conn, request, pb.RerunFromResponse)
            if earlier is not None:
                return earlier
            if run["state"] not in (
                R.WORKFLOW_RUN_STATE_FAILED,
                R.WORKFLOW_RUN_STATE_TIMED_OUT,
                R.WORKFLOW_RUN_STATE_CANCELLED,
            ):
                raise FailedPrecondition(
                    f"run {request.run_id} is {states.run_state_name(run['state'])}; only a "
                    "FAILED, TIMED_OUT or CANCELLED run can be rerun"
                )
            tasks = await conn.fetch(
                "SELECT * FROM tasks WHERE run_id = $1 ORDER BY ordinal FOR UPDATE",
                request.run_id,
            )
            start = next((t for t in tasks if t["step_id"] == request.step_id), None)
            if start is None:
                raise InvalidArgument(f"step_id {request.step_id!r} is not a step of this run")
            if request.failed_chunks_only and start["kind"] != workflow_pb2.STEP_KIND_CHUNKED:
                raise InvalidArgument("failed_chunks_only needs step_id to name a chunked step")
            log = EventLog(request.run_id, run["last_sequence"])
            for task in tasks:
                if task["ordinal"] < start["ordinal"]:
                    continue  # steps before the rerun point keep their outcome and output
                await conn.execute(
                    "UPDATE tasks SET state = $2, output = NULL, failure = NULL, end_time = NULL"
                    " WHERE task_id = $1",
                    task["task_id"],
                    T.TASK_RUN_STATE_PENDING,
                )
                log.add(
                    E.RUN_EVENT_TYPE_TASK_STATE_CHANGED,
                    actor,
                    task_id=task["task_id"],
                    payload={
                        "from_state": states.task_state_name(task["state"]),
                        "to_state": "PENDING",
                        "reason": "rerun",
                    },
                )
            if request.failed_chunks_only:
                await conn.execute(
                    "UPDATE chunks SET state = $2, failure = NULL, end_time = NULL,"
                    " dispatch_epoch = dispatch_epoch + 1"
                    " WHERE task_id = $1 AND state <> $3",
                    start["task_id"],
                    T.TASK_RUN_STATE_PENDING,
                    T.TASK_RUN_STATE_SUCCEEDED,
                )
            await conn.execute(
                "UPDATE runs SET state = $2, failure = NULL, outputs = NULL, end_time = NULL,"
                " rerun_count = rerun_count + 1, dispatch_epoch = dispatch_epoch + 1,"
                " pending_control = 0, claim_executor = NULL, claim_expire = clock_timestamp()"
                " WHERE run_id = $1",
                request.run_id,
                R.WORKFLOW_RUN_STATE_PENDING,
            )
            log.add(
                E.RUN_EVENT_TYPE_RUN_STATE_CHANGED,
                actor,
                payload={
                    "from_state": states.run_state_name(run["state"]),
                    "to_state": "PENDING",
                    "reason": request.reason,
                    "rerun_from_step": request.step_id,
                    "failed_chunks_only": request.failed_chunks_only,
                },
                typed=(
                    "run_state_changed",
                    events_pb2.RunStateChanged(
                        workflow_name=run["workflow_name"],
                        workflow_version=run["workflow_version"],
                        from_state=run["state"],
                        to_state=R.WORKFLOW_RUN_STATE_PENDING,
                    ),
                ),
            )
            response = pb.RerunFromResponse(
                run=await read_run(conn, request.run_id, view=run_pb2.RUN_VIEW_TASKS)
            )
            await log.flush(conn, request=request, response=response)
            return response

        return await self.committer.submit(request.run_id, operation)

    # --- artifacts and approval decisions -------------------------------------------

    async def put_artifact(self, request: pb.PutArtifactRequest) -> pb.PutArtifactResponse:
        """Store a file of the current attempt of a task or chunk, under its claim."""
        require(request.request_id, "request_id")
        require(request.run_id, "run_id")
        require(request.task_id, "task_id")
        if request.chunk_id:
            require(request.chunk_id, "chunk_id")
        principal(request.actor)
        if request.attempt_number <= 0:
            raise InvalidArgument("attempt_number must be positive: the attempt that produced it")
        name = artifact_name(request.name)
        content_type(request.content_type)
        content = artifact_content(request.content)
        digest = hashlib.sha256(content).hexdigest()
        owner_id = request.chunk_id or request.task_id
        identifier = artifacts.artifact_id(owner_id, request.attempt_number, name)

        async def operation(conn: asyncpg.Connection) -> pb.PutArtifactResponse:
            run, earlier = await lock_run_replaying(conn, request, pb.PutArtifactResponse)
            if earlier is not None:
                return earlier
            owner = await _fenced_owner(conn, run, request)
            if run["state"] in states.RUN_TERMINAL:
                raise FailedPrecondition(
                    f"run {request.run_id} is {states.run_state_name(run['state'])}"
                )
            what = f"chunk {owner_id}" if request.chunk_id else f"task {owner_id}"
            check_current_attempt(owner, request.attempt_number, what=what)
            row = await conn.fetchrow(
                "INSERT INTO artifacts (artifact_id, owner_id, run_id, task_id, chunk_id,"
                " attempt_number, name, content_type, size_bytes, sha256, content)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
                f" ON CONFLICT DO NOTHING RETURNING {artifacts.DESCRIPTION_COLUMNS}",
                identifier,
                owner_id,
                request.run_id,
                request.task_id,
                request.chunk_id or None,
                request.attempt_number,
                name,
                request.content_type,
                len(content),
                digest,
                content,
            )
            if row is None:
                raise AlreadyExists(
                    f"artifact {identifier} already exists: a name is used once per attempt"
                )
            log = EventLog(request.run_id, run["last_sequence"])
            log.add(
                E.RUN_EVENT_TYPE_ARTIFACT_RECORDED,
                request.actor,
                task_id=request.task_id,
                chunk_id=request.chunk_id,
                payload={
                    "artifact_id": identifier,
                    "attempt_number": request.attempt_number,
                    "name": name,
                    "content_type": request.content_type,
                    "size_bytes": len(content),
                    "sha256": digest,
                },
            )
            response = pb.PutArtifactResponse(artifact=convert.artifact(row))
            await log.flush(conn, request=request, response=response)
            return response

        return await self.committer.submit(request.run_id, operation)

    async def record_approval_decision(
        self, request: pb.RecordApprovalDecisionRequest
    ) -> pb.RecordApprovalDecisionResponse:
        """Append a decision on a GOVERN task's approval request to the run's history."""
        require(request.request_id, "request_id")
        require(request.run_id, "run_id")
        require(request.task_id, "task_id")
        require(request.approval_id, "approval_id")
        principal(request.actor)
        outcome = one_of(request.outcome, "outcome", DECISION_OUTCOMES)
        channel = one_of(request.channel, "channel", DECISION_CHANNELS)
        approval_state = one_of(
            request.approval_state.removeprefix("APPROVAL_STATE_"),
            "approval_state",
            APPROVAL_STATES,
        )
        reason = text(request.reason, "reason")

        async def operation(conn: asyncpg.Connection) -> pb.RecordApprovalDecisionResponse:
            run, earlier = await lock_run_replaying(
                conn, request, pb.RecordApprovalDecisionResponse
            )
            if earlier is not None:
                return earlier
            kind = await conn.fetchval(
                "SELECT kind FROM tasks WHERE task_id = $1 AND run_id = $2",
                request.task_id,
                request.run_id,
            )
            if kind is None:
                raise NotFound(f"task {request.task_id!r} is not part of run {request.run_id}")
            if kind != workflow_pb2.STEP_KIND_GOVERN:
                raise FailedPrecondition(
                    f"task {request.task_id} is not a GOVERN step (its kind is "
                    f"{_kind_name(kind)}); approval decisions belong to GOVERN steps"
                )
            log = EventLog(request.run_id, run["last_sequence"])
            log.add(
                E.RUN_EVENT_TYPE_APPROVAL_DECISION_RECORDED,
                request.actor,
                task_id=request.task_id,
                payload={
                    "approval_id": request.approval_id,
                    "outcome": outcome,
                    "reason": reason,
                    "channel": channel,
                    "approval_state": approval_state,
                },
            )
            response = pb.RecordApprovalDecisionResponse(event=log.queued()[-1])
            await log.flush(conn, request=request, response=response)
            return response

        return await self.committer.submit(request.run_id, operation)


# --- shared pieces of the operations -----------------------------------------------


# A task or chunk, locked, with its last attempt's number and whether it is open.
_LAST_ATTEMPT = (
    " LEFT JOIN LATERAL (SELECT attempt_number AS last_attempt_number,"
    " end_time IS NULL AS last_attempt_open FROM attempts"
    " WHERE owner_id = {key} ORDER BY attempt_number DESC LIMIT 1) a ON true"
)
_LOCK_CHUNK_SQL = (
    "SELECT c.*, a.* FROM chunks c"
    + _LAST_ATTEMPT.format(key="c.chunk_id")
    + " WHERE c.chunk_id = $1 AND c.run_id = $2 FOR UPDATE OF c"
)


@dataclass(frozen=True)
class _Claimable:
    """The run, or one of its chunks, that a claim or dispatch concerns."""

    row: Mapping[str, Any]  # the locked row, with the transaction's ``now``
    table: str
    column: str
    key: str

    @property
    def what(self) -> str:
        return f"{self.table[:-1]} {self.key}"


async def _claimable(conn: asyncpg.Connection, run: asyncpg.Record, chunk_id: str) -> _Claimable:
    if not chunk_id:
        return _Claimable(run, "runs", "run_id", run["run_id"])
    chunk = await _lock_chunk(conn, run["run_id"], chunk_id)
    return _Claimable({**dict(chunk), "now": run["now"]}, "chunks", "chunk_id", chunk_id)


async def _lock_chunk(conn: asyncpg.Connection, run_id: str, chunk_id: str) -> asyncpg.Record:
    row = await conn.fetchrow(_LOCK_CHUNK_SQL, chunk_id, run_id)
    if row is None:
        raise NotFound(f"chunk {chunk_id!r} is not part of run {run_id}")
    return row


_TASK_SQL = (
    "SELECT t.*, a.* FROM tasks t"
    + _LAST_ATTEMPT.format(key="t.task_id")
    + " WHERE t.task_id = $1 AND t.run_id = $2"
)


async def _fenced_owner(
    conn: asyncpg.Connection, run: asyncpg.Record, request: pb.PutArtifactRequest
) -> Mapping[str, Any]:
    """The task, or chunk, an artifact is stored for, with its last attempt, after
    the fencing check: the run's claim for a task, the chunk's own for a chunk."""
    if not request.chunk_id:
        check_claim(run, request.epoch, what=f"run {request.run_id}")
        task: asyncpg.Record | None = await conn.fetchrow(
            _TASK_SQL, request.task_id, request.run_id
        )
        if task is None:
            raise NotFound(f"task {request.task_id!r} is not part of run {request.run_id}")
        return dict(task)
    chunk = await _lock_chunk(conn, request.run_id, request.chunk_id)
    if chunk["task_id"] != request.task_id:
        raise NotFound(f"chunk {request.chunk_id!r} is not part of task {request.task_id}")
    row = {**dict(chunk), "now": run["now"]}
    check_claim(row, request.epoch, what=f"chunk {request.chunk_id}")
    return row


def _kind_name(kind: int) -> str:
    if kind not in workflow_pb2.StepKind.values():
        return str(kind)
    return workflow_pb2.StepKind.Name(kind).removeprefix("STEP_KIND_")  # type: ignore[arg-type]


async def _apply_run_state(
    conn: asyncpg.Connection,
    run: asyncpg.Record,
    log: EventLog,
    target: int,
    *,
    actor: common_pb2.Principal,
    failure: common_pb2.Failure | None,
    outputs: Any,
    reason: str,
    release: str | None = None,
    claim: _NewClaim | None = None,
    with_tasks: bool = False,
) -> tuple[int, asyncpg.Record]:
    """Move a run to ``target``; a terminal state also ends its open tasks and chunks.
    With ``release`` (its reason) the run's claim is released too, as ReleaseClaim
    does; with ``claim`` it is set (ClaimRun). Returns the state change's event
    sequence and the updated run row (with its tasks' parts, see
    :func:`run_from_row`, if ``with_tasks``), all in one statement."""
    current = run["state"]
    if not states.run_transition_allowed(current, target):
        raise FailedPrecondition(
            f"run {run['run_id']} cannot go from {states.run_state_name(current)} "
            f"to {states.run_state_name(target)}"
        )
    terminal = target in states.RUN_TERMINAL
    if terminal:
        await _end_open_steps(conn, run, log, target, actor)
    row: asyncpg.Record = await conn.fetchrow(
        _RUN_STATE_TASKS_SQL if with_tasks else _RUN_STATE_SQL,
        run["run_id"],
        target,
        terminal,
        failure_dict(failure),
        convert.to_dict(outputs) if outputs is not None else None,
        release is not None,
        *(claim or _NO_CLAIM),
    )
    sequence = log.add(
        E.RUN_EVENT_TYPE_RUN_STATE_CHANGED,
        actor,
        payload={
            "from_state": states.run_state_name(current),
            "to_state": states.run_state_name(target),
            "failure": failure_dict(failure),
            "reason": reason,
        },
        typed=(
            "run_state_changed",
            events_pb2.RunStateChanged(
                workflow_name=run["workflow_name"],
                workflow_version=run["workflow_version"],
                from_state=current,
                to_state=target,  # type: ignore[arg-type]
                failure=failure,
                parent_run_id=run["parent_run_id"] or "",
            ),
        ),
    )
    if release is not None:
        _add_released(log, actor.id, epoch=run["claim_epoch"], chunk_id="", reason=release)
    return sequence, row


class _NewClaim(NamedTuple):
    executor_id: str
    epoch: int
    time: datetime
    expire: datetime


_NO_CLAIM = (None, None, None, None)
# A new claim (a _NewClaim as $2..$5) on a run or chunk row.
_SET_CLAIM = "claim_executor = $2, claim_epoch = $3, claim_time = $4, claim_expire = $5"
_RUN_STATE_SQL = (
    "UPDATE runs r SET state = $2::smallint, update_time = clock_timestamp(),"
    " start_time = CASE WHEN $2::smallint = 2 THEN coalesce(start_time, clock_timestamp())"
    "   ELSE start_time END,"
    " end_time = CASE WHEN $3 THEN clock_timestamp() ELSE end_time END,"
    " failure = coalesce($4, CASE WHEN $2::smallint = 2 THEN NULL ELSE failure END),"
    " outputs = coalesce($5, outputs),"
    " pending_control = CASE WHEN $3 OR ($2::smallint = 4 AND pending_control = 2) THEN 0"
    "   ELSE pending_control END,"
    # a released claim keeps its release time in claim_expire (see release_claim)
    " claim_executor = CASE WHEN $6 THEN NULL ELSE coalesce($7, claim_executor) END,"
    " claim_epoch = coalesce($8, claim_epoch), claim_time = coalesce($9, claim_time),"
    " claim_expire = CASE WHEN $6 THEN clock_timestamp() ELSE coalesce($10, claim_expire) END"
    " WHERE run_id = $1 RETURNING r.*"
)


def _add_released(log: EventLog, holder: str, *, epoch: int, chunk_id: str, reason: str) -> None:
    log.add(
        E.RUN_EVENT_TYPE_CLAIM_RELEASED,
        common_pb2.Principal(id=holder),
        chunk_id=chunk_id,
        payload={"epoch": epoch, "reason": reason},
    )


async def _end_open_steps(
    conn: asyncpg.Connection,
    run: asyncpg.Record,
    log: EventLog,
    run_target: int,
    actor: common_pb2.Principal,
) -> None:
    """When a run ends: PENDING tasks and chunks are SKIPPED; RUNNING or SUSPENDED
    ones are CANCELLED (a run cannot succeed while one is still running)."""
    open_steps = await conn.fetch(
        "SELECT 'tasks' AS tbl, task_id AS id, task_id, NULL AS chunk_id, state"
        " FROM tasks WHERE run_id = $1 AND state IN (1, 2, 3)"
        " UNION ALL SELECT 'chunks', chunk_id, task_id, chunk_id, state"
        " FROM chunks WHERE run_id = $1 AND state IN (1, 2, 3)",
        run["run_id"],
    )
    running = [s for s in open_steps if s["state"] != T.TASK_RUN_STATE_PENDING]
    if running and run_target == R.WORKFLOW_RUN_STATE_SUCCEEDED:
        raise FailedPrecondition(
            f"run {run['run_id']} cannot succeed while {running[0]['id']} is "
            f"{states.task_state_name(running[0]['state'])}"
        )
    ended = common_pb2.Failure(
        reason=common_pb2.FAILURE_REASON_CANCELLED,
        message=f"the run ended {states.run_state_name(run_target)}",
    )
    for step in open_steps:
        new = (
            T.TASK_RUN_STATE_SKIPPED
            if step["state"] == T.TASK_RUN_STATE_PENDING
            else T.TASK_RUN_STATE_CANCELLED
        )
        key = "task_id" if step["tbl"] == "tasks" else "chunk_id"
        await conn.execute(
            f"UPDATE {step['tbl']} SET state = $2::smallint, end_time = clock_timestamp(),"
            " failure = CASE WHEN $2::smallint = 7 THEN $3::jsonb ELSE failure END"
            f" WHERE {key} = $1",
            step["id"],
            new,
            convert.to_dict(ended),
        )
        await conn.execute(
            "UPDATE attempts SET state = $2, end_time = clock_timestamp(), failure = $3"
            " WHERE owner_id = $1 AND end_time IS NULL",
            step["id"],
            T.TASK_RUN_STATE_CANCELLED,
            convert.to_dict(ended),
        )
        is_chunk = step["tbl"] == "chunks"
        log.add(
            E.RUN_EVENT_TYPE_CHUNK_STATE_CHANGED
            if is_chunk
            else E.RUN_EVENT_TYPE_TASK_STATE_CHANGED,
            actor,
            task_id=step["task_id"],
            chunk_id=step["chunk_id"] or "",
            payload={
                "from_state": states.task_state_name(step["state"]),
                "to_state": states.task_state_name(new),
                "reason": "run_ended",
            },
        )


# --- reads used by writes and queries ----------------------------------------------


async def read_chunk_counts(conn: asyncpg.Connection, task_id: str) -> run_pb2.ChunkCounts:
    rows = await conn.fetch(
        "SELECT state, count(*) AS n FROM chunks WHERE task_id = $1 GROUP BY state", task_id
    )
    complete = await conn.fetchval("SELECT chunks_complete FROM tasks WHERE task_id = $1", task_id)
    return convert.chunk_counts(list(rows), complete=bool(complete))


_WITH_ATTEMPTS = (
    "SELECT o.*, (SELECT coalesce(json_agg(a ORDER BY a.attempt_number), '[]')"
    " FROM attempts a WHERE a.owner_id = o.{key}) AS attempts_json"
    " FROM {table} o WHERE o.{key} = $1"
)


async def read_chunk(conn: asyncpg.Connection, chunk_id: str) -> run_pb2.ChunkRun:
    """A chunk with its attempts, in one round trip."""
    row = await conn.fetchrow(_WITH_ATTEMPTS.format(table="chunks", key="chunk_id"), chunk_id)
    if row is None:
        raise NotFound(f"chunk {chunk_id!r} does not exist")
    files = await artifacts.of_owners(conn, [chunk_id])
    return convert.chunk(row, row["attempts_json"], files.get(chunk_id, []))


# The parts of run ``r`` that the TASKS and FULL views add: its tasks, their
# attempts, chunk counts and artifact descriptions (subqueries, so that a read or
# an UPDATE ... RETURNING of the run gets them in the same statement).
_RUN_TASK_PARTS = f"""
    (SELECT array_agg(t ORDER BY t.ordinal) FROM tasks t WHERE t.run_id = r.run_id) AS read_tasks,
    (SELECT array_agg(a ORDER BY a.owner_id, a.attempt_number) FROM attempts a
        WHERE a.run_id = r.run_id AND a.chunk_id IS NULL) AS read_attempts,
    (SELECT json_agg(c) FROM (
        SELECT task_id, state, count(*) AS n FROM chunks WHERE run_id = r.run_id
        GROUP BY task_id, state) c) AS read_counts,
    (SELECT json_agg(f ORDER BY f.create_time, f.artifact_id) FROM (
        SELECT {artifacts.DESCRIPTION_COLUMNS} FROM artifacts
        WHERE run_id = r.run_id AND chunk_id IS NULL) f) AS read_artifacts"""
_READ_RUN_TASKS_SQL = f"SELECT r.*, {_RUN_TASK_PARTS} FROM runs r WHERE r.run_id = $1"
_RUN_STATE_TASKS_SQL = f"{_RUN_STATE_SQL}, {_RUN_TASK_PARTS}"
# Tasks are new: no attempts, chunks or artifacts yet.
_CREATE_RUN_SQL = f"""
WITH q AS (
    INSERT INTO requests (method, request_id, fingerprint, response)
    VALUES ($23, $2, $24, $25)
    ON CONFLICT DO NOTHING
    RETURNING 1
), r AS (
    INSERT INTO runs (run_id, request_id, workflow_name, workflow_version,
        definition, state, inputs, labels, initiator_id, initiator_roles,
        parent_run_id, parent_task_id, schedule_id, run_timeout_s, last_sequence)
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, cardinality($22::events[])
    WHERE EXISTS (SELECT FROM q)
    RETURNING *
), t AS (
    INSERT INTO tasks (task_id, run_id, step_id, step_path, ordinal, kind, verb, state,
        child_workflow_version)
    SELECT x.task_id, $1, x.step_id, x.step_path, x.ordinal, x.kind, x.verb,
        {T.TASK_RUN_STATE_PENDING}, x.child_workflow_version
    FROM unnest($15::text[], $16::text[], $17::text[], $18::int[], $19::smallint[],
        $20::text[], $21::bigint[])
        AS x(task_id, step_id, step_path, ordinal, kind, verb, child_workflow_version)
    WHERE EXISTS (SELECT FROM q)
    RETURNING *
), e AS (
    {insert_events("$22", where="EXISTS (SELECT FROM q)")}
)
SELECT r.*, (SELECT array_agg(t::tasks ORDER BY t.ordinal) FROM t) AS read_tasks,
    NULL::attempts[] AS read_attempts, NULL::json AS read_counts, NULL::json AS read_artifacts
FROM r
"""
_CLAIM_RUN_SQL = (
    f"UPDATE runs r SET {_SET_CLAIM} WHERE r.run_id = $1 RETURNING r.*, {_RUN_TASK_PARTS}"
)


async def read_run(conn: asyncpg.Connection, run_id: str, *, view: int) -> run_pb2.WorkflowRun:
    with_tasks = view in (run_pb2.RUN_VIEW_TASKS, run_pb2.RUN_VIEW_FULL)
    if with_tasks:
        row = await conn.fetchrow(_READ_RUN_TASKS_SQL, run_id)
    else:
        row = await conn.fetchrow("SELECT * FROM runs WHERE run_id = $1", run_id)
    if row is None:
        raise NotFound(f"run {run_id!r} does not exist")
    return run_from_row(row, view=view)


def run_from_row(row: Mapping[str, Any], *, view: int) -> run_pb2.WorkflowRun:
    """The run of a ``runs`` row in ``view``; for TASKS and FULL the row also has
    the parts of ``_RUN_TASK_PARTS``."""
    with_tasks = view in (run_pb2.RUN_VIEW_TASKS, run_pb2.RUN_VIEW_FULL)
    result = convert.run(row, with_definition=view == run_pb2.RUN_VIEW_FULL)
    if with_tasks:
        by_owner = convert.group_by(row["read_attempts"] or [], "owner_id")
        counts_by_task = convert.group_by(row["read_counts"] or [], "task_id")
        files = convert.group_by(row["read_artifacts"] or [], "owner_id")
        for task in row["read_tasks"] or ():
            counts = None
            if task["kind"] == workflow_pb2.STEP_KIND_CHUNKED:
                counts = convert.chunk_counts(
                    counts_by_task.get(task["task_id"], []), complete=task["chunks_complete"]
                )
            result.tasks.append(
                convert.task(
                    task,
                    by_owner.get(task["task_id"], []),
                    counts,
                    files.get(task["task_id"], []),
                )
            )
    return result
