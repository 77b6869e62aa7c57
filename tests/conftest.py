"""The embedded mesh, started once for the end-to-end tests of this folder.

``stepline up`` as real processes (PostgreSQL, nats-server, adb, two
simulated phones, the five services and two executors) in a temporary state
directory, with short claim leases and a quick reconciler so that a killed
executor's run is taken over in seconds rather than the production
half-minute, and quick approval, webhook and device-broker loops.

Fixtures (all session-scoped):

``mesh_state`` -> :class:`stepline.cli.mesh.MeshState`
    endpoints (``mesh_state.endpoint("approvals")``), process records, and
    ``mesh_state.admin_token``; ``mesh_state.phones`` are the phones'
    addresses (also their adb serials, as the broker sees them);
    ``mesh_state.approvals_webhook`` is the URL of the inbound decision
    webhook; ``mesh_state.secrets_file`` the approvals signing secrets.
``mesh_tokens`` -> ``dict[str, str]``
    bearer token by principal: ``admin`` (role admin), ``operator`` (role
    operator), ``approver`` (role approver); the principal ids are the names.
``webhook_secrets`` -> ``dict[str, str]``
    the approvals service's signing secrets by name: ``inbound`` signs
    decisions posted to the webhook, ``demo`` is free for subscriptions.
``phone_addresses`` -> ``list[str]``
    ``["127.0.0.1:P1", "127.0.0.1:P2"]``: the phones the broker connects.

and (per test) ``api`` -> the test module's ``Api``, a :class:`MeshApi`.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
from google.protobuf import json_format

from stepline.api.common.v1 import run_pb2
from stepline.api.ledger.v1 import ledger_pb2_grpc
from stepline.api.scheduler.v1 import scheduler_service_pb2 as spb
from stepline.api.scheduler.v1 import scheduler_service_pb2_grpc, workflow_service_pb2_grpc
from stepline.cli import mesh
from stepline.common import embedded, testing
from stepline.common.client import check_health, open_channel
from stepline.common.config import ClientSettings
from stepline.common.states import RUN_TERMINAL

EXECUTORS = 2
PHONES = 2
#: how long an end-to-end test waits on the mesh: each call's deadline and each
#: polled condition (``MeshApi.wait_s``, which a module's ``Api`` may raise)
WAIT_S = 30.0

#: settings for every service of the test mesh (defaults: 30 s lease and ack
#: wait, a reconcile pass every 10 s, a 30 s grace before a redispatch)
FAST_RECOVERY = {
    "STEPLINE_EXECUTOR_LEASE_S": "3",
    "STEPLINE_EXECUTOR_ACK_WAIT_S": "3",
    "STEPLINE_SCHEDULER_RECONCILE_INTERVAL_S": "0.5",
    "STEPLINE_SCHEDULER_ORPHAN_GRACE_S": "2",
    "STEPLINE_SCHEDULER_WATCH_POLL_S": "0.5",
}

#: approvals: expiry swept twice a second, outboxes polled often, webhook
#: retries after 0.1 s doubling to 1 s, four attempts (defaults: 5 s, 1 s,
#: 1 s doubling to 300 s, ten attempts)
FAST_APPROVALS = {
    "STEPLINE_APPROVALS_SWEEP_INTERVAL_S": "0.5",
    "STEPLINE_APPROVALS_OUTBOX_POLL_S": "0.2",
    "STEPLINE_APPROVALS_WEBHOOK_INITIAL_BACKOFF_S": "0.1",
    "STEPLINE_APPROVALS_WEBHOOK_MAX_BACKOFF_S": "1",
    "STEPLINE_APPROVALS_WEBHOOK_MAX_ATTEMPTS": "4",
    "STEPLINE_APPROVALS_WEBHOOK_TIMEOUT_S": "2",
}

#: devices: the broker scans (reconnects dropped phones) twice a second, device
#: leases of executors last 5 s (renewed every third of that), and a step
#: waits at most 20 s for a device (defaults: 5 s, 30 s, 60 s)
FAST_DEVICES = {
    "STEPLINE_BROKER_SCAN_INTERVAL_S": "0.5",
    "STEPLINE_EXECUTOR_DEVICE_TTL_S": "5",
    "STEPLINE_EXECUTOR_DEVICE_WAIT_S": "20",
}

MESH_SETTINGS = {**FAST_RECOVERY, **FAST_APPROVALS, **FAST_DEVICES}


@pytest.fixture(scope="session")
def mesh_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[mesh.MeshState]:
    """The running mesh's state (endpoints, pids, tokens, phones); stopped at the end."""
    state_dir: Path = tmp_path_factory.mktemp("mesh")
    state = mesh.up(
        state_dir,
        executors=EXECUTORS,
        phones=PHONES,
        env=MESH_SETTINGS,
        progress=lambda _msg: None,
    )
    try:
        yield state
    finally:
        mesh.down(state_dir, progress=lambda _msg: None)


@pytest.fixture(scope="session")
def mesh_tokens(mesh_state: mesh.MeshState) -> dict[str, str]:
    """Bearer token by principal name: admin, operator, approver."""
    return dict(mesh_state.tokens)


@pytest.fixture(scope="session")
def webhook_secrets(mesh_state: mesh.MeshState) -> dict[str, str]:
    """The approvals service's signing secrets by name (``inbound``, ``demo``)."""
    document = json.loads(mesh_state.secrets_file.read_text(encoding="utf-8"))
    return {str(k): str(v) for k, v in document["secrets"].items()}


