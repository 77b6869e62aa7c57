"""The ``stepline`` command: argument parsing only; the work is in the modules.

stepline up | status | down                       the embedded mesh (mesh.py)
stepline workflows apply | list | show            definitions (workflows.py)
stepline run WORKFLOW                             start a run (runs.py)
stepline runs list | show | history | wait | artifact | cancel | pause | resume | rerun
stepline devices list | show | quarantine | release | bind | unbind   (devices.py)
stepline approvals list | show | approve | reject                     (approvals.py)
stepline schedules create | list | show | pause | resume | delete     (schedules.py)
stepline phone ...                                a simulated phone (stepline.phone)

Client commands exit 0 on success, 1 when ``run --wait`` or ``runs wait`` saw
the run end otherwise than waited for, and 2 on an error (gRPC status, bad
arguments, no service address). See docs/cli.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import grpc

from stepline.cli import approvals, devices, mesh, runs, schedules, workflows
from stepline.cli.connect import ALL_SERVICES, ClientOptions, Clients
from stepline.common.config import Env
from stepline.common.errors import SteplineError

ClientCommand = Callable[[argparse.Namespace, Clients], Awaitable[int]]
EXIT_ERROR = 2
DEMO_PHONES = 2


def _state_dir(value: str | None, environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(value or environ.get("STEPLINE_STATE_DIR") or ".stepline")


def _print_status(state_dir: Path, *, as_json: bool) -> int:
    health = mesh.status(state_dir)
    if as_json:
        print(json.dumps([h.to_json() for h in health], indent=2))
    elif not health:
        print(f"the mesh is not running (no state in {state_dir})")
    else:
        width = max(len(h.name) for h in health)
        print(f"{'COMPONENT':<{width}}  {'HEALTH':<9}  {'PID':>7}  ENDPOINT")
        for h in health:
            verdict = "healthy" if h.healthy else ("unhealthy" if h.alive else "stopped")
            print(f"{h.name:<{width}}  {verdict:<9}  {h.pid:>7}  {h.endpoint}")
        print()
        webhook = next((h.extra["webhook_url"] for h in health if "webhook_url" in h.extra), "")
        if webhook:
            print(f"approvals webhook: {webhook}")
            print(f"  (signing secrets: {state_dir.resolve() / mesh.SECRETS_FILE})")
        print(f"logs: {state_dir.resolve() / 'logs'}")
    return 0 if health and all(h.healthy for h in health) else 1


def cmd_up(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args.state_dir)
    if args.executors < 1:
        print("error: --executors must be at least 1", file=sys.stderr)
        return 2
    if args.phones < 0:
        print("error: --phones must not be negative", file=sys.stderr)
        return 2
    state = mesh.up(state_dir, executors=args.executors, phones=args.phones)
    print()
    code = _print_status(state_dir, as_json=False)
    print(f"state: {state_dir.resolve() / mesh.STATE_FILE}")
    names = ", ".join(sorted(state.tokens))
    credentials = state_dir.resolve() / mesh.CREDENTIALS_FILE
    print(f"tokens: {credentials} ({names}; the CLI uses admin unless --as NAME)")
    return code


def cmd_phone(args: argparse.Namespace) -> int:
    """``stepline phone ...``: ``python -m stepline.phone ...``."""
    from stepline.phone.__main__ import main as phone_main

    return phone_main(args.argv)


def cmd_down(args: argparse.Namespace) -> int:
    mesh.down(_state_dir(args.state_dir))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    return _print_status(_state_dir(args.state_dir), as_json=args.json)


def _client_options() -> argparse.ArgumentParser:
    """Options every client command takes, before or after its name (defaults are
    suppressed here so that a value given before the command is kept)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="proto JSON output, for scripts")
    _connection_options(common, default=argparse.SUPPRESS)
    return common


def _connection_options(parser: argparse.ArgumentParser, *, default: object) -> None:
    for service in ALL_SERVICES:
        parser.add_argument(
            service.flag,
            metavar="HOST:PORT",
            default=default,
            help=f"{service.name} address (default: $STEPLINE_{service.variable}, else the "
            "mesh started by `stepline up`)",
        )
    parser.add_argument(
        "--token",
        default=default,
        help="bearer token (default: $STEPLINE_TOKEN, else the admin token of `stepline up`)",
    )
    parser.add_argument(
        "--as",
        dest="as_principal",
        metavar="NAME",
        default=default,
        help="use the token of principal NAME of `stepline up` (admin, operator, approver)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=default,
        help="deadline of each call (default: $STEPLINE_RPC_TIMEOUT_S or 30)",
    )
    if default is argparse.SUPPRESS:
        parser.add_argument("--state-dir", default=default, help=argparse.SUPPRESS)


