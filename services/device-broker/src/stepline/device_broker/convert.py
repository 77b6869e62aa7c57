"""Between database rows (and phone reports) and the API's messages."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from stepline.api.common.v1 import common_pb2
from stepline.api.device_broker.v1 import device_broker_pb2 as pb
from stepline.device_broker.model import LEASED, QUARANTINED, Entry, LiveLease
from stepline.device_broker.phones import Report

Row = Mapping[str, Any]


def health_report(report: Report) -> pb.HealthReport:
    result = pb.HealthReport(healthy=report.passed and bool(report.checks))
    result.check_time.FromMicroseconds(int((report.finished or time.time()) * 1e6))
    for check in report.checks:
        result.checks.add(name=check.name, passed=check.passed, message=check.message)
    return result


def health_to_json(report: pb.HealthReport) -> dict[str, Any]:
    return json_format.MessageToDict(report, preserving_proto_field_name=True)


def health_from_json(document: Any) -> pb.HealthReport | None:
    if not document:
        return None
    return json_format.ParseDict(document, pb.HealthReport(), ignore_unknown_fields=True)


def struct(document: Mapping[str, Any]) -> Struct:
    result = Struct()
    result.update(dict(document))
    return result


def struct_to_json(value: Struct) -> dict[str, Any]:
    return json_format.MessageToDict(value)


def live_lease(row: Row) -> LiveLease:
    holder = pb.LeaseHolder(
        executor_id=row["executor_id"],
        run_id=row["run_id"],
        task_id=row["task_id"],
        chunk_id=row["chunk_id"],
    )
    return LiveLease(
        lease_id=row["lease_id"],
        request_id=row["request_id"],
        fingerprint=row["fingerprint"],
        serial=row["serial"],
        token=row["token"],
        holder=holder,
        account=row["account"],
        grant_time=row["grant_time"],
        expire_time=row["expire_time"],
    )


def entry(row: Row) -> Entry:
    return Entry(
        serial=row["serial"],
        adb_server=row["adb_server"],
        pool=row["pool"],
        profile=row["cleanup_profile"],
        state=row["state"],
        version=row["version"],
        model=row["model"],
        product=row["product"],
        labels=dict(row["labels"] or {}),
        online=row["online"],
        account=row["bound_account"],
        health=health_from_json(row["health"]),
        last_seen=row["last_seen_time"],
        cleaning_reason=row["cleaning_reason"],
    )


def quarantine_info(row: Row) -> pb.QuarantineInfo:
    info = pb.QuarantineInfo(
        reason=row["q_reason"],
        actor=common_pb2.Principal(id=row["q_actor_id"], roles=list(row["q_actor_roles"])),
        evidence=struct(row["q_evidence"] or {}),
    )
    info.quarantine_time.FromDatetime(row["q_time"])
    return info


def device(row: Row) -> pb.Device:
    """A Device from a row of :data:`stepline.device_broker.store.DEVICE_VIEW`."""
    result = entry(row).to_proto()
    if row["state"] == LEASED and row["l_lease_id"] is not None:
        lease = pb.Lease(
            lease_id=row["l_lease_id"],
            serial=row["serial"],
            token=row["l_token"],
            account=row["l_account"],
            holder=pb.LeaseHolder(
                executor_id=row["l_executor_id"],
                run_id=row["l_run_id"],
                task_id=row["l_task_id"],
                chunk_id=row["l_chunk_id"],
            ),
        )
        lease.grant_time.FromDatetime(row["l_grant_time"])
        lease.expire_time.FromDatetime(row["l_expire_time"])
        result.lease.CopyFrom(lease)
    if row["state"] == QUARANTINED and row["q_reason"] is not None:
        result.quarantine.CopyFrom(quarantine_info(row))
    return result


def timestamp_s(value: datetime) -> float:
    return value.timestamp()
