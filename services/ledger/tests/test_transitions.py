"""State machines, fencing, idempotent replays, history and control."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from google.protobuf.duration_pb2 import Duration

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from stepline.ledger import queries, states
from stepline.ledger.relay import pending_count
from stepline.ledger.unit import RUN_CLAIM_COLUMNS, StepMemory, StepUnit

from . import conftest
from .conftest import ACTOR, EXECUTOR, OPERATOR, Ledger, claimed_run, create_request

R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState
E = run_pb2.RunEventType
FAILURE = common_pb2.Failure(reason=common_pb2.FAILURE_REASON_VERB_ERROR, message="boom")
_ids = itertools.count()


def rid() -> str:
    return f"req-{next(_ids)}"


def run_request(run_id: str, epoch: int, state: int, **extra: object) -> pb.TransitionRunRequest:
    request = pb.TransitionRunRequest(
        request_id=rid(),
        run_id=run_id,
        epoch=epoch,
        actor=ACTOR,
        state=state,  # type: ignore[arg-type]
    )
    if state in states.NEEDS_FAILURE_RUN:
        request.failure.CopyFrom(FAILURE)
    for key, value in extra.items():
        setattr(request, key, value)
    return request


def task_request(run_id: str, epoch: int, step: str, state: int) -> pb.TransitionTaskRequest:
    """A new request (its own id) with the failure that ``state`` needs."""
    request = conftest.task_request(run_id, epoch, step, state, rid())
    if state in states.NEEDS_FAILURE_TASK:
        request.failure.CopyFrom(FAILURE)
    return request


async def _snapshot(ledger: Ledger, run_id: str) -> tuple[object, ...]:
    run = await ledger.pool.fetchrow(
        "SELECT state, last_sequence FROM runs WHERE run_id = $1", run_id
    )
    tasks = await ledger.pool.fetch(
        "SELECT state FROM tasks WHERE run_id = $1 ORDER BY ordinal", run_id
    )
    waiting = await pending_count(ledger.pool)  # events for the relay
    return (run["state"], run["last_sequence"], [t["state"] for t in tasks], waiting)


ALL_RUN_STATES = [s for s in R.values() if s != R.WORKFLOW_RUN_STATE_UNSPECIFIED]
ALL_TASK_STATES = [s for s in T.values() if s != T.TASK_RUN_STATE_UNSPECIFIED]


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (c, t)
        for c in ALL_RUN_STATES
        for t in ALL_RUN_STATES
        if not states.run_transition_allowed(c, t)
    ],
)
async def test_every_illegal_run_transition_is_refused(
    ledger: Ledger, current: int, target: int
) -> None:
    run_id, epoch = await claimed_run(ledger)
    await ledger.pool.execute("UPDATE runs SET state = $2 WHERE run_id = $1", run_id, current)
    before = await _snapshot(ledger, run_id)
    with pytest.raises(FailedPrecondition):
        await ledger.store.transition_run(run_request(run_id, epoch, target))
    assert await _snapshot(ledger, run_id) == before


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (c, t)
        for c in ALL_TASK_STATES
        for t in ALL_TASK_STATES
        if not states.task_transition_allowed(c, t)
    ],
)
async def test_every_illegal_task_transition_is_refused(
    ledger: Ledger, current: int, target: int
) -> None:
    run_id, epoch = await claimed_run(ledger)
    await ledger.pool.execute(
        "UPDATE runs SET state = $2 WHERE run_id = $1", run_id, R.WORKFLOW_RUN_STATE_RUNNING
    )
    await ledger.pool.execute(
        "UPDATE tasks SET state = $2 WHERE task_id = $1", f"{run_id}/a", current
    )
    before = await _snapshot(ledger, run_id)
    with pytest.raises(FailedPrecondition):
        await ledger.store.transition_task(task_request(run_id, epoch, "a", target))
    assert await _snapshot(ledger, run_id) == before


async def test_legal_run_transitions_are_applied(ledger: Ledger) -> None:
    run_id, epoch = await claimed_run(ledger)
    path = [
        R.WORKFLOW_RUN_STATE_RUNNING,
        R.WORKFLOW_RUN_STATE_PAUSED,
        R.WORKFLOW_RUN_STATE_RUNNING,
        R.WORKFLOW_RUN_STATE_SUSPENDED,
        R.WORKFLOW_RUN_STATE_RUNNING,
        R.WORKFLOW_RUN_STATE_FAILED,
    ]
    for state in path:
        response = await ledger.store.transition_run(run_request(run_id, epoch, state))
        assert response.run.state == state
    final = await ledger.pool.fetchrow("SELECT * FROM runs WHERE run_id = $1", run_id)
    assert final["failure"]["reason"] == "FAILURE_REASON_VERB_ERROR"
    assert final["end_time"] is not None
    # A run that ends takes its pending tasks with it: SKIPPED.
    tasks = await ledger.pool.fetch("SELECT state FROM tasks WHERE run_id = $1", run_id)
    assert {t["state"] for t in tasks} == {T.TASK_RUN_STATE_SKIPPED}


async def test_retries_are_recorded_as_attempts(ledger: Ledger) -> None:
    run_id, epoch = await claimed_run(ledger)
    store = ledger.store
    await store.transition_run(run_request(run_id, epoch, R.WORKFLOW_RUN_STATE_RUNNING))
    await store.transition_task(task_request(run_id, epoch, "a", T.TASK_RUN_STATE_RUNNING))
    failed = task_request(run_id, epoch, "a", T.TASK_RUN_STATE_RUNNING)
    failed.attempt.CopyFrom(
        pb.AttemptUpdate(attempt_number=1, state=T.TASK_RUN_STATE_FAILED, failure=FAILURE)
    )
    await store.transition_task(failed)
    retry = task_request(run_id, epoch, "a", T.TASK_RUN_STATE_RUNNING)
    retry.attempt.CopyFrom(
        pb.AttemptUpdate(attempt_number=2, state=T.TASK_RUN_STATE_RUNNING, reason="retry")
    )
    await store.transition_task(retry)
    skip = task_request(run_id, epoch, "a", T.TASK_RUN_STATE_RUNNING)
    skip.attempt.CopyFrom(pb.AttemptUpdate(attempt_number=4, state=T.TASK_RUN_STATE_RUNNING))
    with pytest.raises(FailedPrecondition, match=r"attempt 2 .* is still open"):
        await store.transition_task(skip)
    done = await store.transition_task(task_request(run_id, epoch, "a", T.TASK_RUN_STATE_SUCCEEDED))
    attempts = done.task.attempts
    assert [(a.attempt_number, a.state, a.reason) for a in attempts] == [
        (1, T.TASK_RUN_STATE_FAILED, "initial"),
        (2, T.TASK_RUN_STATE_SUCCEEDED, "retry"),
    ]
    assert attempts[0].failure.reason == common_pb2.FAILURE_REASON_VERB_ERROR
    assert all(a.claim_epoch == epoch and a.executor_id == EXECUTOR for a in attempts)


async def test_stale_epochs_are_refused(ledger: Ledger) -> None:
    run_id, old_epoch = await claimed_run(ledger)
    await ledger.pool.execute(
        "UPDATE runs SET claim_expire = clock_timestamp() - interval '1 second' WHERE run_id = $1",
        run_id,
    )
    with pytest.raises(FailedPrecondition, match="expired"):
        await ledger.store.transition_run(
            run_request(run_id, old_epoch, R.WORKFLOW_RUN_STATE_RUNNING)
        )
    taken = await ledger.store.claim_run(
        pb.ClaimRunRequest(request_id=rid(), run_id=run_id, executor_id="executor-b")
    )
    assert taken.claim.epoch == old_epoch + 1
    before = await _snapshot(ledger, run_id)
    with pytest.raises(FailedPrecondition, match="stale epoch"):
        await ledger.store.transition_run(
            run_request(run_id, old_epoch, R.WORKFLOW_RUN_STATE_RUNNING)
        )
    with pytest.raises(FailedPrecondition, match="stale epoch"):
        await ledger.store.renew_claim(
            pb.RenewClaimRequest(
                request_id=rid(), run_id=run_id, executor_id=EXECUTOR, epoch=old_epoch
            )
        )
    assert await _snapshot(ledger, run_id) == before
    ok = await ledger.store.transition_run(
        run_request(run_id, taken.claim.epoch, R.WORKFLOW_RUN_STATE_RUNNING)
    )
    assert ok.run.state == R.WORKFLOW_RUN_STATE_RUNNING


async def test_concurrent_claimers_never_both_hold_a_run(ledger: Ledger) -> None:
    created = await ledger.store.create_run(create_request())
    run_id = created.run.run_id

    async def claim(n: int) -> int | None:
        try:
            await ledger.store.claim_run(
                pb.ClaimRunRequest(
                    request_id=f"claim-{n}",
                    run_id=run_id,
                    executor_id=f"executor-{n}",
                    lease_duration=Duration(seconds=30),
                )
            )
        except FailedPrecondition:
            return None
        return n

    winners = [n for n in await asyncio.gather(*(claim(n) for n in range(20))) if n is not None]
    assert len(winners) == 1
    holder = await ledger.pool.fetchrow("SELECT claim_executor, claim_epoch FROM runs")
    assert holder["claim_executor"] == f"executor-{winners[0]}"
    assert holder["claim_epoch"] == 1


async def test_replays_are_no_ops_and_conflicts_are_errors(ledger: Ledger) -> None:
    run_id, epoch = await claimed_run(ledger)
    request = run_request(run_id, epoch, R.WORKFLOW_RUN_STATE_RUNNING)
    first = await ledger.store.transition_run(request)
    before = await _snapshot(ledger, run_id)
    assert await ledger.store.transition_run(request) == first
    assert await _snapshot(ledger, run_id) == before
    conflicting = run_request(run_id, epoch, R.WORKFLOW_RUN_STATE_PAUSED)
    conflicting.request_id = request.request_id
    with pytest.raises(Aborted):
        await ledger.store.transition_run(conflicting)
    assert await _snapshot(ledger, run_id) == before


async def test_malformed_and_unknown_requests_change_nothing(ledger: Ledger) -> None:
    run_id, epoch = await claimed_run(ledger)
    before = await _snapshot(ledger, run_id)
    with pytest.raises(NotFound):
        await ledger.store.transition_run(
            run_request("no-such-run", epoch, R.WORKFLOW_RUN_STATE_RUNNING)
        )
    with pytest.raises(NotFound):
        await ledger.store.transition_task(
            task_request(run_id, epoch, "zzz", T.TASK_RUN_STATE_RUNNING)
        )
    with pytest.raises(InvalidArgument, match=r"failure\.reason is required"):
        await ledger.store.transition_run(
            pb.TransitionRunRequest(
                request_id=rid(),
                run_id=run_id,
                epoch=epoch,
                actor=ACTOR,
                state=R.WORKFLOW_RUN_STATE_FAILED,
            )
        )
    with pytest.raises(InvalidArgument, match="state must be"):
        await ledger.store.transition_run(run_request(run_id, epoch, 0))
    with pytest.raises(InvalidArgument, match=r"actor\.id is required"):
        await ledger.store.transition_run(
            pb.TransitionRunRequest(request_id=rid(), run_id=run_id, epoch=epoch, state=2)
        )
    big = task_request(run_id, epoch, "a", T.TASK_RUN_STATE_RUNNING)
    big.output.update({"blob": "x" * (1024 * 1024 + 1)})
    with pytest.raises(InvalidArgument, match="output is"):
        await ledger.store.transition_task(big)
    assert await _snapshot(ledger, run_id) == before


async def test_history_lists_every_transition_in_order(ledger: Ledger) -> None:

    run_id, epoch = await claimed_run(ledger, steps=("a", "b"))
    store = ledger.store
    await store.transition_run(run_request(run_id, epoch, R.WORKFLOW_RUN_STATE_RUNNING))
    for step in ("a", "b"):
        await store.transition_task(task_request(run_id, epoch, step, T.TASK_RUN_STATE_RUNNING))
        await store.transition_task(task_request(run_id, epoch, step, T.TASK_RUN_STATE_SUCCEEDED))
    await store.transition_run(run_request(run_id, epoch, R.WORKFLOW_RUN_STATE_SUCCEEDED))
    history = await queries.get_run_history(ledger.pool, pb.GetRunHistoryRequest(run_id=run_id))

    def describe(event: run_pb2.RunEvent) -> tuple[int, str, str]:
        payload = dict(event.payload)
        step = event.task_id.rsplit("/", 1)[-1] if event.task_id else ""
        return (event.type, step, str(payload.get("to_state", payload.get("state", ""))))

    described = [describe(e) for e in history.events]
    assert [e.sequence for e in history.events] == list(range(1, len(history.events) + 1))
    assert history.last_sequence == len(history.events)
    assert described == [
        (E.RUN_EVENT_TYPE_RUN_CREATED, "", ""),
        (E.RUN_EVENT_TYPE_CLAIMED, "", ""),
        (E.RUN_EVENT_TYPE_RUN_STATE_CHANGED, "", "RUNNING"),
        (E.RUN_EVENT_TYPE_ATTEMPT_RECORDED, "a", "RUNNING"),
        (E.RUN_EVENT_TYPE_TASK_STATE_CHANGED, "a", "RUNNING"),
        (E.RUN_EVENT_TYPE_ATTEMPT_RECORDED, "a", "SUCCEEDED"),
        (E.RUN_EVENT_TYPE_TASK_STATE_CHANGED, "a", "SUCCEEDED"),
        (E.RUN_EVENT_TYPE_ATTEMPT_RECORDED, "b", "RUNNING"),
        (E.RUN_EVENT_TYPE_TASK_STATE_CHANGED, "b", "RUNNING"),
        (E.RUN_EVENT_TYPE_ATTEMPT_RECORDED, "b", "SUCCEEDED"),
        (E.RUN_EVENT_TYPE_TASK_STATE_CHANGED, "b", "SUCCEEDED"),
        (E.RUN_EVENT_TYPE_RUN_STATE_CHANGED, "", "SUCCEEDED"),
    ]
    assert await pending_count(ledger.pool) == len(history.events)  # all for the relay
    page = await queries.get_run_history(
        ledger.pool, pb.GetRunHistoryRequest(run_id=run_id, after_sequence=10, page_size=5)
    )
    assert [e.sequence for e in page.events] == [11, 12]


async def test_cancel_of_an_unclaimed_run_applies_at_once(ledger: Ledger) -> None:
    created = await ledger.store.create_run(create_request())
    run_id = created.run.run_id
    response = await ledger.store.request_control(
        pb.RequestControlRequest(
            request_id=rid(),
            run_id=run_id,
            action=run_pb2.CONTROL_ACTION_CANCEL,
            actor=OPERATOR,
            reason="not needed",
        )
    )
    assert response.applied
    assert response.run.state == R.WORKFLOW_RUN_STATE_CANCELLED
    assert response.run.failure.reason == common_pb2.FAILURE_REASON_CANCELLED
    tasks = await ledger.pool.fetch("SELECT state FROM tasks WHERE run_id = $1", run_id)
    assert {t["state"] for t in tasks} == {T.TASK_RUN_STATE_SKIPPED}
    with pytest.raises(FailedPrecondition, match="CANCELLED"):
        await ledger.store.request_control(
            pb.RequestControlRequest(
                request_id=rid(), run_id=run_id, action=run_pb2.CONTROL_ACTION_PAUSE, actor=OPERATOR
            )
        )


async def test_cancel_of_a_claimed_run_waits_for_its_holder(ledger: Ledger) -> None:
    run_id, epoch = await claimed_run(ledger)
    response = await ledger.store.request_control(
        pb.RequestControlRequest(
            request_id=rid(), run_id=run_id, action=run_pb2.CONTROL_ACTION_CANCEL, actor=OPERATOR
        )
    )
    assert not response.applied
    assert response.run.pending_control == run_pb2.CONTROL_ACTION_CANCEL
    renewed = await ledger.store.renew_claim(
        pb.RenewClaimRequest(request_id=rid(), run_id=run_id, executor_id=EXECUTOR, epoch=epoch)
    )
    assert renewed.pending_control == run_pb2.CONTROL_ACTION_CANCEL


async def test_a_claim_may_start_the_run_in_the_same_commit(ledger: Ledger) -> None:
    store = ledger.store

    def claim(run_id: str, request_id: str) -> pb.ClaimRunRequest:
        return pb.ClaimRunRequest(
            request_id=request_id, run_id=run_id, executor_id=EXECUTOR, start=True
        )

    started = (await store.create_run(create_request("start-1"))).run.run_id
    claimed = await store.claim_run(claim(started, "c1"))
    assert claimed.run.state == R.WORKFLOW_RUN_STATE_RUNNING
    assert claimed.run.HasField("start_time")
    history = await queries.get_run_history(ledger.pool, pb.GetRunHistoryRequest(run_id=started))
    claimed_event, started_event = history.events[-2:]
    assert claimed_event.type == E.RUN_EVENT_TYPE_CLAIMED
    assert started_event.type == E.RUN_EVENT_TYPE_RUN_STATE_CHANGED
    assert started_event.payload["reason"] == "claimed"
    assert started_event.actor.id == EXECUTOR
    # A run with a control action pending is claimed but not started.
    waiting = (await store.create_run(create_request("start-2"))).run.run_id
    first = await store.claim_run(
        pb.ClaimRunRequest(request_id="c2", run_id=waiting, executor_id="other")
    )
    assert first.run.state == R.WORKFLOW_RUN_STATE_PENDING  # no start asked
    await store.request_control(
        pb.RequestControlRequest(
            request_id=rid(), run_id=waiting, action=run_pb2.CONTROL_ACTION_CANCEL, actor=OPERATOR
        )
    )
    await store.release_claim(
        pb.ReleaseClaimRequest(
            request_id=rid(), run_id=waiting, executor_id="other", epoch=first.claim.epoch
        )
    )
    again = await store.claim_run(claim(waiting, "c3"))
    assert again.run.state == R.WORKFLOW_RUN_STATE_PENDING
    assert again.run.pending_control == run_pb2.CONTROL_ACTION_CANCEL


async def test_a_claim_may_start_the_first_task_in_the_same_commit(ledger: Ledger) -> None:
    store = ledger.store

    def claim(run_id: str, request_id: str, **flags: bool) -> pb.ClaimRunRequest:
        return pb.ClaimRunRequest(
            request_id=request_id, run_id=run_id, executor_id=EXECUTOR, **flags
        )

    run_id = (await store.create_run(create_request("first-1"))).run.run_id
    request = claim(run_id, "fc1", start=True, start_first_task=True)
    claimed = await store.claim_run(request)
    assert claimed.first_task_started
    first, second = claimed.run.tasks[:2]
    assert first.step_path == "a" and first.state == T.TASK_RUN_STATE_RUNNING
    assert first.HasField("start_time")
    assert [(a.attempt_number, a.state, a.reason) for a in first.attempts] == [
        (1, T.TASK_RUN_STATE_RUNNING, "initial")
    ]
    assert second.state == T.TASK_RUN_STATE_PENDING
    # Claim, run start and task start: one commit, in this order in the log.
    rows = await ledger.pool.fetch(
        "SELECT type, xid::text AS xid, actor_id FROM events"
        " WHERE run_id = $1 AND sequence > 1 ORDER BY sequence",
        run_id,
    )
    assert [r["type"] for r in rows] == [
        E.RUN_EVENT_TYPE_CLAIMED,
        E.RUN_EVENT_TYPE_RUN_STATE_CHANGED,
        E.RUN_EVENT_TYPE_ATTEMPT_RECORDED,
        E.RUN_EVENT_TYPE_TASK_STATE_CHANGED,
    ]
    assert len({r["xid"] for r in rows}) == 1
    assert {r["actor_id"] for r in rows} == {EXECUTOR}
    attempt = await ledger.pool.fetchrow(
        "SELECT executor_id, claim_epoch, state FROM attempts WHERE task_id = $1", first.task_id
    )
    assert tuple(attempt) == (EXECUTOR, claimed.claim.epoch, T.TASK_RUN_STATE_RUNNING)
    # The run's shard remembers its rows: the holder's next batch reads nothing.
    remembered = store.committer.memory(run_id, StepUnit)
    assert isinstance(remembered, StepMemory)
    assert set(remembered.runs[run_id].tasks) == {t.task_id for t in claimed.run.tasks}
    # A replay answers the same and writes nothing.
    before = await _snapshot(ledger, run_id)
    assert await store.claim_run(request) == claimed
    assert await _snapshot(ledger, run_id) == before
    # The holder goes on from there: the first attempt ends, the next step starts.
    epoch = claimed.claim.epoch
    ended = await store.transition_task(
        task_request(run_id, epoch, "a", T.TASK_RUN_STATE_SUCCEEDED)
    )
    assert ended.task.attempts[0].state == T.TASK_RUN_STATE_SUCCEEDED
    await store.transition_task(task_request(run_id, epoch, "b", T.TASK_RUN_STATE_RUNNING))
    sequences = [
        r["sequence"]
        for r in await ledger.pool.fetch(
            "SELECT sequence FROM events WHERE run_id = $1 ORDER BY sequence", run_id
        )
    ]
    assert sequences == list(range(1, len(sequences) + 1))
    assert (await _snapshot(ledger, run_id))[1] == sequences[-1]

    # Not started: a first step that is not atomic, or a claim that does not
    # start the run.
    chunked = (await store.create_run(create_request("first-2", chunked="a"))).run.run_id
    claimed = await store.claim_run(claim(chunked, "fc2", start=True, start_first_task=True))
    assert claimed.run.state == R.WORKFLOW_RUN_STATE_RUNNING
    assert not claimed.first_task_started
    assert {t.state for t in claimed.run.tasks} == {T.TASK_RUN_STATE_PENDING}
    plain = (await store.create_run(create_request("first-3"))).run.run_id
    claimed = await store.claim_run(claim(plain, "fc3", start_first_task=True))
    assert claimed.run.state == R.WORKFLOW_RUN_STATE_PENDING
    assert not claimed.first_task_started
    assert {t.state for t in claimed.run.tasks} == {T.TASK_RUN_STATE_PENDING}


async def test_a_claim_starts_no_task_of_a_run_that_ran_before(ledger: Ledger) -> None:
    """A run put back to PENDING by RerunFrom keeps its tasks' attempts: its
    claim starts the run only, and the holder's start opens the next attempt."""
    store = ledger.store

    def claim(request_id: str) -> pb.ClaimRunRequest:
        return pb.ClaimRunRequest(
            request_id=request_id,
            run_id=run_id,
            executor_id=EXECUTOR,
            start=True,
            start_first_task=True,
        )

    run_id = (await store.create_run(create_request("first-4"))).run.run_id
    epoch = (await store.claim_run(claim("fc4"))).claim.epoch
    await store.transition_task(task_request(run_id, epoch, "a", T.TASK_RUN_STATE_FAILED))
    await store.transition_run(
        run_request(run_id, epoch, R.WORKFLOW_RUN_STATE_FAILED, release_claim=True)
    )
    await store.rerun_from(
        pb.RerunFromRequest(request_id=rid(), run_id=run_id, step_id="a", actor=OPERATOR)
    )
    again = await store.claim_run(claim("fc5"))
    assert again.run.state == R.WORKFLOW_RUN_STATE_RUNNING
    assert not again.first_task_started
    first = again.run.tasks[0]
    assert first.state == T.TASK_RUN_STATE_PENDING
    assert [(a.attempt_number, a.state) for a in first.attempts] == [(1, T.TASK_RUN_STATE_FAILED)]
    started = await store.transition_task(
        task_request(run_id, again.claim.epoch, "a", T.TASK_RUN_STATE_RUNNING)
    )
    assert [a.attempt_number for a in started.task.attempts] == [1, 2]


