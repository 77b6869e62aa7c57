"""Checks shared by the ledger's writes: request validation, replays, fencing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf.message import Message

from stepline.api.common.v1 import common_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.errors import Aborted, FailedPrecondition, InvalidArgument
from stepline.ledger import states
from stepline.ledger.events import fingerprint

T = common_pb2.TaskRunState
M = TypeVar("M", bound=Message)

MAX_VALUE_BYTES = 1024 * 1024  # one output, input set or chunk record
MAX_ID_LENGTH = 256


# --- validation ------------------------------------------------------------------


def require(value: str, name: str) -> str:
    if not value:
        raise InvalidArgument(f"{name} is required")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(f"{name} is {len(value)} characters; the limit is {MAX_ID_LENGTH}")
    return value


def check_size(message: Message, name: str) -> None:
    size = message.ByteSize()
    if size > MAX_VALUE_BYTES:
        raise InvalidArgument(f"{name} is {size} bytes; the limit is {MAX_VALUE_BYTES}")


def require_failure(failure: common_pb2.Failure, state_name: str) -> None:
    if failure.reason == common_pb2.FAILURE_REASON_UNSPECIFIED:
        raise InvalidArgument(f"failure.reason is required for state {state_name}")


def principal(actor: common_pb2.Principal, name: str = "actor") -> common_pb2.Principal:
    require(actor.id, f"{name}.id")
    return actor


def lease_seconds(duration_s: float, *, default_s: float, max_s: float) -> float:
    if duration_s < 0:
        raise InvalidArgument("lease_duration must not be negative")
    return min(duration_s or default_s, max_s)


# --- idempotency -----------------------------------------------------------------


def earlier_response(
    request: Message, stored_fingerprint: str, stored_response: bytes, response_type: type[M]
) -> M:
    """The stored response of a replayed request; ABORTED if the request differs."""
    if stored_fingerprint != fingerprint(request):
        raise Aborted(
            f"request_id {request.request_id!r} was already used for a different "  # type: ignore[attr-defined]
            f"{request.DESCRIPTOR.name}; use a new request_id for a new request"
        )
    return response_type.FromString(stored_response)


def check_claim(row: Mapping[str, Any], epoch: int, *, what: str) -> None:
    """Fencing: ``epoch`` must be the current claim's, and the claim live."""
    if epoch != row["claim_epoch"]:
        raise FailedPrecondition(
            f"stale epoch {epoch} for {what}: it is claimed under epoch {row['claim_epoch']}"
        )
    if row["claim_executor"] is None:
        raise FailedPrecondition(f"the claim of {what} under epoch {epoch} was released")
    if row["claim_expire"] <= row["now"]:
        raise FailedPrecondition(f"the claim of {what} under epoch {epoch} has expired")


def validate_step_change(
    state: int,
    failure: common_pb2.Failure,
    output: Any,
    attempt: pb.AttemptUpdate,
) -> None:
    if state == T.TASK_RUN_STATE_UNSPECIFIED or state not in T.values():
        raise InvalidArgument("state must be a TaskRunState")
    if state in states.NEEDS_FAILURE_TASK:
        require_failure(failure, states.task_state_name(state))
    check_size(output, "output")
    if attempt.attempt_number < 0:
        raise InvalidArgument("attempt.attempt_number must be positive")
