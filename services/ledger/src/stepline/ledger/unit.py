"""Task and chunk transitions applied as one unit of work per commit.

Executors moving tasks and chunks through their state machines are the
ledger's hot path. Rather than several statements per transition, the group
committer hands each batch of such transitions to a :class:`StepUnit`:

1. one statement reads every row the batch touches (the runs' claims, tasks,
   chunks, their attempts, the idempotency records of their request ids, chunk
   counts, the descriptions of their artifacts for the responses);
2. each transition is validated and applied to those rows in memory, in
   order, so later transitions of the batch see earlier ones; a transition
   that fails validation raises before it changes anything;
3. one statement writes every changed row, the new attempts, the events and
   the idempotency records.

The rows are read without locks: within one ledger process the committer
already applies a run's writes one batch at a time. Against another writer (a
second ledger replica) the write is guarded: it applies only where each run's
``last_sequence`` is still the one read, and otherwise aborts as a whole with
``serialization_failure`` (every change to a run appends to its event log).
A batch of N transitions costs two round trips, the write being its own
transaction, instead of several per transition. Times are the database clock read at load
plus the elapsed monotonic time, so they stay on the same clock as the rest of
the ledger's timestamps.

Idempotency: the first event a transition appends has an id derived from the
run, the method and the request id (:func:`request_event_id`), and carries the
request's fingerprint and the response, so a replay finds them through the
events' unique index on ``event_id`` and a transition writes no row of its own
for them; a transition that appends no event (e.g. ``RUNNING`` to ``RUNNING``
recording an output) keeps its record in ``requests``, as every other write
does. The request ids of these two methods are therefore scoped to their run.
"""

from __future__ import annotations

import operator
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

import asyncpg
from google.protobuf.message import Message

from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.errors import FailedPrecondition, InvalidArgument, NotFound
from stepline.common.requests import fingerprint
from stepline.ledger import convert, states
from stepline.ledger.artifacts import DESCRIPTION_COLUMNS
from stepline.ledger.checks import check_claim, earlier_response
from stepline.ledger.committer import UnitOperation
from stepline.ledger.events import EventLog, name_based_id

T = common_pb2.TaskRunState
E = run_pb2.RunEventType
Row = dict[str, Any]

# Enum values used on the hot path, as plain constants: attribute access through
# the protobuf enum wrappers is slow.
PENDING = T.TASK_RUN_STATE_PENDING
RUNNING = T.TASK_RUN_STATE_RUNNING
SUCCEEDED = T.TASK_RUN_STATE_SUCCEEDED
ATTEMPT_RECORDED = E.RUN_EVENT_TYPE_ATTEMPT_RECORDED
TASK_STATE_CHANGED = E.RUN_EVENT_TYPE_TASK_STATE_CHANGED
CHUNK_STATE_CHANGED = E.RUN_EVENT_TYPE_CHUNK_STATE_CHANGED
CHUNKED_STEP = workflow_pb2.STEP_KIND_CHUNKED

# Column order of the tables written as composite rows (checked by a test).
ATTEMPT_COLUMNS = (
    "owner_id",
    "run_id",
    "task_id",
    "chunk_id",
    "attempt_number",
    "state",
    "start_time",
    "end_time",
    "failure",
    "reason",
    "executor_id",
    "claim_epoch",
    "device_serial",
    "device_lease_id",
)
_attempt_row = operator.itemgetter(*ATTEMPT_COLUMNS)  # an attempt as a composite row


# Namespace of the ids of the events that carry an idempotency record.
_REQUEST_EVENTS = uuid.UUID("6f1f4f0e-8f55-4d2b-9a53-3c1b8f0b5d21")


def request_event_id(run_id: str, method: str, request_id: str) -> str:
    """The id of the first event appended by request ``request_id`` of ``method``
    to run ``run_id``: replays of the request find its record under it."""
    return name_based_id(_REQUEST_EVENTS, f"{run_id}\n{method}\n{request_id}")


# Control actions a step does not start under (``unless_control_pending``).
_HOLDING = frozenset({run_pb2.CONTROL_ACTION_PAUSE, run_pb2.CONTROL_ACTION_CANCEL})