def _add_workflow_commands(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    group = commands.add_parser("workflows", help="register and read workflow definitions")
    sub = group.add_subparsers(dest="workflows_command", required=True)
    apply = sub.add_parser(
        "apply", parents=[common], help="register a definition file (.yaml, .yml or .json)"
    )
    apply.add_argument("file", help="the definition")
    apply.add_argument(
        "--validate-only", action="store_true", help="check the definition, store nothing"
    )
    apply.set_defaults(client=workflows.apply)
    listing = sub.add_parser("list", parents=[common], help="workflows, by name")
    listing.add_argument("--prefix", help="only names starting with this")
    listing.set_defaults(client=workflows.list_workflows)
    show = sub.add_parser("show", parents=[common], help="one version of a workflow")
    show.add_argument("name")
    show.add_argument("--version", type=int, default=0, help="version (default: the latest)")
    show.add_argument("--versions", action="store_true", help="list every version instead")
    show.set_defaults(client=workflows.show)


def _add_run_command(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    run = commands.add_parser("run", parents=[common], help="start a run of a workflow")
    run.add_argument("workflow")
    run.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an input; VALUE is JSON if it parses as JSON, else a string (repeatable)",
    )
    run.add_argument("--input-json", metavar="JSON", help="inputs as one JSON object")
    run.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="a run label"
    )
    run.add_argument("--version", type=int, default=0, help="version (default: the latest)")
    run.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="StartRun request_id: the same key returns the same run (default: a new UUID)",
    )
    run.add_argument(
        "--wait",
        action="store_true",
        help="follow the run to its end; exit 0 only if it SUCCEEDED, else 1",
    )
    run.add_argument(
        "-q", "--quiet", action="store_true", help="print only the run id (for scripts)"
    )
    run.set_defaults(client=runs.start)


def _add_runs_commands(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    group = commands.add_parser("runs", help="list, inspect and control runs")
    sub = group.add_subparsers(dest="runs_command", required=True)
    listing = sub.add_parser("list", parents=[common], help="runs, newest first")
    listing.add_argument("--workflow", help="only runs of this workflow")
    listing.add_argument(
        "--state",
        action="append",
        default=[],
        type=runs.parse_state,
        help="only runs in this state (repeatable), e.g. failed",
    )
    listing.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    listing.set_defaults(client=runs.list_runs)
    for name, handler, text in (
        ("show", runs.show, "a run's timeline: each step with its state and timing"),
        ("history", runs.history, "a run's event log"),
    ):
        command = sub.add_parser(name, parents=[common], help=text)
        command.add_argument("run_id")
        command.set_defaults(client=handler)
    history = sub.choices["history"]
    history.add_argument("--follow", action="store_true", help="keep streaming until it ends")
    wait = sub.add_parser(
        "wait",
        parents=[common],
        help="wait until a run is suspended (for an approval), paused or ended",
    )
    wait.add_argument("run_id")
    wait.add_argument(
        "--until",
        choices=sorted(runs.UNTIL),
        default="terminal",
        help="terminal (default: exit 0 only if it SUCCEEDED), suspended or paused; "
        "exit 1 if the run ended otherwise",
    )
    wait.add_argument(
        "--max-wait",
        type=float,
        metavar="SECONDS",
        help="give up (exit 1) after this long (default: wait as long as it takes)",
    )
    wait.set_defaults(client=runs.wait)
    artifact = sub.add_parser(
        "artifact", parents=[common], help="save an artifact of a run (e.g. a screenshot)"
    )
    artifact.add_argument("artifact_id", help="as listed by `runs show`")
    artifact.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="where to write it (- for stdout)"
    )
    artifact.set_defaults(client=runs.artifact)
    for name, handler, text in (
        ("cancel", runs.cancel, "cancel a run that has not ended"),
        ("pause", runs.pause, "pause a running run at the next step boundary"),
        ("resume", runs.resume, "resume a paused run"),
    ):
        command = sub.add_parser(name, parents=[common], help=text)
        command.add_argument("run_id")
        command.add_argument("--reason", default="", help="why, for the event log")
        command.set_defaults(client=handler)
    rerun = sub.add_parser(
        "rerun", parents=[common], help="reopen a failed, timed-out or cancelled run from a step"
    )
    rerun.add_argument("run_id")
    rerun.add_argument("--from", dest="from_step", required=True, metavar="STEP_ID")
    rerun.add_argument(
        "--failed-chunks-only",
        action="store_true",
        help="rerun only the chunks of the (chunked) step that did not succeed",
    )
    rerun.add_argument("--reason", default="", help="why, for the event log")
    rerun.set_defaults(client=runs.rerun)


