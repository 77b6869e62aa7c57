"""A client of the device broker's ``LeaseSession`` stream, shared by its callers.

:class:`LeaseSession` sends Lease, Renew and Release requests on one
bidirectional stream and hands each caller the answer with its request's
``request_id``; answers come in the order the broker has them ready, so a lease
waiting for a device holds back no other request. A message on an open stream
costs both sides about a third of a unary call (docs/devices.md, "Lease
sessions").

The stream opens on first use. One writer task sends the requests, one at a
time, so a caller cancelled or timed out while its request is being written
cannot cancel the stream under the others; one reader task routes each answer
to the future of its request. If the stream ends or fails (the broker
restarted, the network went away), every request waiting on it fails with
:class:`~stepline.common.errors.Unavailable` and the next request opens a new
stream. The broker answers a replayed ``request_id`` idempotently, so a caller
may retry such a request as it is. A stream is replaced before its deadline
would cut a request short.

A caller that gives up on a lease (its ``timeout_s`` passed, or it was
cancelled) does not stop the broker's wait for a device; a lease granted to it
afterwards is released at once (outcome ABANDONED), so the device goes to the
next caller instead of sitting idle until its TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

import grpc

from stepline.api.device_broker.v1 import device_broker_pb2 as pb
from stepline.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    SteplineError,
    Unavailable,
    from_rpc_error,
    from_status_number,
)

if TYPE_CHECKING:
    from stepline.api.device_broker.v1.device_broker_pb2_grpc import DeviceBrokerServiceAsyncStub

log = logging.getLogger(__name__)

Call = grpc.aio.StreamStreamCall[pb.LeaseSessionRequest, pb.LeaseSessionResponse]
#: a stream is replaced when a new request could outlive it by less than this
DEADLINE_MARGIN_S = 5.0
#: how long after a lease's ``max_wait_s`` its answer may take to come: give
#: :meth:`LeaseSession.lease` ``timeout_s=max_wait_s + ANSWER_MARGIN_S`` to get
#: the broker's own answer (DEADLINE_EXCEEDED, with its explanation)
ANSWER_MARGIN_S = 5.0
#: the initial metadata by which the broker says a session is open (sent before
#: any answer): the client writes only after it, since a write racing the
#: refusal of a session would end the call with the gRPC library's own INTERNAL
#: status instead of the broker's (PERMISSION_DENIED, UNAUTHENTICATED)
SESSION_OPEN = ("stepline-lease-session", "open")
#: how long a new stream waits for the broker's SESSION_OPEN before writing anyway
_OPEN_WAIT_S = 0.5
#: statuses that end a stream for a reason a new stream would not cure: the
#: caller's own error, not :class:`Unavailable`
_FINAL = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


class _Stream:
    """One LeaseSession call: its writer and reader, and the requests awaiting
    their answers on it."""

    def __init__(self, call: Call, *, deadline: float) -> None:
        self.call = call
        self.deadline = deadline  # loop time
        self.pending: dict[str, asyncio.Future[pb.LeaseSessionResponse]] = {}
        self.outbox: asyncio.Queue[pb.LeaseSessionRequest | None] = asyncio.Queue()
        self.ended = False
        self.closing = False  # no new requests: done_writing is queued
        self.writer: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[None] | None = None

    def route(self, answer: pb.LeaseSessionResponse) -> None:
        future = self.pending.pop(answer.request_id, None)
        if future is None or future.done():
            log.info(
                "lease session: no one waits for the answer to %r (%s) any more",
                answer.request_id,
                answer.WhichOneof("response"),
            )
            if answer.HasField("lease"):
                self.give_back(answer.request_id, answer.lease.lease)
            return
        future.set_result(answer)

    def give_back(self, request_id: str, lease: pb.Lease) -> None:
        """Release a lease granted to a request whose caller has given up (timed
        out or cancelled while the broker still waited for a device), so the
        device does not sit idle until its TTL."""
        if self.closing or self.ended:
            return  # it lapses by TTL
        release_id = f"{request_id}:abandoned"
        future: asyncio.Future[pb.LeaseSessionResponse] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_ignore_outcome)
        self.pending[release_id] = future
        self.outbox.put_nowait(
            pb.LeaseSessionRequest(
                release=pb.ReleaseRequest(
                    request_id=release_id,
                    lease_id=lease.lease_id,
                    token=lease.token,
                    outcome=pb.RELEASE_OUTCOME_ABANDONED,
                    message="granted after its caller had given up",
                )
            )
        )

    def end(self, error: Callable[[], SteplineError]) -> None:
        """No more answers will come: fail what is pending with ``error()``."""
        self.ended = True
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error())
        if self.writer is not None and not self.writer.done():
            self.writer.cancel()


class LeaseSession:
    """Lease, Renew and Release requests multiplexed on one ``LeaseSession``
    stream of the device broker (see the module's docstring).

    ``stub`` is a DeviceBrokerService stub on a channel that carries the
    caller's credentials (:func:`stepline.common.client.open_channel`); each
    stream lives at most ``stream_timeout_s``. Use it as an async context
    manager, or call :meth:`close` when done. Every request needs a
    ``request_id``; the same id may not be in flight twice at once.
    """

    def __init__(
        self, stub: DeviceBrokerServiceAsyncStub, *, stream_timeout_s: float = 3600.0
    ) -> None:
        self.stub = stub
        self.stream_timeout_s = stream_timeout_s
        self._stream: _Stream | None = None
        self._streams: set[_Stream] = set()  # the current one and those draining
        self._closed = False

    async def __aenter__(self) -> LeaseSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def lease(
        self, request: pb.LeaseRequest, *, max_wait_s: float | None = None, timeout_s: float
    ) -> pb.LeaseResponse:
        """Lease a device: the broker waits up to ``max_wait_s`` (None: its
        maximum; 0: not at all) for one to become free, then answers
        DEADLINE_EXCEEDED. Give a ``timeout_s`` of ``max_wait_s +``
        :data:`ANSWER_MARGIN_S` to get the broker's answer."""
        message = pb.LeaseSessionRequest(lease=request)
        if max_wait_s is not None:
            message.max_wait.FromNanoseconds(int(max(max_wait_s, 0.0) * 1e9))
        answer = await self._ask(message, request.request_id, timeout_s=timeout_s)
        return answer.lease

    async def renew(self, request: pb.RenewRequest, *, timeout_s: float) -> pb.RenewResponse:
        """Extend a lease (see DeviceBrokerService.Renew)."""
        message = pb.LeaseSessionRequest(renew=request)
        return (await self._ask(message, request.request_id, timeout_s=timeout_s)).renew

    async def release(self, request: pb.ReleaseRequest, *, timeout_s: float) -> pb.ReleaseResponse:
        """End a lease (see DeviceBrokerService.Release)."""
        message = pb.LeaseSessionRequest(release=request)
        return (await self._ask(message, request.request_id, timeout_s=timeout_s)).release

    async def _ask(
        self, message: pb.LeaseSessionRequest, request_id: str, *, timeout_s: float
    ) -> pb.LeaseSessionResponse:
        """Send ``message`` and await its answer; an ``error`` answer raises the
        SteplineError of its code."""
        kind = message.WhichOneof("request")
        if not request_id:
            raise InvalidArgument(f"a {kind} request on a lease session needs a request_id")
        stream = self._current(timeout_s)
        if request_id in stream.pending:
            raise InvalidArgument(
                f"a request with request_id {request_id!r} is already in flight on this session"
            )
        future: asyncio.Future[pb.LeaseSessionResponse] = asyncio.get_running_loop().create_future()
        stream.pending[request_id] = future
        stream.outbox.put_nowait(message)
        try:
            answer = await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the device broker did not answer {kind} {request_id!r} within {timeout_s:g}s"
            ) from None
        finally:
            if stream.pending.get(request_id) is future:
                del stream.pending[request_id]
        if answer.HasField("error"):
            raise from_status_number(answer.error.code, answer.error.message)
        return answer

    def _current(self, timeout_s: float) -> _Stream:
        """The stream for a request that may take ``timeout_s``: the open one, or
        a new one if it ended or would end too soon (the old one drains)."""
        if self._closed:
            raise Unavailable("the lease session is closed")
        loop = asyncio.get_running_loop()
        stream = self._stream
        if stream is not None and not stream.ended:
            if loop.time() + timeout_s + DEADLINE_MARGIN_S <= stream.deadline:
                return stream
            self._drain(stream)
        lifetime = max(self.stream_timeout_s, timeout_s + 2 * DEADLINE_MARGIN_S)
        call: Call = self.stub.LeaseSession(timeout=lifetime)
        stream = _Stream(call, deadline=loop.time() + lifetime)
        stream.writer = asyncio.create_task(self._write(stream), name="lease-session-writer")
        stream.reader = asyncio.create_task(self._read(stream), name="lease-session-reader")
        self._stream = stream
        self._streams.add(stream)
        return stream

    def _drain(self, stream: _Stream) -> None:
        """Send no more on ``stream``: it ends once its requests in flight are answered."""
        if self._stream is stream:
            self._stream = None
        if not stream.closing:
            stream.closing = True
            stream.outbox.put_nowait(None)

    async def _write(self, stream: _Stream) -> None:
        """Once the broker has opened the session, send the queued requests one at
        a time; None: done writing."""
        try:
            opened = await asyncio.wait_for(
                asyncio.shield(stream.call.initial_metadata()), _OPEN_WAIT_S
            )
        except TimeoutError:
            pass  # a broker that predates the marker sends no metadata before an answer
        else:
            if opened.get(SESSION_OPEN[0]) != SESSION_OPEN[1]:
                # Refused, its status on the way (or an older broker that answered
                # already: nothing is sent before the first request)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stream.call.code()), _OPEN_WAIT_S)
                if stream.call.done():
                    return  # the reader says why
        while (message := await stream.outbox.get()) is not None:
            kind = message.WhichOneof("request")
            future = stream.pending.get(getattr(message, str(kind)).request_id)
            if future is None or future.done():
                continue  # its caller gave up before it was sent
            try:
                await stream.call.write(message)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return  # the call ended: the reader says why and fails what is pending
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await stream.call.done_writing()

    async def _read(self, stream: _Stream) -> None:
        """Route each answer to its request until the stream ends, then fail what
        is still pending."""
        error: Callable[[], SteplineError]
        try:
            while (answer := await stream.call.read()) is not grpc.aio.EOF:
                assert isinstance(answer, pb.LeaseSessionResponse)
                stream.route(answer)
            error = _ended("the device broker ended the lease session")
        except grpc.aio.AioRpcError as exc:
            error = _failed(exc)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                stream.end(_ended("the lease session was closed"))
                raise
            error = _ended("the lease session's call was cancelled")  # the call, not this task
        finally:
            self._streams.discard(stream)
            if self._stream is stream:
                self._stream = None
        if stream.pending:
            log.warning("lease session ended with %d request(s) unanswered", len(stream.pending))
        stream.end(error)

    async def close(self, *, grace_s: float = 1.0) -> None:
        """Stop sending, give the requests in flight up to ``grace_s`` to be
        answered, then cancel the streams; what is still pending fails with
        Unavailable. Later requests fail with Unavailable too."""
        self._closed = True
        streams = list(self._streams)
        for stream in streams:
            self._drain(stream)
        readers = [s.reader for s in streams if s.reader is not None]
        if readers:
            await asyncio.wait(readers, timeout=grace_s)
        tasks = [t for s in streams for t in (s.writer, s.reader) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # each reader, ending, has failed what was pending on its stream and
        # forgotten the stream
        for stream in streams:
            stream.call.cancel()


def _ignore_outcome(future: asyncio.Future[pb.LeaseSessionResponse]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.info("lease session: giving back an abandoned lease failed: %s", future.exception())


def _ended(message: str) -> Callable[[], SteplineError]:
    return lambda: Unavailable(message)


def _failed(exc: grpc.aio.AioRpcError) -> Callable[[], SteplineError]:
    """What the requests pending on a stream that failed with ``exc`` raise."""
    code = exc.code()
    if code in _FINAL:
        return lambda: from_rpc_error(exc)
    text = f"the lease session with the device broker failed: {code.name}: {exc.details()}"
    return _ended(text)