class StepUnit:
    """The rows one batch of step transitions reads and writes."""

    def __init__(self, record: asyncpg.Record) -> None:
        self._db_now: datetime = record["now"]
        self._mono = time.monotonic()
        self.runs: dict[str, Row] = {r["run_id"]: dict(r) for r in record["runs"] or ()}
        self.tasks: dict[str, Row] = {t["task_id"]: dict(t) for t in record["tasks"] or ()}
        self.chunks: dict[str, Row] = {c["chunk_id"]: dict(c) for c in record.get("chunks") or ()}
        self.attempts: dict[str, list[Row]] = {}
        for a in record["attempts"] or ():
            self.attempts.setdefault(a["owner_id"], []).append(dict(a))
        # Idempotency records: on the first event of the transitions that appended
        # events (by that event's id), in ``requests`` for the others.
        self.recorded: dict[str, tuple[str, bytes]] = {
            str(e[0]): (e[1], e[2]) for e in record["recorded"] or ()
        }
        self.replays: dict[tuple[str, str], tuple[str, bytes]] = {
            (q["method"], q["request_id"]): (q["fingerprint"], q["response"])
            for q in record["replays"] or ()
        }
        # Descriptions of the artifacts of the tasks and chunks, for responses.
        self.artifacts: dict[str, list[Row]] = {}
        for f in record["artifacts"] or ():
            self.artifacts.setdefault(f["owner_id"], []).append(f)
        self.counts: dict[str, Counter[int]] = {}
        self.complete: dict[str, bool] = {}
        self.add_counts(record.get("counts"))
        self._read_sequence = {run_id: r["last_sequence"] for run_id, r in self.runs.items()}
        self._dirty_runs: set[str] = set()
        self._dirty_tasks: set[str] = set()
        self._dirty_chunks: set[str] = set()
        self._dirty_attempts: set[tuple[str, int]] = set()
        self._logs: list[EventLog] = []
        self._requests: list[tuple[str, str, str, bytes]] = []

    # --- loading and writing -------------------------------------------------------

    def add_counts(self, rows: list[Row] | None) -> None:
        """Chunk counts by task and state (rows of task_id, state, n, complete)."""
        for c in rows or ():
            self.counts.setdefault(c["task_id"], Counter())[c["state"]] += c["n"]
            self.complete[c["task_id"]] = c["complete"]

    @classmethod
    async def load(cls, conn: asyncpg.Connection, ops: Sequence[UnitOperation[Any]]) -> StepUnit:
        """Read what ``ops`` need: one statement (two if the batch has no chunk
        transitions but transitions a chunked step, for its chunk counts)."""
        run_ids: set[str] = set()
        task_ids: set[str] = set()
        chunk_ids: set[str] = set()
        methods: list[str] = []
        request_ids: list[str] = []
        event_ids: list[str] = []
        for op in ops:
            assert isinstance(op, _StepTransition)
            run_ids.add(op.run_id)
            (chunk_ids if op.table == "chunks" else task_ids).add(op.owner_id)
            methods.append(op.method)
            request_ids.append(op.request.request_id)
            event_ids.append(op.event_id)
        if chunk_ids:
            return cls(
                await conn.fetchrow(
                    _LOAD_SQL,
                    sorted(run_ids),
                    sorted(task_ids),
                    sorted(chunk_ids),
                    methods,
                    request_ids,
                    event_ids,
                )
            )
        unit = cls(
            await conn.fetchrow(
                _LOAD_TASKS_SQL, sorted(run_ids), sorted(task_ids), methods, request_ids, event_ids
            )
        )
        chunked = [t for t, row in unit.tasks.items() if row["kind"] == CHUNKED_STEP]
        if chunked:
            unit.add_counts(await conn.fetchval(_COUNTS_SQL, chunked))
        return unit

    async def flush(self, conn: asyncpg.Connection) -> None:
        if not self._dirty_runs:
            return
        events: list[tuple[Any, ...]] = []
        for log in self._logs:
            events.extend(log.event_rows())
        runs = [self.runs[run_id] for run_id in sorted(self._dirty_runs)]
        await conn.execute(
            _FLUSH_SQL,
            [r["run_id"] for r in runs],
            [r["last_sequence"] for r in runs],
            [r["update_time"] for r in runs],
            [tuple(self.tasks[k].values()) for k in sorted(self._dirty_tasks)],
            [tuple(self.chunks[k].values()) for k in sorted(self._dirty_chunks)],
            [
                _attempt_row(a)
                for owner, number in sorted(self._dirty_attempts)
                for a in self.attempts[owner]
                if a["attempt_number"] == number
            ],
            events,
            [q[0] for q in self._requests],
            [q[1] for q in self._requests],
            [q[2] for q in self._requests],
            [q[3] for q in self._requests],
            [self._read_sequence[r["run_id"]] for r in runs],
        )

    # --- in-memory view ------------------------------------------------------------

    def now(self) -> datetime:
        return self._db_now + timedelta(seconds=time.monotonic() - self._mono)

    def run(self, run_id: str) -> Row:
        run = self.runs.get(run_id)
        if run is None:
            raise NotFound(f"run {run_id!r} does not exist")
        return run

    def replayed(self, op: _StepTransition) -> Any:
        """The stored response of an earlier identical request; ABORTED if it differed."""
        request = op.request
        stored = self.recorded.get(op.event_id) or self.replays.get((op.method, request.request_id))
        if stored is None:
            return None
        return earlier_response(request, stored[0], stored[1], op.response_type)

    def chunk_counts(self, task_id: str) -> run_pb2.ChunkCounts:
        rows = [{"state": s, "n": n} for s, n in self.counts.get(task_id, Counter()).items()]
        return convert.chunk_counts(rows, complete=self.complete.get(task_id, False))

    def commit(
        self, log: EventLog, op: _StepTransition, response: Message, *, now: datetime
    ) -> None:
        """Record an applied transition: its events, the run's sequence, its response
        (on its first event if it appended any, else in ``requests``)."""
        run = self.runs[log.run_id]
        if log.last_sequence > run["last_sequence"]:
            run["last_sequence"] = log.last_sequence
            run["update_time"] = now
        self._dirty_runs.add(log.run_id)  # written back under the guard, changed or not
        self._logs.append(log)
        body = response.SerializeToString()
        fp = fingerprint(op.request)
        if log.rows:
            log.record_request(fp, body)
            self.recorded[op.event_id] = (fp, body)
        else:
            request_id: str = op.request.request_id
            self.replays[(op.method, request_id)] = (fp, body)
            self._requests.append((op.method, request_id, fp, body))

    # --- the step state machine ----------------------------------------------------

    def apply_step_change(
        self,
        log: EventLog,
        *,
        owner: Row,
        chunk_id: str | None,
        state: int,
        attempt: pb.AttemptUpdate | None,
        output: Any,
        failure: common_pb2.Failure | None,
        actor: common_pb2.Principal,
        executor_id: str,
        epoch: int,
        extra: dict[str, Any],
        now: datetime,
    ) -> int:
        """Validate, then apply (at ``now``), a task or chunk transition and the attempt
        it starts or ends; returns the event sequence. Raises before changing anything."""
        owner_id = chunk_id or owner["task_id"]
        attempts = self.attempts.setdefault(owner_id, [])
        plan = plan_step_change(
            owner["state"],
            attempts[-1] if attempts else None,
            state=state,
            attempt=attempt,
            failure=failure,
            what=f"{'chunk' if chunk_id else 'task'} {owner_id}",
        )
        # Validated: from here on nothing raises.
        current = owner["state"]
        task_id = owner["task_id"]
        if plan.end_state:
            last = attempts[-1]
            last.update(
                state=plan.end_state,
                end_time=now,
                failure=plan.attempt_failure if plan.end_state != SUCCEEDED else None,
            )
            self._dirty_attempts.add((owner_id, last["attempt_number"]))
            log.add(
                ATTEMPT_RECORDED,
                actor,
                task_id=task_id,
                chunk_id=chunk_id or "",
                payload={
                    "attempt_number": last["attempt_number"],
                    "state": states.task_state_name(plan.end_state),
                    "failure": last["failure"],
                },
            )
        if plan.start_number:
            attempts.append(
                {
                    "owner_id": owner_id,
                    "run_id": log.run_id,
                    "task_id": task_id,
                    "chunk_id": chunk_id,
                    "attempt_number": plan.start_number,
                    "state": RUNNING,
                    "start_time": now,
                    "end_time": None,
                    "failure": None,
                    "reason": plan.reason,
                    "executor_id": executor_id,
                    "claim_epoch": epoch,
                    "device_serial": attempt.device_serial if attempt is not None else "",
                    "device_lease_id": attempt.device_lease_id if attempt is not None else "",
                }
            )
            self._dirty_attempts.add((owner_id, plan.start_number))
            log.add(
                ATTEMPT_RECORDED,
                actor,
                task_id=task_id,
                chunk_id=chunk_id or "",
                payload={
                    "attempt_number": plan.start_number,
                    "state": "RUNNING",
                    "reason": plan.reason,
                },
            )
        failure_json = failure_dict(failure)
        owner["state"] = state
        if state == RUNNING and owner["start_time"] is None:
            owner["start_time"] = now
        if state in states.TASK_TERMINAL:
            owner["end_time"] = now
        if output is not None:
            owner["output"] = convert.to_dict(output)
        if failure_json is not None:
            owner["failure"] = failure_json
        for column, value in extra.items():
            if value is not None:
                owner[column] = value
        if chunk_id:
            self._dirty_chunks.add(chunk_id)
            counts = self.counts.get(task_id)
            if counts is not None and state != current:
                counts[current] -= 1
                counts[state] += 1
        else:
            self._dirty_tasks.add(task_id)
        if state == current:
            return log.last_sequence
        number = plan.start_number or (attempts[-1]["attempt_number"] if attempts else 0)
        typed: tuple[str, Message]
        if chunk_id:
            typed = (
                "chunk_state_changed",
                events_pb2.ChunkStateChanged(
                    task_id=task_id,
                    chunk_id=chunk_id,
                    index=owner["index"],
                    from_state=current,
                    to_state=state,  # type: ignore[arg-type]
                    attempt_number=number,
                    failure=failure,
                ),
            )
        else:
            typed = (
                "task_state_changed",
                events_pb2.TaskStateChanged(
                    task_id=task_id,
                    step_id=owner["step_id"],
                    from_state=current,
                    to_state=state,  # type: ignore[arg-type]
                    attempt_number=number,
                    failure=failure,
                ),
            )
        return log.add(
            CHUNK_STATE_CHANGED if chunk_id else TASK_STATE_CHANGED,
            actor,
            task_id=task_id,
            chunk_id=chunk_id or "",
            payload={
                "from_state": states.task_state_name(current),
                "to_state": states.task_state_name(state),
                "attempt_number": number,
                "failure": failure_json,
            },
            typed=typed,
        )


