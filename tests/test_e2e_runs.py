"""Runs end to end through the real mesh: `stepline up` processes, gRPC, NATS
JetStream and PostgreSQL (the ``mesh_state`` fixture of tests/conftest.py,
started once for the module, two executors).

Every example in examples/ runs to its documented end; run control (cancel in
each state, pause/resume, rerun, idempotent start) and validation are checked
through SchedulerService; two executors share the chunks of one step; and an
executor killed with SIGKILL in the middle of a run loses nothing: the run is
taken over once its claim lease expires. That test kills an executor, so it is
the last of the module.
"""

from __future__ import annotations

import os
import re
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.ledger.v1 import ledger_pb2
from stepline.api.scheduler.v1 import scheduler_service_pb2 as spb
from stepline.api.scheduler.v1 import workflow_service_pb2 as wpb
from stepline.cli import mesh
from stepline.cli.__main__ import run_async
from stepline.common.plan import plan
from stepline.common.states import RUN_TERMINAL

from .conftest import MeshApi, outputs, task

R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState
F = common_pb2.FailureReason
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@dataclass
class Api(MeshApi):
    async def cli(self, *argv: str) -> int:
        return await run_async(["--state-dir", str(self.state.state_dir), *argv])

    async def register(self, text: str) -> wpb.WorkflowVersion:
        response = await self.workflows.RegisterWorkflow(
            wpb.RegisterWorkflowRequest(
                request_id=str(uuid.uuid4()),
                source_text=wpb.WorkflowSource(format=wpb.SOURCE_FORMAT_YAML, text=text),
            )
        )
        return response.workflow

    async def example(self, name: str) -> wpb.WorkflowVersion:
        return await self.register((EXAMPLES / f"{name}.yaml").read_text(encoding="utf-8"))

    async def start(
        self, name: str, inputs: dict[str, Any] | None = None, *, request_id: str = ""
    ) -> spb.StartRunResponse:
        values = struct_pb2.Struct()
        values.update(inputs or {})
        return await self.runs.StartRun(
            spb.StartRunRequest(
                request_id=request_id or str(uuid.uuid4()), workflow_name=name, inputs=values
            )
        )

    async def chunks(self, run_id: str, task_id: str) -> list[run_pb2.ChunkRun]:
        collected: list[run_pb2.ChunkRun] = []
        request = ledger_pb2.ListChunksRequest(run_id=run_id, task_id=task_id, page_size=100)
        while True:
            page = await self.ledger.ListChunks(request)
            collected.extend(page.chunks)
            if not page.next_page_token:
                return sorted(collected, key=lambda c: c.index)
            request.page_token = page.next_page_token


def attempt_running(path: str) -> Callable[[run_pb2.WorkflowRun], bool]:
    """The condition: the task's latest attempt is running."""

    def check(run: run_pb2.WorkflowRun) -> bool:
        attempts = task(run, path).attempts
        return bool(attempts) and attempts[-1].state == T.TASK_RUN_STATE_RUNNING

    return check


# --- the examples ------------------------------------------------------------------


