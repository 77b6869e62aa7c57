"""What the client commands print, and how they read their arguments (no server)."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from stepline.api.approvals.v1 import approvals_pb2 as apb
from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.device_broker.v1 import device_broker_pb2 as dpb
from stepline.api.scheduler.v1 import workflow_service_pb2 as wpb
from stepline.cli import output
from stepline.cli.approvals import parse_state as parse_approval_state
from stepline.cli.devices import parse_state as parse_device_state
from stepline.cli.inputs import parse_inputs, parse_labels, parse_value
from stepline.cli.runs import parse_state
from stepline.cli.workflows import source_format
from stepline.common.errors import InvalidArgument

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def ts(seconds_after_t0: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.fromtimestamp(T0.timestamp() + seconds_after_t0, tz=UTC))
    return stamp


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(data)
    return value


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0, "0ms"),
        (0.8504, "850ms"),
        (1, "1.0s"),
        (12.34, "12.3s"),
        (59.99, "59.9s"),
        (60, "1m00s"),
        (245.7, "4m05s"),
        (3600, "1h00m"),
        (7380, "2h03m"),
        (3 * 86400 + 4 * 3600 + 59, "3d04h"),
        (-5, "0ms"),
    ],
)
def test_durations_are_short(seconds: float | None, text: str) -> None:
    assert output.duration(seconds) == text


def test_elapsed_marks_what_is_still_running() -> None:
    assert output.elapsed(ts(0), ts(2.5), now=T0) == "2.5s"
    assert (
        output.elapsed(ts(0), Timestamp(), now=datetime.fromtimestamp(T0.timestamp() + 90, UTC))
        == "1m30s+"
    )
    assert output.elapsed(Timestamp(), Timestamp(), now=T0) == "-"


def test_timestamps_are_utc_to_the_second() -> None:
    assert output.timestamp(ts(3.25)) == "2025-03-01 12:00:03Z"
    assert output.timestamp(Timestamp()) == "-"
    assert output.clock(ts(3.25)) == "12:00:03.250"


def test_table_aligns_columns_and_right_aligns_numbers() -> None:
    text = output.table(
        ("NAME", "N", "NOTE"),
        [("alpha", "1", "first"), ("b", "120", "")],
        right="N",
    )
    assert text.splitlines() == [
        "NAME     N  NOTE",
        "alpha    1  first",
        "b      120",
    ]


def test_fields_align_values_and_drop_empty_ones() -> None:
    assert output.fields([("run", "r1"), ("failure", ""), ("workflow", "w v1")]) == (
        "run:       r1\nworkflow:  w v1"
    )


def test_states_and_failures_read_without_prefixes() -> None:
    assert output.run_state(common_pb2.WORKFLOW_RUN_STATE_TIMED_OUT) == "TIMED_OUT"
    assert output.task_state(common_pb2.TASK_RUN_STATE_SKIPPED) == "SKIPPED"
    assert output.run_state(99) == "99"
    failure = common_pb2.Failure(reason=common_pb2.FAILURE_REASON_VERB_ERROR, message="boom")
    assert output.failure_text(failure) == "VERB_ERROR: boom"
    assert output.failure_text(common_pb2.Failure()) == ""


def test_chunk_summary_counts_what_is_not_done() -> None:
    counts = run_pb2.ChunkCounts(total=10, succeeded=7, failed=2, running=1, complete=True)
    assert output.chunk_summary(counts) == "7/10 succeeded, 2 failed, 1 running"
    assert output.chunk_summary(run_pb2.ChunkCounts(total=3, pending=3)) == (
        "0/3 succeeded, 3 pending, generating"
    )


def _run() -> run_pb2.WorkflowRun:
    run = run_pb2.WorkflowRun(
        run_id="r1",
        workflow_name="nightly",
        workflow_version=3,
        state=common_pb2.WORKFLOW_RUN_STATE_FAILED,
        create_time=ts(0),
        start_time=ts(1),
        end_time=ts(95),
        failure=common_pb2.Failure(
            reason=common_pb2.FAILURE_REASON_CHUNK_FAILURES, message="2 chunks failed"
        ),
    )
    run.initiator.id = "user:alice"
    run.tasks.add(
        step_id="fetch",
        step_path="fetch",
        kind=workflow_pb2.STEP_KIND_ATOMIC,
        state=common_pb2.TASK_RUN_STATE_SUCCEEDED,
        start_time=ts(1),
        end_time=ts(1.4),
    ).attempts.add(attempt_number=1, state=common_pb2.TASK_RUN_STATE_SUCCEEDED)
    crawl = run.tasks.add(
        step_id="crawl",
        step_path="crawl",
        kind=workflow_pb2.STEP_KIND_CHUNKED,
        state=common_pb2.TASK_RUN_STATE_FAILED,
        start_time=ts(2),
        end_time=ts(95),
        chunk_counts=run_pb2.ChunkCounts(total=10, succeeded=8, failed=2, complete=True),
        failure=common_pb2.Failure(
            reason=common_pb2.FAILURE_REASON_CHUNK_FAILURES, message="2 of 10 failed"
        ),
    )
    crawl.attempts.add(attempt_number=1, state=common_pb2.TASK_RUN_STATE_FAILED)
    run.tasks.add(
        step_id="send",
        step_path="notify/email/send",
        kind=workflow_pb2.STEP_KIND_ATOMIC,
        state=common_pb2.TASK_RUN_STATE_SKIPPED,
    )
    return run


def test_timeline_lists_each_step_with_state_attempts_timing_chunks_and_failure() -> None:
    lines = output.timeline(_run(), now=T0).splitlines()
    assert "run:        r1" in lines
    assert "workflow:   nightly v3" in lines
    assert "failure:    CHUNK_FAILURES: 2 chunks failed" in lines
    assert "duration:   1m34s" in lines
    start = lines.index(next(line for line in lines if line.startswith("STEP")))
    header, fetch, crawl, send = lines[start : start + 4]
    assert header.split() == [
        "STEP",
        "KIND",
        "STATE",
        "ATTEMPTS",
        "STARTED",
        "DURATION",
        "CHUNKS",
        "DETAIL",
    ]
    assert fetch.split()[:7] == [
        "fetch",
        "atomic",
        "SUCCEEDED",
        "1",
        "2025-03-01",
        "12:00:01Z",
        "400ms",
    ]
    assert "8/10 succeeded, 2 failed" in crawl
    assert crawl.endswith("CHUNK_FAILURES: 2 of 10 failed")
    assert send.split() == ["notify/email/send", "atomic", "SKIPPED", "0", "-", "-"]
    # columns line up: every row's STATE starts where the header's does
    column = header.index("STATE")
    assert {fetch[column:].split()[0], crawl[column:].split()[0]} == {"SUCCEEDED", "FAILED"}


def test_timeline_shows_the_last_attempts_failure_of_a_task_kept_running() -> None:
    run = run_pb2.WorkflowRun(run_id="r2", state=common_pb2.WORKFLOW_RUN_STATE_PAUSED)
    task = run.tasks.add(
        step_id="charge", step_path="charge", state=common_pb2.TASK_RUN_STATE_RUNNING
    )
    task.attempts.add(
        attempt_number=2,
        state=common_pb2.TASK_RUN_STATE_FAILED,
        failure=common_pb2.Failure(reason=common_pb2.FAILURE_REASON_TIMEOUT, message="30s"),
    )
    assert "attempt 2: TIMEOUT: 30s" in output.timeline(run, now=T0)


def _event(
    seq: int, kind: int, *, task: str = "", chunk: str = "", **payload: Any
) -> run_pb2.RunEvent:
    return run_pb2.RunEvent(
        run_id="r1",
        sequence=seq,
        type=kind,  # type: ignore[arg-type]
        task_id=f"r1/{task}" if task else "",
        chunk_id=f"r1/{chunk}" if chunk else "",
        time=ts(seq),
        payload=struct(payload),
    )


def test_event_lines_name_the_step_and_the_transition() -> None:
    E = run_pb2.RunEventType
    moved = _event(
        3,
        E.RUN_EVENT_TYPE_TASK_STATE_CHANGED,
        task="fan/eu/login",
        from_state="RUNNING",
        to_state="FAILED",
        attempt_number=2,
        failure={"reason": "FAILURE_REASON_VERB_ERROR", "message": "401"},
    )
    assert output.event_line(moved) == (
        "12:00:03.000  fan/eu/login  RUNNING -> FAILED (attempt 2): VERB_ERROR: 401"
    )
    created = _event(
        1, E.RUN_EVENT_TYPE_RUN_CREATED, workflow_name="w", workflow_version=2, tasks=4
    )
    assert output.event_subject(created) == "run"
    assert output.event_detail(created) == "created: w v2, 4 steps"
    chunk = _event(
        5,
        E.RUN_EVENT_TYPE_CHUNK_STATE_CHANGED,
        chunk="crawl#7",
        from_state="RUNNING",
        to_state="FAILED",
    )
    assert output.event_subject(chunk) == "crawl#7"
    control = _event(6, E.RUN_EVENT_TYPE_CONTROL_REQUESTED, action="CANCEL", reason="wrong input")
    control.actor.id = "user:bob"
    assert output.event_detail(control) == "cancel requested by user:bob: wrong input"


def test_only_transitions_are_shown_live() -> None:
    E = run_pb2.RunEventType
    shown = [
        _event(1, E.RUN_EVENT_TYPE_RUN_STATE_CHANGED, from_state="PENDING", to_state="RUNNING"),
        _event(2, E.RUN_EVENT_TYPE_TASK_STATE_CHANGED, task="a", to_state="RUNNING"),
        _event(3, E.RUN_EVENT_TYPE_ATTEMPT_RECORDED, task="a", state="RUNNING", reason="retry"),
        _event(4, E.RUN_EVENT_TYPE_ATTEMPT_RECORDED, task="a", state="FAILED"),
        _event(5, E.RUN_EVENT_TYPE_CHUNK_STATE_CHANGED, chunk="a#1", to_state="FAILED"),
    ]
    hidden = [
        _event(6, E.RUN_EVENT_TYPE_CLAIMED, epoch=1),
        _event(7, E.RUN_EVENT_TYPE_DISPATCHED, dispatch_epoch=1),
        _event(8, E.RUN_EVENT_TYPE_ATTEMPT_RECORDED, task="a", state="RUNNING", reason="initial"),
        _event(9, E.RUN_EVENT_TYPE_CHUNK_STATE_CHANGED, chunk="a#1", to_state="SUCCEEDED"),
    ]
    assert all(output.is_transition(e) for e in shown)
    assert not any(output.is_transition(e) for e in hidden)


def test_history_is_a_table_of_every_event() -> None:
    E = run_pb2.RunEventType
    lines = output.history(
        [
            _event(9, E.RUN_EVENT_TYPE_CLAIMED, epoch=1),
            _event(10, E.RUN_EVENT_TYPE_DISPATCHED, dispatch_epoch=2),
        ]
    ).splitlines()
    assert lines[0].split() == ["SEQ", "TIME", "EVENT", "SUBJECT", "ACTOR", "DETAIL"]
    assert lines[1].startswith("  9  2025-03-01 12:00:09Z  claimed  ")
    assert lines[2].endswith("dispatched (epoch 2)")


def test_workflow_detail_shows_inputs_and_nested_steps() -> None:
    version = wpb.WorkflowVersion(digest="ab" * 32, create_time=ts(0))
    version.created_by.id = "user:alice"
    d = version.definition
    d.name, d.version, d.description = "deploy", 4, "ship it"
    d.input_schema.fields.add(name="region", type=workflow_pb2.INPUT_TYPE_STRING, required=True)
    d.input_schema.fields.add(
        name="count", type=workflow_pb2.INPUT_TYPE_INT
    ).default.number_value = 2
    d.steps.add(id="build").atomic.verb = "core.http"
    fan = d.steps.add(id="fan")
    fan.parallel.branches.add(id="eu").steps.add(id="push").atomic.verb = "core.noop"
    text = output.workflow_detail(version)
    assert "workflow:     deploy" in text
    assert "registered:   2025-03-01 12:00:00Z by user:alice" in text
    assert any(line.split() == ["count", "int", "no", "2.0"] for line in text.splitlines())
    assert any(line.split() == ["fan/eu/push", "atomic", "core.noop"] for line in text.splitlines())


def test_json_output_uses_the_proto_json_mapping() -> None:
    run = run_pb2.WorkflowRun(
        run_id="r1", workflow_version=3, state=common_pb2.WORKFLOW_RUN_STATE_RUNNING
    )
    assert json.loads(output.to_json(run)) == {
        "runId": "r1",
        "workflowVersion": "3",
        "state": "WORKFLOW_RUN_STATE_RUNNING",
    }
    assert "\n" not in output.to_json_line(run)


def test_input_values_are_json_when_they_parse_else_strings() -> None:
    assert parse_value("3") == 3
    assert parse_value("true") is True
    assert parse_value('"007"') == "007"
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("eu-west") == "eu-west"
    assert parse_value("") == ""
    assert parse_value("a=b") == "a=b"


def test_inputs_merge_the_json_object_then_each_pair() -> None:
    inputs = parse_inputs(
        ["count=3", "region=eu", "url=http://x/?a=b"], '{"count": 1, "dry": true}'
    )
    assert dict(inputs) == {"count": 3, "dry": True, "region": "eu", "url": "http://x/?a=b"}
    with pytest.raises(InvalidArgument, match="expected KEY=VALUE"):
        parse_inputs(["novalue"])
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        parse_inputs([], "{nope")
    with pytest.raises(InvalidArgument, match="JSON object"):
        parse_inputs([], "[1]")
    assert parse_labels(["team=core", "x=1"]) == {"team": "core", "x": "1"}


def test_states_and_formats_from_arguments() -> None:
    assert parse_state("failed") == common_pb2.WORKFLOW_RUN_STATE_FAILED
    assert parse_state("WORKFLOW_RUN_STATE_TIMED_OUT") == common_pb2.WORKFLOW_RUN_STATE_TIMED_OUT
    with pytest.raises(argparse.ArgumentTypeError, match="one of: pending, running"):
        parse_state("done")
    assert source_format(Path("a.YML")) == wpb.SOURCE_FORMAT_YAML
    assert source_format(Path("a.json")) == wpb.SOURCE_FORMAT_JSON
    with pytest.raises(InvalidArgument, match=r"use \.yaml, \.yml or \.json"):
        source_format(Path("a.toml"))


def test_a_reason_already_in_the_failure_is_not_repeated() -> None:
    E = run_pb2.RunEventType
    ended = _event(
        7,
        E.RUN_EVENT_TYPE_RUN_STATE_CHANGED,
        from_state="PENDING",
        to_state="CANCELLED",
        reason="wrong input",
        failure={"reason": "FAILURE_REASON_CANCELLED", "message": "wrong input"},
    )
    assert output.event_detail(ended) == "PENDING -> CANCELLED: CANCELLED: wrong input"


# --- artifacts, waiting, devices, approvals ---------------------------------------------


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (12_595, "12.3 KiB"), (5 << 20, "5.0 MiB")],
)
def test_sizes_are_short(count: int, text: str) -> None:
    assert output.size(count) == text


def _govern_run() -> run_pb2.WorkflowRun:
    run = run_pb2.WorkflowRun(run_id="r3", state=common_pb2.WORKFLOW_RUN_STATE_SUSPENDED)
    shot = run.tasks.add(
        step_id="shot",
        step_path="shot",
        kind=workflow_pb2.STEP_KIND_ATOMIC,
        state=common_pb2.TASK_RUN_STATE_SUCCEEDED,
    )
    shot.artifacts.add(
        artifact_id="r3/shot:1:screen.png",
        attempt_number=1,
        name="screen.png",
        content_type="image/png",
        size_bytes=12_595,
    )
    run.tasks.add(
        step_id="ask",
        step_path="ask",
        kind=workflow_pb2.STEP_KIND_GOVERN,
        state=common_pb2.TASK_RUN_STATE_SUSPENDED,
        approval_id="ap-1",
    )
    return run


def test_timeline_lists_artifacts_and_the_approval_a_step_waits_for() -> None:
    lines = output.timeline(_govern_run(), now=T0).splitlines()
    ask = next(line for line in lines if line.startswith("ask "))
    assert ask.split()[:3] == ["ask", "govern", "SUSPENDED"]
    assert ask.endswith("approval ap-1")
    start = lines.index(next(line for line in lines if line.startswith("STEP  ATTEMPT")))
    assert lines[start].split() == ["STEP", "ATTEMPT", "NAME", "TYPE", "SIZE", "ARTIFACT"]
    assert lines[start + 1].split() == [
        "shot", "1", "screen.png", "image/png", "12.3", "KiB", "r3/shot:1:screen.png"
    ]  # fmt: skip
    assert "ARTIFACT" not in output.timeline(_run(), now=T0)


def test_wait_outcome_names_the_approval_of_a_suspended_run() -> None:
    assert output.wait_outcome(_govern_run(), now=T0).splitlines() == [
        "run r3 SUSPENDED",
        "  step ask waits for approval ap-1: stepline approvals show ap-1",
    ]
    assert output.wait_outcome(_run(), now=T0) == (
        "run r1 FAILED in 1m34s: CHUNK_FAILURES: 2 chunks failed"
    )
    paused = run_pb2.WorkflowRun(run_id="r4", state=common_pb2.WORKFLOW_RUN_STATE_PAUSED)
    assert output.wait_outcome(paused, now=T0) == "run r4 PAUSED"


def _device() -> dpb.Device:
    device = dpb.Device(
        serial="127.0.0.1:5555",
        adb_server="127.0.0.1:5037",
        model="Pixel 7",
        product="stepline_sim",
        pool="default",
        state=common_pb2.DEVICE_STATE_LEASED,
        bound_account="acme",
        cleanup_profile="standard",
        last_seen_time=ts(0),
    )
    device.lease.CopyFrom(
        dpb.Lease(
            lease_id="l-9",
            serial=device.serial,
            token=7,
            holder=dpb.LeaseHolder(executor_id="executor-1", run_id="r1", task_id="r1/post"),
            grant_time=ts(0),
            expire_time=ts(25),
        )
    )
    device.health.CopyFrom(dpb.HealthReport(healthy=True, check_time=ts(-5)))
    device.health.checks.add(name="boot_completed", passed=True, message="1")
    device.health.checks.add(name="storage_free", passed=True, message="6144 MB free")
    return device


def test_device_rows_show_state_health_account_and_lease() -> None:
    quarantined = dpb.Device(
        serial="127.0.0.1:5557", state=common_pb2.DEVICE_STATE_QUARANTINED, model="Pixel 7"
    )
    quarantined.health.check_time.CopyFrom(ts(0))
    quarantined.health.checks.add(name="battery", passed=False, message="5%")
    lines = output.device_rows([_device(), quarantined, dpb.Device(serial="x")]).splitlines()
    assert lines[0].split() == ["SERIAL", "STATE", "MODEL", "POOL", "HEALTH", "ACCOUNT", "LEASE"]
    assert lines[1].split() == [
        "127.0.0.1:5555", "LEASED", "Pixel", "7", "default", "ok", "acme", "r1/post", "(token", "7)"
    ]  # fmt: skip
    assert "failed: battery" in lines[2]
    assert lines[3].split() == ["x", "UNSPECIFIED", "-", "-", "-", "-", "-"]


def test_device_detail_shows_the_lease_the_checks_and_quarantine_evidence() -> None:
    text = output.device_detail(_device(), now=T0)
    assert "device:      127.0.0.1:5555" in text
    assert "model:       Pixel 7 / stepline_sim" in text
    assert "  expires:   2025-03-01 12:00:25Z (in 25.0s)" in text
    assert "  executor:  executor-1" in text
    assert "health:  healthy, checked 2025-03-01 11:59:55Z" in text
    assert any(
        line.split() == ["storage_free", "pass", "6144", "MB", "free"] for line in text.splitlines()
    )
    assert "quarantine" not in text

    device = dpb.Device(serial="s", state=common_pb2.DEVICE_STATE_QUARANTINED)
    device.quarantine.reason = "cleanup_failed"
    device.quarantine.actor.id = "system:device-broker"
    device.quarantine.quarantine_time.CopyFrom(ts(60))
    device.quarantine.evidence.update({"failed_checks": ["storage_free"], "output": "rm: busy"})
    text = output.device_detail(device, now=T0)
    assert "health:  not checked yet" in text
    assert text.endswith(
        "quarantine:\n"
        "  reason:  cleanup_failed\n"
        "  by:      system:device-broker\n"
        "  since:   2025-03-01 12:01:00Z\n"
        "  evidence:\n"
        '    failed_checks: ["storage_free"]\n'
        '    output: "rm: busy"'
    )


def _approval() -> apb.Approval:
    approval = apb.Approval(
        approval_id="ap-1",
        run_id="r1",
        task_id="r1/ask",
        step_id="ask",
        workflow_name="payout",
        state=apb.APPROVAL_STATE_PENDING,
        create_time=ts(0),
        expire_time=ts(3600),
    )
    policy = approval.policy
    policy.approver_roles.append("approver")
    policy.approver_principals.append("user:carol")
    policy.required_approvals = 2
    policy.expiry.FromSeconds(3600)
    policy.expiry_outcome = workflow_pb2.APPROVAL_EXPIRY_OUTCOME_FAILED
    approval.initiator.id = "operator"
    approval.context.update({"inputs.amount": 120})
    decision = approval.decisions.add(
        outcome=apb.DECISION_OUTCOME_APPROVED,
        reason="looks right",
        decide_time=ts(60),
        channel=apb.DECISION_CHANNEL_GRPC,
    )
    decision.actor.id = "approver"
    return approval


def test_approval_rows_show_votes_and_expiry() -> None:
    lines = output.approval_rows([_approval()], now=T0).splitlines()
    assert lines[0].split() == [
        "APPROVAL", "STATE", "VOTES", "WORKFLOW", "STEP", "RUN", "CREATED", "EXPIRES"
    ]  # fmt: skip
    assert lines[1].split()[:6] == ["ap-1", "PENDING", "1/2", "payout", "ask", "r1"]
    assert lines[1].endswith("2025-03-01 13:00:00Z (in 1h00m)")


def test_approval_detail_shows_policy_context_and_decisions() -> None:
    text = output.approval_detail(_approval(), now=T0)
    assert "votes:      1/2" in text
    assert "initiator:  operator" in text
    assert (
        "policy:     2 approvals from role approver or principal user:carol; "
        "initiator may not approve; expires after 1h00m (FAILED)"
    ) in text
    assert "context:\n  inputs.amount: 120\n" in text
    table_lines = text.splitlines()[-2:]
    assert table_lines[0].split() == ["TIME", "ACTOR", "DECISION", "CHANNEL", "REASON"]
    assert table_lines[1].split()[2:] == ["approver", "APPROVED", "grpc", "looks", "right"]

    bare = apb.Approval(approval_id="ap-2", state=apb.APPROVAL_STATE_EXPIRED)
    text = output.approval_detail(bare, now=T0)
    assert "policy:    1 approval from admins; initiator may not approve" in text
    assert "expires:   never" in text
    assert text.endswith("context: (none)\n\nno decisions yet")


def test_decided_says_whether_more_approvals_are_needed() -> None:
    approval = _approval()
    assert output.decided(approval) == "approval ap-1 PENDING (1/2 approvals; more are needed)"
    approval.state = apb.APPROVAL_STATE_APPROVED
    assert output.decided(approval) == "approval ap-1 APPROVED (1/2 approvals), run r1"


def test_device_and_approval_states_from_arguments() -> None:
    assert parse_device_state("quarantined") == common_pb2.DEVICE_STATE_QUARANTINED
    assert parse_device_state("DEVICE_STATE_OFFLINE") == common_pb2.DEVICE_STATE_OFFLINE
    with pytest.raises(argparse.ArgumentTypeError, match="one of: available, leased"):
        parse_device_state("busy")
    assert parse_approval_state("pending") == apb.APPROVAL_STATE_PENDING
    with pytest.raises(argparse.ArgumentTypeError, match="unknown approval state 'done'"):
        parse_approval_state("done")