def failure_dict(failure: common_pb2.Failure | None) -> dict[str, Any] | None:
    if failure is None or failure.reason == common_pb2.FAILURE_REASON_UNSPECIFIED:
        return None
    return convert.to_dict(failure)


@dataclass(frozen=True)
class StepPlan:
    """What a valid task or chunk transition does to its attempts."""

    start_number: int = 0  # the attempt it starts (0: none)
    end_state: int = 0  # the state the open attempt ends in (0: it stays open)
    reason: str = ""  # why the new attempt starts
    attempt_failure: dict[str, Any] | None = None


def plan_step_change(
    current: int,
    last_attempt: Row | None,
    *,
    state: int,
    attempt: pb.AttemptUpdate | None,
    failure: common_pb2.Failure | None,
    what: str,
) -> StepPlan:
    """Validate a transition from ``current`` to ``state`` (FAILED_PRECONDITION when
    the state machine or the attempt numbering forbids it) and say what it does to
    the attempts: explicit when ``attempt`` is given, otherwise implied."""
    if not states.task_transition_allowed(current, state):
        raise FailedPrecondition(
            f"{what} cannot go from {states.task_state_name(current)} "
            f"to {states.task_state_name(state)}"
        )
    last_number = last_attempt["attempt_number"] if last_attempt else 0
    open_attempt = last_attempt is not None and last_attempt["end_time"] is None
    start_number = 0
    end_state = 0
    reason = ""
    if attempt is not None and attempt.attempt_number:
        if attempt.state == RUNNING:
            if open_attempt:
                raise FailedPrecondition(f"attempt {last_number} of {what} is still open")
            if attempt.attempt_number != last_number + 1:
                raise FailedPrecondition(
                    f"the next attempt of {what} is {last_number + 1}, not {attempt.attempt_number}"
                )
            start_number, reason = attempt.attempt_number, attempt.reason or "retry"
        elif attempt.state in states.ATTEMPT_END:
            if not open_attempt or attempt.attempt_number != last_number:
                raise FailedPrecondition(
                    f"attempt {attempt.attempt_number} of {what} is not the open attempt"
                )
            end_state = attempt.state
        else:
            raise InvalidArgument("attempt.state must be RUNNING or a terminal state")
    elif current == PENDING and state == RUNNING:
        start_number, reason = last_number + 1, "initial"
    elif state in states.ATTEMPT_END and open_attempt:
        end_state = state
    if state == RUNNING and current == PENDING and not start_number:
        raise FailedPrecondition(f"{what} starts RUNNING with a new attempt")
    attempt_failure = failure_dict(
        attempt.failure if attempt is not None and attempt.HasField("failure") else failure
    )
    return StepPlan(start_number, end_state, reason, attempt_failure)


