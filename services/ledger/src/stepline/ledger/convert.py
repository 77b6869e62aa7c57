"""Between database rows and protobuf messages."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2

Row = Any  # an asyncpg.Record (asyncpg ships no type information)


def group_by(rows: list[Row], key: str) -> dict[Any, list[Row]]:
    """Rows grouped by one column's value, keeping their order."""
    groups: dict[Any, list[Row]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return groups


def to_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data (enum names, original field names)."""
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


def struct(data: dict[str, Any] | None) -> Struct:
    value = Struct()
    if data:
        value.update(data)
    return value


def failure(data: dict[str, Any] | None) -> common_pb2.Failure | None:
    if not data:
        return None
    return json_format.ParseDict(data, common_pb2.Failure())


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _aware(value: datetime | str) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def timestamp(value: datetime | str | None) -> Timestamp | None:
    """A Timestamp from a database value (a datetime, or ISO text from JSON)."""
    if value is None:
        return None
    stamp = Timestamp()
    fill_timestamp(stamp, _aware(value))
    return stamp


def fill_timestamp(stamp: Timestamp, value: datetime) -> None:
    """Set ``stamp`` to the aware datetime ``value``."""
    # Exact integer arithmetic: much cheaper than Timestamp.FromDatetime.
    delta = value - _EPOCH
    stamp.seconds = delta.days * 86400 + delta.seconds
    stamp.nanos = delta.microseconds * 1000


def _set_time(message: Message, field: str, value: datetime | str | None) -> None:
    if value is not None:
        fill_timestamp(getattr(message, field), _aware(value))


def claim(row: Row) -> run_pb2.Claim:
    result = run_pb2.Claim(executor_id=row["claim_executor"] or "", epoch=row["claim_epoch"])
    _set_time(result, "claim_time", row["claim_time"])
    _set_time(result, "expire_time", row["claim_expire"])
    return result


def attempt(row: Row) -> run_pb2.Attempt:
    result = run_pb2.Attempt(
        attempt_number=row["attempt_number"],
        state=row["state"],
        reason=row["reason"],
        executor_id=row["executor_id"],
        claim_epoch=row["claim_epoch"],
        device_serial=row["device_serial"],
        device_lease_id=row["device_lease_id"],
    )
    _set_time(result, "start_time", row["start_time"])
    _set_time(result, "end_time", row["end_time"])
    if (f := failure(row["failure"])) is not None:
        result.failure.CopyFrom(f)
    return result


def run(row: Row, *, with_definition: bool = False) -> run_pb2.WorkflowRun:
    result = run_pb2.WorkflowRun(
        run_id=row["run_id"],
        workflow_name=row["workflow_name"],
        workflow_version=row["workflow_version"],
        state=row["state"],
        inputs=struct(row["inputs"]),
        labels=row["labels"],
        initiator=common_pb2.Principal(id=row["initiator_id"], roles=row["initiator_roles"]),
        parent_run_id=row["parent_run_id"] or "",
        parent_task_id=row["parent_task_id"] or "",
        rerun_count=row["rerun_count"],
        schedule_id=row["schedule_id"] or "",
        claim=claim(row),
        dispatch_epoch=row["dispatch_epoch"],
        pending_control=row["pending_control"],
        request_id=row["request_id"],
    )
    for field in ("create_time", "start_time", "end_time", "update_time"):
        _set_time(result, field, row[field])
    if (f := failure(row["failure"])) is not None:
        result.failure.CopyFrom(f)
    if row["outputs"] is not None:
        result.outputs.CopyFrom(struct(row["outputs"]))
    if with_definition:
        result.definition.ParseFromString(row["definition"])
    return result


def definition(row: Row) -> workflow_pb2.WorkflowDefinition:
    result = workflow_pb2.WorkflowDefinition()
    result.ParseFromString(row["definition"])
    return result


def chunk_counts(rows: list[Row], *, complete: bool) -> run_pb2.ChunkCounts:
    counts = run_pb2.ChunkCounts(complete=complete)
    names = {
        common_pb2.TASK_RUN_STATE_PENDING: "pending",
        common_pb2.TASK_RUN_STATE_RUNNING: "running",
        common_pb2.TASK_RUN_STATE_SUCCEEDED: "succeeded",
        common_pb2.TASK_RUN_STATE_FAILED: "failed",
        common_pb2.TASK_RUN_STATE_TIMED_OUT: "timed_out",
        common_pb2.TASK_RUN_STATE_CANCELLED: "cancelled",
        common_pb2.TASK_RUN_STATE_SKIPPED: "skipped",
    }
    for row in rows:
        counts.total += row["n"]
        name = names.get(row["state"])
        if name is not None:
            setattr(counts, name, getattr(counts, name) + row["n"])
    return counts


def artifact(row: Row) -> run_pb2.Artifact:
    """An artifact's description (never its content) from its row."""
    result = run_pb2.Artifact(
        artifact_id=row["artifact_id"],
        run_id=row["run_id"],
        task_id=row["task_id"],
        chunk_id=row["chunk_id"] or "",
        attempt_number=row["attempt_number"],
        name=row["name"],
        content_type=row["content_type"],
        size_bytes=row["size_bytes"],
        sha256=row["sha256"],
    )
    _set_time(result, "create_time", row["create_time"])
    return result


def task(
    row: Row,
    attempts: list[Row],
    counts: run_pb2.ChunkCounts | None,
    artifacts: Sequence[Row] = (),
) -> run_pb2.TaskRun:
    result = run_pb2.TaskRun(
        task_id=row["task_id"],
        run_id=row["run_id"],
        step_id=row["step_id"],
        step_path=row["step_path"],
        ordinal=row["ordinal"],
        kind=row["kind"],
        verb=row["verb"],
        state=row["state"],
        attempts=[attempt(a) for a in attempts],
        child_run_id=row["child_run_id"] or "",
        child_workflow_version=row["child_workflow_version"],
        approval_id=row["approval_id"] or "",
        artifacts=[artifact(a) for a in artifacts],
    )
    for field in ("create_time", "start_time", "end_time"):
        _set_time(result, field, row[field])
    if row["output"] is not None:
        result.output.CopyFrom(struct(row["output"]))
    if (f := failure(row["failure"])) is not None:
        result.failure.CopyFrom(f)
    if counts is not None:
        result.chunk_counts.CopyFrom(counts)
    return result


def chunk(row: Row, attempts: list[Row], artifacts: Sequence[Row] = ()) -> run_pb2.ChunkRun:
    result = run_pb2.ChunkRun(
        chunk_id=row["chunk_id"],
        task_id=row["task_id"],
        run_id=row["run_id"],
        index=row["index"],
        record=struct(row["record"]),
        state=row["state"],
        attempts=[attempt(a) for a in attempts],
        claim=claim(row),
        dispatch_epoch=row["dispatch_epoch"],
        artifacts=[artifact(a) for a in artifacts],
    )
    for field in ("create_time", "start_time", "end_time"):
        _set_time(result, field, row[field])
    if row["output"] is not None:
        result.output.CopyFrom(struct(row["output"]))
    if (f := failure(row["failure"])) is not None:
        result.failure.CopyFrom(f)
    return result


def event(row: Row) -> run_pb2.RunEvent:
    result = run_pb2.RunEvent(payload=struct(row["payload"]))
    fill_event(result, row)
    return result


def fill_event(result: run_pb2.RunEvent, row: Row) -> None:
    """Set the fields of an empty ``result`` from an ``events`` row, all but ``payload``
    (the relay reads it as JSON text, see :func:`stepline.ledger.events.published_event`)."""
    result.event_id = str(row["event_id"])
    result.run_id = row["run_id"]
    result.sequence = row["sequence"]
    result.type = row["type"]
    actor = result.actor
    actor.id = row["actor_id"]
    actor.roles.extend(row["actor_roles"])
    if task_id := row["task_id"]:
        result.task_id = task_id
    if chunk_id := row["chunk_id"]:
        result.chunk_id = chunk_id
    _set_time(result, "time", row["time"])
