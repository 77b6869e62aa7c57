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
applies a run's shard writes one batch at a time. Against another writer (a
second ledger replica, or a claim this ledger applied beside its shards) the
write is guarded: it applies only where each run's
``last_sequence`` is still the one read, and otherwise aborts as a whole with
``serialization_failure`` (every change to a run appends to its event log).
A batch of N transitions costs at most two round trips, the write being its
own transaction, instead of several per transition. Times are the database
clock read at load plus the elapsed monotonic time, so they stay on the same
clock as the rest of the ledger's timestamps.

Memory: a committer shard keeps, between batches, the rows of the runs its
units moved (:class:`StepMemory`: the run's claim row and a window of its
unfinished tasks, the next :data:`WINDOW` by ordinal, with their attempts and
artifact descriptions), so a batch of task transitions on remembered runs
costs one statement, its write. Every other operation on a run forgets it
(but a claim that started the run's first task, :func:`start_first_task`,
leaves there the rows it wrote), and so does a failed batch; the write's
``last_sequence`` guard refuses what another writer changed since.
Remembered rows settle only transitions that they show to be new and valid:
one that fails, or appends no event (a replay, or a change that may be one),
makes the batch run again on a fresh read. A replay that looks new appends its
first event under the id of its request, which the events' unique index
refuses: the batch then fails and is retried singly, reading afresh.

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
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

import asyncpg
from google.protobuf.message import Message

from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.errors import FailedPrecondition, InvalidArgument, NotFound, SteplineError
from stepline.common.requests import fingerprint
from stepline.ledger import convert, states
from stepline.ledger.artifacts import DESCRIPTION_COLUMNS
from stepline.ledger.checks import check_claim, earlier_response
from stepline.ledger.committer import UnitOperation
from stepline.ledger.events import EventLog, insert_events, name_based_id

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
ATOMIC_STEP = workflow_pb2.STEP_KIND_ATOMIC
# The columns of a run's row that units read (the view ``run_claims``).
RUN_CLAIM_COLUMNS = (
    "run_id",
    "state",
    "claim_executor",
    "claim_epoch",
    "claim_expire",
    "last_sequence",
    "update_time",
    "pending_control",
)

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


@dataclass
class _RunRows:
    """A remembered run: its claim row and unfinished tasks with their attempts
    and artifact descriptions (the same objects a unit applies changes to)."""

    run: Row
    tasks: dict[str, Row]
    attempts: dict[str, list[Row]]
    artifacts: dict[str, list[Row]]

    def drop(self, task_id: str) -> None:
        del self.tasks[task_id]
        self.attempts.pop(task_id, None)
        self.artifacts.pop(task_id, None)


class StepMemory:
    """The rows of the runs a committer shard's step units moved last; beyond
    ``max_tasks`` remembered tasks, the least recently used runs go first."""

    def __init__(self, max_tasks: int = 4096) -> None:
        self.max_tasks = max_tasks
        self.runs: OrderedDict[str, _RunRows] = OrderedDict()
        self.tasks = 0  # remembered when their runs were kept (an upper bound)
        self._counted: dict[str, int] = {}
        # The database clock at the last read, and the monotonic clock then.
        self.db_now: datetime | None = None
        self.mono = 0.0

    def get(self, run_id: str, task_ids: Sequence[str]) -> _RunRows | None:
        """The run's rows if they include every one of ``task_ids``."""
        rows = self.runs.get(run_id)
        if rows is None or any(t not in rows.tasks for t in task_ids):
            return None
        self.runs.move_to_end(run_id)
        return rows

    def keep(self, run_id: str, rows: _RunRows) -> None:
        self.forget(run_id)
        size = len(rows.tasks)
        if size > self.max_tasks // 4:
            return  # a batch moving that many tasks of one run reads them each time
        self.runs[run_id] = rows
        self._counted[run_id] = size
        self.tasks += size
        while self.tasks > self.max_tasks:
            self.forget(next(iter(self.runs)))

    def forget(self, key: str) -> None:
        if self.runs.pop(key, None) is not None:
            self.tasks -= self._counted.pop(key)

    def clear(self) -> None:
        self.runs.clear()
        self._counted.clear()
        self.tasks = 0


# A unit built from memory alone reads no record.
_NOTHING: dict[str, Any] = dict.fromkeys(
    ("runs", "tasks", "attempts", "recorded", "replays", "artifacts")
)