# --- the operations ------------------------------------------------------------------


class _StepTransition(UnitOperation[Any]):
    """A task or chunk transition; subclasses say which rows, claim and response."""

    unit_type: ClassVar[type[StepUnit]] = StepUnit
    table: ClassVar[str]
    response_type: ClassVar[type[Message]]

    def __init__(self, request: Any) -> None:
        self.request = request
        self.run_id: str = request.run_id
        self.owner_id: str = request.chunk_id if self.table == "chunks" else request.task_id
        self.method: str = request.DESCRIPTOR.name
        self.event_id = request_event_id(self.run_id, self.method, request.request_id)

    def apply(self, unit: Any) -> Any:
        assert isinstance(unit, StepUnit)
        request = self.request
        run = unit.run(request.run_id)
        earlier = unit.replayed(self)
        if earlier is not None:
            return earlier
        now = unit.now()
        owner, executor = self.locate(unit, run, now)
        if run["state"] in states.RUN_TERMINAL:
            raise FailedPrecondition(
                f"run {request.run_id} is {states.run_state_name(run['state'])}"
            )
        if run["pending_control"] in _HOLDING and getattr(request, "unless_control_pending", False):
            # Not started: the response shows the task as it is and the action.
            return self.response(unit, owner, run["last_sequence"])
        log = EventLog(request.run_id, run["last_sequence"], self.event_id)
        sequence = unit.apply_step_change(
            log,
            owner=owner,
            chunk_id=request.chunk_id if self.table == "chunks" else None,
            state=request.state,
            attempt=request.attempt if request.HasField("attempt") else None,
            output=request.output if request.HasField("output") else None,
            failure=request.failure if request.HasField("failure") else None,
            actor=request.actor,
            executor_id=executor,
            epoch=request.epoch,
            extra=self.extra(),
            now=now,
        )
        response = self.response(unit, owner, sequence)
        unit.commit(log, self, response, now=now)
        return response

    def locate(self, unit: StepUnit, run: Row, now: datetime) -> tuple[Row, str]:
        """The task or chunk (NOT_FOUND if not the run's) after the fencing check;
        returns it and the executor its claim names."""
        raise NotImplementedError

    def extra(self) -> dict[str, Any]:
        return {}

    def response(self, unit: StepUnit, owner: Row, sequence: int) -> Message:
        raise NotImplementedError