def _add_device_commands(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    group = commands.add_parser("devices", help="cloud phones: inventory, quarantine, bindings")
    sub = group.add_subparsers(dest="devices_command", required=True)
    listing = sub.add_parser("list", parents=[common], help="devices, by serial")
    listing.add_argument("--pool", help="only devices of this pool")
    listing.add_argument(
        "--state",
        action="append",
        default=[],
        type=devices.parse_state,
        help="only devices in this state (repeatable), e.g. quarantined",
    )
    listing.add_argument("--model", help="only this model, e.g. 'Pixel 7'")
    listing.add_argument("--account", help="only the device bound to this account")
    listing.set_defaults(client=devices.list_devices)
    show = sub.add_parser(
        "show", parents=[common], help="one device: lease, health checks, quarantine evidence"
    )
    show.add_argument("serial")
    show.set_defaults(client=devices.show)
    quarantine = sub.add_parser(
        "quarantine", parents=[common], help="take a device out of service (revokes its lease)"
    )
    quarantine.add_argument("serial")
    quarantine.add_argument("--reason", required=True, help="why, kept with the device")
    quarantine.add_argument(
        "--evidence",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="evidence kept with the device; VALUE is JSON if it parses (repeatable)",
    )
    quarantine.set_defaults(client=devices.quarantine)
    release = sub.add_parser(
        "release", parents=[common], help="return a quarantined device to service"
    )
    release.add_argument("serial")
    release.add_argument("--reason", required=True, help="why it is fixed, for the audit log")
    release.set_defaults(client=devices.release)
    bind = sub.add_parser(
        "bind", parents=[common], help="bind a device to an account (its leases go there)"
    )
    bind.add_argument("serial")
    bind.add_argument("account")
    bind.set_defaults(client=devices.bind)
    unbind = sub.add_parser("unbind", parents=[common], help="remove a device's account binding")
    unbind.add_argument("serial")
    unbind.add_argument("account", nargs="?", help="refuse unless this account is the bound one")
    unbind.set_defaults(client=devices.unbind)


def _add_approval_commands(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    group = commands.add_parser("approvals", help="approval requests of GOVERN steps")
    sub = group.add_subparsers(dest="approvals_command", required=True)
    listing = sub.add_parser("list", parents=[common], help="approval requests, newest first")
    listing.add_argument(
        "--state",
        action="append",
        default=[],
        type=approvals.parse_state,
        help="only requests in this state (repeatable), e.g. pending",
    )
    listing.add_argument("--run", metavar="RUN_ID", help="only requests of this run")
    listing.add_argument("--workflow", help="only requests of this workflow")
    listing.add_argument(
        "--actionable", action="store_true", help="only pending requests you may decide"
    )
    listing.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    listing.set_defaults(client=approvals.list_approvals)
    show = sub.add_parser(
        "show", parents=[common], help="one request: policy, context and decisions"
    )
    show.add_argument("approval_id")
    show.set_defaults(client=approvals.show)
    for name, handler, text in (
        ("approve", approvals.approve, "approve a request (as the caller: see --as)"),
        ("reject", approvals.reject, "reject a request; one rejection rejects it"),
    ):
        decide = sub.add_parser(name, parents=[common], help=text)
        decide.add_argument("approval_id", nargs="?", help="the request's id")
        decide.add_argument(
            "--run", metavar="RUN_ID", help="instead of an id: the run's one pending request"
        )
        decide.add_argument(
            "--reason", required=name == "reject", default="", help="recorded with the decision"
        )
        decide.set_defaults(client=handler)


def _add_schedule_commands(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    group = commands.add_parser("schedules", help="cron schedules that start runs")
    sub = group.add_subparsers(dest="schedules_command", required=True)
    create = sub.add_parser(
        "create", parents=[common], help="start a run of a workflow at each time a cron matches"
    )
    create.add_argument("workflow")
    create.add_argument(
        "--cron",
        required=True,
        metavar="EXPR",
        help="five-field cron expression: minute hour day-of-month month day-of-week, "
        'e.g. "0 9 * * 1-5"',
    )
    create.add_argument(
        "--timezone",
        metavar="TZ",
        help="IANA time zone the expression is read in, e.g. Asia/Shanghai (default: UTC)",
    )
    create.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an input of every run; VALUE is JSON if it parses as JSON, else a string "
        "(repeatable)",
    )
    create.add_argument("--input-json", metavar="JSON", help="inputs as one JSON object")
    create.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="a label of every run"
    )
    create.add_argument(
        "--version",
        type=int,
        default=0,
        help="pin this version (default: the latest at each firing)",
    )
    create.add_argument(
        "--overlap",
        choices=sorted(schedules.OVERLAP),
        default="skip",
        help="when the previous run still goes at a firing: skip the firing (default) "
        "or allow a second run",
    )
    create.add_argument("--description", help="what the schedule is for, for people")
    create.add_argument("--paused", action="store_true", help="create it paused")
    create.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="CreateSchedule request_id: the same key returns the same schedule "
        "(default: a new UUID)",
    )
    create.add_argument(
        "-q", "--quiet", action="store_true", help="print only the schedule id (for scripts)"
    )
    create.set_defaults(client=schedules.create)
    listing = sub.add_parser("list", parents=[common], help="schedules, oldest first")
    listing.add_argument("--workflow", help="only schedules of this workflow")
    listing.set_defaults(client=schedules.list_schedules)
    show = sub.add_parser(
        "show", parents=[common], help="one schedule: timing, inputs and last firing"
    )
    show.add_argument("schedule_id")
    show.set_defaults(client=schedules.show)
    for name, handler, text in (
        ("pause", schedules.pause, "stop a schedule from firing until resumed"),
        ("resume", schedules.resume, "let a paused schedule fire again, from its next due time"),
    ):
        command = sub.add_parser(name, parents=[common], help=text)
        command.add_argument("schedule_id")
        command.add_argument("--reason", default="", help="why, for the audit log")
        command.set_defaults(client=handler)
    delete = sub.add_parser(
        "delete", parents=[common], help="delete a schedule (the runs it started are kept)"
    )
    delete.add_argument("schedule_id")
    delete.set_defaults(client=schedules.delete)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepline", description="Stepline workflow runtime")
    parser.add_argument(
        "--state-dir",
        help="where the embedded mesh keeps its state, data and logs "
        "(default: $STEPLINE_STATE_DIR or ./.stepline)",
    )
    _connection_options(parser, default=None)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the embedded mesh in the background")
    up.add_argument(
        "--executors", type=int, default=1, metavar="N", help="executor processes (default 1)"
    )
    up.add_argument(
        "--phones",
        type=int,
        default=DEMO_PHONES,
        metavar="N",
        help=f"simulated phones for the device broker (default {DEMO_PHONES})",
    )
    up.set_defaults(func=cmd_up)
    commands.add_parser("down", help="stop every process of the embedded mesh").set_defaults(
        func=cmd_down
    )
    status = commands.add_parser("status", help="show each component's health")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    phone = commands.add_parser(
        "phone",
        help="run a simulated phone: stepline phone --port P (see stepline phone --help)",
        add_help=False,
        prefix_chars="\0",  # every argument after `phone` is the phone's
    )
    phone.add_argument("argv", nargs=argparse.REMAINDER)
    phone.set_defaults(func=cmd_phone)
    common = _client_options()
    _add_workflow_commands(commands, common)
    _add_run_command(commands, common)
    _add_runs_commands(commands, common)
    _add_device_commands(commands, common)
    _add_approval_commands(commands, common)
    _add_schedule_commands(commands, common)
    return parser


