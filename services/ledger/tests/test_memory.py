"""A committer shard's memory of the runs it moved: later batches on them read
nothing before their write, and nothing they settle differs from a fresh read."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration

from stepline.api.common.v1 import common_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.errors import Aborted, FailedPrecondition
from stepline.ledger.committer import UnitOperation, _grouped
from stepline.ledger.unit import WINDOW, StepMemory, StepUnit, TaskTransition, _RunRows

from .conftest import ACTOR, EXECUTOR, Ledger, claimed_run, running_run, task_request

T = common_pb2.TaskRunState
RUNNING, SUCCEEDED = T.TASK_RUN_STATE_RUNNING, T.TASK_RUN_STATE_SUCCEEDED


class NoConnection:
    """Stands where a connection would be: any use of it fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the database was used ({name})")


async def events_of(ledger: Ledger, run_id: str) -> list[int]:
    rows = await ledger.pool.fetch(
        "SELECT sequence FROM events WHERE run_id = $1 ORDER BY sequence", run_id
    )
    return [r["sequence"] for r in rows]


async def task_states(ledger: Ledger, run_id: str) -> dict[str, int]:
    rows = await ledger.pool.fetch("SELECT step_id, state FROM tasks WHERE run_id = $1", run_id)
    return {r["step_id"]: r["state"] for r in rows}


async def test_a_remembered_run_is_moved_without_a_read(ledger: Ledger) -> None:
    run_id, epoch = await running_run(ledger, "mem-1")
    memory = StepMemory()
    async with ledger.pool.acquire() as conn:
        first = [TaskTransition(task_request(run_id, epoch, "a", RUNNING))]
        unit = await StepUnit.load(conn, first, memory)
        assert not unit.remembers
        first[0].apply(unit)
        await unit.flush(conn)
        unit.remember()
        # The run and its unfinished tasks are remembered, read once.
        assert set(memory.runs[run_id].tasks) == {f"{run_id}/{s}" for s in "abc"}
        later = [
            TaskTransition(task_request(run_id, epoch, "a", SUCCEEDED)),
            TaskTransition(task_request(run_id, epoch, "b", RUNNING)),
        ]
        unit = await StepUnit.load(NoConnection(), later, memory)  # type: ignore[arg-type]
        assert unit.remembers
        responses = [op.apply(unit) for op in later]
        assert not unit.unsure
        await unit.flush(conn)
        unit.remember()
    assert [r.task.state for r in responses] == [SUCCEEDED, RUNNING]
    assert responses[0].task.attempts[0].state == SUCCEEDED
    # A finished task leaves memory; the others stay.
    assert set(memory.runs[run_id].tasks) == {f"{run_id}/b", f"{run_id}/c"}
    assert await task_states(ledger, run_id) == {
        "a": SUCCEEDED,
        "b": RUNNING,
        "c": T.TASK_RUN_STATE_PENDING,
    }
    numbers = await events_of(ledger, run_id)
    assert numbers == list(range(1, len(numbers) + 1))
    last = await ledger.pool.fetchval("SELECT last_sequence FROM runs WHERE run_id = $1", run_id)
    assert last == numbers[-1]


async def test_replays_on_remembered_rows_answer_as_a_fresh_read_would(ledger: Ledger) -> None:
    run_id, epoch = await running_run(ledger, "mem-2")
    store = ledger.store
    started = await store.transition_task(task_request(run_id, epoch, "a", RUNNING, "start-a"))
    # The run moves on (a parallel branch), so a replay answered from the
    # remembered rows would show a later sequence than the stored response.
    await store.transition_task(task_request(run_id, epoch, "b", RUNNING, "start-b"))
    count = len(await events_of(ledger, run_id))
    # RUNNING again under the same request id: the stored response, nothing written.
    assert (
        await store.transition_task(task_request(run_id, epoch, "a", RUNNING, "start-a")) == started
    )
    assert not await ledger.pool.fetchval(
        "SELECT count(*) FROM requests WHERE request_id = 'start-a'"
    )
    # The same request id for another change: refused.
    changed = task_request(run_id, epoch, "a", RUNNING, "start-a")
    changed.output.update({"x": 1})
    with pytest.raises(Aborted):
        await store.transition_task(changed)
    assert len(await events_of(ledger, run_id)) == count
    ended = await store.transition_task(task_request(run_id, epoch, "a", SUCCEEDED, "end-a"))
    assert (
        await store.transition_task(task_request(run_id, epoch, "a", SUCCEEDED, "end-a")) == ended
    )