class StepUnit:
    """The rows one batch of step transitions reads and writes."""

    def __init__(
        self,
        record: asyncpg.Record | None,
        *,
        memory: StepMemory | None = None,
        remembered: dict[str, _RunRows] | None = None,
        touched: dict[str, list[str]] | None = None,
        windows: bool = False,
    ) -> None:
        self._memory = memory
        self.unsure = False
        # Runs whose rows came from memory, and whether the rows read here are
        # windows of their runs (see _LOAD_RUNS_SQL), which memory may then keep.
        self.remembered = remembered or {}
        self._touched = touched or {}
        self._windows = windows
        if record is not None:
            self._db_now: datetime = record["now"]
            self._mono = time.monotonic()
            if memory is not None:
                memory.db_now, memory.mono = self._db_now, self._mono
        else:
            assert memory is not None and memory.db_now is not None
            self._db_now, self._mono = memory.db_now, memory.mono
            record = _NOTHING
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
        self._read_tasks = list(self.tasks)
        # From memory only the tasks the batch moves (``touched``, by run).
        for run_id, rows in self.remembered.items():
            self.runs[run_id] = rows.run
            for task_id in self._touched[run_id]:
                self.tasks[task_id] = rows.tasks[task_id]
                if task_id in rows.attempts:
                    self.attempts[task_id] = rows.attempts[task_id]
                if task_id in rows.artifacts:
                    self.artifacts[task_id] = rows.artifacts[task_id]
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

    @staticmethod
    def memory() -> StepMemory:
        return StepMemory()

    @classmethod
    async def load(
        cls,
        conn: asyncpg.Connection,
        ops: Sequence[UnitOperation[Any]],
        memory: StepMemory,
        *,
        fresh: bool = False,
    ) -> StepUnit:
        """The rows ``ops`` need: from ``memory`` where it has them (unless
        ``fresh``), the rest in one statement (two if the batch transitions a
        chunked step, for its chunk counts); none if memory has everything."""
        steps = [op for op in ops if isinstance(op, _StepTransition)]
        assert len(steps) == len(ops)
        if any(op.table == "chunks" for op in steps):
            return await cls._load_chunks(conn, steps, memory)
        task_ids: dict[str, list[str]] = {}
        for op in steps:
            task_ids.setdefault(op.run_id, []).append(op.owner_id)
        remembered: dict[str, _RunRows] = {}
        if not fresh:
            for run_id, tasks in task_ids.items():
                rows = memory.get(run_id, tasks)
                if rows is not None:
                    remembered[run_id] = rows
        if len(remembered) == len(task_ids):
            return cls(None, memory=memory, remembered=remembered, touched=task_ids, windows=True)
        # A window of each run not remembered, with the idempotency records of
        # their transitions.
        missing = [op for op in steps if op.run_id not in remembered]
        unit = cls(
            await conn.fetchrow(
                _LOAD_RUNS_SQL,
                sorted({op.run_id for op in missing}),
                sorted({op.owner_id for op in missing}),
                [op.method for op in missing],
                [op.request.request_id for op in missing],
                [op.event_id for op in missing],
            ),
            memory=memory,
            remembered=remembered,
            touched=task_ids,
            windows=True,
        )
        chunked = sorted(
            {
                op.owner_id
                for op in missing
                if unit.tasks.get(op.owner_id, {}).get("kind") == CHUNKED_STEP
            }
        )
        if chunked:
            unit.add_counts(await conn.fetchval(_COUNTS_SQL, chunked))
        return unit

    @classmethod
    async def _load_chunks(
        cls, conn: asyncpg.Connection, ops: list[_StepTransition], memory: StepMemory
    ) -> StepUnit:
        """A batch with chunk transitions reads exactly its rows, never from memory."""
        run_ids: set[str] = set()
        task_ids: set[str] = set()
        chunk_ids: set[str] = set()
        for op in ops:
            run_ids.add(op.run_id)
            (chunk_ids if op.table == "chunks" else task_ids).add(op.owner_id)
            memory.forget(op.run_id)
        return cls(
            await conn.fetchrow(
                _LOAD_SQL,
                sorted(run_ids),
                sorted(task_ids),
                sorted(chunk_ids),
                [op.method for op in ops],
                [op.request.request_id for op in ops],
                [op.event_id for op in ops],
            ),
            memory=memory,
        )

    def remember(self, memory: StepMemory | None = None) -> None:
        """After the write: keep the runs read as windows in memory (their
        unfinished tasks), update the remembered ones, forget the others.
        ``memory``: where, if not the unit's own (a shard's, for a unit that
        was applied beside the shards)."""
        memory = memory or self._memory
        if memory is None:
            return
        if memory.db_now is None:  # a unit built from memory alone reads this clock
            memory.db_now, memory.mono = self._db_now, self._mono
        if not self._windows:
            for run_id in self.runs:
                memory.forget(run_id)
            return
        # Runs from memory: only the tasks the batch moved changed.
        for run_id, rows in self.remembered.items():
            for task_id in self._touched[run_id]:
                if self.tasks[task_id]["state"] in states.TASK_TERMINAL:
                    rows.drop(task_id)  # no transition leaves a terminal state
                elif task_id in self.attempts:
                    rows.attempts[task_id] = self.attempts[task_id]
        # Runs read as windows: their unfinished tasks.
        kept = {
            run_id: _RunRows(run, {}, {}, {})
            for run_id, run in self.runs.items()
            if run_id not in self.remembered and run["state"] not in states.RUN_TERMINAL
        }
        chunked: set[str] = set()
        for task_id in self._read_tasks:
            task = self.tasks[task_id]
            whole = kept.get(task["run_id"])
            if whole is None or task["state"] in states.TASK_TERMINAL:
                continue
            if task["kind"] == CHUNKED_STEP:
                chunked.add(task["run_id"])  # its chunk counts change apart
            whole.tasks[task_id] = task
            if task_id in self.attempts:
                whole.attempts[task_id] = self.attempts[task_id]
            whole.artifacts[task_id] = self.artifacts.setdefault(task_id, [])
        for run_id in self.runs:
            if run_id in kept and run_id not in chunked:
                memory.keep(run_id, kept[run_id])
            elif run_id not in self.remembered:
                memory.forget(run_id)

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

    @property
    def remembers(self) -> bool:
        return bool(self.remembered)

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

    def follow(self, log: EventLog) -> None:
        """Write ``log``, another operation's events on one of the unit's runs in
        the same transaction, with the unit's (the unit's come after them)."""
        self.runs[log.run_id]["last_sequence"] = log.last_sequence
        self._dirty_runs.add(log.run_id)
        self._logs.insert(0, log)

    def record(self, request: Message, response: Message) -> None:
        """Write the idempotency record of another operation's ``request`` (in
        ``requests``) with the unit's changes."""
        request_id: str = request.request_id  # type: ignore[attr-defined]
        body = response.SerializeToString()
        self._keep_record(request.DESCRIPTOR.name, request_id, fingerprint(request), body)

    def _keep_record(self, method: str, request_id: str, fp: str, body: bytes) -> None:
        self.replays[(method, request_id)] = (fp, body)
        self._requests.append((method, request_id, fp, body))

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
            self._keep_record(op.method, op.request.request_id, fp, body)

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
        if self.run_id not in unit.remembered:
            return self._apply(unit)[0]
        # Rows from memory settle only a new, valid transition that appends events.
        try:
            response, appended = self._apply(unit)
        except SteplineError:
            unit.unsure = True
            raise
        if not appended:
            unit.unsure = True
        return response

    def _apply(self, unit: StepUnit) -> tuple[Any, bool]:
        """The response, and whether the transition appended events."""
        request = self.request
        run = unit.run(request.run_id)
        earlier = unit.replayed(self)
        if earlier is not None:
            return earlier, False
        now = unit.now()
        owner, executor = self.locate(unit, run, now)
        if run["state"] in states.RUN_TERMINAL:
            raise FailedPrecondition(
                f"run {request.run_id} is {states.run_state_name(run['state'])}"
            )
        if run["pending_control"] in _HOLDING and getattr(request, "unless_control_pending", False):
            # Not started: the response shows the task as it is and the action.
            return self.response(unit, owner, run["last_sequence"]), False
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
        return response, bool(log.rows)

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