async def test_units_read_the_columns_of_run_claims(ledger: Ledger) -> None:
    async with ledger.pool.acquire() as conn:
        statement = await conn.prepare("SELECT * FROM run_claims")
        assert tuple(a.name for a in statement.get_attributes()) == RUN_CLAIM_COLUMNS


async def test_a_task_transition_reports_the_pending_pause(ledger: Ledger) -> None:
    """A pause asked for while a step ran reaches its holder with the step's end,
    so it is honoured at that boundary without waiting for the control event."""
    store = ledger.store
    run_id, epoch = await claimed_run(ledger)
    await store.transition_run(run_request(run_id, epoch, R.WORKFLOW_RUN_STATE_RUNNING))
    started = await store.transition_task(
        task_request(run_id, epoch, "a", T.TASK_RUN_STATE_RUNNING)
    )
    assert started.pending_control == run_pb2.CONTROL_ACTION_UNSPECIFIED
    await store.request_control(
        pb.RequestControlRequest(
            request_id=rid(), run_id=run_id, action=run_pb2.CONTROL_ACTION_PAUSE, actor=OPERATOR
        )
    )
    done = await store.transition_task(task_request(run_id, epoch, "a", T.TASK_RUN_STATE_SUCCEEDED))
    assert done.pending_control == run_pb2.CONTROL_ACTION_PAUSE
    await store.transition_run(run_request(run_id, epoch, R.WORKFLOW_RUN_STATE_PAUSED))
    run = await ledger.pool.fetchrow("SELECT pending_control FROM runs WHERE run_id = $1", run_id)
    assert run["pending_control"] == run_pb2.CONTROL_ACTION_UNSPECIFIED


