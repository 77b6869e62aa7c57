"""GetRun views, ListRuns filters and stable pagination, orphaned runs."""

from __future__ import annotations

import pytest
from google.protobuf.duration_pb2 import Duration

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.errors import InvalidArgument, NotFound
from stepline.ledger import queries

from .conftest import EXECUTOR, Ledger, claimed_run, create_request

R = common_pb2.WorkflowRunState


async def test_get_run_views(ledger: Ledger) -> None:
    run_id, _ = await claimed_run(ledger)
    basic = await queries.get_run(ledger.pool, pb.GetRunRequest(run_id=run_id))
    assert basic.run.run_id == run_id and not basic.run.tasks
    assert not basic.run.HasField("definition")
    with_tasks = await queries.get_run(
        ledger.pool, pb.GetRunRequest(run_id=run_id, view=run_pb2.RUN_VIEW_TASKS)
    )
    assert [t.step_id for t in with_tasks.run.tasks] == ["a", "b", "c"]
    full = await queries.get_run(
        ledger.pool, pb.GetRunRequest(run_id=run_id, view=run_pb2.RUN_VIEW_FULL)
    )
    assert full.run.definition.name == "wf"
    assert full.run.claim.executor_id == "executor-a" and full.run.claim.epoch == 1
    with pytest.raises(NotFound):
        await queries.get_run(ledger.pool, pb.GetRunRequest(run_id="nope"))
    with pytest.raises(InvalidArgument, match="run_id is required"):
        await queries.get_run(ledger.pool, pb.GetRunRequest())


async def test_list_runs_pages_are_stable_and_complete(ledger: Ledger) -> None:
    created = []
    for n in range(7):
        request = create_request(f"r{n}", name="alpha" if n % 2 else "beta")
        request.labels["team"] = "ops" if n < 4 else "web"
        created.append((await ledger.store.create_run(request)).run.run_id)
    seen: list[str] = []
    token = ""
    while True:
        page = await queries.list_runs(
            ledger.pool, pb.ListRunsRequest(page_size=3, page_token=token)
        )
        seen += [r.run_id for r in page.runs]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(created))  # newest first, each exactly once
    alpha = await queries.list_runs(
        ledger.pool, pb.ListRunsRequest(filter=run_pb2.RunFilter(workflow_name="alpha"))
    )
    assert {r.run_id for r in alpha.runs} == {created[n] for n in (1, 3, 5)}
    ops = await queries.list_runs(
        ledger.pool, pb.ListRunsRequest(filter=run_pb2.RunFilter(labels={"team": "ops"}))
    )
    assert {r.run_id for r in ops.runs} == set(created[:4])
    pending = await queries.list_runs(
        ledger.pool,
        pb.ListRunsRequest(filter=run_pb2.RunFilter(states=[R.WORKFLOW_RUN_STATE_SUCCEEDED])),
    )
    assert not pending.runs
    with pytest.raises(InvalidArgument, match="page_token"):
        await queries.list_runs(ledger.pool, pb.ListRunsRequest(page_token="garbage!"))


async def test_orphaned_runs_are_listed_for_the_reconciler(ledger: Ledger) -> None:
    fresh = (await ledger.store.create_run(create_request("fresh"))).run.run_id
    old = (await ledger.store.create_run(create_request("old"))).run.run_id
    await ledger.pool.execute(
        "UPDATE runs SET create_time = create_time - interval '1 hour' WHERE run_id = $1", old
    )
    claimed, _ = await claimed_run(ledger, "claimed")
    expired, _ = await claimed_run(ledger, "expired")
    await ledger.pool.execute(
        "UPDATE runs SET claim_expire = clock_timestamp() - interval '1 second' WHERE run_id = $1",
        expired,
    )
    response = await queries.list_orphaned_runs(
        ledger.pool, pb.ListOrphanedRunsRequest(grace_period=Duration(seconds=60))
    )
    reasons = {o.run.run_id: o.reason for o in response.runs}
    assert reasons == {
        old: pb.ORPHAN_REASON_NEVER_CLAIMED,
        expired: pb.ORPHAN_REASON_CLAIM_EXPIRED,
    }
    assert fresh not in reasons and claimed not in reasons


async def test_a_released_run_is_orphaned_only_after_the_grace(ledger: Ledger) -> None:
    """A claim given up by its holder (drain) or reset by RerunFrom leaves a job
    on its way; the reconciler dispatches again only after the grace period."""
    run_id, epoch = await claimed_run(ledger, "released")
    await ledger.store.release_claim(
        pb.ReleaseClaimRequest(
            request_id="rel", run_id=run_id, executor_id=EXECUTOR, epoch=epoch, reason="shutdown"
        )
    )
    within = await queries.list_orphaned_runs(
        ledger.pool, pb.ListOrphanedRunsRequest(grace_period=Duration(seconds=60))
    )
    assert run_id not in {o.run.run_id for o in within.runs}
    await ledger.pool.execute(
        "UPDATE runs SET claim_expire = claim_expire - interval '61 seconds' WHERE run_id = $1",
        run_id,
    )
    after = await queries.list_orphaned_runs(
        ledger.pool, pb.ListOrphanedRunsRequest(grace_period=Duration(seconds=60))
    )
    assert {o.run.run_id: o.reason for o in after.runs}[run_id] == pb.ORPHAN_REASON_CLAIM_EXPIRED
