"""One error root for Stepline, each class carrying a stable code and gRPC status.

Services raise these; :class:`stepline.common.auth.AuthInterceptor` turns them
into gRPC status codes at the edge (and a LeaseSession stream into its error
answers) with :func:`status_of`. Anything else that escapes a handler becomes
``INTERNAL`` with a generic message, so internals and secrets never reach clients.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import grpc

log = logging.getLogger(__name__)


class SteplineError(Exception):
    """Base of every error Stepline raises on purpose."""

    code: ClassVar[str] = "internal"
    status: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(SteplineError):
    """The request is malformed; the message says which field and why."""

    code = "invalid_argument"
    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(SteplineError):
    code = "not_found"
    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SteplineError):
    code = "already_exists"
    status = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SteplineError):
    """The system is not in a state that allows the operation (e.g. stale epoch)."""

    code = "failed_precondition"
    status = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(SteplineError):
    """A conflict with a concurrent operation, such as a conflicting idempotent replay."""

    code = "aborted"
    status = grpc.StatusCode.ABORTED


class Unauthenticated(SteplineError):
    code = "unauthenticated"
    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SteplineError):
    code = "permission_denied"
    status = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(SteplineError):
    code = "resource_exhausted"
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(SteplineError):
    code = "unavailable"
    status = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(SteplineError):
    code = "deadline_exceeded"
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class ConfigError(SteplineError):
    """A setting is missing or malformed; raised at start-up, before serving."""

    code = "config"
    status = grpc.StatusCode.INTERNAL


class RemoteError(SteplineError):
    """A call to another Stepline service failed; keeps the remote status."""

    code = "remote"

    def __init__(self, message: str, *, remote_status: grpc.StatusCode) -> None:
        super().__init__(message)
        self.remote_status = remote_status


_BY_STATUS: dict[grpc.StatusCode, type[SteplineError]] = {
    cls.status: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
    )
}


_BY_NUMBER: dict[int, grpc.StatusCode] = {status.value[0]: status for status in grpc.StatusCode}


def from_status(status: grpc.StatusCode, message: str) -> SteplineError:
    """Rebuild the Stepline error that a remote service raised from its status."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        return RemoteError(message or status.name, remote_status=status)
    return cls(message or status.name)


def from_rpc_error(error: grpc.aio.AioRpcError) -> SteplineError:
    """Rebuild the Stepline error that a remote service raised from its status."""
    return from_status(error.code(), error.details() or "")


def from_status_number(code: int, message: str) -> SteplineError:
    """:func:`from_status` for a status carried as its number (google.rpc.Code)."""
    return from_status(_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN), message)


def status_number(error: SteplineError) -> int:
    """The number (google.rpc.Code) of ``error``'s gRPC status."""
    return int(error.status.value[0])


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message that ``exc``, raised while handling a call,
    answers the client with. A Stepline error keeps its own; anything
    unexpected is logged here and reaches the client only as a generic
    INTERNAL, never with its details."""
    if isinstance(exc, SteplineError):
        return exc.status, exc.message
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, "this method is not implemented yet"
    log.error("unexpected error in RPC handler", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error; see the service log"