async def test_a_step_does_not_start_while_a_control_action_is_pending(ledger: Ledger) -> None:
    store = ledger.store
    run_id, epoch = await claimed_run(ledger)
    await store.transition_run(run_request(run_id, epoch, R.WORKFLOW_RUN_STATE_RUNNING))
    await store.request_control(
        pb.RequestControlRequest(
            request_id=rid(), run_id=run_id, action=run_pb2.CONTROL_ACTION_PAUSE, actor=OPERATOR
        )
    )
    before = await _snapshot(ledger, run_id)
    start = task_request(run_id, epoch, "a", T.TASK_RUN_STATE_RUNNING)
    start.unless_control_pending = True
    held = await store.transition_task(start)
    assert held.task.state == T.TASK_RUN_STATE_PENDING
    assert held.pending_control == run_pb2.CONTROL_ACTION_PAUSE
    assert await _snapshot(ledger, run_id) == before  # nothing applied, no event
    wrong = task_request(run_id, epoch, "a", T.TASK_RUN_STATE_SKIPPED)
    wrong.unless_control_pending = True
    with pytest.raises(InvalidArgument, match="only for state TASK_RUN_STATE_RUNNING"):
        await store.transition_task(wrong)
    # Once the pause is withdrawn, the same kind of request starts the step.
    await store.request_control(
        pb.RequestControlRequest(
            request_id=rid(), run_id=run_id, action=run_pb2.CONTROL_ACTION_RESUME, actor=OPERATOR
        )
    )
    again = task_request(run_id, epoch, "a", T.TASK_RUN_STATE_RUNNING)
    again.unless_control_pending = True
    started = await store.transition_task(again)
    assert started.task.state == T.TASK_RUN_STATE_RUNNING
    assert started.pending_control == run_pb2.CONTROL_ACTION_UNSPECIFIED


