"""Text the client commands print: aligned tables, times, durations, states,
run timelines and event lines, devices and approval requests, and the proto
JSON mapping for ``--json``.

Everything here is a pure function of its arguments (the current time is
passed in), so it is tested without a server.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from stepline.api.approvals.v1 import approvals_pb2
from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.device_broker.v1 import device_broker_pb2

RUN_TERMINAL = frozenset(
    {
        common_pb2.WORKFLOW_RUN_STATE_SUCCEEDED,
        common_pb2.WORKFLOW_RUN_STATE_FAILED,
        common_pb2.WORKFLOW_RUN_STATE_CANCELLED,
        common_pb2.WORKFLOW_RUN_STATE_TIMED_OUT,
    }
)
_TASK_ENDED_BADLY = frozenset(
    {
        common_pb2.TASK_RUN_STATE_FAILED,
        common_pb2.TASK_RUN_STATE_TIMED_OUT,
        common_pb2.TASK_RUN_STATE_CANCELLED,
    }
)
EMPTY = "-"

# --- proto JSON -----------------------------------------------------------------


def to_json(message: Message) -> str:
    """``message`` in the proto JSON mapping, indented (one document)."""
    return json_format.MessageToJson(message, indent=2)


def to_json_line(message: Message) -> str:
    """``message`` in the proto JSON mapping on one line (for JSON Lines streams)."""
    return json.dumps(json_format.MessageToDict(message), separators=(",", ":"))


# --- scalars --------------------------------------------------------------------


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """The name of an enum value without its prefix (``SUCCEEDED``); the number
    itself for a value this client does not know."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix)


def run_state(value: int) -> str:
    return enum_name(common_pb2.WorkflowRunState, value, "WORKFLOW_RUN_STATE_")


def task_state(value: int) -> str:
    return enum_name(common_pb2.TaskRunState, value, "TASK_RUN_STATE_")


def step_kind(value: int) -> str:
    return enum_name(workflow_pb2.StepKind, value, "STEP_KIND_").lower()


def failure_text(failure: common_pb2.Failure) -> str:
    """``VERB_ERROR: connection refused``; empty for an unset failure."""
    reason = ""
    if failure.reason != common_pb2.FAILURE_REASON_UNSPECIFIED:
        reason = enum_name(common_pb2.FailureReason, failure.reason, "FAILURE_REASON_")
    if reason and failure.message:
        return f"{reason}: {failure.message}"
    return reason or failure.message


def is_set(ts: Timestamp) -> bool:
    return ts.seconds != 0 or ts.nanos != 0


def timestamp(ts: Timestamp) -> str:
    """``2025-03-01 12:00:03Z`` (UTC, to the second); ``-`` when unset."""
    if not is_set(ts):
        return EMPTY
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def clock(ts: Timestamp) -> str:
    """``12:00:03.250`` (UTC), for lines of a live stream."""
    if not is_set(ts):
        return " " * 12
    return ts.ToDatetime(tzinfo=UTC).strftime("%H:%M:%S.%f")[:12]


def duration(seconds: float | None) -> str:
    """Short and readable: ``850ms``, ``12.3s``, ``4m05s``, ``2h03m``, ``3d04h``."""
    if seconds is None:
        return EMPTY
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    if seconds < 60:
        return f"{int(seconds * 10) / 10:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def elapsed(start: Timestamp, end: Timestamp, *, now: datetime) -> str:
    """Duration from ``start`` to ``end``; still running (no end): the time so far
    followed by ``+``; ``-`` if it never started."""
    if not is_set(start):
        return EMPTY
    began = start.ToDatetime(tzinfo=UTC)
    if is_set(end):
        return duration((end.ToDatetime(tzinfo=UTC) - began).total_seconds())
    return duration((now - began).total_seconds()) + "+"


