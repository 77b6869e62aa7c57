"""The executor's step loop against the real ledger and NATS."""

from __future__ import annotations

import asyncio

from google.protobuf.duration_pb2 import Duration

from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb

from .conftest import Mesh, atomic, workflow

R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState
F = common_pb2.FailureReason
W = workflow_pb2


def ms(value: int) -> Duration:
    return Duration(nanos=value * 1_000_000)


def task(run: run_pb2.WorkflowRun, path: str) -> run_pb2.TaskRun:
    return next(t for t in run.tasks if t.step_path == path)


async def test_sequential_steps_template_earlier_outputs(mesh: Mesh) -> None:
    definition = workflow(
        atomic("greet", "core.echo", {"text": "hello {{ inputs.who }}"}),
        atomic("copy", "core.echo", {"copied": "{{ steps.greet.text }}", "n": 3}),
    )
    async with mesh.executor():
        run_id = await mesh.start(definition, {"who": "world"})
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED
    assert dict(task(run, "copy").output) == {"copied": "hello world", "n": 3}
    assert dict(run.outputs) == {"copied": "hello world", "n": 3}
    assert [a.reason for a in task(run, "greet").attempts] == ["initial"]


async def test_failing_step_fails_the_run_and_skips_the_rest(mesh: Mesh) -> None:
    failing = workflow(
        atomic("boom", "core.fail", {"message": "no luck"}), atomic("after", "core.noop")
    )
    forbidden = workflow(atomic("x", "core.noop"), allowed_verbs=["test.*"])
    async with mesh.executor():
        failed_id = await mesh.start(failing)
        forbidden_id = await mesh.start(forbidden)
        failed = await mesh.wait_run(failed_id)
        refused = await mesh.wait_run(forbidden_id)
    assert failed.state == R.WORKFLOW_RUN_STATE_FAILED
    assert failed.failure.reason == F.FAILURE_REASON_VERB_ERROR
    assert failed.failure.message == "no luck"
    assert task(failed, "boom").state == T.TASK_RUN_STATE_FAILED
    assert task(failed, "after").state == T.TASK_RUN_STATE_SKIPPED
    assert refused.state == R.WORKFLOW_RUN_STATE_FAILED
    assert task(refused, "x").failure.reason == F.FAILURE_REASON_VERB_NOT_ALLOWED


async def test_retries_are_recorded_as_attempts(mesh: Mesh) -> None:
    mesh.probe.flaky_failures = 2
    retry = W.RetryPolicy(max_attempts=3, initial_backoff=ms(10))
    async with mesh.executor():
        run_id = await mesh.start(workflow(atomic("flaky", "test.flaky", retry=retry)))
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED
    attempts = task(run, "flaky").attempts
    assert [a.reason for a in attempts] == ["initial", "retry", "retry"]
    assert [a.state for a in attempts] == [
        T.TASK_RUN_STATE_FAILED,
        T.TASK_RUN_STATE_FAILED,
        T.TASK_RUN_STATE_SUCCEEDED,
    ]
    assert attempts[0].failure.message == "flaky failure 1"
    assert dict(task(run, "flaky").output) == {"attempt": 3}


async def test_step_timeout_times_the_run_out(mesh: Mesh) -> None:
    step = atomic("slow", "core.sleep", {"seconds": 30}, timeout=ms(200))
    async with mesh.executor():
        run_id = await mesh.start(workflow(step))
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_TIMED_OUT
    slow = task(run, "slow")
    assert slow.state == T.TASK_RUN_STATE_TIMED_OUT
    assert slow.failure.reason == F.FAILURE_REASON_TIMEOUT