def start_first_task(
    row: Any, log: EventLog, *, request_id: str, actor: common_pb2.Principal
) -> tuple[StepUnit, pb.TransitionTaskResponse] | None:
    """The start of a just-claimed run's first task, applied in memory.

    ``row`` is the run as its claim's statement left it (locked, its claim's
    events not written yet: they are in ``log``), with its tasks
    (``read_tasks``, in plan order), their attempts and artifacts. Only a
    fresh run qualifies, one with no attempt yet (not a run put back to
    PENDING by ``RerunFrom``): its first task, if it is an atomic step, goes
    from PENDING to RUNNING with attempt 1, exactly as the holder's
    ``TransitionTask`` under the new epoch would (request ``request_id``, by
    ``actor``), in a unit built from those rows that writes the claim's
    events too, before its own. Times are those of the claim's statement
    (the run's ``update_time``). The caller adds the claim's record
    (:meth:`StepUnit.record`), flushes the unit in the claim's transaction,
    and may then keep its rows in a shard's memory (:meth:`StepUnit.remember`).
    None if the run has attempts or its first task is not an atomic step.
    """
    tasks = row["read_tasks"] or ()
    if row["read_attempts"] or row["read_artifacts"]:
        return None
    if not tasks or tasks[0]["kind"] != ATOMIC_STEP or tasks[0]["state"] != PENDING:
        return None
    first = tasks[0]
    run = {column: row[column] for column in RUN_CLAIM_COLUMNS}
    record = {
        **_NOTHING,
        "now": row["update_time"],
        "runs": [run],
        "tasks": tasks[:WINDOW],  # a fresh run's: all PENDING
    }
    unit = StepUnit(record, touched={run["run_id"]: [first["task_id"]]}, windows=True)
    unit.follow(log)
    start = TaskTransition(
        pb.TransitionTaskRequest(
            request_id=request_id,
            run_id=run["run_id"],
            task_id=first["task_id"],
            epoch=run["claim_epoch"],
            actor=actor,
            state=RUNNING,
        )
    )
    response: pb.TransitionTaskResponse = start.apply(unit)
    return unit, response


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
# A batch of task transitions only (the usual case) reads its runs ($1) with a
# window of each one's unfinished tasks (the next WINDOW by ordinal) besides the
# tasks it moves ($2), so that memory can serve the batches that follow; those
# tasks' attempts, the runs' artifact descriptions of tasks; $3 methods, $4
# request ids, $5 event ids. A task can come twice (window and moved): the rows
# are keyed by id.
WINDOW = 16
_LOAD_RUNS_SQL = f"""
WITH window_tasks AS (
    SELECT w.t FROM unnest($1::text[]) AS x(run_id),
        LATERAL (SELECT t FROM tasks t
            WHERE t.run_id = x.run_id
              AND t.state NOT IN ({", ".join(str(s) for s in sorted(states.TASK_TERMINAL))})
            ORDER BY t.ordinal LIMIT {WINDOW}) AS w(t)
    UNION ALL
    SELECT t FROM tasks t WHERE t.task_id = ANY($2::text[])
)
SELECT {_NOW}, {_RUNS},
    (SELECT array_agg(t) FROM window_tasks) AS tasks,
    (SELECT array_agg(a ORDER BY a.owner_id, a.attempt_number) FROM attempts a
        WHERE a.owner_id IN (SELECT (t).task_id FROM window_tasks)) AS attempts,
    (SELECT json_agg(f ORDER BY f.create_time, f.artifact_id) FROM (
        SELECT {DESCRIPTION_COLUMNS} FROM artifacts
        WHERE run_id = ANY($1::text[]) AND chunk_id IS NULL) f) AS artifacts,
    {_REPLAYS.format(methods=3, request_ids=4)},
    {_RECORDED.format(event_ids=5)}
"""
# Chunk counts of chunked steps ($1 task ids) that a batch of task transitions moves.
_COUNTS_SQL = """
SELECT json_agg(x) FROM (
    SELECT ch.task_id, ch.state, count(*) AS n, tk.chunks_complete AS complete
    FROM chunks ch JOIN tasks tk ON tk.task_id = ch.task_id
    WHERE ch.task_id = ANY($1::text[])
    GROUP BY ch.task_id, ch.state, tk.chunks_complete) x
"""

_FLUSH_SQL = f"""
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
    {insert_events("$7")}
), new_requests AS (
    INSERT INTO requests (method, request_id, fingerprint, response)
    SELECT * FROM unnest($8::text[], $9::text[], $10::text[], $11::bytea[])
)
SELECT ledger_expect_rows((SELECT count(*) FROM up_runs), cardinality($1::text[]), 'runs')
"""
