"""The ``stepline`` command.

stepline up       start the embedded mesh in the background
stepline status   health of every component
stepline down     stop every process ``up`` started
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from stepline.cli import mesh
from stepline.common.errors import SteplineError


def _state_dir(value: str | None) -> Path:
    return Path(value or os.environ.get("STEPLINE_STATE_DIR") or ".stepline")


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
    mesh.up(state_dir)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepline", description="Stepline workflow runtime")
    parser.add_argument(
        "--state-dir",
        help="where the embedded mesh keeps its state, data and logs "
        "(default: $STEPLINE_STATE_DIR or ./.stepline)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start the embedded mesh in the background").set_defaults(
        func=cmd_up
    )
    commands.add_parser("down", help="stop every process of the embedded mesh").set_defaults(
        func=cmd_down
    )
    status = commands.add_parser("status", help="show each component's health")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except SteplineError as exc:
        print(f"stepline: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
