"""Verbs registered ``cancellable=False`` under cancel, loss of the claim,
timeouts and shutdown; and the executor's graceful drain (what SIGTERM does):
the running step finishes and is recorded, the claim is released, no new job
is taken, and another executor continues the run from the next step."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration

from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.server import GrpcHost
from stepline.executor.attempts import invoke
from stepline.executor.control import Control
from stepline.executor.server import running as executor_running
from stepline.executor.verbs.base import VerbContext, VerbError
from stepline.executor.verbs.registry import VerbRegistry

from .conftest import WAIT_S, Mesh, atomic, workflow

R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState
F = common_pb2.FailureReason
E = run_pb2.RunEventType
C = run_pb2.ControlAction


# -- test verbs and executors ------------------------------------------------


@dataclass
class Verbs:
    """Shared state of this module's test verbs."""

    calls: list[tuple[str, str]] = field(default_factory=list)  # (step id, executor id)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    interrupted: asyncio.Event = field(default_factory=asyncio.Event)
    fail: bool = False


def registry(verbs: Verbs, executor_id: str) -> VerbRegistry:
    """The built-in verbs plus ``test.steady`` (not cancellable) and
    ``test.hold`` (cancellable), which wait for ``verbs.gate``, and
    ``test.mark``; each records which executor ran it."""
    registry = VerbRegistry.default(plugins=[])

    async def hold(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
        verbs.calls.append((ctx.step_id, executor_id))
        verbs.started.set()
        try:
            await verbs.gate.wait()
        except asyncio.CancelledError:
            verbs.interrupted.set()
            raise
        if verbs.fail:
            raise VerbError(f"{ctx.step_id} failed on its own")
        return {"by": executor_id}

    async def mark(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
        verbs.calls.append((ctx.step_id, executor_id))
        return {"by": executor_id}

    registry.register("test.steady", hold, cancellable=False)
    registry.register("test.hold", hold)
    registry.register("test.mark", mark)
    return registry


@dataclass
class Served:
    """An executor served as ``stepline.executor.server.serve`` does it."""

    host: GrpcHost
    task: asyncio.Task[None]

    def sigterm(self) -> None:
        """What the executor's SIGTERM handler calls (GrpcHost.install_signal_handlers)."""
        self.host.request_stop()

    async def stopped(self) -> None:
        await asyncio.wait_for(asyncio.shield(self.task), WAIT_S)


@contextlib.asynccontextmanager
async def serving(
    mesh: Mesh, verbs: Verbs, executor_id: str, *, grace_s: float = 5.0, **overrides: Any
) -> AsyncIterator[Served]:
    # The default ack wait (30 s, beyond WAIT_S): a job must not sit in a
    # stopping executor until it runs out.
    settings = mesh.settings(executor_id, **overrides)
    settings = dataclasses.replace(
        settings, server=dataclasses.replace(settings.server, shutdown_grace_s=grace_s)
    )
    ready: asyncio.Future[GrpcHost] = asyncio.get_running_loop().create_future()

    async def serve() -> None:
        # server.serve(), less wait_until_stopped's signal handlers: the test
        # process's own SIGTERM handling is left alone.
        async with executor_running(
            settings, registry=registry(verbs, executor_id), workflows=mesh.workflows
        ) as host:
            ready.set_result(host)
            await host.wait_for_stop()

    task = asyncio.create_task(serve(), name=f"serve-{executor_id}")
    try:
        first: set[asyncio.Future[Any]] = {ready, task}
        await asyncio.wait(first, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # its start-up error
        served = Served(ready.result(), task)
        yield served
    finally:
        if ready.done() and not task.done():
            ready.result().request_stop()
        else:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.contextmanager
def logged(logger: str, text: str) -> Iterator[asyncio.Event]:
    """An event set when ``logger`` logs a message containing ``text``."""
    seen = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if text in record.getMessage():
                seen.set()

    target = logging.getLogger(logger)
    handler, level = Watch(logging.INFO), target.level
    target.setLevel(logging.INFO)
    target.addHandler(handler)
    try:
        yield seen
    finally:
        target.removeHandler(handler)
        target.setLevel(level)


async def until(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), WAIT_S)


def task(run: run_pb2.WorkflowRun, path: str) -> run_pb2.TaskRun:
    return next(t for t in run.tasks if t.step_path == path)


async def history(mesh: Mesh, run_id: str, kind: int) -> list[run_pb2.RunEvent]:
    response = await mesh.stub.GetRunHistory(pb.GetRunHistoryRequest(run_id=run_id))
    return [e for e in response.events if e.type == kind]


async def cancel_applied(mesh: Mesh, run_id: str) -> None:
    """Cancel the run and wait until the executor holding it has the cancel."""
    with logged("stepline.executor.control", "cancel requested") as applied:
        assert not await mesh.control(run_id, C.CONTROL_ACTION_CANCEL)  # pending: held
        await until(applied)


def ms(value: int) -> Duration:
    return Duration(seconds=value // 1000, nanos=(value % 1000) * 1_000_000)


# -- invoke: what interrupts a running call ------------------------------------


@pytest.mark.parametrize("cancellable", [True, False])
async def test_a_cancel_interrupts_only_a_cancellable_call(cancellable: bool) -> None:
    control = Control()
    started, saw_cancel, gate = asyncio.Event(), asyncio.Event(), asyncio.Event()
    interrupted = asyncio.Event()

    async def call() -> dict[str, Any]:
        started.set()
        try:
            await control.stop.wait()
            saw_cancel.set()  # still running after the cancel was signalled
            await gate.wait()
        except asyncio.CancelledError:
            interrupted.set()
            raise
        return {"finished": True}

    attempt = asyncio.create_task(
        invoke(call(), control=control, timeout_s=0, deadline=None, cancellable=cancellable)
    )
    await until(started)
    control.apply(C.CONTROL_ACTION_CANCEL, "stop it")
    if cancellable:
        value, why = await asyncio.wait_for(attempt, WAIT_S)
        assert value is None and why is not None
        assert why.reason == F.FAILURE_REASON_CANCELLED and why.message == "stop it"
        assert interrupted.is_set()
    else:
        await until(saw_cancel)
        gate.set()
        value, why = await asyncio.wait_for(attempt, WAIT_S)
        assert why is None and value == {"finished": True}
        assert not interrupted.is_set()


async def test_loss_of_the_claim_interrupts_a_non_cancellable_call_at_once() -> None:
    control = Control()
    started, interrupted = asyncio.Event(), asyncio.Event()

    async def call() -> dict[str, Any]:
        started.set()
        try:
            await asyncio.Event().wait()  # never ends on its own
        except asyncio.CancelledError:
            interrupted.set()
            raise
        return {}

    attempt = asyncio.create_task(
        invoke(call(), control=control, timeout_s=0, deadline=None, cancellable=False)
    )
    await until(started)
    control.apply(C.CONTROL_ACTION_CANCEL)
    assert not control.interrupt.is_set()
    control.lose()
    value, why = await asyncio.wait_for(attempt, WAIT_S)
    assert value is None and why is not None and why.reason == F.FAILURE_REASON_CANCELLED
    assert interrupted.is_set()


async def test_the_timeout_still_bounds_a_non_cancellable_call() -> None:
    control = Control()

    async def call() -> dict[str, Any]:
        await control.stop.wait()
        await asyncio.Event().wait()  # past the cancel, until the timeout
        return {}

    attempt = asyncio.create_task(
        invoke(call(), control=control, timeout_s=0.3, deadline=None, cancellable=False)
    )
    control.apply(C.CONTROL_ACTION_CANCEL)
    value, why = await asyncio.wait_for(attempt, WAIT_S)
    assert value is None and why is not None and why.reason == F.FAILURE_REASON_TIMEOUT


# -- a run cancelled while a non-cancellable verb runs -------------------------


@pytest.mark.parametrize(
    ("fails", "last"),
    [(False, False), (False, True), (True, False)],
    ids=["succeeds", "succeeds-as-last-step", "fails"],
)
async def test_cancel_lets_a_non_cancellable_verb_finish_then_stops_the_run(
    mesh: Mesh, fails: bool, last: bool
) -> None:
    verbs = Verbs(fail=fails)
    retry = workflow_pb2.RetryPolicy(max_attempts=3, initial_backoff=ms(10))
    steps = [atomic("steady", "test.steady", retry=retry)]
    if not last:
        steps.append(atomic("after", "test.mark"))
    async with serving(mesh, verbs, "executor-1"):
        run_id = await mesh.start(workflow(*steps))
        await until(verbs.started)
        await cancel_applied(mesh, run_id)
        during = await mesh.get(run_id)
        assert during.state == R.WORKFLOW_RUN_STATE_RUNNING
        assert task(during, "steady").state == T.TASK_RUN_STATE_RUNNING
        verbs.gate.set()
        run = await mesh.wait_run(run_id)
    assert not verbs.interrupted.is_set()
    assert run.state == R.WORKFLOW_RUN_STATE_CANCELLED
    assert run.failure.reason == F.FAILURE_REASON_CANCELLED
    steady = task(run, "steady")
    if fails:  # its own failure is recorded, and not retried after the cancel
        assert steady.state == T.TASK_RUN_STATE_FAILED
        assert steady.failure.reason == F.FAILURE_REASON_VERB_ERROR
        assert steady.failure.message == "steady failed on its own"
        assert [(a.attempt_number, a.state) for a in steady.attempts] == [
            (1, T.TASK_RUN_STATE_FAILED)
        ]
    else:
        assert steady.state == T.TASK_RUN_STATE_SUCCEEDED
        assert dict(steady.output) == {"by": "executor-1"}
        assert [(a.attempt_number, a.state) for a in steady.attempts] == [
            (1, T.TASK_RUN_STATE_SUCCEEDED)
        ]
    if not last:
        assert task(run, "after").state == T.TASK_RUN_STATE_SKIPPED
    assert verbs.calls == [("steady", "executor-1")]


async def test_a_cancellable_verb_is_still_interrupted_at_once(mesh: Mesh) -> None:
    verbs = Verbs()
    async with serving(mesh, verbs, "executor-1"):
        run_id = await mesh.start(
            workflow(atomic("held", "test.hold"), atomic("after", "core.noop"))
        )
        await until(verbs.started)
        assert not await mesh.control(run_id, C.CONTROL_ACTION_CANCEL)
        await until(verbs.interrupted)  # the gate never opens
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_CANCELLED
    assert task(run, "held").state == T.TASK_RUN_STATE_CANCELLED
    assert task(run, "after").state == T.TASK_RUN_STATE_SKIPPED


async def test_the_step_timeout_still_cuts_off_a_non_cancellable_verb(mesh: Mesh) -> None:
    verbs = Verbs()
    steps = (atomic("steady", "test.steady", timeout=ms(2000)), atomic("after", "core.noop"))
    async with serving(mesh, verbs, "executor-1"):
        run_id = await mesh.start(workflow(*steps))
        await until(verbs.started)
        await cancel_applied(mesh, run_id)
        run = await mesh.wait_run(run_id)  # the gate never opens
    assert verbs.interrupted.is_set()
    steady = task(run, "steady")
    assert steady.state == T.TASK_RUN_STATE_TIMED_OUT
    assert steady.failure.reason == F.FAILURE_REASON_TIMEOUT
    assert run.state == R.WORKFLOW_RUN_STATE_CANCELLED
    assert task(run, "after").state == T.TASK_RUN_STATE_SKIPPED


async def test_loss_of_the_claim_interrupts_a_non_cancellable_verb(mesh: Mesh) -> None:
    """The claim is taken under a new epoch (as by this executor restarted):
    renewal fails, and the verb is interrupted though the cancel let it run."""
    verbs = Verbs()
    async with serving(mesh, verbs, "executor-1", lease_s=1.0):
        run_id = await mesh.start(
            workflow(atomic("steady", "test.steady"), atomic("after", "core.noop"))
        )
        await until(verbs.started)
        await cancel_applied(mesh, run_id)
        taken = await mesh.stub.ClaimRun(
            pb.ClaimRunRequest(
                request_id=f"take-{run_id}",
                run_id=run_id,
                executor_id="executor-1",
                lease_duration=Duration(seconds=60),
            )
        )
        assert taken.claim.epoch == 2
        await until(verbs.interrupted)  # at the next renewal; the gate never opens
        run = await mesh.get(run_id)
    # Nothing was recorded for the interrupted attempt: the new holder decides.
    assert run.state == R.WORKFLOW_RUN_STATE_RUNNING
    steady = task(run, "steady")
    assert steady.state == T.TASK_RUN_STATE_RUNNING
    assert [(a.attempt_number, a.state) for a in steady.attempts] == [(1, T.TASK_RUN_STATE_RUNNING)]
    assert run.claim.epoch == 2


async def test_shutdown_interrupts_a_non_cancellable_verb_after_the_grace(mesh: Mesh) -> None:
    """Draining waits for the step only for the grace; then the verb is cut
    off, the claim released, and the next executor applies the pending cancel."""
    verbs = Verbs()
    definition = workflow(atomic("steady", "test.steady"), atomic("after", "test.mark"))
    async with serving(mesh, verbs, "executor-1", grace_s=0.5) as first:
        run_id = await mesh.start(definition)
        await until(verbs.started)
        await cancel_applied(mesh, run_id)
        first.sigterm()
        await first.stopped()
        assert verbs.interrupted.is_set()  # the gate never opened
    cut = await mesh.get(run_id)
    assert cut.state == R.WORKFLOW_RUN_STATE_RUNNING
    assert not cut.claim.executor_id
    assert task(cut, "steady").state == T.TASK_RUN_STATE_RUNNING
    released = await history(mesh, run_id, E.RUN_EVENT_TYPE_CLAIM_RELEASED)
    assert [(e.actor.id, e.payload["reason"]) for e in released] == [("executor-1", "shutdown")]
    async with serving(mesh, verbs, "executor-2"):
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_CANCELLED
    assert task(run, "steady").state == T.TASK_RUN_STATE_CANCELLED
    assert task(run, "after").state == T.TASK_RUN_STATE_SKIPPED
    assert verbs.calls == [("steady", "executor-1")]


# -- graceful drain -------------------------------------------------------------


async def test_drain_finishes_the_step_releases_the_run_and_another_executor_continues(
    mesh: Mesh,
) -> None:
    verbs = Verbs()
    definition = workflow(atomic("hold", "test.hold"), atomic("after", "test.mark"))
    async with serving(mesh, verbs, "executor-1") as first:
        run_id = await mesh.start(definition)
        await until(verbs.started)
        with logged("stepline.executor.server", "executor-1 draining") as draining:
            first.sigterm()
            await until(draining)
        # Published while executor-1 drains: it must not take it.
        later_id = await mesh.start(workflow(atomic("later", "test.mark")))
        during = await mesh.get(run_id)
        assert task(during, "hold").state == T.TASK_RUN_STATE_RUNNING
        assert not first.task.done()  # waiting for the running step
        verbs.gate.set()
        await first.stopped()
    assert not verbs.interrupted.is_set()

    handed = await mesh.get(run_id)
    assert handed.state == R.WORKFLOW_RUN_STATE_RUNNING  # not failed
    assert not handed.HasField("failure")
    assert not handed.claim.executor_id  # released
    hold = task(handed, "hold")
    assert hold.state == T.TASK_RUN_STATE_SUCCEEDED
    assert dict(hold.output) == {"by": "executor-1"}
    assert task(handed, "after").state == T.TASK_RUN_STATE_PENDING
    released = await history(mesh, run_id, E.RUN_EVENT_TYPE_CLAIM_RELEASED)
    assert [(e.actor.id, e.payload["reason"]) for e in released] == [("executor-1", "shutdown")]
    later = await mesh.get(later_id)
    assert later.state == R.WORKFLOW_RUN_STATE_PENDING
    assert await history(mesh, later_id, E.RUN_EVENT_TYPE_CLAIMED) == []

    async with serving(mesh, verbs, "executor-2"):
        run = await mesh.wait_run(run_id)
        later = await mesh.wait_run(later_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED
    assert later.state == R.WORKFLOW_RUN_STATE_SUCCEEDED
    hold = task(run, "hold")
    assert [(a.attempt_number, a.reason) for a in hold.attempts] == [(1, "initial")]
    assert dict(hold.output) == {"by": "executor-1"}
    assert dict(task(run, "after").output) == {"by": "executor-2"}
    assert dict(run.outputs) == {"by": "executor-2"}
    assert sorted(verbs.calls) == [
        ("after", "executor-2"),
        ("hold", "executor-1"),
        ("later", "executor-2"),
    ]
    claims = await history(mesh, run_id, E.RUN_EVENT_TYPE_CLAIMED)
    assert [e.actor.id for e in claims] == ["executor-1", "executor-2"]
    claims = await history(mesh, later_id, E.RUN_EVENT_TYPE_CLAIMED)
    assert [e.actor.id for e in claims] == ["executor-2"]
