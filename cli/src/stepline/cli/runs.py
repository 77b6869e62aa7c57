"""``stepline run`` and ``stepline runs ...``: start, read, wait for and steer
runs, and fetch their artifacts."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.ledger.v1 import ledger_pb2
from stepline.api.scheduler.v1 import scheduler_service_pb2 as pb
from stepline.cli import output, watch
from stepline.cli.connect import Clients, Scheduler
from stepline.cli.inputs import parse_inputs, parse_labels
from stepline.common.errors import InvalidArgument, SteplineError

PAGE_SIZE = 100
HISTORY_IDLE_S = 0.5
EXIT_RUN_NOT_SUCCEEDED = 1
#: what ``runs wait --until`` accepts, and the run states each one means
UNTIL = {
    "suspended": frozenset({common_pb2.WORKFLOW_RUN_STATE_SUSPENDED}),
    "paused": frozenset({common_pb2.WORKFLOW_RUN_STATE_PAUSED}),
    "terminal": output.RUN_TERMINAL,
}


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


async def start(args: argparse.Namespace, clients: Clients) -> int:
    """Start a run; with ``--wait`` follow it to its end (exit 0 only if it
    succeeded); with ``--quiet`` print only its id."""
    request = pb.StartRunRequest(
        request_id=args.idempotency_key or str(uuid.uuid4()),
        workflow_name=args.workflow,
        workflow_version=args.version,
        inputs=parse_inputs(args.input, args.input_json),
        labels=parse_labels(args.label),
    )
    scheduler = clients.scheduler
    response = await scheduler.runs.StartRun(request)
    run = response.run
    if args.quiet:
        print(run.run_id, flush=True)
    elif args.json and not args.wait:
        print(output.to_json(response))
        return 0
    elif not args.json:
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
        if args.quiet:
            return
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
        is_run = event.type == run_pb2.RUN_EVENT_TYPE_RUN_STATE_CHANGED
        if is_run and to_state == "SUSPENDED":
            print(f"  waiting for approval: stepline approvals list --run {run_id}", flush=True)

    await watch.follow(scheduler, run_id, on_event=on_event)
    final = await scheduler.runs.GetRun(
        pb.GetRunRequest(run_id=run_id, view=run_pb2.RUN_VIEW_BASIC)
    )
    run = final.run
    if args.json and not args.quiet:
        print(output.to_json_line(final))
    elif not args.quiet:
        print(output.outcome(run, now=_now()))
        for step, detail in failed_steps.items():
            print(f"  failed step {step}: {detail}")
    return 0 if run.state == common_pb2.WORKFLOW_RUN_STATE_SUCCEEDED else EXIT_RUN_NOT_SUCCEEDED


async def list_runs(args: argparse.Namespace, clients: Clients) -> int:
    """Runs, newest first, up to ``--limit``."""
    scheduler = clients.scheduler
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


async def show(args: argparse.Namespace, clients: Clients) -> int:
    """A run's timeline: each step with its state, attempts, start and duration."""
    scheduler = clients.scheduler
    response = await scheduler.runs.GetRun(
        pb.GetRunRequest(run_id=args.run_id, view=run_pb2.RUN_VIEW_TASKS)
    )
    print(output.to_json(response) if args.json else output.timeline(response.run, now=_now()))
    return 0


async def history(args: argparse.Namespace, clients: Clients) -> int:
    """A run's event log. For a run still going, the events so far (or, with
    ``--follow``, every event until it ends)."""
    scheduler = clients.scheduler
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


async def cancel(args: argparse.Namespace, clients: Clients) -> int:
    scheduler = clients.scheduler
    response = await scheduler.runs.CancelRun(
        pb.CancelRunRequest(request_id=str(uuid.uuid4()), run_id=args.run_id, reason=args.reason)
    )
    if args.json:
        print(output.to_json(response))
    _print_controlled(args, response.run, "cancel")
    return 0


async def pause(args: argparse.Namespace, clients: Clients) -> int:
    scheduler = clients.scheduler
    response = await scheduler.runs.PauseRun(
        pb.PauseRunRequest(request_id=str(uuid.uuid4()), run_id=args.run_id, reason=args.reason)
    )
    if args.json:
        print(output.to_json(response))
    _print_controlled(args, response.run, "pause")
    return 0


