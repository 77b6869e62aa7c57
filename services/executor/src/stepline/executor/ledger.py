"""A thin client over ``LedgerService`` for the executor.

:class:`Ledger` makes the calls; :class:`Fence` carries one claim (a run's or a
chunk's) and writes under it. Task, chunk and run transitions, the bulk of the
traffic, go through a :class:`TransitionBatcher`: the transitions of all the
runs the executor holds share ``ApplyTransitions`` calls.

Every write's request id is derived from what is being done (claim epoch, task
or chunk, attempt, state), so an RPC retried after a lost response replays
instead of applying twice. Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED)
are retried a few times for that reason.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.api.ledger.v1 import ledger_pb2_grpc
from stepline.common.errors import (
    DeadlineExceeded,
    Unavailable,
    from_rpc_error,
    from_status_number,
)

if TYPE_CHECKING:
    from stepline.api.ledger.v1.ledger_pb2_grpc import LedgerServiceAsyncStub

log = logging.getLogger(__name__)

T = common_pb2.TaskRunState
R = common_pb2.WorkflowRunState
Resp = TypeVar("Resp")

_TRANSIENT = (Unavailable, DeadlineExceeded)
_RETRIES = 4


def struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    if value:
        result.update(dict(value))
    return result


def failure(reason: int, message: str) -> common_pb2.Failure:
    return common_pb2.Failure(reason=reason, message=message)  # type: ignore[arg-type]


def duration(seconds: float) -> Duration:
    result = Duration()
    result.FromNanoseconds(int(seconds * 1e9))
    return result


_Group = tuple[list[pb.StepTransition], list["asyncio.Future[pb.StepTransitionResult]"]]


class TransitionBatcher:
    """Sends task, chunk and run transitions in shared ``ApplyTransitions`` calls.

    A transition is sent at once when a call slot is free (after one turn of
    the event loop, so that transitions made ready together travel together);
    while ``max_in_flight`` calls are out, new ones wait and leave together in
    the next call. At low load every transition has its own call, with no
    added wait; under load one call carries the transitions of many runs, and
    the ledger's per-call cost is shared by them. Transitions given together
    (:meth:`apply_all`) always travel in one call, in their order.
    """

    def __init__(
        self,
        stub: LedgerServiceAsyncStub,
        *,
        max_items: int = 256,
        max_in_flight: int = 2,
    ) -> None:
        self._stub = stub
        self._max_items = max_items
        self._max_in_flight = max_in_flight
        self._waiting: collections.deque[_Group] = collections.deque()
        self._senders = 0
        self._sending: set[asyncio.Task[None]] = set()
        self.calls = 0
        self.items = 0

    async def apply(self, item: pb.StepTransition) -> pb.StepTransitionResult:
        """The item's result; raises the call's ``AioRpcError`` if the call failed."""
        (result,) = await self.apply_all([item])
        return result

    async def apply_all(self, items: list[pb.StepTransition]) -> list[pb.StepTransitionResult]:
        """The items' results, the items sent in order in one call; raises the
        call's ``AioRpcError`` if the call failed."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[pb.StepTransitionResult]] = [
            loop.create_future() for _ in items
        ]
        self._waiting.append((list(items), futures))
        if self._senders < self._max_in_flight:
            self._senders += 1
            sender = loop.create_task(self._send())
            self._sending.add(sender)  # held until done (the loop keeps only weak references)
            sender.add_done_callback(self._sending.discard)
        return [await future for future in futures]

    def _next_batch(self) -> _Group:
        """Whole groups from the front, up to ``max_items`` items (at least one group)."""
        items: list[pb.StepTransition] = []
        futures: list[asyncio.Future[pb.StepTransitionResult]] = []
        while self._waiting and (
            not items or len(items) + len(self._waiting[0][0]) <= self._max_items
        ):
            group_items, group_futures = self._waiting.popleft()
            items.extend(group_items)
            futures.extend(group_futures)
        return items, futures

    async def _send(self) -> None:
        try:
            await asyncio.sleep(0)  # let transitions made ready in this turn join
            while self._waiting:
                items, futures = self._next_batch()
                self.calls += 1
                self.items += len(items)
                try:
                    response = await self._stub.ApplyTransitions(
                        pb.ApplyTransitionsRequest(transitions=items)
                    )
                except grpc.aio.AioRpcError as exc:
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                except BaseException as exc:  # cancelled (shutdown) or a bug: fail them all
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                    raise
                for future, result in zip(futures, response.results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._senders -= 1


class Ledger:
    """Calls to the ledger, with errors turned into Stepline's own."""

    def __init__(self, channel: grpc.aio.Channel, *, executor_id: str) -> None:
        self.stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        self.executor_id = executor_id
        self.actor = common_pb2.Principal(id=executor_id, roles=["service"])
        self.transitions = TransitionBatcher(self.stub)

    async def apply_transitions(
        self, items: list[pb.StepTransition]
    ) -> list[pb.StepTransitionResult]:
        """Task, chunk or run transitions, in order in one call through the batcher;
        the first item the ledger refused raises its Stepline error (use with
        :meth:`call` for retries: a replay of applied items is a no-op)."""
        results = await self.transitions.apply_all(items)
        for result in results:
            if result.HasField("error"):
                raise from_status_number(result.error.code, result.error.message)
        return results

    async def call(self, method: Callable[[Any], Awaitable[Resp]], request: Any) -> Resp:
        for attempt in range(_RETRIES):
            try:
                return await method(request)
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
            except _TRANSIENT as exc:  # an item of ApplyTransitions
                error = exc
            if isinstance(error, _TRANSIENT) and attempt + 1 < _RETRIES:
                log.warning("ledger call failed (%s), retrying", error.status.name)
                await asyncio.sleep(0.2 * 2**attempt)
                continue
            raise error from None
        raise AssertionError("unreachable")

    async def claim(
        self,
        *,
        request_id: str,
        run_id: str,
        lease_s: float,
        dispatch_epoch: int = 0,
        chunk_id: str = "",
        first_task: bool = True,
    ) -> pb.ClaimRunResponse:
        """Claim a run or one of its chunks. A PENDING run starts with its claim,
        and so does its first task if atomic, unless not ``first_task`` (see
        ``Execution.opened``)."""
        return await self.call(
            self.stub.ClaimRun,
            pb.ClaimRunRequest(
                request_id=request_id,
                run_id=run_id,
                chunk_id=chunk_id,
                executor_id=self.executor_id,
                lease_duration=duration(lease_s),
                dispatch_epoch=dispatch_epoch,
                start=not chunk_id,
                start_first_task=first_task and not chunk_id,
            ),
        )

    async def get_run(self, run_id: str, view: int = run_pb2.RUN_VIEW_BASIC) -> run_pb2.WorkflowRun:
        response = await self.call(
            self.stub.GetRun,
            pb.GetRunRequest(run_id=run_id, view=view),  # type: ignore[arg-type]
        )
        return response.run

    async def list_chunks(self, run_id: str, task_id: str) -> list[run_pb2.ChunkRun]:
        chunks: list[run_pb2.ChunkRun] = []
        token = ""
        while True:
            page = await self.call(
                self.stub.ListChunks,
                pb.ListChunksRequest(run_id=run_id, task_id=task_id, page_token=token),
            )
            chunks.extend(page.chunks)
            token = page.next_page_token
            if not token:
                return chunks

    async def create_run(self, request: pb.CreateRunRequest) -> pb.CreateRunResponse:
        return await self.call(self.stub.CreateRun, request)

    def fence(self, claim: pb.ClaimRunResponse, *, chunk_id: str = "") -> Fence:
        return Fence(self, run_id=claim.run.run_id, epoch=claim.claim.epoch, chunk_id=chunk_id)


class Fence:
    """Writes under one claim: a run's, or (with ``chunk_id``) one chunk's."""

    def __init__(self, ledger: Ledger, *, run_id: str, epoch: int, chunk_id: str = "") -> None:
        self.ledger = ledger
        self.run_id = run_id
        self.epoch = epoch
        self.chunk_id = chunk_id
        self.actor = ledger.actor
        # Called with the run's pending control action a task transition
        # reports (a PAUSE asked for while the step ran), so that it is
        # honoured at this step boundary even before its event arrives.
        self.on_control: Callable[[int], None] | None = None

    def _id(self, *parts: object) -> str:
        return ":".join(str(p) for p in (self.run_id, self.chunk_id, self.epoch, *parts))

    async def renew(self, lease_s: float, sequence: int) -> pb.RenewClaimResponse:
        return await self.ledger.call(
            self.ledger.stub.RenewClaim,
            pb.RenewClaimRequest(
                request_id=self._id("renew", sequence),
                run_id=self.run_id,
                chunk_id=self.chunk_id,
                executor_id=self.ledger.executor_id,
                epoch=self.epoch,
                lease_duration=duration(lease_s),
            ),
        )

    async def release(self, reason: str) -> None:
        await self.ledger.call(
            self.ledger.stub.ReleaseClaim,
            pb.ReleaseClaimRequest(
                request_id=self._id("release"),
                run_id=self.run_id,
                chunk_id=self.chunk_id,
                executor_id=self.ledger.executor_id,
                epoch=self.epoch,
                reason=reason,
            ),
        )

    async def transition_run(
        self,
        state: int,
        *,
        failure: common_pb2.Failure | None = None,
        outputs: Mapping[str, Any] | None = None,
        reason: str = "",
        release: str | None = None,
        after: pb.StepTransition | None = None,
        key: str = "",
    ) -> run_pb2.WorkflowRun:
        """Move the run to ``state``; with ``release`` (its reason) the claim is
        released in the same commit, and ``after`` (a step's end) is applied
        first, in the same call. ``key`` names the move in its request id in
        place of ``state``, for a run that may go to one state more than once
        under this claim. Returns the run (RUN_VIEW_BASIC)."""
        request = pb.TransitionRunRequest(
            request_id=self._id("run", key or R.Name(state)),  # type: ignore[arg-type]
            run_id=self.run_id,
            epoch=self.epoch,
            actor=self.actor,
            state=state,  # type: ignore[arg-type]
            failure=failure,
            reason=reason,
            release_claim=release is not None,
            release_reason=release or "",
        )
        if outputs is not None:
            request.outputs.CopyFrom(struct(outputs))
        item = pb.StepTransition(run=request)
        results = await self.apply_changes([item] if after is None else [after, item])
        return results[-1].run.run

    async def transition_step(
        self,
        owner_id: str,
        state: int,
        *,
        after: pb.StepTransition | None = None,
        unless_control_pending: bool = False,
        **change: Any,
    ) -> pb.StepTransitionResult:
        """Change a task (or, with ``chunk``, a chunk) and/or record an attempt
        (``change``: the arguments of :meth:`step_change`); with ``after``, that
        change first, in the same call. Returns the change's result."""
        item = self.step_change(owner_id, state, **change)
        if unless_control_pending:
            item.task.unless_control_pending = True
        results = await self.apply_changes([item] if after is None else [after, item])
        return results[-1]

    async def apply_changes(self, items: list[pb.StepTransition]) -> list[pb.StepTransitionResult]:
        """Send changes made by :meth:`step_change`, in order, in one call."""
        results = await self.ledger.call(self.ledger.apply_transitions, items)
        for result in results:
            if result.task.pending_control and self.on_control is not None:
                self.on_control(result.task.pending_control)
        return results

    def step_change(
        self,
        owner_id: str,
        state: int,
        *,
        attempt: pb.AttemptUpdate | None = None,
        output: Mapping[str, Any] | None = None,
        failure: common_pb2.Failure | None = None,
        child_run_id: str = "",
        chunk: bool = False,
    ) -> pb.StepTransition:
        """The change :meth:`transition_step` sends, to send later."""
        marker = f"a{attempt.attempt_number}{T.Name(attempt.state)}" if attempt is not None else ""
        request_id = self._id(owner_id, T.Name(state), marker, "child" if child_run_id else "")  # type: ignore[arg-type]
        common: dict[str, Any] = {
            "request_id": request_id,
            "run_id": self.run_id,
            "epoch": self.epoch,
            "actor": self.actor,
            "state": state,
            "attempt": attempt,
            "failure": failure,
        }
        if output is not None:
            common["output"] = struct(output)
        if chunk:
            return pb.StepTransition(
                chunk=pb.TransitionChunkRequest(
                    chunk_id=owner_id, use_run_claim=not self.chunk_id, **common
                )
            )
        return pb.StepTransition(
            task=pb.TransitionTaskRequest(task_id=owner_id, child_run_id=child_run_id, **common)
        )

    async def create_chunks(
        self, task_id: str, records: list[Mapping[str, Any]], *, batch: int = 500
    ) -> None:
        first = 0
        while True:
            part = records[first : first + batch]
            last = first + batch >= len(records)
            await self.ledger.call(
                self.ledger.stub.CreateChunks,
                pb.CreateChunksRequest(
                    request_id=self._id(task_id, "chunks", first),
                    run_id=self.run_id,
                    task_id=task_id,
                    epoch=self.epoch,
                    actor=self.actor,
                    first_index=first,
                    records=[struct(r) for r in part],
                    last_batch=last,
                ),
            )
            if last:
                return
            first += batch

    async def put_artifact(
        self,
        task_id: str,
        attempt_number: int,
        name: str,
        content_type: str,
        content: bytes,
        chunk_id: str = "",
    ) -> run_pb2.Artifact:
        """Store a file produced by an attempt with its task's (or chunk's) record.

        Under this fence's claim: the run's, or the chunk's when the fence has a
        ``chunk_id``. Replaying the same attempt's artifact is a no-op.
        """
        chunk_id = chunk_id or self.chunk_id
        response = await self.ledger.call(
            self.ledger.stub.PutArtifact,
            pb.PutArtifactRequest(
                request_id=self._id("artifact", chunk_id, task_id, attempt_number, name),
                run_id=self.run_id,
                task_id=task_id,
                chunk_id=chunk_id,
                epoch=self.epoch,
                attempt_number=attempt_number,
                name=name,
                content_type=content_type,
                content=content,
                actor=self.actor,
            ),
        )
        return response.artifact

    async def record_dispatch(self, chunk_id: str, expected: int) -> int:
        response = await self.ledger.call(
            self.ledger.stub.RecordDispatch,
            pb.RecordDispatchRequest(
                request_id=f"dispatch:{chunk_id}:{expected}",
                run_id=self.run_id,
                chunk_id=chunk_id,
                expected_dispatch_epoch=expected,
                actor=self.actor,
                reason="chunk_dispatch",
            ),
        )
        return response.dispatch_epoch