class TaskTransition(_StepTransition):
    """``TransitionTask``, applied in a :class:`StepUnit`."""

    table = "tasks"
    response_type = pb.TransitionTaskResponse

    def locate(self, unit: StepUnit, run: Row, now: datetime) -> tuple[Row, str]:
        request: pb.TransitionTaskRequest = self.request
        check_claim(run, request.epoch, what=f"run {request.run_id}", now=now)
        task = unit.tasks.get(request.task_id)
        if task is None or task["run_id"] != request.run_id:
            raise NotFound(f"task {request.task_id!r} is not part of run {request.run_id}")
        return task, run["claim_executor"] or ""

    def extra(self) -> dict[str, Any]:
        return {
            "child_run_id": self.request.child_run_id or None,
            "approval_id": self.request.approval_id or None,
        }

    def response(self, unit: StepUnit, owner: Row, sequence: int) -> Message:
        counts = None
        if owner["kind"] == CHUNKED_STEP:
            counts = unit.chunk_counts(owner["task_id"])
        return pb.TransitionTaskResponse(
            task=convert.task(
                owner,
                unit.attempts.get(owner["task_id"], []),
                counts,
                unit.artifacts.get(owner["task_id"], []),
            ),
            event_sequence=sequence,
            pending_control=unit.runs[owner["run_id"]]["pending_control"],
        )