@pytest.mark.parametrize("waiting", [R.WORKFLOW_RUN_STATE_SUSPENDED, R.WORKFLOW_RUN_STATE_PAUSED])
async def test_cancel_of_a_waiting_run_applies_even_while_claimed(
    ledger: Ledger, waiting: int
) -> None:
    """A SUSPENDED or PAUSED run waits for a person, not for its holder: a cancel
    that races with the holder letting go is applied at once, never lost."""
    run_id, epoch = await claimed_run(ledger)
    await ledger.store.transition_run(run_request(run_id, epoch, R.WORKFLOW_RUN_STATE_RUNNING))
    await ledger.store.transition_run(run_request(run_id, epoch, waiting))
    response = await ledger.store.request_control(
        pb.RequestControlRequest(
            request_id=rid(), run_id=run_id, action=run_pb2.CONTROL_ACTION_CANCEL, actor=OPERATOR
        )
    )
    assert response.applied
    assert response.run.state == R.WORKFLOW_RUN_STATE_CANCELLED


async def test_a_run_transition_releases_the_claim_in_the_same_commit(ledger: Ledger) -> None:
    """``release_claim``: the state change and the release are one commit, the
    CLAIM_RELEASED event right after the state change's; a replay changes
    nothing; a stale epoch is refused with nothing changed."""
    store = ledger.store
    run_id, epoch = await claimed_run(ledger)
    await store.transition_run(run_request(run_id, epoch, R.WORKFLOW_RUN_STATE_RUNNING))
    before = await _snapshot(ledger, run_id)
    with pytest.raises(FailedPrecondition):
        await store.transition_run(
            run_request(run_id, epoch + 1, R.WORKFLOW_RUN_STATE_PAUSED, release_claim=True)
        )
    assert await _snapshot(ledger, run_id) == before
    request = run_request(
        run_id, epoch, R.WORKFLOW_RUN_STATE_PAUSED, release_claim=True, release_reason="paused"
    )
    paused = await store.transition_run(request)
    assert paused.run.state == R.WORKFLOW_RUN_STATE_PAUSED
    assert paused.run.claim.executor_id == ""
    assert paused.run.claim.epoch == epoch
    row = await ledger.pool.fetchrow(
        "SELECT claim_executor, claim_expire <= clock_timestamp() AS ended FROM runs"
        " WHERE run_id = $1",
        run_id,
    )
    assert row["claim_executor"] is None and row["ended"]
    events = await ledger.pool.fetch(
        "SELECT sequence, type, xid::text AS xid, payload FROM events WHERE run_id = $1"
        " ORDER BY sequence",
        run_id,
    )
    changed, released = events[-2:]
    assert changed["sequence"] == paused.event_sequence
    assert (changed["type"], released["type"]) == (
        E.RUN_EVENT_TYPE_RUN_STATE_CHANGED,
        E.RUN_EVENT_TYPE_CLAIM_RELEASED,
    )
    assert changed["xid"] == released["xid"]  # one commit
    assert released["payload"] == {"epoch": epoch, "reason": "paused"}
    # A replay answers the same and appends nothing.
    assert await store.transition_run(request) == paused
    assert await ledger.pool.fetchval("SELECT count(*) FROM events WHERE run_id = $1", run_id) == (
        len(events)
    )
    # Released: another executor may claim the run at once.
    again = await store.claim_run(
        pb.ClaimRunRequest(request_id=rid(), run_id=run_id, executor_id="executor-b")
    )
    assert again.claim.executor_id == "executor-b" and again.claim.epoch == epoch + 1
