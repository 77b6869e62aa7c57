"""``stepline run`` and ``stepline runs ...``: start, read and steer runs."""

from __future__ import annotations

import argparse
import uuid
from datetime import UTC, datetime

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.scheduler.v1 import scheduler_service_pb2 as pb
from stepline.cli import output, watch
from stepline.cli.connect import Scheduler
from stepline.cli.inputs import parse_inputs, parse_labels

PAGE_SIZE = 100
HISTORY_IDLE_S = 0.5
EXIT_RUN_NOT_SUCCEEDED = 1


def parse_state(text: str) -> common_pb2.WorkflowRunState.ValueType:
    """``failed``, ``FAILED`` or ``WORKFLOW_RUN_STATE_FAILED`` (an argparse type)."""
    name = text.strip().upper().removeprefix("WORKFLOW_RUN_STATE_")
    try:
        value = common_pb2.WorkflowRunState.Value("WORKFLOW_RUN_STATE_" + name)
    except ValueError:
        value = common_pb2.WORKFLOW_RUN_STATE_UNSPECIFIED
    if value == common_pb2.WORKFLOW_RUN_STATE_UNSPECIFIED:
        known = ", ".join(
            n.removeprefix("WORKFLOW_RUN_STATE_").lower()
            for n in common_pb2.WorkflowRunState.keys()[1:]
        )
        raise argparse.ArgumentTypeError(f"unknown run state {text!r} (one of: {known})")
    return value


def _now() -> datetime:
    return datetime.now(UTC)


async def start(args: argparse.Namespace, scheduler: Scheduler) -> int:
    """Start a run; with ``--wait`` follow it to its end (exit 0 only if it succeeded)."""
    request = pb.StartRunRequest(
        request_id=args.idempotency_key or str(uuid.uuid4()),
        workflow_name=args.workflow,
        workflow_version=args.version,
        inputs=parse_inputs(args.input, args.input_json),
        labels=parse_labels(args.label),
    )
    response = await scheduler.runs.StartRun(request)
    run = response.run
    if args.json and not args.wait:
        print(output.to_json(response))
        return 0
    if not args.json:
        verb = "started" if response.created else "already started with this idempotency key"
        print(
            f"run {run.run_id} {verb}: {run.workflow_name} v{run.workflow_version} "
            f"({output.run_state(run.state)})",
            flush=True,
        )
    if not args.wait:
        return 0
    return await _wait(args, scheduler, run.run_id)


async def _wait(args: argparse.Namespace, scheduler: Scheduler, run_id: str) -> int:
    failed_steps: dict[str, str] = {}

    def on_event(event: run_pb2.RunEvent) -> None:
        if args.json:
            print(output.to_json_line(pb.WatchRunResponse(event=event)), flush=True)
            return
        if not output.is_transition(event):
            return
        print(output.event_line(event), flush=True)
        is_step = event.type == run_pb2.RUN_EVENT_TYPE_TASK_STATE_CHANGED
        to_state = event.payload.fields["to_state"].string_value
        if is_step and to_state in ("FAILED", "TIMED_OUT"):
            failed_steps[output.event_subject(event)] = output.event_detail(event)

    await watch.follow(scheduler, run_id, on_event=on_event)
    final = await scheduler.runs.GetRun(
        pb.GetRunRequest(run_id=run_id, view=run_pb2.RUN_VIEW_BASIC)
    )
    run = final.run
    if args.json:
        print(output.to_json_line(final))
    else:
        print(output.outcome(run, now=_now()))
        for step, detail in failed_steps.items():
            print(f"  failed step {step}: {detail}")
    return 0 if run.state == common_pb2.WORKFLOW_RUN_STATE_SUCCEEDED else EXIT_RUN_NOT_SUCCEEDED