class ChunkTransition(_StepTransition):
    """``TransitionChunk``, applied in a :class:`StepUnit`: under the run's claim
    (``use_run_claim``) or the chunk's own."""

    table = "chunks"
    response_type = pb.TransitionChunkResponse

    def locate(self, unit: StepUnit, run: Row, now: datetime) -> tuple[Row, str]:
        request: pb.TransitionChunkRequest = self.request
        chunk = unit.chunks.get(request.chunk_id)
        if chunk is None or chunk["run_id"] != request.run_id:
            raise NotFound(f"chunk {request.chunk_id!r} is not part of run {request.run_id}")
        holder, what = (
            (run, f"run {request.run_id}")
            if request.use_run_claim
            else (chunk, f"chunk {request.chunk_id}")
        )
        check_claim(holder, request.epoch, what=what, now=now)
        return chunk, holder["claim_executor"] or ""

    def response(self, unit: StepUnit, owner: Row, sequence: int) -> Message:
        return pb.TransitionChunkResponse(
            chunk=convert.chunk(
                owner,
                unit.attempts.get(owner["chunk_id"], []),
                unit.artifacts.get(owner["chunk_id"], []),
            ),
            counts=unit.chunk_counts(owner["task_id"]),
            event_sequence=sequence,
        )


# The rows a batch reads, by parts: $1 run ids, $2 task ids, $3 chunk ids, $4 and
# $5 methods and request ids (records in ``requests``), $6 the ids of the events
# that would carry the records.
_NOW = "clock_timestamp() AS now"
_RUNS = "(SELECT array_agg(r) FROM run_claims r WHERE r.run_id = ANY($1::text[])) AS runs"
_TASKS = "(SELECT array_agg(t) FROM tasks t WHERE t.task_id = ANY($2::text[])) AS tasks"
_CHUNKS = "(SELECT array_agg(c) FROM chunks c WHERE c.chunk_id = ANY($3::text[])) AS chunks"
_ATTEMPTS = """(SELECT array_agg(a ORDER BY a.owner_id, a.attempt_number) FROM attempts a
        WHERE a.owner_id = ANY({owners})) AS attempts"""
_ARTIFACTS = f"""(SELECT json_agg(f ORDER BY f.create_time, f.artifact_id) FROM (
        SELECT {DESCRIPTION_COLUMNS} FROM artifacts
        WHERE owner_id = ANY({{owners}})) f) AS artifacts"""
_REPLAYS = """(SELECT array_agg(q) FROM requests q
        JOIN unnest(${methods}::text[], ${request_ids}::text[]) AS k(method, request_id)
        ON q.method = k.method AND q.request_id = k.request_id) AS replays"""
_RECORDED = """(SELECT array_agg(ROW(e.event_id, e.request_fingerprint, e.response)) FROM events e
        WHERE e.event_id = ANY(${event_ids}::uuid[]) AND e.response IS NOT NULL) AS recorded"""