async def test_parallel_branches_join(mesh: Mesh) -> None:
    group = W.Step(
        id="fanout",
        parallel=W.ParallelGroup(
            branches=[
                W.Branch(id="left", steps=[atomic("l1", "core.echo", {"side": "left"})]),
                W.Branch(
                    id="right",
                    steps=[
                        atomic("r1", "core.echo", {"side": "right"}),
                        atomic("r2", "core.echo", {"after": "{{ steps.r1.side }}"}),
                    ],
                ),
            ]
        ),
    )
    definition = workflow(group, atomic("join", "core.echo", {"got": "{{ steps.r2.after }}"}))
    async with mesh.executor():
        run_id = await mesh.start(definition)
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED
    assert task(run, "fanout/right/r2").state == T.TASK_RUN_STATE_SUCCEEDED
    assert task(run, "fanout").state == T.TASK_RUN_STATE_SUCCEEDED
    assert dict(run.outputs) == {"got": "right"}


async def test_chunks_are_shared_by_two_executors_and_run_once(mesh: Mesh) -> None:
    step = W.Step(
        id="fan",
        chunked=W.ChunkedDispatch(
            generator_verb="core.range",
            chunk_verb="test.record",
            max_concurrency=3,
        ),
    )
    step.chunked.generator_args.update({"count": 8})
    step.chunked.chunk_args.update({"value": "{{ record.value }}"})
    async with mesh.executor("executor-a"), mesh.executor("executor-b"):
        run_id = await mesh.start(workflow(step))
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure
    values = sorted(value for kind, (_, value) in mesh.probe.calls if kind == "record")
    assert values == list(range(8))  # every chunk once, none twice
    chunks = await mesh.stub.ListChunks(
        pb.ListChunksRequest(run_id=run_id, task_id=task(run, "fan").task_id)
    )
    assert all(
        len(c.attempts) == 1 and c.state == T.TASK_RUN_STATE_SUCCEEDED for c in chunks.chunks
    )
    assert dict(task(run, "fan").output)["succeeded"] == 8


