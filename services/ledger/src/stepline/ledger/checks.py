"""Checks shared by the ledger's writes: request validation, replays, fencing."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypeVar

from google.protobuf.message import Message

from stepline.api.approvals.v1 import approvals_pb2
from stepline.api.common.v1 import common_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.errors import Aborted, FailedPrecondition, InvalidArgument
from stepline.common.requests import fingerprint
from stepline.ledger import states

T = common_pb2.TaskRunState
M = TypeVar("M", bound=Message)

MAX_VALUE_BYTES = 1024 * 1024  # one output, input set or chunk record
MAX_ID_LENGTH = 256
MAX_ARTIFACT_BYTES = 8 * 1024 * 1024  # the content of one artifact
MAX_TEXT_LENGTH = 64 * 1024  # free text kept in an event, e.g. a decision's reason

ARTIFACT_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
# A MIME type (RFC 6838 names), optionally with parameters: image/png, text/plain; charset=utf-8
_TOKEN = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
CONTENT_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}([ \t]*;[ \t]*{_TOKEN}=({_TOKEN}|\"[ !#-~]*\"))*")
MAX_CONTENT_TYPE_LENGTH = 255

# RecordApprovalDecision: what was decided, how it arrived, and the request's state after it.
DECISION_OUTCOMES = ("approved", "rejected")
DECISION_CHANNELS = ("grpc", "webhook")
APPROVAL_STATES = tuple(
    name.removeprefix("APPROVAL_STATE_")
    for name, number in approvals_pb2.ApprovalState.items()
    if number != approvals_pb2.APPROVAL_STATE_UNSPECIFIED
)


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


def one_of(value: str, name: str, choices: tuple[str, ...]) -> str:
    if not value:
        raise InvalidArgument(f"{name} is required: one of {', '.join(choices)}")
    if value not in choices:
        raise InvalidArgument(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def text(value: str, name: str) -> str:
    if len(value) > MAX_TEXT_LENGTH:
        raise InvalidArgument(f"{name} is {len(value)} characters; the limit is {MAX_TEXT_LENGTH}")
    return value


def artifact_name(name: str) -> str:
    if not name:
        raise InvalidArgument("name is required, e.g. screenshot-1.png")
    if ARTIFACT_NAME.fullmatch(name) is None:
        raise InvalidArgument(
            f"name {name[:120]!r} must be 1 to 100 letters, digits, '.', '-' or '_'"
        )
    return name


def content_type(value: str) -> str:
    if not value:
        raise InvalidArgument("content_type is required, e.g. image/png")
    if len(value) > MAX_CONTENT_TYPE_LENGTH or CONTENT_TYPE.fullmatch(value) is None:
        raise InvalidArgument(
            f"content_type {value[:80]!r} is not a MIME type such as image/png or text/plain"
        )
    return value


def artifact_content(content: bytes) -> bytes:
    if len(content) > MAX_ARTIFACT_BYTES:
        raise InvalidArgument(
            f"content is {len(content)} bytes; the limit is {MAX_ARTIFACT_BYTES} (8 MiB)"
        )
    return content


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


def check_claim(
    row: Mapping[str, Any], epoch: int, *, what: str, now: datetime | None = None
) -> None:
    """Fencing: ``epoch`` must be the current claim's, and the claim live (at
    ``now``, by default the row's ``now``)."""
    if epoch != row["claim_epoch"]:
        raise FailedPrecondition(
            f"stale epoch {epoch} for {what}: it is claimed under epoch {row['claim_epoch']}"
        )
    if row["claim_executor"] is None:
        raise FailedPrecondition(f"the claim of {what} under epoch {epoch} was released")
    if row["claim_expire"] <= (row["now"] if now is None else now):
        raise FailedPrecondition(f"the claim of {what} under epoch {epoch} has expired")


def check_current_attempt(row: Mapping[str, Any], attempt_number: int, *, what: str) -> None:
    """``attempt_number`` must be the open (current) attempt of ``row``, a task or
    chunk read with its last attempt's number and whether it is still open."""
    if row["state"] in states.TASK_TERMINAL:
        raise FailedPrecondition(
            f"{what} is {states.task_state_name(row['state'])}; only its current attempt, "
            "while it runs, can add to its record"
        )
    current = row["last_attempt_number"]
    if current is None or not row["last_attempt_open"]:
        raise FailedPrecondition(f"{what} has no open attempt (attempt {attempt_number} given)")
    if attempt_number != current:
        raise FailedPrecondition(
            f"attempt {attempt_number} of {what} is not its current attempt {current}"
        )


def validate_step_change(
    state: int,
    failure: common_pb2.Failure,
    output: Any,
    attempt: pb.AttemptUpdate,
) -> None:
    if state == T.TASK_RUN_STATE_UNSPECIFIED or state not in states.TASK_STATES:
        raise InvalidArgument("state must be a TaskRunState")
    if state in states.NEEDS_FAILURE_TASK:
        require_failure(failure, states.task_state_name(state))
    check_size(output, "output")
    if attempt.attempt_number < 0:
        raise InvalidArgument("attempt.attempt_number must be positive")
