"""Between database rows, protobuf messages and the JSON sent to webhooks."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from stepline.api.approvals.v1 import approvals_pb2 as pb
from stepline.api.common.v1 import common_pb2, workflow_pb2
from stepline.common.errors import InvalidArgument

Row = Any  # an asyncpg.Record (asyncpg ships no type information)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

S = pb.ApprovalState
STATE_NAMES: dict[int, str] = {
    S.APPROVAL_STATE_PENDING: "PENDING",
    S.APPROVAL_STATE_APPROVED: "APPROVED",
    S.APPROVAL_STATE_REJECTED: "REJECTED",
    S.APPROVAL_STATE_EXPIRED: "EXPIRED",
    S.APPROVAL_STATE_CANCELLED: "CANCELLED",
}


def set_time(stamp: Timestamp, value: datetime | None) -> None:
    if value is not None:
        stamp.FromDatetime(value)


def to_json(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data: proto field names, enums by name."""
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


def fingerprint(request: Message, *extra: str) -> str:
    """Digest of ``request`` without its request_id (plus ``extra``, e.g. the caller),
    to tell an idempotent replay from a conflicting reuse of the request_id."""
    copy = type(request)()
    copy.CopyFrom(request)
    if "request_id" in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField("request_id")
    digest = hashlib.sha256(copy.SerializeToString(deterministic=True))
    for value in extra:
        digest.update(b"\0" + value.encode("utf-8"))
    return digest.hexdigest()


def principal(actor_id: str, roles: Iterable[str]) -> common_pb2.Principal:
    return common_pb2.Principal(id=actor_id, roles=sorted(roles))


def decision(row: Row) -> pb.Decision:
    result = pb.Decision(
        actor=principal(row["actor_id"], row["actor_roles"]),
        outcome=row["outcome"],
        reason=row["reason"],
        channel=row["channel"],
    )
    set_time(result.decide_time, row["decide_time"])
    return result


def approval(row: Row, decisions: Iterable[Row] = ()) -> pb.Approval:
    policy = workflow_pb2.ApprovalPolicy()
    policy.ParseFromString(bytes(row["policy"]))
    result = pb.Approval(
        approval_id=row["approval_id"],
        run_id=row["run_id"],
        task_id=row["task_id"],
        step_id=row["step_id"],
        workflow_name=row["workflow_name"],
        labels=row["labels"],
        state=row["state"],
        policy=policy,
        decisions=[decision(d) for d in decisions],
    )
    result.context.update(row["context"])
    if row["initiator_id"]:
        result.initiator.CopyFrom(principal(row["initiator_id"], row["initiator_roles"]))
    set_time(result.create_time, row["create_time"])
    set_time(result.expire_time, row["expire_time"])
    set_time(result.decide_time, row["decide_time"])
    return result


def subscription(row: Row) -> pb.Subscription:
    result = pb.Subscription(
        subscription_id=row["subscription_id"],
        url=row["url"],
        secret_ref=row["secret_ref"],
        workflow_names=row["workflow_names"],
        labels=row["labels"],
        event_types=row["event_types"],
        description=row["description"],
        created_by=principal(row["created_by_id"], row["created_by_roles"]),
    )
    set_time(result.create_time, row["create_time"])
    return result


def delivery(row: Row) -> pb.Delivery:
    result = pb.Delivery(
        delivery_id=str(row["delivery_id"]),
        subscription_id=row["subscription_id"],
        approval_id=row["approval_id"],
        event_type=row["event_type"],
        state=row["state"],
        attempts=row["attempts"],
        last_status_code=row["last_status_code"],
        last_error=row["last_error"],
    )
    set_time(result.create_time, row["create_time"])
    set_time(result.last_attempt_time, row["last_attempt_time"])
    if row["state"] == pb.DELIVERY_STATE_PENDING:
        set_time(result.next_attempt_time, row["next_attempt_time"])
    return result


# --- pagination --------------------------------------------------------------


def page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(**position: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode()


def decode_token(token: str, *keys: str) -> dict[str, Any] | None:
    """The position a page token holds (None for the first page)."""
    if not token:
        return None
    try:
        position = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, TypeError):
        position = None
    if not isinstance(position, dict) or set(position) != set(keys):
        raise InvalidArgument("page_token is malformed; pass back next_page_token as given")
    return position


def after_position(token: str) -> tuple[datetime, str] | None:
    """A ``(create_time, id)`` position from a page token of a time-ordered list."""
    position = decode_token(token, "t", "id")
    if position is None:
        return None
    try:
        return datetime.fromisoformat(position["t"]), str(position["id"])
    except (TypeError, ValueError):
        raise InvalidArgument(
            "page_token is malformed; pass back next_page_token as given"
        ) from None


def next_token(rows: list[Row], size: int, id_column: str) -> str:
    """The token after the last row of a page of ``size``, if more rows follow."""
    if len(rows) <= size:
        return ""
    last = rows[size - 1]
    return encode_token(t=last["create_time"].isoformat(), id=str(last[id_column]))
