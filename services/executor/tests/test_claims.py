"""Claim renewal and graceful hand-over of a run between executors."""

from __future__ import annotations

import asyncio

from google.protobuf.duration_pb2 import Duration

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb

from .conftest import Mesh, atomic, workflow

R = common_pb2.WorkflowRunState
E = run_pb2.RunEventType


async def orphaned_ids(mesh: Mesh) -> set[str]:
    response = await mesh.stub.ListOrphanedRuns(
        pb.ListOrphanedRunsRequest(grace_period=Duration(seconds=60))
    )
    return {o.run.run_id for o in response.runs}


async def test_a_step_longer_than_the_lease_keeps_its_claim(mesh: Mesh) -> None:
    """With a 1 s lease and a step held open for several leases, the executor's
    renewals keep the claim live: the run is never listed as orphaned and is
    claimed exactly once."""
    definition = workflow(atomic("hold", "test.gate"), atomic("after", "core.noop"))
    async with mesh.executor(lease_s=1.0, ack_wait_s=1.0):
        run_id = await mesh.start(definition)
        await asyncio.wait_for(mesh.probe.started.wait(), 20)
        loop = asyncio.get_running_loop()
        until = loop.time() + 3.5  # three and a half leases
        while loop.time() < until:
            assert run_id not in await orphaned_ids(mesh)
            await asyncio.sleep(0.25)
        mesh.probe.gate.set()
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED
    history = await mesh.stub.GetRunHistory(pb.GetRunHistoryRequest(run_id=run_id))
    claims = [e for e in history.events if e.type == E.RUN_EVENT_TYPE_CLAIMED]
    assert len(claims) == 1
    assert run.claim.epoch == 1
