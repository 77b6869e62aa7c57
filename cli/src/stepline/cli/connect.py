"""How the client commands reach the scheduler.

The address is, in order: ``--scheduler HOST:PORT``, ``STEPLINE_SCHEDULER_ADDR``,
then the scheduler recorded by ``stepline up`` in the state directory. The
token is ``--token``, ``STEPLINE_TOKEN``, then the admin token ``stepline up``
wrote to ``credentials.json`` in the state directory. ``__main__`` gathers
flags and environment into :class:`ClientOptions`; nothing here reads the
environment.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from stepline.api.scheduler.v1 import scheduler_service_pb2_grpc, workflow_service_pb2_grpc
from stepline.cli import mesh
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings, parse_address
from stepline.common.embedded import ProcessRecord
from stepline.common.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class ClientOptions:
    """Where the scheduler is and who the caller is, as given (flags over environment)."""

    scheduler: str | None = None
    token: str | None = None
    state_dir: Path = Path(".stepline")
    timeout_s: float = 30.0


@dataclass(frozen=True)
class Target:
    address: str
    token: str | None


def _recorded_scheduler(state_dir: Path) -> str | None:
    path = state_dir / mesh.STATE_FILE
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        for component in document["components"]:
            record = ProcessRecord.from_json(component)
            if record.name == "scheduler" and record.endpoint:
                return record.endpoint
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is unreadable: {exc}") from None
    return None


def _recorded_token(state_dir: Path) -> str | None:
    path = state_dir / mesh.CREDENTIALS_FILE
    if not path.exists():
        return None
    try:
        token = json.loads(path.read_text(encoding="utf-8"))["admin_token"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is unreadable: {exc}") from None
    return str(token) if token else None


def resolve(options: ClientOptions) -> Target:
    """The scheduler's address and the bearer token to send it."""
    state_dir = options.state_dir.resolve()
    address = options.scheduler or _recorded_scheduler(state_dir)
    if address is None:
        raise ConfigError(
            "no scheduler address: pass --scheduler HOST:PORT, set STEPLINE_SCHEDULER_ADDR, "
            f"or start the mesh with `stepline up` (no mesh state in {state_dir})"
        )
    parse_address(address, name="the scheduler address")
    token = options.token or _recorded_token(state_dir)
    return Target(address, token)


@dataclass(frozen=True)
class Scheduler:
    """Stubs of the scheduler's two services on one channel."""

    channel: grpc.aio.Channel
    workflows: workflow_service_pb2_grpc.WorkflowServiceAsyncStub
    runs: scheduler_service_pb2_grpc.SchedulerServiceAsyncStub
    address: str


@contextlib.asynccontextmanager
async def connect(options: ClientOptions) -> AsyncIterator[Scheduler]:
    """A channel to the scheduler with the caller's token and default deadline."""
    target = resolve(options)
    settings = ClientSettings(default_timeout_s=options.timeout_s)
    async with open_channel(target.address, settings=settings, token=target.token) as channel:
        yield Scheduler(
            channel=channel,
            workflows=workflow_service_pb2_grpc.WorkflowServiceStub(channel),
            runs=scheduler_service_pb2_grpc.SchedulerServiceStub(channel),
            address=target.address,
        )
