"""ChunkedDispatch: the step that fans out (generator, chunk records, dispatch
with a concurrency limit, wait for every chunk), and the chunk jobs that any
executor runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from google.protobuf.timestamp_pb2 import Timestamp

from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.events.v1 import events_pb2
from stepline.common import jetstream
from stepline.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from stepline.common.logs import log_context
from stepline.common.plan import steps_by_path
from stepline.executor.attempts import (
    Halt,
    Target,
    as_output,
    end_failed,
    run_attempts,
    start,
    to_dict,
)
from stepline.executor.control import Beat, Control
from stepline.executor.devices import DeviceSpans
from stepline.executor.verbs.base import VerbContext, VerbError
from stepline.executor.verbs.templating import render

if TYPE_CHECKING:
    from stepline.executor.runner import Execution, Worker

log = logging.getLogger(__name__)

T = common_pb2.TaskRunState
F = common_pb2.FailureReason
UNSUCCESSFUL = (T.TASK_RUN_STATE_FAILED, T.TASK_RUN_STATE_TIMED_OUT, T.TASK_RUN_STATE_CANCELLED)
TERMINAL = (*UNSUCCESSFUL, T.TASK_RUN_STATE_SUCCEEDED, T.TASK_RUN_STATE_SKIPPED)
#: chunk jobs start at dispatch epoch 1; RecordDispatch before the first publish makes it 2
FIRST_EPOCH = 1
#: fallback poll while waiting for chunk events
POLL_S = 2.0


async def run_chunked(ex: Execution, step: workflow_pb2.Step, task: run_pb2.TaskRun) -> Halt | None:
    spec = step.chunked
    target = Target(ex.fence, task.task_id)
    number = task.attempts[-1].attempt_number if task.attempts else 1
    if not task.chunk_counts.complete:
        allowed = list(ex.definition.allowed_verbs)
        limit = spec.max_chunks or ex.worker.settings.max_chunks

        seen = {"attempt": number}

        async def generate(n: int) -> list[Mapping[str, Any]]:
            seen["attempt"] = n
            verb = ex.worker.registry.resolve_generator(spec.generator_verb, allowed=allowed)
            ex.worker.registry.resolve(spec.chunk_verb, allowed=allowed)
            args = render(to_dict(spec.generator_args), inputs=ex.inputs, outputs=ex.outputs)
            records = await verb(ex.context(step, task.task_id, n), args)
            if not isinstance(records, list) or not all(isinstance(r, Mapping) for r in records):
                raise VerbError(f"generator {spec.generator_verb!r} must return a list of mappings")
            if len(records) > limit:
                raise VerbError(
                    f"generator {spec.generator_verb!r} yielded {len(records)} records; "
                    f"the step allows {limit}",
                    reason=F.FAILURE_REASON_INVALID_INPUT,
                )
            return [as_output(r) for r in records]

        records, halt = await ex.attempts(target, step, task, generate)
        if halt is not None:
            return halt
        number = seen["attempt"]
        await ex.fence.create_chunks(task.task_id, records)
    with ex.worker.parking():
        outcome = await _dispatch_and_wait(ex, step, task)
    if isinstance(outcome, Halt):
        return outcome
    if outcome["unsuccessful"] > spec.tolerated_failures:
        why = common_pb2.Failure(
            reason=F.FAILURE_REASON_CHUNK_FAILURES,
            message=f"{outcome['unsuccessful']} of {outcome['total']} chunks did not succeed; "
            f"the step tolerates {spec.tolerated_failures}",
        )
        why.details.update(outcome)
        return await end_failed(
            target, number, T.TASK_RUN_STATE_FAILED, why, pause_policy=ex.pause_policy
        )
    await target.write(T.TASK_RUN_STATE_SUCCEEDED, output=outcome)
    ex.outputs[step.id] = outcome
    return None


async def _dispatch_and_wait(
    ex: Execution, step: workflow_pb2.Step, task: run_pb2.TaskRun
) -> dict[str, Any] | Halt:
    spec = step.chunked
    limit = spec.max_concurrency or ex.worker.settings.chunk_concurrency
    wake = asyncio.Event()

    async def on_event(_msg: Any) -> None:
        wake.set()

    streams = ex.worker.streams
    subscription = await ex.worker.nc.subscribe(
        streams.subject("events", "chunk", ex.run_id), cb=on_event
    )
    try:
        while True:
            wake.clear()
            chunks = await ex.worker.ledger.list_chunks(ex.run_id, task.task_id)
            unsuccessful = sum(1 for c in chunks if c.state in UNSUCCESSFUL)
            pending = [c for c in chunks if c.state == T.TASK_RUN_STATE_PENDING]
            if unsuccessful > spec.tolerated_failures:
                await _skip(ex, [c for c in pending if c.dispatch_epoch <= FIRST_EPOCH] or pending)
            else:
                in_flight = sum(
                    1 for c in chunks if c.state not in TERMINAL and c.dispatch_epoch > FIRST_EPOCH
                )
                waiting = [c for c in pending if c.dispatch_epoch <= FIRST_EPOCH]
                for chunk in waiting[: max(limit - in_flight, 0)]:
                    await _dispatch(ex, chunk)
            if all(c.state in TERMINAL for c in chunks):
                return {
                    "total": len(chunks),
                    "succeeded": sum(1 for c in chunks if c.state == T.TASK_RUN_STATE_SUCCEEDED),
                    "unsuccessful": unsuccessful,
                    "skipped": sum(1 for c in chunks if c.state == T.TASK_RUN_STATE_SKIPPED),
                }
            control = ex.control
            if control.lost:
                return Halt("lost")
            if control.cancelled:
                return Halt("cancel")
            if control.draining:
                return Halt("drain")
            if ex.deadline is not None and asyncio.get_running_loop().time() >= ex.deadline:
                return Halt("deadline")
            stop = asyncio.ensure_future(control.stop.wait())
            woken = asyncio.ensure_future(wake.wait())
            try:
                await asyncio.wait(
                    {stop, woken}, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                stop.cancel()
                woken.cancel()
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()


async def _skip(ex: Execution, chunks: list[run_pb2.ChunkRun]) -> None:
    for chunk in chunks:
        with contextlib.suppress(FailedPrecondition):
            await ex.fence.transition_step(chunk.chunk_id, T.TASK_RUN_STATE_SKIPPED, chunk=True)


async def _dispatch(ex: Execution, chunk: run_pb2.ChunkRun) -> None:
    try:
        epoch = await ex.fence.record_dispatch(chunk.chunk_id, chunk.dispatch_epoch)
    except Aborted:
        return  # dispatched by someone else meanwhile
    now = Timestamp()
    now.GetCurrentTime()
    job = events_pb2.RunJob(
        run_id=chunk.run_id,
        dispatch_epoch=epoch,
        task_id=chunk.task_id,
        chunk_id=chunk.chunk_id,
        enqueue_time=now,
    )
    await jetstream.publish_proto(
        ex.worker.js,
        ex.worker.streams.subject("jobs", "chunk"),
        job,
        msg_id=f"chunk:{chunk.chunk_id}:{epoch}",
    )
    log.debug("dispatched chunk %s (epoch %d)", chunk.chunk_id, epoch)


async def execute_chunk_job(
    worker: Worker, job: events_pb2.RunJob, *, request_id: str, control: Control, beat: Beat | None
) -> str:
    """Claim one chunk and run its verb (with the step's timeout and retries)."""
    from stepline.executor.runner import ACK, NAK

    with log_context(run_id=job.run_id, task_id=job.chunk_id):
        try:
            claim = await worker.ledger.claim(
                request_id=request_id,
                run_id=job.run_id,
                chunk_id=job.chunk_id,
                lease_s=worker.settings.lease_s,
                dispatch_epoch=job.dispatch_epoch,
            )
        except (NotFound, FailedPrecondition, InvalidArgument) as exc:
            log.info("chunk job dropped: %s", exc)
            return ACK
        fence = worker.ledger.fence(claim, chunk_id=job.chunk_id)
        try:
            async with worker.hold(fence, control, beat):
                await _run_chunk(worker, fence, claim, control)
        except FailedPrecondition as exc:
            log.info("chunk stopped: the ledger refused a write: %s", exc)
            return ACK
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(fence.release("shutdown"))
            raise
        with contextlib.suppress(Exception):
            await fence.release("shutdown" if control.draining else "terminal")
        return NAK if control.draining and not control.lost else ACK


async def _run_chunk(worker: Worker, fence: Any, claim: Any, control: Control) -> None:
    run, chunk = claim.run, claim.chunk
    task = next(t for t in run.tasks if t.task_id == chunk.task_id)
    step = steps_by_path(run.definition)[task.step_path]
    spec = step.chunked
    target = Target(fence, chunk.chunk_id, chunk=True)
    inputs = to_dict(run.inputs)
    outputs = {
        t.step_id: to_dict(t.output) for t in run.tasks if t.state == T.TASK_RUN_STATE_SUCCEEDED
    }
    record = to_dict(chunk.record)
    allowed = list(run.definition.allowed_verbs)
    devices = DeviceSpans(
        worker.devices, fence, executor_id=worker.settings.executor_id, chunk_id=chunk.chunk_id
    )
    devices.plan([step], chunk=True)

    async def call(number: int) -> dict[str, Any]:
        verb = worker.registry.resolve(spec.chunk_verb, allowed=allowed)
        args = render(
            to_dict(spec.chunk_args),
            inputs=inputs,
            outputs=outputs,
            record=record,
            chunk_index=chunk.index,
        )
        ctx = VerbContext(
            run_id=run.run_id,
            task_id=task.task_id,
            step_id=step.id,
            attempt_number=number,
            workflow_name=run.definition.name,
            inputs=inputs,
            outputs=outputs,
            record=record,
            extras={
                "chunk_id": chunk.chunk_id,
                "chunk_index": chunk.index,
                "executor_id": worker.settings.executor_id,
            },
        )
        return as_output(await devices.run(step, ctx, lambda c: verb(c, args)))

    first = await start(target, step, chunk, pause_policy=False)
    if isinstance(first, Halt):
        return
    try:
        output, halt = await run_attempts(
            target, step, first, call, control=control, deadline=None, pause_policy=False
        )
        await devices.passed(step.id, halt)
    finally:
        await asyncio.shield(devices.close())
    if halt is None:
        await target.write(T.TASK_RUN_STATE_SUCCEEDED, output=output)
