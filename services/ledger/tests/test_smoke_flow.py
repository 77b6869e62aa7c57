"""A run from pre-flight to SUCCEEDED through the store."""

from __future__ import annotations

from stepline.api.common.v1 import common_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb

from .conftest import ACTOR, Ledger, claimed_run

R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState


async def test_run_to_success(ledger: Ledger) -> None:
    run_id, epoch = await claimed_run(ledger)
    store = ledger.store
    await store.transition_run(
        pb.TransitionRunRequest(
            request_id="r1",
            run_id=run_id,
            epoch=epoch,
            actor=ACTOR,
            state=R.WORKFLOW_RUN_STATE_RUNNING,
        )
    )
    for step in ("a", "b", "c"):
        task_id = f"{run_id}/{step}"
        await store.transition_task(
            pb.TransitionTaskRequest(
                request_id=f"{step}-run",
                run_id=run_id,
                task_id=task_id,
                epoch=epoch,
                actor=ACTOR,
                state=T.TASK_RUN_STATE_RUNNING,
            )
        )
        done = pb.TransitionTaskRequest(
            request_id=f"{step}-ok",
            run_id=run_id,
            task_id=task_id,
            epoch=epoch,
            actor=ACTOR,
            state=T.TASK_RUN_STATE_SUCCEEDED,
        )
        done.output.update({"step": step})
        response = await store.transition_task(done)
        assert response.task.state == T.TASK_RUN_STATE_SUCCEEDED
        assert [a.state for a in response.task.attempts] == [T.TASK_RUN_STATE_SUCCEEDED]
    final = await store.transition_run(
        pb.TransitionRunRequest(
            request_id="r2",
            run_id=run_id,
            epoch=epoch,
            actor=ACTOR,
            state=R.WORKFLOW_RUN_STATE_SUCCEEDED,
        )
    )
    assert final.run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED
    assert final.run.end_time.seconds > 0