async def resume(args: argparse.Namespace, clients: Clients) -> int:
    scheduler = clients.scheduler
    response = await scheduler.runs.ResumeRun(
        pb.ResumeRunRequest(request_id=str(uuid.uuid4()), run_id=args.run_id, reason=args.reason)
    )
    if args.json:
        print(output.to_json(response))
    _print_controlled(args, response.run, "resume")
    return 0


async def rerun(args: argparse.Namespace, clients: Clients) -> int:
    """Reopen a failed, timed-out or cancelled run in place from a step."""
    scheduler = clients.scheduler
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


async def wait(args: argparse.Namespace, clients: Clients) -> int:
    """Wait until the run is SUSPENDED, PAUSED or has ended (``--until``), at most
    ``--max-wait`` seconds. Exit 0 when it got there (for ``terminal``: ended
    SUCCEEDED), 1 when it ended otherwise or the time ran out."""
    scheduler = clients.scheduler
    wanted = UNTIL[args.until]
    try:
        async with asyncio.timeout(args.max_wait):
            run = await _reach(scheduler, args.run_id, wanted)
    except TimeoutError:
        current = await _get(scheduler, args.run_id)
        state = output.run_state(current.state)
        print(
            f"error: run {args.run_id} is still {state} after {args.max_wait:g}s "
            f"(waited for {args.until})",
            file=sys.stderr,
        )
        return EXIT_RUN_NOT_SUCCEEDED
    if args.json:
        print(output.to_json(pb.GetRunResponse(run=run)))
    else:
        print(output.wait_outcome(run, now=_now()))
    if run.state not in wanted:
        return EXIT_RUN_NOT_SUCCEEDED
    if args.until == "terminal" and run.state != common_pb2.WORKFLOW_RUN_STATE_SUCCEEDED:
        return EXIT_RUN_NOT_SUCCEEDED
    return 0


async def _get(scheduler: Scheduler, run_id: str) -> run_pb2.WorkflowRun:
    response = await scheduler.runs.GetRun(
        pb.GetRunRequest(run_id=run_id, view=run_pb2.RUN_VIEW_TASKS)
    )
    return response.run


async def _reach(scheduler: Scheduler, run_id: str, wanted: frozenset[int]) -> run_pb2.WorkflowRun:
    """The run once it is in one of the ``wanted`` states or has ended.

    The event stream replays the run's history before its live events, so an
    event saying the run entered a wanted state may be an old one: each is
    checked against the run's current state, and the stream followed on from
    there if it was."""
    names = {output.run_state(state) for state in (*wanted, *output.RUN_TERMINAL)}

    def entered_wanted(event: run_pb2.RunEvent) -> bool:
        to_state = event.payload.fields["to_state"].string_value
        return event.type == run_pb2.RUN_EVENT_TYPE_RUN_STATE_CHANGED and to_state in names

    last = 0
    while True:
        run = await _get(scheduler, run_id)
        if run.state in wanted or run.state in output.RUN_TERMINAL:
            return run
        last = await watch.follow(
            scheduler, run_id, on_event=lambda _e: None, after_sequence=last, stop=entered_wanted
        )


async def artifact(args: argparse.Namespace, clients: Clients) -> int:
    """Write an artifact's content to ``-o FILE`` (``-`` for standard output),
    checked against its recorded SHA-256. Read from the ledger
    (LedgerService.GetArtifact): it needs an admin or service token."""
    to_stdout = args.output == "-"
    if to_stdout and args.json:
        raise InvalidArgument("-o - writes the content to standard output; leave out --json")
    response = await clients.ledger.GetArtifact(
        ledger_pb2.GetArtifactRequest(artifact_id=args.artifact_id)
    )
    described, content = response.artifact, response.content
    digest = hashlib.sha256(content).hexdigest()
    if described.sha256 and digest != described.sha256:
        raise SteplineError(
            f"artifact {args.artifact_id}: content has SHA-256 {digest}, "
            f"the ledger recorded {described.sha256}; nothing written"
        )
    if to_stdout:
        sys.stdout.buffer.write(content)
        sys.stdout.flush()
        return 0
    path = Path(args.output)
    try:
        await asyncio.to_thread(path.write_bytes, content)
    except OSError as exc:
        raise InvalidArgument(f"cannot write {path}: {exc}") from None
    if args.json:
        print(output.to_json(described))
    else:
        print(f"wrote {output.artifact_summary(described)} to {path}")
    return 0
