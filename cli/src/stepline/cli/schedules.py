"""``stepline schedules ...``: cron schedules that start runs of a workflow
(create, list, show) and their control (pause, resume, delete), through the
scheduler's ``SchedulerService`` schedule RPCs.

Creating, pausing, resuming and deleting a schedule needs permission to start
runs of its workflow (the ``operator`` role by default); reading it, to read
the workflow. Runs a schedule starts are started as its creator.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from stepline.api.scheduler.v1 import scheduler_service_pb2 as pb
from stepline.cli import output
from stepline.cli.connect import Clients
from stepline.cli.inputs import parse_inputs, parse_labels

PAGE_SIZE = 100
#: what ``--overlap`` accepts: what a firing does while the previous run still goes
OVERLAP = {"skip": pb.OVERLAP_POLICY_SKIP, "allow": pb.OVERLAP_POLICY_ALLOW}


def _now() -> datetime:
    return datetime.now(UTC)


def _request_id() -> str:
    return str(uuid.uuid4())


# --- text -------------------------------------------------------------------------


def schedule_state(value: int) -> str:
    return output.enum_name(pb.ScheduleState, value, "SCHEDULE_STATE_")


def overlap_policy(value: int) -> str:
    """``skip`` (also for an unset policy, which the scheduler treats as SKIP) or ``allow``."""
    if value == pb.OVERLAP_POLICY_UNSPECIFIED:
        value = pb.OVERLAP_POLICY_SKIP
    return output.enum_name(pb.OverlapPolicy, value, "OVERLAP_POLICY_").lower()


def version_text(schedule: pb.Schedule) -> str:
    """``latest`` (0: the latest version at each firing) or the pinned version."""
    return str(schedule.workflow_version) if schedule.workflow_version else "latest"


def timezone_text(schedule: pb.Schedule) -> str:
    return schedule.timezone or "UTC"


def schedule_rows(schedules: Sequence[pb.Schedule]) -> str:
    """``schedules list``: one line per schedule, in creation order."""
    return output.table(
        ("SCHEDULE", "WORKFLOW", "VERSION", "CRON", "TIMEZONE", "STATE", "NEXT", "LAST RUN"),
        [
            (
                s.schedule_id,
                s.workflow_name,
                version_text(s),
                s.cron_expression,
                timezone_text(s),
                schedule_state(s.state),
                output.timestamp(s.next_fire_time),
                s.last_run_id or output.EMPTY,
            )
            for s in schedules
        ],
    )


def _last_fire(schedule: pb.Schedule) -> str:
    if not output.is_set(schedule.last_fire_time):
        return ""
    when = output.timestamp(schedule.last_fire_time)
    if schedule.last_run_id:
        return f"{when}, run {schedule.last_run_id}"
    return f"{when}, skipped (the previous run was still going)"


def _next_fire(schedule: pb.Schedule, *, now: datetime) -> str:
    if output.is_set(schedule.next_fire_time):
        return output.until(schedule.next_fire_time, now=now)
    return "none while paused" if schedule.state == pb.SCHEDULE_STATE_PAUSED else ""


def schedule_detail(schedule: pb.Schedule, *, now: datetime) -> str:
    """``schedules show``: the schedule, its timing, and the inputs of its runs."""
    s = schedule
    version = f"v{s.workflow_version}" if s.workflow_version else "latest at each firing"
    created = output.timestamp(s.create_time)
    if s.created_by.id:
        created += f" by {s.created_by.id}"
    header = output.fields(
        [
            ("schedule", s.schedule_id),
            ("workflow", f"{s.workflow_name} ({version})"),
            ("cron", s.cron_expression),
            ("timezone", timezone_text(s)),
            ("state", schedule_state(s.state)),
            ("description", s.description),
            ("overlap", overlap_policy(s.overlap_policy)),
            ("labels", output.labels(s.labels)),
            ("created", created),
            ("updated", output.timestamp(s.update_time) if output.is_set(s.update_time) else ""),
            ("next fire", _next_fire(s, now=now)),
            ("last fire", _last_fire(s) or "never"),
        ]
    )
    inputs = output.struct_lines(s.inputs)
    return header + "\n\n" + ("inputs:\n" + output.indent(inputs) if inputs else "inputs: (none)")


def summary(schedule: pb.Schedule, *, now: datetime) -> str:
    """The line ``create``, ``pause`` and ``resume`` print:
    ``schedule ID ACTIVE: hello (latest) at "0 9 * * 1-5" Europe/Paris, next ...``."""
    s = schedule
    text = (
        f"schedule {s.schedule_id} {schedule_state(s.state)}: {s.workflow_name} "
        f'({version_text(s)}) at "{s.cron_expression}" {timezone_text(s)}'
    )
    if output.is_set(s.next_fire_time):
        text += f", next {output.until(s.next_fire_time, now=now)}"
    return text


# --- commands ---------------------------------------------------------------------


async def create(args: argparse.Namespace, clients: Clients) -> int:
    """Create a schedule that starts a run of WORKFLOW at each time ``--cron`` matches."""
    schedule = pb.Schedule(
        workflow_name=args.workflow,
        workflow_version=args.version,
        cron_expression=args.cron,
        timezone=args.timezone or "",
        inputs=parse_inputs(args.input, args.input_json),
        labels=parse_labels(args.label),
        overlap_policy=OVERLAP[args.overlap],
        description=args.description or "",
    )
    response = await clients.scheduler.runs.CreateSchedule(
        pb.CreateScheduleRequest(
            request_id=args.idempotency_key or _request_id(),
            schedule=schedule,
            paused=args.paused,
        )
    )
    if args.quiet:
        print(response.schedule.schedule_id)
    elif args.json:
        print(output.to_json(response))
    else:
        print(summary(response.schedule, now=_now()))
    return 0


async def list_schedules(args: argparse.Namespace, clients: Clients) -> int:
    """Every schedule the caller may read (of ``--workflow``), oldest first (all pages)."""
    scheduler = clients.scheduler
    request = pb.ListSchedulesRequest(workflow_name=args.workflow or "", page_size=PAGE_SIZE)
    collected = pb.ListSchedulesResponse()
    while True:
        page = await scheduler.runs.ListSchedules(request)
        collected.schedules.extend(page.schedules)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    if args.json:
        print(output.to_json(collected))
    elif not collected.schedules:
        print("no schedules")
    else:
        print(schedule_rows(collected.schedules))
    return 0


async def show(args: argparse.Namespace, clients: Clients) -> int:
    """One schedule: what it runs, when, with which inputs, and its last firing."""
    response = await clients.scheduler.runs.GetSchedule(
        pb.GetScheduleRequest(schedule_id=args.schedule_id)
    )
    if args.json:
        print(output.to_json(response))
    else:
        print(schedule_detail(response.schedule, now=_now()))
    return 0


async def pause(args: argparse.Namespace, clients: Clients) -> int:
    """Stop a schedule from firing until it is resumed (a no-op if already paused)."""
    response = await clients.scheduler.runs.PauseSchedule(
        pb.PauseScheduleRequest(
            request_id=_request_id(), schedule_id=args.schedule_id, reason=args.reason
        )
    )
    print(output.to_json(response) if args.json else summary(response.schedule, now=_now()))
    return 0


async def resume(args: argparse.Namespace, clients: Clients) -> int:
    """Let a paused schedule fire again, from its next due time after now."""
    response = await clients.scheduler.runs.ResumeSchedule(
        pb.ResumeScheduleRequest(
            request_id=_request_id(), schedule_id=args.schedule_id, reason=args.reason
        )
    )
    print(output.to_json(response) if args.json else summary(response.schedule, now=_now()))
    return 0


async def delete(args: argparse.Namespace, clients: Clients) -> int:
    """Delete a schedule; the runs it started are kept.

    ``DeleteSchedule`` answers OK for an id that does not exist (so that a
    retried call succeeds); the command reads the schedule first, so that a
    mistyped or already deleted id is reported as NOT_FOUND."""
    scheduler = clients.scheduler
    current = await scheduler.runs.GetSchedule(pb.GetScheduleRequest(schedule_id=args.schedule_id))
    response = await scheduler.runs.DeleteSchedule(
        pb.DeleteScheduleRequest(request_id=_request_id(), schedule_id=args.schedule_id)
    )
    if args.json:
        print(output.to_json(response))
    else:
        s = current.schedule
        print(f"schedule {s.schedule_id} deleted ({s.workflow_name}; the runs it started are kept)")
    return 0