async def list_runs(args: argparse.Namespace, scheduler: Scheduler) -> int:
    """Runs, newest first, up to ``--limit``."""
    run_filter = run_pb2.RunFilter(workflow_name=args.workflow or "", states=args.state)
    request = pb.ListRunsRequest(filter=run_filter, page_size=min(args.limit, PAGE_SIZE))
    collected = pb.ListRunsResponse()
    while len(collected.runs) < args.limit:
        page = await scheduler.runs.ListRuns(request)
        collected.runs.extend(page.runs[: args.limit - len(collected.runs)])
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    if args.json:
        print(output.to_json(collected))
    elif not collected.runs:
        print("no runs")
    else:
        print(output.run_rows(collected.runs, now=_now()))
    return 0


async def show(args: argparse.Namespace, scheduler: Scheduler) -> int:
    """A run's timeline: each step with its state, attempts, start and duration."""
    response = await scheduler.runs.GetRun(
        pb.GetRunRequest(run_id=args.run_id, view=run_pb2.RUN_VIEW_TASKS)
    )
    print(output.to_json(response) if args.json else output.timeline(response.run, now=_now()))
    return 0


async def history(args: argparse.Namespace, scheduler: Scheduler) -> int:
    """A run's event log. For a run still going, the events so far (or, with
    ``--follow``, every event until it ends)."""
    current = await scheduler.runs.GetRun(pb.GetRunRequest(run_id=args.run_id))
    terminal = current.run.state in output.RUN_TERMINAL
    idle_s = None if terminal or args.follow else HISTORY_IDLE_S
    events: list[run_pb2.RunEvent] = []

    def on_event(event: run_pb2.RunEvent) -> None:
        if args.json:
            print(output.to_json_line(pb.WatchRunResponse(event=event)), flush=True)
        elif args.follow:
            print(output.event_line(event), flush=True)
        else:
            events.append(event)

    await watch.follow(scheduler, args.run_id, on_event=on_event, idle_s=idle_s)
    if events:
        print(output.history(events))
    return 0


def _print_controlled(args: argparse.Namespace, run: run_pb2.WorkflowRun, action: str) -> None:
    if args.json:
        return
    text = f"run {run.run_id} {output.run_state(run.state)}"
    if run.pending_control:
        text += f" ({action} requested; applied at the next step boundary)"
    print(text)


async def cancel(args: argparse.Namespace, scheduler: Scheduler) -> int:
    response = await scheduler.runs.CancelRun(
        pb.CancelRunRequest(request_id=str(uuid.uuid4()), run_id=args.run_id, reason=args.reason)
    )
    if args.json:
        print(output.to_json(response))
    _print_controlled(args, response.run, "cancel")
    return 0


async def pause(args: argparse.Namespace, scheduler: Scheduler) -> int:
    response = await scheduler.runs.PauseRun(
        pb.PauseRunRequest(request_id=str(uuid.uuid4()), run_id=args.run_id, reason=args.reason)
    )
    if args.json:
        print(output.to_json(response))
    _print_controlled(args, response.run, "pause")
    return 0


async def resume(args: argparse.Namespace, scheduler: Scheduler) -> int:
    response = await scheduler.runs.ResumeRun(
        pb.ResumeRunRequest(request_id=str(uuid.uuid4()), run_id=args.run_id, reason=args.reason)
    )
    if args.json:
        print(output.to_json(response))
    _print_controlled(args, response.run, "resume")
    return 0


async def rerun(args: argparse.Namespace, scheduler: Scheduler) -> int:
    """Reopen a failed, timed-out or cancelled run in place from a step."""
    response = await scheduler.runs.RerunFrom(
        pb.RerunFromRequest(
            request_id=str(uuid.uuid4()),
            run_id=args.run_id,
            step_id=args.from_step,
            failed_chunks_only=args.failed_chunks_only,
            reason=args.reason,
        )
    )
    run = response.run
    if args.json:
        print(output.to_json(response))
    else:
        scope = "the failed chunks of step" if args.failed_chunks_only else "step"
        print(
            f"run {run.run_id} reopened from {scope} {args.from_step} "
            f"(rerun {run.rerun_count}): {output.run_state(run.state)}"
        )
    return 0