async def test_every_example_applies_through_the_cli(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        assert await api.cli("workflows", "apply", str(path)) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    for path in EXAMPLES.glob("*.yaml"):
        assert re.search(rf"workflow {path.stem} version \d+ (created|unchanged)", text), text


async def test_hello_runs_to_success_with_the_cli_wait(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    await api.example("hello")
    assert await api.cli("run", "hello", "--input", "name=Ada", "--wait") == 0
    text = capsys.readouterr().out
    found = re.search(r"run (\S+) started: hello", text)
    assert found is not None, text
    assert "SUCCEEDED" in text
    run = await api.get(found.group(1))
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED
    assert [t.state for t in run.tasks] == [T.TASK_RUN_STATE_SUCCEEDED] * 4
    assert all(len(t.attempts) == 1 for t in run.tasks)
    goodbye = outputs(task(run, "goodbye").output)
    assert goodbye == {"message": "Goodbye, Ada.", "greeting": "Hello, Ada!"}
    assert outputs(run.outputs) == goodbye


async def test_retry_example_fails_after_its_three_attempts(api: Api) -> None:
    await api.example("retry")
    run = await api.finished((await api.start("retry")).run.run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_FAILED
    assert run.failure.reason == F.FAILURE_REASON_VERB_ERROR
    flaky = task(run, "flaky")
    assert flaky.state == T.TASK_RUN_STATE_FAILED
    assert [a.attempt_number for a in flaky.attempts] == [1, 2, 3]
    assert [a.state for a in flaky.attempts] == [T.TASK_RUN_STATE_FAILED] * 3
    assert {a.failure.reason for a in flaky.attempts} == {F.FAILURE_REASON_VERB_ERROR}
    assert [a.reason for a in flaky.attempts[1:]] == ["retry", "retry"]
    never = task(run, "never")
    assert never.state == T.TASK_RUN_STATE_SKIPPED
    assert not never.attempts


async def test_timeout_example_times_out(api: Api) -> None:
    await api.example("timeout")
    run = await api.finished((await api.start("timeout")).run.run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_TIMED_OUT
    slow = task(run, "too-slow")
    assert slow.state == T.TASK_RUN_STATE_TIMED_OUT
    assert slow.failure.reason == F.FAILURE_REASON_TIMEOUT
    assert len(slow.attempts) == 1


async def test_chunked_example_runs_every_chunk_exactly_once(api: Api) -> None:
    await api.example("chunked")
    run = await api.finished((await api.start("chunked", {"greeting": "Hey"})).run.run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure
    fan_out = task(run, "fan-out")
    assert fan_out.chunk_counts.total == 3
    assert fan_out.chunk_counts.succeeded == 3
    chunks = await api.chunks(run.run_id, fan_out.task_id)
    assert [outputs(c.output)["message"] for c in chunks] == [
        "Hey, ada",
        "Hey, grace",
        "Hey, linus",
    ]
    for chunk in chunks:
        assert chunk.state == T.TASK_RUN_STATE_SUCCEEDED
        assert len(chunk.attempts) == 1, chunk
    assert task(run, "done").state == T.TASK_RUN_STATE_SUCCEEDED


async def test_range_example_succeeds_with_its_chunks(api: Api) -> None:
    await api.example("range")
    run = await api.finished((await api.start("range", {"count": 4})).run.run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure
    numbers = task(run, "numbers")
    assert numbers.chunk_counts.total == numbers.chunk_counts.succeeded == 4


async def test_nested_example_links_its_child_run(api: Api) -> None:
    await api.example("hello")
    await api.example("nested")
    run = await api.finished((await api.start("nested", {"who": "Grace"})).run.run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure
    ref = task(run, "say-hello")
    assert ref.state == T.TASK_RUN_STATE_SUCCEEDED
    assert ref.child_run_id
    assert ref.child_workflow_version >= 1
    child = await api.get(ref.child_run_id)
    assert child.workflow_name == "hello"
    assert child.workflow_version == ref.child_workflow_version
    assert child.state == R.WORKFLOW_RUN_STATE_SUCCEEDED
    assert (child.parent_run_id, child.parent_task_id) == (run.run_id, ref.task_id)
    assert outputs(child.inputs) == {"name": "Grace"}
    assert outputs(task(run, "report").output) == {"message": "hello ran for Grace"}


async def test_parallel_example_joins_both_branches(api: Api) -> None:
    await api.example("parallel")
    run = await api.finished((await api.start("parallel")).run.run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure
    paths = [t.step_path for t in run.tasks]
    assert paths == [
        "start",
        "fan",
        "fan/left/left-1",
        "fan/left/left-2",
        "fan/right/right-1",
        "join",
    ]
    join = task(run, "join")
    for branch_end in ("fan/left/left-2", "fan/right/right-1", "fan"):
        assert task(run, branch_end).end_time.ToDatetime() <= join.start_time.ToDatetime()
    assert outputs(join.output) == {"left": "left done after starting", "right": "right done"}


async def test_approval_example_suspends_until_someone_decides(api: Api) -> None:
    await api.example("approval")
    run_id = (await api.start("approval", {"amount": 42})).run.run_id
    run = await api.until(
        run_id,
        lambda r: r.state in RUN_TERMINAL or task(r, "ask").state == T.TASK_RUN_STATE_SUSPENDED,
        "its approval step suspended",
    )
    assert task(run, "ask").state == T.TASK_RUN_STATE_SUSPENDED, run.failure
    assert task(run, "ask").approval_id
    await api.runs.CancelRun(
        spb.CancelRunRequest(request_id=str(uuid.uuid4()), run_id=run_id, reason="test over")
    )
    run = await api.finished(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_CANCELLED
    assert task(run, "publish").state == T.TASK_RUN_STATE_SKIPPED


# --- run control -------------------------------------------------------------------

SLEEPER = """
name: e2e-sleeper
allowed_verbs: [core.echo, core.sleep]
input_schema:
  fields:
    - {name: seconds, type: INPUT_TYPE_FLOAT, default: 30}
steps:
  - id: first
    atomic: {verb: core.echo, args: {message: first}}
  - id: nap
    atomic: {verb: core.sleep, args: {seconds: "{{ inputs.seconds }}"}}
  - id: last
    atomic: {verb: core.echo, args: {message: last}}
"""


async def _cancel(api: Api, run_id: str) -> spb.CancelRunResponse:
    return await api.runs.CancelRun(
        spb.CancelRunRequest(request_id=str(uuid.uuid4()), run_id=run_id, reason="e2e cancel")
    )


async def test_cancel_while_a_step_is_running_interrupts_it(api: Api) -> None:
    await api.register(SLEEPER)
    run_id = (await api.start("e2e-sleeper")).run.run_id
    await api.until(run_id, attempt_running("nap"), "its sleep running")
    await _cancel(api, run_id)
    run = await api.finished(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_CANCELLED
    assert run.failure.reason == F.FAILURE_REASON_CANCELLED
    assert task(run, "first").state == T.TASK_RUN_STATE_SUCCEEDED
    nap = task(run, "nap")
    assert nap.state == T.TASK_RUN_STATE_CANCELLED
    assert nap.failure.reason == F.FAILURE_REASON_CANCELLED
    assert task(run, "last").state == T.TASK_RUN_STATE_SKIPPED


async def test_cancel_while_pending_ends_the_run_before_any_step(api: Api) -> None:
    """A run recorded but not yet dispatched (created on the ledger directly, as
    StartRun does before it publishes the job) is cancelled at once."""
    definition = (await api.register(SLEEPER)).definition
    inputs = struct_pb2.Struct()
    inputs.update({"seconds": 1.0})
    created = await api.ledger.CreateRun(
        ledger_pb2.CreateRunRequest(
            request_id=str(uuid.uuid4()),
            definition=definition,
            inputs=inputs,
            initiator=common_pb2.Principal(id="admin", roles=["admin"]),
            tasks=plan(definition),
        )
    )
    assert created.run.state == R.WORKFLOW_RUN_STATE_PENDING
    response = await _cancel(api, created.run.run_id)
    assert response.run.state == R.WORKFLOW_RUN_STATE_CANCELLED
    run = await api.get(created.run.run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_CANCELLED
    assert not run.HasField("start_time")
    assert all(t.state == T.TASK_RUN_STATE_SKIPPED and not t.attempts for t in run.tasks)


async def _paused(api: Api) -> run_pb2.WorkflowRun:
    """A run of the sleeper paused after its (short) sleep."""
    await api.register(SLEEPER)
    run_id = (await api.start("e2e-sleeper", {"seconds": 0.5})).run.run_id
    await api.until(run_id, attempt_running("nap"), "its sleep running")
    paused = await api.runs.PauseRun(
        spb.PauseRunRequest(request_id=str(uuid.uuid4()), run_id=run_id, reason="e2e pause")
    )
    assert paused.run.pending_control == run_pb2.CONTROL_ACTION_PAUSE
    run = await api.until(
        run_id,
        lambda r: r.state == R.WORKFLOW_RUN_STATE_PAUSED and not r.claim.executor_id,
        "PAUSED at a step boundary, its claim released",
    )
    assert task(run, "nap").state == T.TASK_RUN_STATE_SUCCEEDED
    assert task(run, "last").state == T.TASK_RUN_STATE_PENDING
    return run


async def test_pause_then_resume_continues_where_it_stopped(api: Api) -> None:
    run = await _paused(api)
    await api.runs.ResumeRun(
        spb.ResumeRunRequest(request_id=str(uuid.uuid4()), run_id=run.run_id, reason="go on")
    )
    run = await api.finished(run.run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure
    assert [len(t.attempts) for t in run.tasks] == [1, 1, 1]


async def test_cancel_while_paused(api: Api) -> None:
    run = await _paused(api)
    response = await _cancel(api, run.run_id)
    assert response.run.state == R.WORKFLOW_RUN_STATE_CANCELLED
    run = await api.get(run.run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_CANCELLED
    assert task(run, "last").state == T.TASK_RUN_STATE_SKIPPED


FAILING = """
name: e2e-failing
allowed_verbs: [core.echo, core.fail]
steps:
  - id: prepare
    atomic: {verb: core.echo, args: {message: prepared}}
  - id: break
    atomic: {verb: core.fail, args: {message: broken on purpose}}
  - id: finish
    atomic: {verb: core.echo, args: {message: finished}}
"""


async def test_rerun_from_a_failed_step_keeps_the_completed_ones(api: Api) -> None:
    await api.register(FAILING)
    first = await api.finished((await api.start("e2e-failing")).run.run_id)
    assert first.state == R.WORKFLOW_RUN_STATE_FAILED
    prepared = task(first, "prepare")
    assert len(prepared.attempts) == 1
    rerun = await api.runs.RerunFrom(
        spb.RerunFromRequest(
            request_id=str(uuid.uuid4()), run_id=first.run_id, step_id="break", reason="again"
        )
    )
    assert rerun.run.rerun_count == 1
    again = await api.until(
        first.run_id,
        lambda r: r.state in RUN_TERMINAL and len(task(r, "break").attempts) == 2,
        "its failed step run again",
    )
    assert again.state == R.WORKFLOW_RUN_STATE_FAILED
    assert again.rerun_count == 1
    kept = task(again, "prepare")
    assert kept.state == T.TASK_RUN_STATE_SUCCEEDED
    assert list(kept.attempts) == list(prepared.attempts)  # not run again
    broke = task(again, "break")
    assert [a.attempt_number for a in broke.attempts] == [1, 2]
    assert broke.failure.reason == F.FAILURE_REASON_VERB_ERROR
    assert task(again, "finish").state == T.TASK_RUN_STATE_SKIPPED


async def test_start_with_the_same_idempotency_key_returns_the_same_run(api: Api) -> None:
    await api.example("hello")
    key = f"e2e-{uuid.uuid4()}"
    first = await api.start("hello", {"name": "Linus"}, request_id=key)
    second = await api.start("hello", {"name": "Linus"}, request_id=key)
    assert first.created and not second.created
    assert second.run.run_id == first.run.run_id
    await api.finished(first.run.run_id)
    listed = await api.runs.ListRuns(
        spb.ListRunsRequest(filter=run_pb2.RunFilter(workflow_name="hello"), page_size=100)
    )
    assert [r.run_id for r in listed.runs].count(first.run.run_id) == 1


async def test_an_invalid_definition_is_refused_and_nothing_is_stored(api: Api) -> None:
    text = SLEEPER.replace("e2e-sleeper", "e2e-invalid").replace("core.sleep]", "core.nope]")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await api.register(text)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    assert '"nap"' in details and "core.sleep" in details, details
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await api.workflows.GetWorkflow(wpb.GetWorkflowRequest(name="e2e-invalid"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_invalid_inputs_are_refused_and_no_run_is_created(api: Api) -> None:
    await api.register(SLEEPER)
    run_filter = run_pb2.RunFilter(workflow_name="e2e-sleeper")
    before = await api.runs.ListRuns(spb.ListRunsRequest(filter=run_filter, page_size=100))
    for inputs, pointed in (
        ({"who": "x"}, "inputs.who"),
        ({"seconds": "soon"}, "inputs.seconds"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await api.start("e2e-sleeper", inputs)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert pointed in (refused.value.details() or ""), refused.value.details()
    after = await api.runs.ListRuns(spb.ListRunsRequest(filter=run_filter, page_size=100))
    assert [r.run_id for r in after.runs] == [r.run_id for r in before.runs]


# --- several executors -------------------------------------------------------------

SHARED_CHUNKS = """
name: e2e-shared-chunks
allowed_verbs: [core.range, core.sleep]
steps:
  - id: each
    chunked:
      generator_verb: core.range
      generator_args: {count: 12}
      chunk_verb: core.sleep
      chunk_args: {seconds: 0.2}
      max_concurrency: 6
"""


def executor_ids(state: mesh.MeshState) -> dict[str, int]:
    """Executor id (STEPLINE_EXECUTOR_ID as `stepline up` sets it) -> its pid."""
    return {
        (c.name if c.name[-1].isdigit() else f"{c.name}-1"): c.pid
        for c in state.components
        if c.name.startswith("executor")
    }


async def test_two_executors_share_the_chunks_of_a_step(api: Api) -> None:
    await api.register(SHARED_CHUNKS)
    run = await api.finished((await api.start("e2e-shared-chunks")).run.run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure
    each = task(run, "each")
    chunks = await api.chunks(run.run_id, each.task_id)
    assert [c.index for c in chunks] == list(range(12))
    for chunk in chunks:
        assert chunk.state == T.TASK_RUN_STATE_SUCCEEDED
        assert len(chunk.attempts) == 1, chunk
    ran_on = {c.attempts[0].executor_id for c in chunks}
    assert ran_on == set(executor_ids(api.state)), ran_on


# --- losing an executor (last: it kills one) ---------------------------------------

FRAGILE = """
name: e2e-fragile
allowed_verbs: [core.echo, core.sleep]
steps:
  - id: before
    atomic: {verb: core.echo, args: {message: before}}
  - id: both
    parallel:
      branches:
        - id: once
          steps:
            - id: fragile
              atomic: {verb: core.sleep, args: {seconds: 3}}
        - id: again
          steps:
            - id: sturdy
              idempotent: true
              atomic: {verb: core.sleep, args: {seconds: 3}}
  - id: after
    atomic: {verb: core.echo, args: {message: after}}
"""


async def test_a_killed_executor_s_run_is_taken_over_after_its_lease(api: Api) -> None:
    await api.register(FRAGILE)
    run_id = (await api.start("e2e-fragile")).run.run_id

    def both_sleeping(run: run_pb2.WorkflowRun) -> bool:
        return attempt_running("both/once/fragile")(run) and attempt_running("both/again/sturdy")(
            run
        )

    run = await api.until(run_id, both_sleeping, "both sleeps running")
    lost = run.claim.executor_id
    pids = executor_ids(api.state)
    assert lost in pids, (lost, pids)
    (survivor,) = set(pids) - {lost}
    os.kill(pids[lost], signal.SIGKILL)

    run = await api.finished(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_FAILED, run
    before = task(run, "before")
    assert before.state == T.TASK_RUN_STATE_SUCCEEDED
    assert [a.executor_id for a in before.attempts] == [lost]  # not run again
    fragile = task(run, "both/once/fragile")
    assert fragile.state == T.TASK_RUN_STATE_FAILED
    assert fragile.failure.reason == F.FAILURE_REASON_INTERRUPTED
    assert len(fragile.attempts) == 1
    sturdy = task(run, "both/again/sturdy")
    assert sturdy.state == T.TASK_RUN_STATE_SUCCEEDED
    first, second = sturdy.attempts
    assert (first.executor_id, first.state) == (lost, T.TASK_RUN_STATE_FAILED)
    assert first.failure.reason == F.FAILURE_REASON_EXECUTOR_LOST
    assert (second.executor_id, second.reason) == (survivor, "executor_lost")
    assert task(run, "after").state == T.TASK_RUN_STATE_SKIPPED
