"""Task transitions applied as a unit of work: batched, in order, guarded."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from stepline.api.common.v1 import common_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.errors import FailedPrecondition
from stepline.ledger.unit import ATTEMPT_COLUMNS, StepMemory, StepUnit, TaskTransition

from .conftest import ACTOR, Ledger, claimed_run, task_request

T = common_pb2.TaskRunState


async def test_attempt_columns_match_the_table(ledger: Ledger) -> None:
    columns = await ledger.pool.fetch(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = 'ledger' AND table_name = 'attempts' ORDER BY ordinal_position"
    )
    assert tuple(c["column_name"] for c in columns) == ATTEMPT_COLUMNS


async def test_one_batch_applies_transitions_in_order_and_skips_refused_ones(
    ledger: Ledger,
) -> None:
    run_id, epoch = await claimed_run(ledger)
    await ledger.store.transition_run(
        pb.TransitionRunRequest(
            request_id="start", run_id=run_id, epoch=epoch, actor=ACTOR, state=2
        )
    )
    requests = [
        task_request(run_id, epoch, "a", T.TASK_RUN_STATE_RUNNING),
        task_request(run_id, epoch, "a", T.TASK_RUN_STATE_SUCCEEDED),
        task_request(run_id, epoch, "b", T.TASK_RUN_STATE_SUCCEEDED),  # PENDING -> SUCCEEDED
        task_request(run_id, epoch, "c", T.TASK_RUN_STATE_RUNNING),
    ]
    # Submitted together, they share one batch of the run's shard.
    results = await asyncio.gather(
        *(ledger.store.transition_task(r) for r in requests), return_exceptions=True
    )
    assert isinstance(results[2], FailedPrecondition)
    ok = [r for r in results if isinstance(r, pb.TransitionTaskResponse)]
    assert [r.task.state for r in ok] == [
        T.TASK_RUN_STATE_RUNNING,
        T.TASK_RUN_STATE_SUCCEEDED,
        T.TASK_RUN_STATE_RUNNING,
    ]
    assert ok[1].task.attempts[0].state == T.TASK_RUN_STATE_SUCCEEDED
    rows = await ledger.pool.fetch(
        "SELECT step_id, state FROM tasks WHERE run_id = $1 ORDER BY ordinal", run_id
    )
    assert [(r["step_id"], r["state"]) for r in rows] == [
        ("a", T.TASK_RUN_STATE_SUCCEEDED),
        ("b", T.TASK_RUN_STATE_PENDING),
        ("c", T.TASK_RUN_STATE_RUNNING),
    ]
    sequences = await ledger.pool.fetch(
        "SELECT sequence FROM events WHERE run_id = $1 ORDER BY sequence", run_id
    )
    numbers = [s["sequence"] for s in sequences]
    assert numbers == list(range(1, len(numbers) + 1))
    last = await ledger.pool.fetchval("SELECT last_sequence FROM runs WHERE run_id = $1", run_id)
    assert last == numbers[-1]
    # Replays return the stored response and write nothing.
    again = await ledger.store.transition_task(requests[1])
    assert again == ok[1]
    assert await ledger.pool.fetchval(
        "SELECT count(*) FROM events WHERE run_id = $1", run_id
    ) == len(numbers)


async def test_a_concurrent_writer_aborts_the_whole_write(ledger: Ledger) -> None:
    run_id, epoch = await claimed_run(ledger)
    op = TaskTransition(task_request(run_id, epoch, "a", T.TASK_RUN_STATE_RUNNING))
    async with ledger.pool.acquire() as conn:
        unit = await StepUnit.load(conn, [op], StepMemory())
        op.apply(unit)
        # Another writer (a second ledger replica) changes the run in between.
        await ledger.pool.execute(
            "UPDATE runs SET last_sequence = last_sequence + 1 WHERE run_id = $1", run_id
        )
        with pytest.raises(asyncpg.SerializationError):
            await unit.flush(conn)
    state = await ledger.pool.fetchval("SELECT state FROM tasks WHERE task_id = $1", f"{run_id}/a")
    assert state == T.TASK_RUN_STATE_PENDING
    assert (
        await ledger.pool.fetchval("SELECT count(*) FROM attempts WHERE run_id = $1", run_id) == 0
    )