_COUNTS = """(SELECT json_agg(x) FROM (
        SELECT ch.task_id, ch.state, count(*) AS n, tk.chunks_complete AS complete
        FROM chunks ch JOIN tasks tk ON tk.task_id = ch.task_id
        WHERE ch.task_id IN (
            SELECT task_id FROM chunks WHERE chunk_id = ANY($3::text[])
            UNION SELECT task_id FROM tasks WHERE task_id = ANY($2::text[]) AND kind = 3)
        GROUP BY ch.task_id, ch.state, tk.chunks_complete) x) AS counts"""
_OWNERS = "$2::text[] || $3::text[]"
_LOAD_SQL = "SELECT " + ",\n    ".join(
    (
        _NOW,
        _RUNS,
        _TASKS,
        _CHUNKS,
        _ATTEMPTS.format(owners=_OWNERS),
        _ARTIFACTS.format(owners=_OWNERS),
        _REPLAYS.format(methods=4, request_ids=5),
        _RECORDED.format(event_ids=6),
        _COUNTS,
    )
)
# A batch of task transitions only (the usual case): no chunk, fewer parts to run.
# Its parameters are $1 run ids, $2 task ids, $3 methods, $4 request ids, $5 event ids.
_LOAD_TASKS_SQL = "SELECT " + ",\n    ".join(
    (
        _NOW,
        _RUNS,
        _TASKS,
        _ATTEMPTS.format(owners="$2::text[]"),
        _ARTIFACTS.format(owners="$2::text[]"),
        _REPLAYS.format(methods=3, request_ids=4),
        _RECORDED.format(event_ids=5),
    )
)
# Chunk counts of chunked steps ($1 task ids) that a batch of task transitions moves.
_COUNTS_SQL = """
SELECT json_agg(x) FROM (
    SELECT ch.task_id, ch.state, count(*) AS n, tk.chunks_complete AS complete
    FROM chunks ch JOIN tasks tk ON tk.task_id = ch.task_id
    WHERE ch.task_id = ANY($1::text[])
    GROUP BY ch.task_id, ch.state, tk.chunks_complete) x
"""

_FLUSH_SQL = """
WITH up_runs AS (
    UPDATE runs r SET last_sequence = x.last_sequence, update_time = x.update_time
    FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $12::bigint[])
        AS x(run_id, last_sequence, update_time, read_sequence)
    WHERE r.run_id = x.run_id AND r.last_sequence = x.read_sequence
    RETURNING 1
), up_tasks AS (
    UPDATE tasks t SET state = x.state, start_time = x.start_time, end_time = x.end_time,
        output = x.output, failure = x.failure, child_run_id = x.child_run_id,
        approval_id = x.approval_id
    FROM unnest($4::tasks[]) AS x WHERE t.task_id = x.task_id
), up_chunks AS (
    UPDATE chunks c SET state = x.state, start_time = x.start_time, end_time = x.end_time,
        output = x.output, failure = x.failure
    FROM unnest($5::chunks[]) AS x WHERE c.chunk_id = x.chunk_id
), up_attempts AS (
    INSERT INTO attempts SELECT * FROM unnest($6::attempts[])
    ON CONFLICT (owner_id, attempt_number) DO UPDATE SET state = excluded.state,
        end_time = excluded.end_time, failure = excluded.failure
), new_events AS (
    INSERT INTO events (run_id, sequence, event_id, type, actor_id, actor_roles, time,
                        task_id, chunk_id, payload, envelope, request_fingerprint, response)
    SELECT run_id, sequence, event_id, type, actor_id, actor_roles, time,
           task_id, chunk_id, payload, envelope, request_fingerprint, response
    FROM unnest($7::events[])
), new_requests AS (
    INSERT INTO requests (method, request_id, fingerprint, response)
    SELECT * FROM unnest($8::text[], $9::text[], $10::text[], $11::bytea[])
)
SELECT ledger_expect_rows((SELECT count(*) FROM up_runs), cardinality($1::text[]), 'runs')
"""