def size(count: int) -> str:
    """``512 B``, ``12.3 KiB``, ``4.0 MiB``."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def until(ts: Timestamp, *, now: datetime) -> str:
    """``2025-03-01 12:00:30Z (in 25.0s)``, or ``(5.0s ago)`` once past."""
    if not is_set(ts):
        return EMPTY
    left = (ts.ToDatetime(tzinfo=UTC) - now).total_seconds()
    when = f"in {duration(left)}" if left >= 0 else f"{duration(-left)} ago"
    return f"{timestamp(ts)} ({when})"


def _plain(value: Any) -> Any:
    """Struct numbers are doubles: show ``120``, not ``120.0``."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def struct_lines(value: Any) -> str:
    """A Struct (or dict) as ``key: value`` lines, values as compact JSON."""
    data = json_format.MessageToDict(value) if isinstance(value, Message) else dict(value)
    return "\n".join(
        f"{key}: {json.dumps(_plain(data[key]), sort_keys=True, ensure_ascii=False)}"
        for key in sorted(data)
    )


def indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line if line else line for line in text.splitlines())


# --- layout ---------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, right: str = "") -> str:
    """Columns aligned on two spaces; the last column is not padded.

    ``right`` names the headers of right-aligned (numeric) columns, comma-separated.
    """
    body = [list(map(str, row)) for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    aligned = {h for h in right.split(",") if h}
    lines = []
    for row in [list(headers), *body]:
        cells = []
        for i, cell in enumerate(row):
            last = i == len(row) - 1
            if headers[i] in aligned:
                cells.append(cell.rjust(widths[i]))
            else:
                cells.append(cell if last else cell.ljust(widths[i]))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    """``label:  value`` lines with the values aligned; empty values are left out."""
    shown = [(label, value) for label, value in pairs if value]
    if not shown:
        return ""
    width = max(len(label) for label, _ in shown) + 1
    return "\n".join(f"{label + ':':<{width}}  {value}" for label, value in shown)


def labels(mapping: Any) -> str:
    return ", ".join(f"{k}={mapping[k]}" for k in sorted(mapping))


# --- runs -----------------------------------------------------------------------


def chunk_summary(counts: run_pb2.ChunkCounts) -> str:
    """``7/10 succeeded, 2 failed, 1 running`` (``, generating`` until the
    generator's last batch is recorded)."""
    parts = [f"{counts.succeeded}/{counts.total} succeeded"]
    for name in ("failed", "timed_out", "cancelled", "running", "pending", "skipped"):
        count = getattr(counts, name)
        if count:
            parts.append(f"{count} {name.replace('_', ' ')}")
    if not counts.complete:
        parts.append("generating")
    return ", ".join(parts)


def task_failure(task: run_pb2.TaskRun) -> str:
    """The task's failure, else that of its last attempt if it ended badly (a
    task kept RUNNING by the PAUSE_RUN policy, or a retry that is due)."""
    text = failure_text(task.failure)
    if text:
        return text
    if task.attempts:
        last = task.attempts[-1]
        if last.state in _TASK_ENDED_BADLY and failure_text(last.failure):
            return f"attempt {last.attempt_number}: {failure_text(last.failure)}"
    return ""


def _task_note(task: run_pb2.TaskRun) -> str:
    notes = []
    if task.child_run_id:
        notes.append(f"child run {task.child_run_id}")
    if task.approval_id:
        notes.append(f"approval {task.approval_id}")
    return ", ".join(notes)


def run_rows(runs: Sequence[run_pb2.WorkflowRun], *, now: datetime) -> str:
    """``runs list``: one line per run."""
    return table(
        ("RUN", "WORKFLOW", "VERSION", "STATE", "CREATED", "DURATION"),
        [
            (
                r.run_id,
                r.workflow_name,
                str(r.workflow_version),
                run_state(r.state),
                timestamp(r.create_time),
                elapsed(r.start_time, r.end_time, now=now),
            )
            for r in runs
        ],
        right="VERSION",
    )


def run_header(run: run_pb2.WorkflowRun, *, now: datetime) -> str:
    control = run.pending_control
    return fields(
        [
            ("run", run.run_id),
            ("workflow", f"{run.workflow_name} v{run.workflow_version}"),
            ("state", run_state(run.state)),
            ("failure", failure_text(run.failure)),
            (
                "pending",
                enum_name(run_pb2.ControlAction, control, "CONTROL_ACTION_").lower()
                if control
                else "",
            ),
            ("initiator", run.initiator.id),
            ("created", timestamp(run.create_time)),
            ("started", timestamp(run.start_time) if is_set(run.start_time) else ""),
            ("ended", timestamp(run.end_time) if is_set(run.end_time) else ""),
            ("duration", elapsed(run.start_time, run.end_time, now=now).strip(EMPTY)),
            ("reruns", str(run.rerun_count) if run.rerun_count else ""),
            ("parent", run.parent_run_id),
            ("schedule", run.schedule_id),
            ("labels", labels(run.labels)),
        ]
    )


def timeline(run: run_pb2.WorkflowRun, *, now: datetime) -> str:
    """``runs show``: the run's header, then each step in plan order with its
    state, attempts, start, duration, chunk counts and failure."""
    chunked = any(t.HasField("chunk_counts") for t in run.tasks)
    headers = ["STEP", "KIND", "STATE", "ATTEMPTS", "STARTED", "DURATION"]
    if chunked:
        headers.append("CHUNKS")
    headers.append("DETAIL")
    rows = []
    for task in run.tasks:
        row = [
            task.step_path or task.step_id,
            step_kind(task.kind),
            task_state(task.state),
            str(len(task.attempts)),
            timestamp(task.start_time),
            elapsed(task.start_time, task.end_time, now=now),
        ]
        if chunked:
            row.append(chunk_summary(task.chunk_counts) if task.HasField("chunk_counts") else "")
        row.append("; ".join(n for n in (task_failure(task), _task_note(task)) if n))
        rows.append(row)
    parts = [run_header(run, now=now)]
    if rows:
        parts.append(table(headers, rows, right="ATTEMPTS,DURATION"))
    if any(task.artifacts for task in run.tasks):
        parts.append(artifact_rows(run))
    return "\n\n".join(parts)


def artifact_summary(artifact: run_pb2.Artifact) -> str:
    """``screenshot-1.png (image/png, 12.3 KiB)``."""
    kind = artifact.content_type or "unknown type"
    return f"{artifact.name} ({kind}, {size(artifact.size_bytes)})"


def artifact_rows(run: run_pb2.WorkflowRun) -> str:
    """The artifacts of the run's steps (``runs artifact ID -o FILE`` fetches one)."""
    return table(
        ("STEP", "ATTEMPT", "NAME", "TYPE", "SIZE", "ARTIFACT"),
        [
            (
                task.step_path or task.step_id,
                str(a.attempt_number),
                a.name,
                a.content_type or EMPTY,
                size(a.size_bytes),
                a.artifact_id,
            )
            for task in run.tasks
            for a in task.artifacts
        ],
        right="ATTEMPT,SIZE",
    )


def wait_outcome(run: run_pb2.WorkflowRun, *, now: datetime) -> str:
    """The line ``runs wait`` ends with: where the run stopped, and for a
    suspended run, the approval request it waits for."""
    if run.state == common_pb2.WORKFLOW_RUN_STATE_SUSPENDED:
        waiting = [t for t in run.tasks if t.state == common_pb2.TASK_RUN_STATE_SUSPENDED]
        text = f"run {run.run_id} SUSPENDED"
        for task in waiting:
            text += f"\n  step {task.step_path or task.step_id} waits for approval "
            text += task.approval_id or "(not yet created)"
            if task.approval_id:
                text += f": stepline approvals show {task.approval_id}"
        return text
    if run.state in RUN_TERMINAL:
        return outcome(run, now=now)
    failure = failure_text(run.failure)
    return f"run {run.run_id} {run_state(run.state)}" + (f": {failure}" if failure else "")


# --- events ---------------------------------------------------------------------

E = run_pb2.RunEventType


def _payload(event: run_pb2.RunEvent) -> dict[str, Any]:
    data: dict[str, Any] = json_format.MessageToDict(event.payload)
    return data


def _payload_failure(value: Any) -> str:
    if not isinstance(value, dict):
        return ""
    reason = str(value.get("reason", "")).removeprefix("FAILURE_REASON_")
    message = str(value.get("message", ""))
    if reason and message:
        return f"{reason}: {message}"
    return reason or message


def event_subject(event: run_pb2.RunEvent) -> str:
    """What the event is about: ``run``, a step path, or ``step#index`` for a chunk."""
    prefix = event.run_id + "/"
    if event.chunk_id:
        return event.chunk_id.removeprefix(prefix)
    if event.task_id:
        return event.task_id.removeprefix(prefix)
    return "run"


def event_type(event: run_pb2.RunEvent) -> str:
    return enum_name(E, event.type, "RUN_EVENT_TYPE_").lower()


def event_detail(event: run_pb2.RunEvent) -> str:
    """One line saying what happened, from the event's payload."""
    p = _payload(event)
    failure = _payload_failure(p.get("failure"))
    reason = str(p.get("reason") or "")
    if event.type == E.RUN_EVENT_TYPE_RUN_CREATED:
        text = f"created: {p.get('workflow_name', '?')} v{_int(p.get('workflow_version'))}"
        return text + (f", {_int(p['tasks'])} steps" if "tasks" in p else "")
    if event.type in (
        E.RUN_EVENT_TYPE_RUN_STATE_CHANGED,
        E.RUN_EVENT_TYPE_TASK_STATE_CHANGED,
        E.RUN_EVENT_TYPE_CHUNK_STATE_CHANGED,
    ):
        text = f"{p.get('from_state', '?')} -> {p.get('to_state', '?')}"
        if p.get("attempt_number"):
            text += f" (attempt {_int(p['attempt_number'])})"
    elif event.type == E.RUN_EVENT_TYPE_ATTEMPT_RECORDED:
        verb = "started" if p.get("state") == "RUNNING" else f"ended {p.get('state', '?')}"
        text = f"attempt {_int(p.get('attempt_number'))} {verb}"
    elif event.type == E.RUN_EVENT_TYPE_CHUNKS_CREATED:
        text = f"{_int(p.get('count'))} chunks recorded"
        if p.get("last_batch"):
            text += " (last batch)"
    elif event.type == E.RUN_EVENT_TYPE_CONTROL_REQUESTED:
        text = f"{p.get('action', '?')} requested".lower()
        if event.actor.id:
            text += f" by {event.actor.id}"
    elif event.type == E.RUN_EVENT_TYPE_CLAIMED:
        text = f"claimed by {event.actor.id or '?'} (epoch {_int(p.get('epoch'))})"
    elif event.type == E.RUN_EVENT_TYPE_CLAIM_RELEASED:
        text = f"claim released (epoch {_int(p.get('epoch'))})"
    elif event.type == E.RUN_EVENT_TYPE_DISPATCHED:
        text = f"dispatched (epoch {_int(p.get('dispatch_epoch'))})"
    else:
        text = json.dumps(p, separators=(",", ":"), sort_keys=True) if p else ""
    if reason == "initial" or reason in failure:
        reason = ""  # the first attempt's usual reason, or already in the failure
    extras = [x for x in (failure, reason) if x]
    return text + (": " + "; ".join(extras) if extras else "")


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def is_transition(event: run_pb2.RunEvent) -> bool:
    """Whether ``run --wait`` shows the event live: state changes of the run and
    its steps, chunks recorded, chunks and attempts that ended badly, retries
    and operator control."""
    p = _payload(event)
    if event.type in (
        E.RUN_EVENT_TYPE_RUN_STATE_CHANGED,
        E.RUN_EVENT_TYPE_TASK_STATE_CHANGED,
        E.RUN_EVENT_TYPE_CHUNKS_CREATED,
        E.RUN_EVENT_TYPE_CONTROL_REQUESTED,
    ):
        return True
    if event.type == E.RUN_EVENT_TYPE_CHUNK_STATE_CHANGED:
        return p.get("to_state") in ("FAILED", "TIMED_OUT", "CANCELLED")
    if event.type == E.RUN_EVENT_TYPE_ATTEMPT_RECORDED:
        state = p.get("state")
        if state == "RUNNING":
            return p.get("reason") not in (None, "", "initial")
        return state in ("FAILED", "TIMED_OUT", "CANCELLED")
    return False


def event_line(event: run_pb2.RunEvent) -> str:
    """``12:00:03.250  fetch  PENDING -> RUNNING (attempt 1)``, for live output."""
    return f"{clock(event.time)}  {event_subject(event)}  {event_detail(event)}"


def history(events: Sequence[run_pb2.RunEvent]) -> str:
    """``runs history``: every event in sequence order."""
    return table(
        ("SEQ", "TIME", "EVENT", "SUBJECT", "ACTOR", "DETAIL"),
        [
            (
                str(e.sequence),
                timestamp(e.time),
                event_type(e),
                event_subject(e),
                e.actor.id or EMPTY,
                event_detail(e),
            )
            for e in events
        ],
        right="SEQ",
    )


def outcome(run: run_pb2.WorkflowRun, *, now: datetime) -> str:
    """The last line of ``run --wait``."""
    text = f"run {run.run_id} {run_state(run.state)}"
    took = elapsed(run.start_time, run.end_time, now=now)
    if took != EMPTY:
        text += f" in {took}"
    failure = failure_text(run.failure)
    return text + (f": {failure}" if failure else "")


# --- workflows ------------------------------------------------------------------


def workflow_rows(summaries: Sequence[Any]) -> str:
    """``workflows list``: one line per workflow (WorkflowSummary)."""
    return table(
        ("NAME", "LATEST", "UPDATED", "DESCRIPTION"),
        [
            (s.name, str(s.latest_version), timestamp(s.update_time), s.description)
            for s in summaries
        ],
        right="LATEST",
    )


def version_rows(versions: Sequence[Any]) -> str:
    """``workflows show --versions``: one line per WorkflowVersion."""
    return table(
        ("VERSION", "REGISTERED", "BY", "DIGEST"),
        [
            (
                str(v.definition.version),
                timestamp(v.create_time),
                v.created_by.id or EMPTY,
                v.digest[:12],
            )
            for v in versions
        ],
        right="VERSION",
    )


def _step_detail(step: workflow_pb2.Step) -> str:
    kind = step.WhichOneof("kind")
    if kind == "atomic":
        return step.atomic.verb
    if kind == "chunked":
        c = step.chunked
        return f"{c.generator_verb} -> {c.chunk_verb}"
    if kind == "workflow_ref":
        ref = step.workflow_ref
        return f"{ref.workflow_name} v{ref.version}" if ref.version else ref.workflow_name
    if kind == "govern":
        policy = step.govern.policy
        who = [*policy.approver_roles, *policy.approver_principals]
        needed = policy.required_approvals or 1
        return f"{needed} approval(s) from {', '.join(who) or 'anyone allowed'}"
    if kind == "parallel":
        return f"branches: {', '.join(b.id for b in step.parallel.branches)}"
    return ""


def _step_rows(steps: Iterable[workflow_pb2.Step], prefix: str = "") -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for step in steps:
        path = prefix + step.id
        kind = step.WhichOneof("kind") or EMPTY
        rows.append((path, kind.replace("_", " "), _step_detail(step)))
        if kind == "parallel":
            for branch in step.parallel.branches:
                rows.extend(_step_rows(branch.steps, f"{path}/{branch.id}/"))
    return rows


def _input_default(field: workflow_pb2.InputField) -> str:
    if not field.HasField("default"):
        return EMPTY
    return json.dumps(json_format.MessageToDict(field.default))


def workflow_detail(version: Any) -> str:
    """``workflows show``: a WorkflowVersion's metadata, inputs and steps."""
    d: workflow_pb2.WorkflowDefinition = version.definition
    policy = enum_name(workflow_pb2.FailurePolicy, d.failure_policy, "FAILURE_POLICY_")
    header = fields(
        [
            ("workflow", d.name),
            ("version", str(d.version)),
            ("description", d.description),
            ("registered", f"{timestamp(version.create_time)} by {version.created_by.id or '?'}"),
            ("digest", version.digest),
            ("labels", labels(d.labels)),
            ("allowed verbs", ", ".join(d.allowed_verbs)),
            ("on failure", policy.lower() if d.failure_policy else ""),
            (
                "run timeout",
                duration(d.run_timeout.ToTimedelta().total_seconds())
                if d.HasField("run_timeout")
                else "",
            ),
        ]
    )
    parts = [header]
    if d.input_schema.fields:
        inputs = table(
            ("INPUT", "TYPE", "REQUIRED", "DEFAULT", "DESCRIPTION"),
            [
                (
                    f.name,
                    enum_name(workflow_pb2.InputType, f.type, "INPUT_TYPE_").lower(),
                    "yes" if f.required else "no",
                    _input_default(f),
                    f.description,
                )
                for f in d.input_schema.fields
            ],
        )
        parts.append(inputs)
    parts.append(table(("STEP", "KIND", "DETAIL"), _step_rows(d.steps)))
    return "\n\n".join(parts)


# --- devices --------------------------------------------------------------------


def device_state(value: int) -> str:
    return enum_name(common_pb2.DeviceState, value, "DEVICE_STATE_")


def health_summary(health: device_broker_pb2.HealthReport) -> str:
    """``ok``, ``failed: storage_free, boot_completed``, or ``-`` if never checked."""
    if not is_set(health.check_time) and not health.checks:
        return EMPTY
    if health.healthy:
        return "ok"
    failed = [c.name for c in health.checks if not c.passed]
    return "failed: " + ", ".join(failed) if failed else "failed"


def lease_summary(lease: device_broker_pb2.Lease) -> str:
    """``<task id> (token 7)``: what the device is leased for."""
    if not lease.lease_id:
        return EMPTY
    holder = lease.holder
    subject = holder.chunk_id or holder.task_id or holder.run_id or holder.executor_id
    return f"{subject or lease.lease_id} (token {lease.token})"


def device_rows(devices: Sequence[device_broker_pb2.Device]) -> str:
    """``devices list``: one line per device."""
    return table(
        ("SERIAL", "STATE", "MODEL", "POOL", "HEALTH", "ACCOUNT", "LEASE"),
        [
            (
                d.serial,
                device_state(d.state),
                d.model or EMPTY,
                d.pool or EMPTY,
                health_summary(d.health),
                d.bound_account or EMPTY,
                lease_summary(d.lease),
            )
            for d in devices
        ],
    )


def _lease_fields(lease: device_broker_pb2.Lease, *, now: datetime) -> str:
    holder = lease.holder
    return fields(
        [
            ("lease", lease.lease_id),
            ("token", str(lease.token)),
            ("executor", holder.executor_id),
            ("run", holder.run_id),
            ("task", holder.task_id),
            ("chunk", holder.chunk_id),
            ("account", lease.account),
            ("granted", timestamp(lease.grant_time) if is_set(lease.grant_time) else ""),
            ("expires", until(lease.expire_time, now=now) if is_set(lease.expire_time) else ""),
        ]
    )


def _health_section(health: device_broker_pb2.HealthReport) -> str:
    if not is_set(health.check_time) and not health.checks:
        return "health:  not checked yet"
    verdict = "healthy" if health.healthy else "UNHEALTHY"
    text = f"health:  {verdict}, checked {timestamp(health.check_time)}"
    if health.checks:
        rows = [(c.name, "pass" if c.passed else "FAIL", c.message) for c in health.checks]
        text += "\n" + indent(table(("CHECK", "RESULT", "OBSERVED"), rows))
    return text


def _quarantine_section(info: device_broker_pb2.QuarantineInfo) -> str:
    text = "quarantine:\n" + indent(
        fields(
            [
                ("reason", info.reason),
                ("by", info.actor.id),
                ("since", timestamp(info.quarantine_time) if is_set(info.quarantine_time) else ""),
            ]
        )
    )
    evidence = struct_lines(info.evidence)
    if evidence:
        text += "\n  evidence:\n" + indent(evidence, "    ")
    return text


def device_detail(device: device_broker_pb2.Device, *, now: datetime) -> str:
    """``devices show``: the device, its lease, its last health check and, when
    quarantined, why (with the evidence)."""
    model = " / ".join(x for x in (device.model, device.product) if x)
    parts = [
        fields(
            [
                ("device", device.serial),
                ("state", device_state(device.state)),
                ("model", model),
                ("pool", device.pool),
                ("labels", labels(device.labels)),
                ("account", device.bound_account),
                ("adb server", device.adb_server),
                ("cleanup", device.cleanup_profile),
                (
                    "last seen",
                    timestamp(device.last_seen_time) if is_set(device.last_seen_time) else "",
                ),
            ]
        )
    ]
    if device.lease.lease_id:
        parts.append("lease:\n" + indent(_lease_fields(device.lease, now=now)))
    parts.append(_health_section(device.health))
    if device.HasField("quarantine") and (device.quarantine.reason or device.quarantine.actor.id):
        parts.append(_quarantine_section(device.quarantine))
    return "\n\n".join(parts)


# --- approvals ------------------------------------------------------------------


def approval_state(value: int) -> str:
    return enum_name(approvals_pb2.ApprovalState, value, "APPROVAL_STATE_")


def votes(approval: approvals_pb2.Approval) -> str:
    """``1/2``: approvals recorded of those the policy needs."""
    approved = sum(
        1 for d in approval.decisions if d.outcome == approvals_pb2.DECISION_OUTCOME_APPROVED
    )
    return f"{approved}/{approval.policy.required_approvals or 1}"


def approval_rows(approvals: Sequence[approvals_pb2.Approval], *, now: datetime) -> str:
    """``approvals list``: one line per request."""
    return table(
        ("APPROVAL", "STATE", "VOTES", "WORKFLOW", "STEP", "RUN", "CREATED", "EXPIRES"),
        [
            (
                a.approval_id,
                approval_state(a.state),
                votes(a),
                a.workflow_name,
                a.step_id,
                a.run_id,
                timestamp(a.create_time),
                _expiry(a, now=now),
            )
            for a in approvals
        ],
        right="VOTES",
    )


def _expiry(approval: approvals_pb2.Approval, *, now: datetime) -> str:
    if not is_set(approval.expire_time):
        return "never"
    if approval.state != approvals_pb2.APPROVAL_STATE_PENDING:
        return timestamp(approval.expire_time)
    return until(approval.expire_time, now=now)


def policy_text(policy: workflow_pb2.ApprovalPolicy) -> str:
    """``1 approval from role approver; initiator may not approve; expires after
    1h00m: TIMED_OUT``."""
    who = [f"role {r}" for r in policy.approver_roles]
    who += [f"principal {p}" for p in policy.approver_principals]
    needed = policy.required_approvals or 1
    text = f"{needed} approval{'s' if needed > 1 else ''} from {' or '.join(who) or 'admins'}"
    text += "; initiator " + ("may" if policy.allow_initiator else "may not") + " approve"
    if policy.HasField("expiry"):
        outcome_name = enum_name(
            workflow_pb2.ApprovalExpiryOutcome, policy.expiry_outcome, "APPROVAL_EXPIRY_OUTCOME_"
        )
        if outcome_name == "UNSPECIFIED":
            outcome_name = "TIMED_OUT"
        text += f"; expires after {duration(policy.expiry.ToTimedelta().total_seconds())}"
        text += f" ({outcome_name})"
    return text


def decision_rows(decisions: Sequence[approvals_pb2.Decision]) -> str:
    return table(
        ("TIME", "ACTOR", "DECISION", "CHANNEL", "REASON"),
        [
            (
                timestamp(d.decide_time),
                d.actor.id or EMPTY,
                enum_name(approvals_pb2.DecisionOutcome, d.outcome, "DECISION_OUTCOME_"),
                enum_name(approvals_pb2.DecisionChannel, d.channel, "DECISION_CHANNEL_").lower(),
                d.reason,
            )
            for d in decisions
        ],
    )


def approval_detail(approval: approvals_pb2.Approval, *, now: datetime) -> str:
    """``approvals show``: the request, its policy, the context shown to
    approvers, and every decision so far."""
    a = approval
    header = fields(
        [
            ("approval", a.approval_id),
            ("state", approval_state(a.state)),
            ("votes", votes(a)),
            ("workflow", a.workflow_name),
            ("run", a.run_id),
            ("step", a.step_id),
            ("initiator", a.initiator.id),
            ("labels", labels(a.labels)),
            ("created", timestamp(a.create_time)),
            ("expires", _expiry(a, now=now)),
            ("decided", timestamp(a.decide_time) if is_set(a.decide_time) else ""),
            ("policy", policy_text(a.policy)),
        ]
    )
    parts = [header]
    context = struct_lines(a.context)
    parts.append("context:\n" + indent(context) if context else "context: (none)")
    parts.append(decision_rows(a.decisions) if a.decisions else "no decisions yet")
    return "\n\n".join(parts)


def decided(approval: approvals_pb2.Approval) -> str:
    """The line ``approvals approve|reject`` print."""
    text = f"approval {approval.approval_id} {approval_state(approval.state)}"
    if approval.state == approvals_pb2.APPROVAL_STATE_PENDING:
        return text + f" ({votes(approval)} approvals; more are needed)"
    return text + f" ({votes(approval)} approvals), run {approval.run_id}"
