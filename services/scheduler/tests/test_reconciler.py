"""The reconciler against a real ledger: runs whose job nobody took are
dispatched again under a new epoch; runs past their deadline end TIMED_OUT."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration

from stepline.api.common.v1 import common_pb2
from stepline.api.ledger.v1 import ledger_pb2
from stepline.api.scheduler.v1 import scheduler_service_pb2 as pb
from stepline.scheduler.reconciler import Reconciler
from stepline.scheduler.server import connected

from .conftest import Mesh, hello


def start(request_id: str) -> pb.StartRunRequest:
    request = pb.StartRunRequest(request_id=request_id, workflow_name="hello")
    request.inputs.update({"who": "again"})
    return request


async def test_a_run_whose_job_was_never_consumed_is_dispatched_under_a_new_epoch(
    mesh: Mesh,
) -> None:
    await mesh.register(hello())
    run = (await mesh.scheduler.StartRun(start("r-1"))).run
    async with connected(mesh.settings) as parts:
        reconciler = Reconciler(parts.runs, grace_s=0.001)
        assert await reconciler.reconcile() == 1
    jobs = await mesh.jobs()
    assert [(j.job.run_id, j.job.dispatch_epoch, j.msg_id) for j in jobs] == [
        (run.run_id, 1, f"run:{run.run_id}:1"),
        (run.run_id, 2, f"run:{run.run_id}:2"),
    ]
    got = await mesh.ledger.GetRun(ledger_pb2.GetRunRequest(run_id=run.run_id))
    assert got.run.dispatch_epoch == 2
    assert got.run.state == common_pb2.WORKFLOW_RUN_STATE_PENDING


async def test_a_fresh_run_is_left_to_its_first_job(mesh: Mesh) -> None:
    await mesh.register(hello())
    await mesh.scheduler.StartRun(start("r-2"))
    async with connected(mesh.settings) as parts:
        assert await Reconciler(parts.runs, grace_s=60).reconcile() == 0
    assert len(await mesh.jobs()) == 1


async def test_a_run_past_its_deadline_ends_timed_out(mesh: Mesh) -> None:
    await mesh.register(hello(run_timeout=Duration(nanos=1_000_000)))
    run = (await mesh.scheduler.StartRun(start("r-3"))).run
    async with connected(mesh.settings) as parts:
        assert await Reconciler(parts.runs, grace_s=60).reconcile() == 1
    got = await mesh.ledger.GetRun(ledger_pb2.GetRunRequest(run_id=run.run_id))
    assert got.run.state == common_pb2.WORKFLOW_RUN_STATE_TIMED_OUT
    assert got.run.failure.reason == common_pb2.FAILURE_REASON_DEADLINE_EXCEEDED