async def test_workflow_ref_runs_a_child_inline(mesh: Mesh) -> None:
    child = workflow(atomic("inner", "core.echo", {"seen": "{{ inputs.value }}"}), name="child")
    mesh.workflows.definitions["child"] = child
    ref = W.Step(id="sub", workflow_ref=W.WorkflowRef(workflow_name="child", version=1))
    ref.workflow_ref.inputs.update({"value": "{{ inputs.who }}"})
    failing = workflow(atomic("inner", "core.fail", {"message": "child broke"}), name="broken")
    mesh.workflows.definitions["broken"] = failing
    bad_ref = W.Step(id="sub", workflow_ref=W.WorkflowRef(workflow_name="broken", version=1))
    async with mesh.executor():
        run_id = await mesh.start(workflow(ref), {"who": "parent"})
        bad_id = await mesh.start(workflow(bad_ref))
        run = await mesh.wait_run(run_id)
        bad = await mesh.wait_run(bad_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED
    sub = task(run, "sub")
    assert dict(sub.output) == {"seen": "parent"}
    child_run = await mesh.get(sub.child_run_id)
    assert child_run.parent_run_id == run_id and child_run.parent_task_id == sub.task_id
    assert child_run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED
    assert bad.state == R.WORKFLOW_RUN_STATE_FAILED
    assert task(bad, "sub").failure.reason == F.FAILURE_REASON_CHILD_FAILED


async def test_cancel_stops_a_running_sleep_at_once(mesh: Mesh) -> None:
    definition = workflow(
        atomic("nap", "core.sleep", {"seconds": 60}), atomic("after", "core.noop")
    )
    async with mesh.executor():
        run_id = await mesh.start(definition)
        await mesh.wait_event(
            run_id, "task", lambda e: e.task_state_changed.to_state == T.TASK_RUN_STATE_RUNNING
        )
        loop = asyncio.get_running_loop()
        asked = loop.time()
        assert not await mesh.control(run_id, run_pb2.CONTROL_ACTION_CANCEL)
        run = await mesh.wait_run(run_id)
        assert loop.time() - asked < 5
    assert run.state == R.WORKFLOW_RUN_STATE_CANCELLED
    assert run.failure.reason == F.FAILURE_REASON_CANCELLED
    assert task(run, "nap").state == T.TASK_RUN_STATE_CANCELLED
    assert task(run, "after").state == T.TASK_RUN_STATE_SKIPPED


async def test_pause_stops_at_the_step_boundary_and_resume_continues(mesh: Mesh) -> None:
    definition = workflow(atomic("hold", "test.gate"), atomic("after", "core.echo", {"ok": True}))
    async with mesh.executor():
        run_id = await mesh.start(definition)
        await mesh.probe.started.wait()
        assert not await mesh.control(run_id, run_pb2.CONTROL_ACTION_PAUSE)
        mesh.probe.gate.set()
        paused = await mesh.wait_run(run_id, R.WORKFLOW_RUN_STATE_PAUSED)
        assert task(paused, "hold").state == T.TASK_RUN_STATE_SUCCEEDED
        assert task(paused, "after").state == T.TASK_RUN_STATE_PENDING
        assert await mesh.control(run_id, run_pb2.CONTROL_ACTION_RESUME)
        dispatched = await mesh.stub.RecordDispatch(
            pb.RecordDispatchRequest(
                request_id="resume-1",
                run_id=run_id,
                expected_dispatch_epoch=1,
                actor=common_pb2.Principal(id="service:scheduler"),
                reason="resumed",
            )
        )
        await mesh.publish(run_id, dispatched.dispatch_epoch)
        run = await mesh.wait_run(run_id, R.WORKFLOW_RUN_STATE_SUCCEEDED)
    assert [a.attempt_number for a in task(run, "hold").attempts] == [1]
    assert dict(run.outputs) == {"ok": True}


async def interrupted_run(mesh: Mesh, step: W.Step) -> str:
    """A run whose only task was RUNNING when its executor died."""
    run_id = await mesh.create(workflow(step))
    claim = await mesh.stub.ClaimRun(
        pb.ClaimRunRequest(
            request_id=f"dead-{run_id}",
            run_id=run_id,
            executor_id="dead",
            lease_duration=Duration(seconds=30),
        )
    )
    actor = common_pb2.Principal(id="dead", roles=["service"])
    epoch = claim.claim.epoch
    await mesh.stub.TransitionRun(
        pb.TransitionRunRequest(
            request_id=f"r-{run_id}",
            run_id=run_id,
            epoch=epoch,
            actor=actor,
            state=R.WORKFLOW_RUN_STATE_RUNNING,
        )
    )
    await mesh.stub.TransitionTask(
        pb.TransitionTaskRequest(
            request_id=f"t-{run_id}",
            run_id=run_id,
            task_id=f"{run_id}/{step.id}",
            epoch=epoch,
            actor=actor,
            state=T.TASK_RUN_STATE_RUNNING,
        )
    )
    await mesh.stub.ReleaseClaim(
        pb.ReleaseClaimRequest(
            request_id=f"x-{run_id}", run_id=run_id, executor_id="dead", epoch=epoch, reason="died"
        )
    )
    await mesh.publish(run_id)
    return run_id


async def test_recovery_of_an_interrupted_task(mesh: Mesh) -> None:
    async with mesh.executor():
        retried = await interrupted_run(
            mesh, atomic("safe", "core.echo", {"a": 1}, idempotent=True)
        )
        failed = await interrupted_run(mesh, atomic("unsafe", "core.echo", {"a": 1}))
        retried_run = await mesh.wait_run(retried)
        failed_run = await mesh.wait_run(failed)
    assert retried_run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED
    attempts = task(retried_run, "safe").attempts
    assert [a.reason for a in attempts] == ["initial", "executor_lost"]
    assert attempts[0].failure.reason == F.FAILURE_REASON_EXECUTOR_LOST
    assert failed_run.state == R.WORKFLOW_RUN_STATE_FAILED
    assert task(failed_run, "unsafe").failure.reason == F.FAILURE_REASON_INTERRUPTED
    assert failed_run.failure.reason == F.FAILURE_REASON_INTERRUPTED