def client_options(args: argparse.Namespace, environ: Mapping[str, str]) -> ClientOptions:
    """Flags over ``STEPLINE_*`` variables over the state of `stepline up`."""
    env = Env(environ)
    timeout = args.timeout if args.timeout is not None else env.number("RPC_TIMEOUT_S", 30.0)
    addresses = {}
    for service in ALL_SERVICES:
        given = getattr(args, service.flag.lstrip("-").replace("-", "_"))
        address = given or env.optional(service.variable)
        if address:
            addresses[service.name] = address
    return ClientOptions(
        addresses=addresses,
        token=args.token,
        principal=args.as_principal,
        env_token=env.optional("TOKEN"),
        state_dir=_state_dir(args.state_dir, environ),
        timeout_s=timeout,
    )


async def run_client(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Run one client command; gRPC and usage errors become exit status 2."""
    command: ClientCommand = args.client
    try:
        async with Clients(client_options(args, environ)) as clients:
            return await command(args, clients)
    except grpc.aio.AioRpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    except SteplineError as exc:
        print(f"error: {exc}", file=sys.stderr)
    return EXIT_ERROR


async def run_async(argv: Sequence[str], *, environ: Mapping[str, str] | None = None) -> int:
    """A client command given as arguments, on the running event loop (tests
    call this beside an in-process server); returns the exit status."""
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    if not hasattr(args, "client"):
        raise ValueError(f"{args.command} is not a client command")
    return await run_client(args, os.environ if environ is None else environ)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "client"):
            code = asyncio.run(run_client(args, os.environ))
        else:
            code = args.func(args)
    except SteplineError as exc:
        print(f"stepline: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
