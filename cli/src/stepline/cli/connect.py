"""How the client commands reach the services, and as whom.

A command talks to one or more services; each is found, in order, by its flag
(``--scheduler``, ``--device-broker``, ``--approvals``, ``--ledger``
``HOST:PORT``), its variable (``STEPLINE_SCHEDULER_ADDR``,
``STEPLINE_DEVICE_BROKER_ADDR``, ``STEPLINE_APPROVALS_ADDR``,
``STEPLINE_LEDGER_ADDR``), then the component recorded by ``stepline up`` in
the state directory. The token is ``--token``, ``--as NAME`` (that
principal's token from the mesh's ``credentials.json``), ``STEPLINE_TOKEN``,
then the mesh's admin token. ``__main__`` gathers flags and environment into
:class:`ClientOptions`; nothing here reads the environment.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc

from stepline.api.approvals.v1 import approvals_pb2_grpc
from stepline.api.device_broker.v1 import device_broker_pb2_grpc
from stepline.api.ledger.v1 import ledger_pb2_grpc
from stepline.api.scheduler.v1 import scheduler_service_pb2_grpc, workflow_service_pb2_grpc
from stepline.cli import mesh
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings, parse_address
from stepline.common.embedded import ProcessRecord
from stepline.common.errors import ConfigError


@dataclass(frozen=True)
class Service:
    """How a client command finds one service."""

    name: str  # the component's name in the mesh state
    flag: str
    variable: str  # without the STEPLINE_ prefix


SCHEDULER = Service("scheduler", "--scheduler", "SCHEDULER_ADDR")
DEVICE_BROKER = Service("device-broker", "--device-broker", "DEVICE_BROKER_ADDR")
APPROVALS = Service("approvals", "--approvals", "APPROVALS_ADDR")
LEDGER = Service("ledger", "--ledger", "LEDGER_ADDR")
ALL_SERVICES = (SCHEDULER, DEVICE_BROKER, APPROVALS, LEDGER)
#: largest message the CLI accepts: an artifact's content (up to 8 MiB) with room
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class ClientOptions:
    """Where the services are and who the caller is, as given (flags over environment)."""

    #: service name -> ``host:port`` given by flag or variable
    addresses: Mapping[str, str] = field(default_factory=dict)
    token: str | None = None  # --token
    principal: str | None = None  # --as
    env_token: str | None = None  # STEPLINE_TOKEN
    state_dir: Path = Path(".stepline")
    timeout_s: float = 30.0


def _recorded_endpoint(state_dir: Path, name: str) -> str | None:
    path = state_dir / mesh.STATE_FILE
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        for component in document["components"]:
            record = ProcessRecord.from_json(component)
            if record.name == name and record.endpoint:
                return record.endpoint
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is unreadable: {exc}") from None
    return None


def _recorded_tokens(state_dir: Path) -> dict[str, str]:
    path = state_dir / mesh.CREDENTIALS_FILE
    return mesh.read_tokens(path) if path.exists() else {}


def address_of(options: ClientOptions, service: Service) -> str:
    """The ``host:port`` of ``service``; ConfigError naming every way to give it."""
    state_dir = options.state_dir.resolve()
    address = options.addresses.get(service.name) or _recorded_endpoint(state_dir, service.name)
    if address is None:
        raise ConfigError(
            f"no {service.name} address: pass {service.flag} HOST:PORT, set "
            f"STEPLINE_{service.variable}, or start the mesh with `stepline up` "
            f"(no mesh state in {state_dir})"
        )
    parse_address(address, name=f"the {service.name} address")
    return address


def token_of(options: ClientOptions) -> str | None:
    """The bearer token to send (None: send none, the server will refuse)."""
    if options.token:
        if options.principal:
            raise ConfigError("give --token or --as, not both")
        return options.token
    if options.principal:
        state_dir = options.state_dir.resolve()
        tokens = _recorded_tokens(state_dir)
        if options.principal not in tokens:
            known = ", ".join(sorted(tokens)) or "none: no mesh credentials there"
            raise ConfigError(
                f"--as {options.principal}: no such principal in "
                f"{state_dir / mesh.CREDENTIALS_FILE} (known: {known})"
            )
        return tokens[options.principal]
    if options.env_token:
        return options.env_token
    return _recorded_tokens(options.state_dir.resolve()).get("admin")


@dataclass(frozen=True)
class Scheduler:
    """Stubs of the scheduler's two services on one channel."""

    channel: grpc.aio.Channel
    workflows: workflow_service_pb2_grpc.WorkflowServiceAsyncStub
    runs: scheduler_service_pb2_grpc.SchedulerServiceAsyncStub
    address: str


class Clients:
    """The services one command talks to. A channel is opened on first use of its
    service, so a command fails for want of an address only for the services it
    really calls; ``async with`` closes them all."""

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        self._token = token_of(options)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, service: Service) -> grpc.aio.Channel:
        if service.name not in self._channels:
            address = address_of(self.options, service)
            settings = ClientSettings(
                default_timeout_s=self.options.timeout_s, max_message_bytes=MAX_MESSAGE_BYTES
            )
            self._channels[service.name] = open_channel(
                address, settings=settings, token=self._token
            )
        return self._channels[service.name]

    @property
    def scheduler(self) -> Scheduler:
        channel = self.channel(SCHEDULER)
        return Scheduler(
            channel=channel,
            workflows=workflow_service_pb2_grpc.WorkflowServiceStub(channel),
            runs=scheduler_service_pb2_grpc.SchedulerServiceStub(channel),
            address=address_of(self.options, SCHEDULER),
        )

    @property
    def devices(self) -> device_broker_pb2_grpc.DeviceBrokerServiceAsyncStub:
        return device_broker_pb2_grpc.DeviceBrokerServiceStub(self.channel(DEVICE_BROKER))

    @property
    def approvals(self) -> approvals_pb2_grpc.ApprovalsServiceAsyncStub:
        return approvals_pb2_grpc.ApprovalsServiceStub(self.channel(APPROVALS))

    @property
    def ledger(self) -> ledger_pb2_grpc.LedgerServiceAsyncStub:
        return ledger_pb2_grpc.LedgerServiceStub(self.channel(LEDGER))

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> Clients:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
