"""Between database rows, protobuf messages and the JSON sent to webhooks."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from stepline.api.approvals.v1 import approvals_pb2 as pb
from stepline.api.common.v1 import common_pb2, workflow_pb2

Row = Any  # an asyncpg.Record (asyncpg ships no type information)


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