@pytest.fixture(scope="session")
def phone_addresses(mesh_state: mesh.MeshState) -> list[str]:
    """The simulated phones' ``host:port`` (their adb serials)."""
    return mesh_state.phones


# --- killing an executor and bringing it back (tests that kill one run last) --


def executor_record(state: mesh.MeshState, executor_id: str) -> embedded.ProcessRecord:
    """The mesh's process record of an executor (its id as `stepline up` sets it)."""
    for record in state.components:
        name = record.name if record.name[-1].isdigit() else f"{record.name}-1"
        if record.name.startswith("executor") and name == executor_id:
            return record
    raise AssertionError(f"no executor {executor_id!r} in the mesh")


async def restart_executor(
    state: mesh.MeshState, record: embedded.ProcessRecord, env: dict[str, str]
) -> None:
    """Start a killed executor again as `stepline up` did, so that later tests
    find the mesh whole."""
    fresh = embedded.spawn(
        record.name,
        [sys.executable, "-m", "stepline.executor"],
        log_path=Path(record.log),
        endpoint=record.endpoint,
        port=record.port,
        env=env,
    )
    state.components[state.components.index(record)] = fresh
    state.save()
    await testing.eventually(
        lambda: check_health(fresh.endpoint, timeout_s=1.0),
        what=f"executor {record.name} to come back",
        timeout_s=60,
        poll_s=0.2,
    )


# --- what the end-to-end tests share: the admin's view of runs ------------------


#: ``channel(service, principal="admin")``: a channel to a service of the mesh
#: whose calls carry the principal's token
Connect = Callable[..., grpc.aio.Channel]


@dataclass
class MeshApi:
    """The scheduler and the ledger as the mesh's admin calls them; each
    end-to-end module adds its own calls, and stubs (:meth:`stubs`), in a
    subclass named ``Api`` (the ``api`` fixture makes it)."""

    state: mesh.MeshState
    workflows: workflow_service_pb2_grpc.WorkflowServiceAsyncStub
    runs: scheduler_service_pb2_grpc.SchedulerServiceAsyncStub
    ledger: ledger_pb2_grpc.LedgerServiceAsyncStub

    wait_s: ClassVar[float] = WAIT_S
    poll_s: ClassVar[float] = 0.05

    @classmethod
    def stubs(cls, channel: Connect) -> dict[str, Any]:
        """A subclass's own fields by name: its stubs, on ``channel``."""
        return {}

    async def ready(self) -> None:
        """Before a test: wait until the mesh is as the module's tests expect."""

    async def get(self, run_id: str) -> run_pb2.WorkflowRun:
        response = await self.runs.GetRun(
            spb.GetRunRequest(run_id=run_id, view=run_pb2.RUN_VIEW_TASKS)
        )
        return response.run

    async def eventually(
        self, check: Callable[[], Awaitable[Any]], *, what: str | Callable[[], str]
    ) -> Any:
        """Poll the async ``check`` until it returns something true (failing
        after ``wait_s`` with ``what``)."""
        return await testing.eventually(check, what=what, timeout_s=self.wait_s, poll_s=self.poll_s)

    async def until(
        self, run_id: str, condition: Callable[[run_pb2.WorkflowRun], bool], what: str
    ) -> run_pb2.WorkflowRun:
        """Poll GetRun until ``condition`` holds."""
        last = run_pb2.WorkflowRun()

        async def check() -> run_pb2.WorkflowRun | None:
            nonlocal last
            last = await self.get(run_id)
            return last if condition(last) else None

        run: run_pb2.WorkflowRun = await self.eventually(
            check, what=lambda: f"run {run_id} to get {what}; it is {last}"
        )
        return run

    async def finished(self, run_id: str) -> run_pb2.WorkflowRun:
        """Follow WatchRun until the scheduler ends the stream (the run is terminal)."""
        call = self.runs.WatchRun(spb.WatchRunRequest(run_id=run_id), timeout=self.wait_s)
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        finally:
            call.cancel()
        run = await self.get(run_id)
        assert run.state in RUN_TERMINAL, run
        return run


@pytest.fixture
async def api(request: pytest.FixtureRequest, mesh_state: mesh.MeshState) -> AsyncIterator[MeshApi]:
    """The test module's ``Api`` (:class:`MeshApi` where it has none), ready, on
    channels of its own (deadlines of ``wait_s``) that close after the test."""
    cls: type[MeshApi] = getattr(request.module, "Api", MeshApi)
    settings = ClientSettings(default_timeout_s=cls.wait_s)
    async with contextlib.AsyncExitStack() as stack:

        def channel(service: str, principal: str = "admin") -> grpc.aio.Channel:
            opened = open_channel(
                mesh_state.endpoint(service), settings=settings, token=mesh_state.tokens[principal]
            )
            stack.push_async_callback(opened.close)
            return opened

        scheduler = channel("scheduler")
        api = cls(
            state=mesh_state,
            workflows=workflow_service_pb2_grpc.WorkflowServiceStub(scheduler),
            runs=scheduler_service_pb2_grpc.SchedulerServiceStub(scheduler),
            ledger=ledger_pb2_grpc.LedgerServiceStub(channel("ledger")),
            **cls.stubs(channel),
        )
        await api.ready()
        yield api


def task(run: run_pb2.WorkflowRun, path: str) -> run_pb2.TaskRun:
    for candidate in run.tasks:
        if candidate.step_path == path:
            return candidate
    raise AssertionError(f"run {run.run_id} has no task {path!r}")


def outputs(message: Any) -> dict[str, Any]:
    """A message (or Struct) as plain JSON values."""
    return dict(json_format.MessageToDict(message))
