"""The ``stepline`` command: argument parsing only; the work is in the modules.

stepline up | status | down                       the embedded mesh (mesh.py)
stepline workflows apply | list | show            definitions (workflows.py)
stepline run WORKFLOW                             start a run (runs.py)
stepline runs list | show | history | cancel | pause | resume | rerun

Client commands exit 0 on success, 1 when ``run --wait`` saw the run end
other than SUCCEEDED, and 2 on an error (gRPC status, bad arguments, no
scheduler). See docs/cli.md.
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

from stepline.cli import mesh, runs, workflows
from stepline.cli.connect import ClientOptions, Scheduler, connect
from stepline.common.config import Env
from stepline.common.errors import SteplineError

ClientCommand = Callable[[argparse.Namespace, Scheduler], Awaitable[int]]
EXIT_ERROR = 2


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
        print(f"\nlogs: {state_dir.resolve() / 'logs'}")
    return 0 if health and all(h.healthy for h in health) else 1


def cmd_up(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args.state_dir)
    if args.executors < 1:
        print("error: --executors must be at least 1", file=sys.stderr)
        return 2
    mesh.up(state_dir, executors=args.executors)
    print()
    code = _print_status(state_dir, as_json=False)
    print(f"state: {state_dir.resolve() / mesh.STATE_FILE}")
    print(f"admin token: {state_dir.resolve() / mesh.CREDENTIALS_FILE}")
    return code


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
    parser.add_argument(
        "--scheduler",
        metavar="HOST:PORT",
        default=default,
        help="scheduler address (default: $STEPLINE_SCHEDULER_ADDR, else the mesh "
        "started by `stepline up`)",
    )
    parser.add_argument(
        "--token",
        default=default,
        help="bearer token (default: $STEPLINE_TOKEN, else the admin token of `stepline up`)",
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
    up.set_defaults(func=cmd_up)
    commands.add_parser("down", help="stop every process of the embedded mesh").set_defaults(
        func=cmd_down
    )
    status = commands.add_parser("status", help="show each component's health")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    common = _client_options()
    _add_workflow_commands(commands, common)
    _add_run_command(commands, common)
    _add_runs_commands(commands, common)
    return parser


def client_options(args: argparse.Namespace, environ: Mapping[str, str]) -> ClientOptions:
    """Flags over ``STEPLINE_*`` variables over the state of `stepline up`."""
    env = Env(environ)
    timeout = args.timeout if args.timeout is not None else env.number("RPC_TIMEOUT_S", 30.0)
    return ClientOptions(
        scheduler=args.scheduler or env.optional("SCHEDULER_ADDR"),
        token=args.token or env.optional("TOKEN"),
        state_dir=_state_dir(args.state_dir, environ),
        timeout_s=timeout,
    )


async def run_client(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Run one client command; gRPC and usage errors become exit status 2."""
    command: ClientCommand = args.client
    try:
        async with connect(client_options(args, environ)) as scheduler:
            return await command(args, scheduler)
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
