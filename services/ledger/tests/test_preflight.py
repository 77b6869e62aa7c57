"""Pre-flight commit: CreateRun and CreateChunks, atomic and idempotent."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.errors import Aborted, FailedPrecondition, InvalidArgument
from stepline.common.testing import eventually
from stepline.ledger.committer import GroupCommitter
from stepline.ledger.relay import pending_count
from stepline.ledger.store import LedgerStore

from .conftest import ACTOR, EXECUTOR, Ledger, claimed_run, create_request

R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState


async def _counts(pool: asyncpg.Pool) -> dict[str, int]:
    return {
        table: await pool.fetchval(f"SELECT count(*) FROM {table}")
        for table in ("runs", "tasks", "events", "requests")
    }


async def test_create_run_records_the_run_and_every_task(ledger: Ledger) -> None:
    response = await ledger.store.create_run(create_request())
    run = response.run
    assert response.created
    assert run.state == R.WORKFLOW_RUN_STATE_PENDING
    assert run.dispatch_epoch == 1
    assert [t.task_id for t in run.tasks] == [f"{run.run_id}/{s}" for s in ("a", "b", "c")]
    assert [t.ordinal for t in run.tasks] == [0, 1, 2]
    assert all(t.state == T.TASK_RUN_STATE_PENDING for t in run.tasks)
    assert run.inputs["who"] == "world"
    events = await ledger.pool.fetch("SELECT sequence, type FROM events ORDER BY sequence")
    assert [(e["sequence"], e["type"]) for e in events] == [(1, run_pb2.RUN_EVENT_TYPE_RUN_CREATED)]
    assert await pending_count(ledger.pool) == 1  # waiting for the relay


async def test_create_run_is_idempotent(ledger: Ledger) -> None:
    first = await ledger.store.create_run(create_request("same"))
    before = await _counts(ledger.pool)
    again = await ledger.store.create_run(create_request("same"))
    assert not again.created
    assert again.run.run_id == first.run.run_id
    assert [t.task_id for t in again.run.tasks] == [t.task_id for t in first.run.tasks]
    assert await _counts(ledger.pool) == before


async def test_a_replayed_creation_answers_the_run_as_it_is_now(ledger: Ledger) -> None:
    run_id, _ = await claimed_run(ledger, "same")
    again = await ledger.store.create_run(create_request("same"))
    assert not again.created
    assert again.run.run_id == run_id
    assert again.run.claim.executor_id == EXECUTOR


async def test_a_creation_answers_in_the_view_asked_for(ledger: Ledger) -> None:
    request = create_request("viewed")
    request.view = run_pb2.RUN_VIEW_BASIC
    created = await ledger.store.create_run(request)
    replayed = await ledger.store.create_run(request)
    for response in (created, replayed):
        assert response.run.run_id and not response.run.tasks
        assert not response.run.HasField("definition")
    assert [created.created, replayed.created] == [True, False]
    request.view = run_pb2.RUN_VIEW_FULL
    full = await ledger.store.create_run(request)
    assert full.run.definition.name == request.definition.name
    assert [t.step_path for t in full.run.tasks] == ["a", "b", "c"]
    # the tasks are still all written
    assert (await _counts(ledger.pool))["tasks"] == 3


async def test_concurrent_identical_creations_make_one_run(ledger: Ledger) -> None:
    responses = await asyncio.gather(
        *(ledger.store.create_run(create_request("same")) for _ in range(5))
    )
    assert len({r.run.run_id for r in responses}) == 1
    assert [r.created for r in responses].count(True) == 1
    assert (await _counts(ledger.pool))["runs"] == 1


async def test_identical_creations_on_two_replicas_make_one_run(ledger: Ledger) -> None:
    """Two ledger replicas (each its own committer) get the same CreateRun at
    once: both pass any look for an earlier one before either inserts, and the
    second's insert waits for the first's. One creates, the other replays."""
    other = GroupCommitter(ledger.pool)
    await other.start()
    replicas = (ledger.store, LedgerStore(ledger.pool, other))
    try:
        async with ledger.pool.acquire() as blocker, blocker.transaction():
            # creations wait for this lock as they begin to write
            await blocker.execute("LOCK TABLE runs IN SHARE MODE")
            creations = [
                asyncio.create_task(store.create_run(create_request("same"))) for store in replicas
            ]

            async def both_waiting() -> bool:
                waiting = await ledger.pool.fetchval(
                    "SELECT count(*) FROM pg_locks"
                    " WHERE NOT granted AND relation = 'runs'::regclass"
                )
                return bool(waiting == 2)

            await eventually(both_waiting, timeout_s=30, what="both creations waiting")
        responses = await asyncio.gather(*creations)
    finally:
        await other.close()
    assert len({r.run.run_id for r in responses}) == 1
    assert sorted(r.created for r in responses) == [False, True]
    assert (await _counts(ledger.pool))["runs"] == 1


@pytest.mark.parametrize("write", ["create", "claim"])
async def test_a_run_s_first_writes_do_not_wait_for_the_shards(ledger: Ledger, write: str) -> None:
    """A run's creation and its claim are applied beside the committer's shards:
    shards busy with long batches do not hold them up."""
    committer = ledger.store.committer
    run_id = (await ledger.store.create_run(create_request("early"))).run.run_id
    release, all_held = asyncio.Event(), asyncio.Event()
    busy = 0

    async def hold(conn: asyncpg.Connection) -> None:
        nonlocal busy
        busy += 1
        if busy == committer.shard_count:
            all_held.set()
        await release.wait()

    # 64 keys: each shard takes one batch of several and holds on its first
    holders = [asyncio.create_task(committer.submit(f"key-{n}", hold)) for n in range(64)]
    try:
        await asyncio.wait_for(all_held.wait(), 30)
        if write == "create":
            created = await asyncio.wait_for(ledger.store.create_run(create_request()), 30)
            assert created.created
        else:
            claim = pb.ClaimRunRequest(
                request_id="c", run_id=run_id, executor_id=EXECUTOR, start=True
            )
            claimed = await asyncio.wait_for(ledger.store.claim_run(claim), 30)
            assert claimed.run.state == R.WORKFLOW_RUN_STATE_RUNNING
        assert busy == committer.shard_count  # every shard still held meanwhile
    finally:
        release.set()
        await asyncio.gather(*holders)


async def test_a_conflicting_replay_is_refused_and_changes_nothing(ledger: Ledger) -> None:
    await ledger.store.create_run(create_request("same"))
    before = await _counts(ledger.pool)
    different = create_request("same", steps=("x",))
    with pytest.raises(Aborted, match="already used"):
        await ledger.store.create_run(different)
    assert await _counts(ledger.pool) == before


async def test_a_failure_mid_way_leaves_no_partial_run(ledger: Ledger) -> None:
    request = create_request("broken")
    request.tasks[2].verb = "core.\x00noop"  # PostgreSQL text cannot hold NUL: fails on insert
    with pytest.raises(asyncpg.CharacterNotInRepertoireError):
        await ledger.store.create_run(request)
    assert await _counts(ledger.pool) == dict.fromkeys(("runs", "tasks", "events", "requests"), 0)
    # The ledger keeps working for everyone else.
    assert (await ledger.store.create_run(create_request("fine"))).created


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.ClearField("request_id"), "request_id is required"),
        (lambda r: r.definition.ClearField("name"), "definition.name is required"),
        (lambda r: setattr(r.definition, "version", 0), "definition.version"),
        (lambda r: r.ClearField("tasks"), "tasks must list"),
        (lambda r: r.initiator.ClearField("id"), "initiator.id is required"),
        (lambda r: setattr(r.tasks[1], "step_path", "a"), "step_path 'a' is repeated"),
        (lambda r: r.inputs.update({"blob": "x" * (1024 * 1024 + 1)}), "inputs is"),
        (lambda r: setattr(r.tasks[0], "kind", 40000), "is not a StepKind"),
        (lambda r: setattr(r, "view", 77), "view 77 is not a RunView"),
    ],
)
async def test_malformed_create_run_is_invalid_and_changes_nothing(
    ledger: Ledger, mutate: object, message: str
) -> None:
    request = create_request()
    mutate(request)  # type: ignore[operator]
    with pytest.raises(InvalidArgument, match=message):
        await ledger.store.create_run(request)
    assert (await _counts(ledger.pool))["runs"] == 0


def _chunks(
    run_id: str, epoch: int, first: int, count: int, *, last: bool, rid: str
) -> pb.CreateChunksRequest:
    request = pb.CreateChunksRequest(
        request_id=rid,
        run_id=run_id,
        task_id=f"{run_id}/b",
        epoch=epoch,
        actor=ACTOR,
        first_index=first,
        last_batch=last,
    )
    for index in range(first, first + count):
        request.records.add().update({"n": index})
    return request


async def test_create_chunks_in_contiguous_batches(ledger: Ledger) -> None:
    run_id, epoch = await claimed_run(ledger, chunked="b")
    store = ledger.store
    await store.transition_run(
        pb.TransitionRunRequest(
            request_id="run",
            run_id=run_id,
            epoch=epoch,
            actor=ACTOR,
            state=R.WORKFLOW_RUN_STATE_RUNNING,
        )
    )
    await store.transition_task(
        pb.TransitionTaskRequest(
            request_id="b",
            run_id=run_id,
            task_id=f"{run_id}/b",
            epoch=epoch,
            actor=ACTOR,
            state=T.TASK_RUN_STATE_RUNNING,
        )
    )
    first = await store.create_chunks(_chunks(run_id, epoch, 0, 3, last=False, rid="c0"))
    assert [c.chunk_id for c in first.chunks] == [f"{run_id}/b#{i}" for i in range(3)]
    assert not first.counts.complete
    with pytest.raises(FailedPrecondition, match="gap or overlap"):
        await store.create_chunks(_chunks(run_id, epoch, 5, 1, last=True, rid="gap"))
    again = await store.create_chunks(_chunks(run_id, epoch, 0, 3, last=False, rid="c0"))
    assert again == first
    last = await store.create_chunks(_chunks(run_id, epoch, 3, 2, last=True, rid="c3"))
    assert last.counts.total == 5 and last.counts.pending == 5 and last.counts.complete
    with pytest.raises(FailedPrecondition, match="complete"):
        await store.create_chunks(_chunks(run_id, epoch, 5, 1, last=True, rid="c5"))
    assert await ledger.pool.fetchval("SELECT count(*) FROM chunks") == 5


async def test_chunks_are_claimed_and_dispatched_on_their_own(ledger: Ledger) -> None:
    run_id, epoch = await claimed_run(ledger, chunked="b")
    store = ledger.store
    await store.transition_run(
        pb.TransitionRunRequest(
            request_id="run",
            run_id=run_id,
            epoch=epoch,
            actor=ACTOR,
            state=R.WORKFLOW_RUN_STATE_RUNNING,
        )
    )
    await store.transition_task(
        pb.TransitionTaskRequest(
            request_id="b",
            run_id=run_id,
            task_id=f"{run_id}/b",
            epoch=epoch,
            actor=ACTOR,
            state=T.TASK_RUN_STATE_RUNNING,
        )
    )
    await store.create_chunks(_chunks(run_id, epoch, 0, 2, last=True, rid="c0"))
    chunk_id = f"{run_id}/b#1"
    dispatched = await store.record_dispatch(
        pb.RecordDispatchRequest(
            request_id="d1",
            run_id=run_id,
            chunk_id=chunk_id,
            expected_dispatch_epoch=1,
            actor=ACTOR,
            reason="chunk_ready",
        )
    )
    assert dispatched.dispatch_epoch == 2
    with pytest.raises(Aborted, match="someone else dispatched it"):
        await store.record_dispatch(
            pb.RecordDispatchRequest(
                request_id="d2",
                run_id=run_id,
                chunk_id=chunk_id,
                expected_dispatch_epoch=1,
                actor=ACTOR,
            )
        )
    with pytest.raises(FailedPrecondition, match="stale job"):
        await store.claim_run(
            pb.ClaimRunRequest(
                request_id="old-job",
                run_id=run_id,
                chunk_id=chunk_id,
                executor_id="executor-b",
                dispatch_epoch=1,
            )
        )
    claim = await store.claim_run(
        pb.ClaimRunRequest(
            request_id="chunk-claim",
            run_id=run_id,
            chunk_id=chunk_id,
            executor_id="executor-b",
            dispatch_epoch=2,
        )
    )
    assert claim.chunk.chunk_id == chunk_id and claim.claim.epoch == 1
    for state, rid in ((T.TASK_RUN_STATE_RUNNING, "x1"), (T.TASK_RUN_STATE_SUCCEEDED, "x2")):
        moved = await store.transition_chunk(
            pb.TransitionChunkRequest(
                request_id=rid,
                run_id=run_id,
                chunk_id=chunk_id,
                epoch=claim.claim.epoch,
                actor=ACTOR,
                state=state,
            )
        )
    assert moved.chunk.state == T.TASK_RUN_STATE_SUCCEEDED
    assert moved.counts.succeeded == 1 and moved.counts.pending == 1
    released = await store.release_claim(
        pb.ReleaseClaimRequest(
            request_id="rel",
            run_id=run_id,
            chunk_id=chunk_id,
            executor_id="executor-b",
            epoch=claim.claim.epoch,
        )
    )
    assert released.claim.epoch == claim.claim.epoch
    holder = await ledger.pool.fetchval(
        "SELECT claim_executor FROM chunks WHERE chunk_id = $1", chunk_id
    )
    assert holder is None