async def test_a_reused_request_id_that_looks_new_is_refused(ledger: Ledger) -> None:
    run_id, epoch = await running_run(ledger, "mem-3")
    store = ledger.store
    await store.transition_task(task_request(run_id, epoch, "a", RUNNING, "x"))
    await store.transition_task(task_request(run_id, epoch, "a", SUCCEEDED, "y"))
    count = len(await events_of(ledger, run_id))
    # Valid on the remembered rows, but "x" was used: its first event's id exists.
    with pytest.raises(Aborted, match="request_id"):
        await store.transition_task(task_request(run_id, epoch, "b", RUNNING, "x"))
    assert (await task_states(ledger, run_id))["b"] == T.TASK_RUN_STATE_PENDING
    assert len(await events_of(ledger, run_id)) == count
    # The run moves on.
    moved = await store.transition_task(task_request(run_id, epoch, "b", RUNNING, "z"))
    assert moved.task.state == RUNNING


async def remembered_run(ledger: Ledger, name: str) -> tuple[str, int]:
    """A running run whose task ``a`` was started (so its shard remembers it)."""
    run_id, epoch = await running_run(ledger, name)
    await ledger.store.transition_task(task_request(run_id, epoch, "a", RUNNING))
    return run_id, epoch


async def test_another_writer_since_the_run_was_remembered(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    run_id, epoch = await remembered_run(ledger, "mem-4")
    store = ledger.store
    # A second ledger replica appends to the run: the remembered rows are stale.
    await ledger.pool.execute(
        "UPDATE runs SET last_sequence = last_sequence + 1 WHERE run_id = $1", run_id
    )
    bumped = await ledger.pool.fetchval("SELECT last_sequence FROM runs WHERE run_id = $1", run_id)
    with caplog.at_level(logging.WARNING, logger="stepline.ledger.committer"):
        ended = await store.transition_task(task_request(run_id, epoch, "a", SUCCEEDED))
    # Refused by the write's guard, then applied on a fresh read.
    assert "retrying singly" in caplog.text
    assert ended.task.state == SUCCEEDED
    assert ended.event_sequence > bumped
    assert (
        await ledger.pool.fetchval("SELECT last_sequence FROM runs WHERE run_id = $1", run_id)
        == ended.event_sequence
    )


async def test_other_operations_on_the_run_make_it_read_afresh(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    run_id, epoch = await remembered_run(ledger, "mem-5")
    store = ledger.store
    # The claim changes hands: release, then a new claim under a new epoch.
    await store.release_claim(
        pb.ReleaseClaimRequest(
            request_id="rel", run_id=run_id, executor_id=EXECUTOR, epoch=epoch, reason="test"
        )
    )
    claim = await store.claim_run(
        pb.ClaimRunRequest(
            request_id="again",
            run_id=run_id,
            executor_id="executor-b",
            lease_duration=Duration(seconds=30),
        )
    )
    new_epoch = claim.claim.epoch
    assert new_epoch == epoch + 1
    with caplog.at_level(logging.WARNING, logger="stepline.ledger.committer"):
        with pytest.raises(FailedPrecondition, match="epoch"):
            await store.transition_task(task_request(run_id, epoch, "a", SUCCEEDED))
        ended = await store.transition_task(task_request(run_id, new_epoch, "a", SUCCEEDED, "new"))
    assert ended.task.state == SUCCEEDED
    # Settled without a refused write: the claim's change was not taken from memory.
    assert "retrying singly" not in caplog.text
    assert "conflicted" not in caplog.text


async def test_a_run_longer_than_the_window(ledger: Ledger) -> None:
    steps = tuple(f"s{i:02d}" for i in range(WINDOW * 2 + 3))
    run_id, epoch = await claimed_run(ledger, "mem-6", steps=steps)
    await ledger.store.transition_run(
        pb.TransitionRunRequest(request_id="go", run_id=run_id, epoch=epoch, actor=ACTOR, state=2)
    )
    for step in steps:
        for state in (RUNNING, SUCCEEDED):
            response = await ledger.store.transition_task(task_request(run_id, epoch, step, state))
            assert response.task.state == state
    assert set((await task_states(ledger, run_id)).values()) == {SUCCEEDED}
    numbers = await events_of(ledger, run_id)
    assert numbers == list(range(1, len(numbers) + 1))


async def test_many_runs_moved_concurrently_keep_gapless_logs(
    ledger: Ledger,
) -> None:
    runs = [await running_run(ledger, f"mem-7-{n}") for n in range(6)]

    async def drive(run_id: str, epoch: int) -> None:
        for step in "abc":
            for state in (RUNNING, SUCCEEDED):
                await ledger.store.transition_task(task_request(run_id, epoch, step, state))

    await asyncio.gather(*(drive(run_id, epoch) for run_id, epoch in runs))
    for run_id, _ in runs:
        assert set((await task_states(ledger, run_id)).values()) == {SUCCEEDED}
        numbers = await events_of(ledger, run_id)
        assert numbers == list(range(1, len(numbers) + 1))


def test_memory_keeps_the_most_recently_used_runs_within_its_bound() -> None:
    memory = StepMemory(max_tasks=8)

    def rows(n: int) -> _RunRows:
        return _RunRows({}, {f"t{i}": {} for i in range(n)}, {}, {})

    memory.keep("r1", rows(2))
    memory.keep("r2", rows(2))
    memory.keep("r3", rows(3))  # a run over a quarter of the bound is not kept
    assert list(memory.runs) == ["r1", "r2"] and memory.tasks == 4
    assert memory.get("r1", ["t0", "t1"]) is not None  # now the most recently used
    assert memory.get("r1", ["t9"]) is None  # a task it does not have
    memory.keep("r4", rows(2))
    memory.keep("r5", rows(2))
    memory.keep("r6", rows(1))
    assert list(memory.runs) == ["r1", "r4", "r5", "r6"]  # r2 went first
    assert memory.tasks == 7
    memory.forget("r4")
    memory.forget("unknown")
    assert memory.tasks == 5
    memory.clear()
    assert not memory.runs and memory.tasks == 0


class _Unit(UnitOperation[None]):
    unit_type = StepUnit


async def _other(conn: Any) -> None:
    return None


def test_unit_operations_of_a_batch_are_grouped_where_each_keys_order_allows() -> None:
    future: Any = None  # _grouped looks at operations and keys only
    u1, u2, o = _Unit(), _Unit(), _other

    def keys(batch: list[Any]) -> list[tuple[str, str]]:
        return [("unit" if isinstance(op, _Unit) else "other", key) for op, _, key in batch]

    # The end of run r1 after its last step, a claim of r2 between: units first.
    batch = [(u1, future, "r1"), (o, future, "r2"), (u2, future, "r3"), (o, future, "r1")]
    assert keys(_grouped(batch)) == [
        ("unit", "r1"),
        ("unit", "r3"),
        ("other", "r2"),
        ("other", "r1"),
    ]
    # A control request on r1 before its step: the others first.
    batch = [(o, future, "r1"), (u1, future, "r1"), (o, future, "r2"), (u2, future, "r3")]
    assert keys(_grouped(batch)) == [
        ("other", "r1"),
        ("other", "r2"),
        ("unit", "r1"),
        ("unit", "r3"),
    ]
    # Both orders on one key: as it came.
    batch = [(o, future, "r1"), (u1, future, "r1"), (o, future, "r1")]
    assert _grouped(batch) == batch
