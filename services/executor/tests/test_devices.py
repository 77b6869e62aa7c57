"""Device leases around steps: the real device broker (in-process), the real
ledger, NATS, the adb server and simulated phones; runs driven by executors."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration

from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.device_broker.v1 import device_broker_pb2 as dpb
from stepline.api.device_broker.v1 import device_broker_pb2_grpc
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings, NatsSettings, ServerSettings
from stepline.common.testing import eventually
from stepline.device_broker.config import DeviceBrokerSettings
from stepline.device_broker.server import running as broker_running
from stepline.phone import app
from stepline.phone.server import PhoneServer
from stepline.phone.testing import PhoneFactory

from .conftest import Mesh, atomic, workflow

R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState
F = common_pb2.FailureReason
D = common_pb2.DeviceState
W = workflow_pb2
WAIT_S = 30.0
PNG = b"\x89PNG\r\n\x1a\n"


def ms(value: int) -> Duration:
    return Duration(seconds=value // 1000, nanos=(value % 1000) * 1_000_000)


def task(run: run_pb2.WorkflowRun, path: str) -> run_pb2.TaskRun:
    return next(t for t in run.tasks if t.step_path == path)


def spanned(*steps: W.Step, until: str | None = None, **requirement: Any) -> list[W.Step]:
    """The steps, the first declaring a device kept through the last (or ``until``)."""
    first = steps[0]
    first.device.CopyFrom(W.DeviceRequirement(**requirement))
    if len(steps) > 1 or until:
        first.device.span_until_step_id = until or steps[-1].id
    return list(steps)


def tap(step_id: str, point: tuple[int, int], **fields: Any) -> W.Step:
    return atomic(step_id, "android.tap", {"x": point[0], "y": point[1]}, **fields)


def android(*steps: W.Step, **fields: Any) -> W.WorkflowDefinition:
    return workflow(*steps, allowed_verbs=["android.*", "core.*", "test.*"], **fields)


@dataclass
class Devices:
    """The executor mesh plus a device broker and its phones."""

    mesh: Mesh
    broker_addr: str
    stub: device_broker_pb2_grpc.DeviceBrokerServiceAsyncStub
    phones: list[PhoneServer]

    def executor(self, executor_id: str = "executor-1", **overrides: Any) -> Any:
        settings: dict[str, Any] = {
            "device_broker_addr": self.broker_addr,
            "device_ttl_s": 3.0,
            "device_wait_s": WAIT_S,
            "adb_timeout_s": 5.0,
        }
        settings.update(overrides)
        return self.mesh.executor(executor_id, **settings)

    async def device(self, phone: PhoneServer) -> dpb.Device:
        response = await self.stub.GetDevice(dpb.GetDeviceRequest(serial=phone.address))
        return response.device

    async def wait_device(
        self, phone: PhoneServer, check: Callable[[dpb.Device], bool]
    ) -> dpb.Device:
        """Poll the broker until the device satisfies ``check``."""

        async def satisfied() -> dpb.Device | None:
            device = await self.device(phone)
            return device if check(device) else None

        found: dpb.Device = await eventually(
            satisfied, what=f"device {phone.address} to change", timeout_s=WAIT_S
        )
        return found

    async def wait_available(self) -> None:
        for phone in self.phones:
            await self.wait_device(phone, lambda d: d.state == D.DEVICE_STATE_AVAILABLE)


@contextlib.asynccontextmanager
async def device_mesh(
    mesh: Mesh, database_url: str, adb_server: tuple[str, int], phones: list[PhoneServer]
) -> AsyncIterator[Devices]:
    credentials = mesh.credentials
    settings = DeviceBrokerSettings(
        server=ServerSettings(service="device-broker", auth_file=credentials.auth_file),
        database_url=database_url,
        nats=NatsSettings(url=mesh.nats_url, stream_prefix=mesh.streams.prefix),
        adb_servers=(adb_server,),
        device_addresses=tuple(phone.address for phone in phones),
        scan_interval_s=0.2,
    )
    async with contextlib.AsyncExitStack() as stack:
        host = await stack.enter_async_context(broker_running(settings))
        addr = f"127.0.0.1:{host.port}"
        channel = open_channel(addr, settings=ClientSettings(service_token=credentials.admin_token))
        stack.push_async_callback(channel.close)
        devices = Devices(
            mesh, addr, device_broker_pb2_grpc.DeviceBrokerServiceStub(channel), phones
        )
        await devices.wait_available()
        yield devices


@pytest.fixture
async def one_phone(
    mesh: Mesh, database_url: str, adb_server: tuple[str, int], phones: PhoneFactory
) -> AsyncIterator[Devices]:
    async with device_mesh(mesh, database_url, adb_server, phones(1)) as devices:
        yield devices


@pytest.fixture
async def two_phones(
    mesh: Mesh, database_url: str, adb_server: tuple[str, int], phones: PhoneFactory
) -> AsyncIterator[Devices]:
    async with device_mesh(mesh, database_url, adb_server, phones(2)) as devices:
        yield devices


def taps(phone: PhoneServer) -> list[tuple[int | str, ...]]:
    """The taps a phone received (the broker's cleanup presses keys, never taps)."""
    with phone.model.lock:
        return [event.args for event in phone.model.input_log if event.kind == "tap"]


def not_leased(device: dpb.Device) -> bool:
    return device.state != D.DEVICE_STATE_LEASED and not device.HasField("lease")


async def test_a_span_keeps_one_device_and_keeps_screenshots(two_phones: Devices) -> None:
    mesh = two_phones.mesh
    steps = spanned(
        atomic("open", "android.launch", {"package": "com.stepline.social"}),
        tap("user", app.USERNAME_FIELD),
        atomic("type-user", "android.text", {"text": "{{ inputs.account }}"}),
        tap("password", app.PASSWORD_FIELD),
        atomic("type-password", "android.text", {"text": "{{ inputs.password }}"}),
        tap("login", app.LOGIN_BUTTON),
        atomic("shot-login", "android.screenshot", {"name": "login.png"}),
        tap("compose", app.COMPOSE_BUTTON),
        atomic("type-post", "android.text", {"text": "{{ inputs.message }}"}),
        tap("post", app.POST_BUTTON),
        atomic("shot-post", "android.screenshot", {}),
        pool="default",
    )
    inputs = {"account": "ada", "password": "pw", "message": "hello from a span"}
    async with two_phones.executor():
        run_id = await mesh.start(android(*steps), inputs)
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure.message
    used = [p for p in two_phones.phones if taps(p)]
    assert len(used) == 1, "every step of the span ran on one phone"
    (phone,) = used
    with phone.model.lock:
        posts = [(p.author, p.text) for p in phone.model.app.posts]
    assert posts == [("ada", "hello from a span")]
    for step_id, name in (("shot-login", "login.png"), ("shot-post", "shot-post.png")):
        shot = task(run, step_id)
        output = dict(shot.output)
        assert output["name"] == name
        assert (output["width"], output["height"]) == (1080, 2400)
        got = await mesh.stub.GetArtifact(
            pb.GetArtifactRequest(artifact_id=str(output["artifact_id"]))
        )
        assert got.content.startswith(PNG)
        assert hashlib.sha256(got.content).hexdigest() == output["sha256"] == got.artifact.sha256
        assert got.artifact.content_type == "image/png"
        assert [a.name for a in shot.artifacts] == [name]
        assert got.artifact.task_id == shot.task_id and got.artifact.attempt_number == 1
    for each in two_phones.phones:
        assert not_leased(await two_phones.device(each))


async def test_released_when_a_step_fails(one_phone: Devices) -> None:
    mesh = one_phone.mesh
    steps = spanned(
        tap("first", (10, 10)),
        atomic("boom", "android.shell", {"command": "echo no >&2; exit 4"}),
        tap("never", (20, 20)),
    )
    async with one_phone.executor():
        run_id = await mesh.start(android(*steps))
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_FAILED
    boom = task(run, "boom")
    assert boom.failure.reason == F.FAILURE_REASON_VERB_ERROR
    assert "exited 4" in boom.failure.message and "no" in boom.failure.message
    assert task(run, "never").state == T.TASK_RUN_STATE_SKIPPED
    assert not_leased(await one_phone.device(one_phone.phones[0]))
    await one_phone.wait_available()  # cleanup passed: the device serves again


async def test_released_when_the_run_is_cancelled(one_phone: Devices) -> None:
    mesh = one_phone.mesh
    phone = one_phone.phones[0]
    steps = spanned(tap("first", (10, 10)), atomic("wait", "core.sleep", {"seconds": 60}))
    async with one_phone.executor():
        run_id = await mesh.start(android(*steps))
        leased = await one_phone.wait_device(phone, lambda d: d.state == D.DEVICE_STATE_LEASED)
        assert leased.lease.holder.run_id == run_id
        await mesh.control(run_id, run_pb2.CONTROL_ACTION_CANCEL)
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_CANCELLED
    assert not_leased(await one_phone.device(phone))


async def test_released_when_a_step_times_out(one_phone: Devices) -> None:
    mesh = one_phone.mesh
    steps = spanned(
        tap("first", (10, 10)),
        atomic("slow", "core.sleep", {"seconds": 60}, timeout=ms(300)),
        tap("never", (20, 20)),
    )
    async with one_phone.executor():
        run_id = await mesh.start(android(*steps))
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_TIMED_OUT
    assert task(run, "slow").failure.reason == F.FAILURE_REASON_TIMEOUT
    assert not_leased(await one_phone.device(one_phone.phones[0]))


async def test_pause_releases_and_resume_leases_again(one_phone: Devices) -> None:
    mesh = one_phone.mesh
    phone = one_phone.phones[0]
    steps = spanned(tap("first", (10, 10)), atomic("hold", "test.gate"), tap("last", (30, 30)))
    async with one_phone.executor():
        run_id = await mesh.start(android(*steps))
        await asyncio.wait_for(mesh.probe.started.wait(), WAIT_S)
        assert (await one_phone.device(phone)).state == D.DEVICE_STATE_LEASED
        assert not await mesh.control(run_id, run_pb2.CONTROL_ACTION_PAUSE)
        # The executor hears the pause on the same subject as this test.
        await mesh.wait_event(run_id, "control", lambda e: e.HasField("run_control"))
        mesh.probe.gate.set()
        paused = await mesh.wait_run(run_id, R.WORKFLOW_RUN_STATE_PAUSED)
        assert task(paused, "last").state == T.TASK_RUN_STATE_PENDING
        assert not_leased(await one_phone.device(phone))
        await one_phone.wait_available()
        assert await mesh.control(run_id, run_pb2.CONTROL_ACTION_RESUME)
        dispatched = await mesh.stub.RecordDispatch(
            pb.RecordDispatchRequest(
                request_id="resume-1",
                run_id=run_id,
                expected_dispatch_epoch=1,
                actor=common_pb2.Principal(id="service:scheduler"),
                reason="resumed",
            )
        )
        await mesh.publish(run_id, dispatched.dispatch_epoch)
        run = await mesh.wait_run(run_id, R.WORKFLOW_RUN_STATE_SUCCEEDED)
    assert task(run, "last").state == T.TASK_RUN_STATE_SUCCEEDED
    assert taps(phone) == [(10, 10), (30, 30)]
    assert not_leased(await one_phone.device(phone))


async def test_an_executor_cut_off_by_shutdown_releases(one_phone: Devices) -> None:
    mesh = one_phone.mesh
    phone = one_phone.phones[0]
    steps = spanned(tap("first", (10, 10)), atomic("hold", "test.gate"))
    async with one_phone.executor():
        run_id = await mesh.start(android(*steps))
        await asyncio.wait_for(mesh.probe.started.wait(), WAIT_S)
        leased = await one_phone.device(phone)
        assert leased.state == D.DEVICE_STATE_LEASED
        # Leaving the block drains; the gate never opens, so after the grace
        # period the run is cut off mid-step.
    assert not_leased(await one_phone.device(phone))
    assert (await mesh.get(run_id)).state == R.WORKFLOW_RUN_STATE_RUNNING


async def test_two_runs_for_one_phone_never_overlap(one_phone: Devices) -> None:
    mesh = one_phone.mesh
    phone = one_phone.phones[0]

    def definition(marker: int) -> W.WorkflowDefinition:
        return android(
            *spanned(
                tap("start", (marker, 1)),
                atomic("work", "core.sleep", {"seconds": 0.3}),
                tap("end", (marker, 2)),
            )
        )

    async with one_phone.executor(max_concurrent_runs=4):
        runs = [await mesh.start(definition(marker)) for marker in (100, 200)]
        ended = [await mesh.wait_run(run_id) for run_id in runs]
    assert [r.state for r in ended] == [R.WORKFLOW_RUN_STATE_SUCCEEDED] * 2
    seen = taps(phone)
    assert len(seen) == 4
    assert seen[0][0] == seen[1][0] and seen[2][0] == seen[3][0] != seen[0][0], seen
    assert [t[1] for t in seen] == [1, 2, 1, 2]


async def test_no_matching_device_or_none_free_in_time(one_phone: Devices) -> None:
    mesh = one_phone.mesh
    mesh.probe.gate.clear()
    nokia = android(*spanned(tap("t", (1, 1)), model="Nokia 3310"))
    holder = android(*spanned(atomic("hold", "test.gate")))
    waiter = android(*spanned(tap("t", (1, 1))))
    async with one_phone.executor(device_wait_s=0.5, max_concurrent_runs=4):
        nokia_id = await mesh.start(nokia)
        refused = await mesh.wait_run(nokia_id)
        holder_id = await mesh.start(holder)
        await asyncio.wait_for(mesh.probe.started.wait(), WAIT_S)
        waiter_id = await mesh.start(waiter)
        starved = await mesh.wait_run(waiter_id)
        mesh.probe.gate.set()
        held = await mesh.wait_run(holder_id)
    assert refused.state == R.WORKFLOW_RUN_STATE_FAILED
    assert task(refused, "t").failure.reason == F.FAILURE_REASON_DEVICE_UNAVAILABLE
    assert "Nokia 3310" in task(refused, "t").failure.message
    assert starved.state == R.WORKFLOW_RUN_STATE_FAILED
    why = task(starved, "t").failure
    assert why.reason == F.FAILURE_REASON_DEVICE_UNAVAILABLE
    assert "within 0.5s" in why.message
    assert held.state == R.WORKFLOW_RUN_STATE_SUCCEEDED
    assert not taps(one_phone.phones[0])


async def test_a_revoked_lease_stops_the_step_with_device_lost(one_phone: Devices) -> None:
    mesh = one_phone.mesh
    phone = one_phone.phones[0]
    steps = spanned(tap("first", (10, 10)), atomic("wait", "core.sleep", {"seconds": 60}))
    async with one_phone.executor():
        run_id = await mesh.start(android(*steps))
        await one_phone.wait_device(phone, lambda d: d.state == D.DEVICE_STATE_LEASED)
        await one_phone.stub.QuarantineDevice(
            dpb.QuarantineDeviceRequest(
                request_id="q-1", serial=phone.address, reason="operator", evidence=None
            )
        )
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_FAILED
    wait = task(run, "wait")
    assert wait.failure.reason == F.FAILURE_REASON_DEVICE_LOST
    assert phone.address in wait.failure.message
    assert (await one_phone.device(phone)).state == D.DEVICE_STATE_QUARANTINED


async def test_a_faulty_device_is_reported_and_kept_out_of_service(one_phone: Devices) -> None:
    mesh = one_phone.mesh
    phone = one_phone.phones[0]
    steps = spanned(
        atomic("break", "android.shell", {"command": "simctl fault set drop"}),
        tap("lost", (10, 10)),
    )
    async with one_phone.executor():
        run_id = await mesh.start(android(*steps))
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_FAILED
    lost = task(run, "lost")
    assert lost.failure.reason == F.FAILURE_REASON_VERB_ERROR
    assert phone.address in lost.failure.message
    # Released as DEVICE_FAULT: the broker checks it and does not lease it again.
    device = await one_phone.wait_device(
        phone, lambda d: d.state in (D.DEVICE_STATE_QUARANTINED, D.DEVICE_STATE_OFFLINE)
    )
    assert not device.HasField("lease")


async def test_an_account_gets_its_bound_device(two_phones: Devices) -> None:
    mesh = two_phones.mesh
    bound = two_phones.phones[1]
    await two_phones.stub.BindAccount(
        dpb.BindAccountRequest(request_id="bind-1", serial=bound.address, account="ada")
    )
    steps = spanned(tap("t", (7, 7)), account="{{ inputs.account }}")
    async with two_phones.executor():
        run_id = await mesh.start(android(*steps), {"account": "ada"})
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure.message
    assert taps(bound) == [(7, 7)]
    assert taps(two_phones.phones[0]) == []


async def test_an_android_verb_without_a_device_fails_clearly(one_phone: Devices) -> None:
    mesh = one_phone.mesh
    async with one_phone.executor():
        run_id = await mesh.start(android(tap("lonely", (1, 1))))
        run = await mesh.wait_run(run_id)
    lonely = task(run, "lonely")
    assert lonely.failure.reason == F.FAILURE_REASON_INVALID_INPUT
    assert "android.tap needs a device" in lonely.failure.message
    assert not taps(one_phone.phones[0])


async def test_each_chunk_leases_its_own_device(two_phones: Devices) -> None:
    mesh = two_phones.mesh
    fan = W.Step(
        id="fan",
        chunked=W.ChunkedDispatch(
            generator_verb="core.range",
            chunk_verb="android.screenshot",
            max_concurrency=2,
        ),
        device=W.DeviceRequirement(pool="default"),
    )
    fan.chunked.generator_args.update({"count": 3})
    fan.chunked.chunk_args.update({"name": "chunk-{{ chunk.index }}.png"})
    async with two_phones.executor():
        run_id = await mesh.start(android(fan))
        run = await mesh.wait_run(run_id)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure.message
    chunks = (
        await mesh.stub.ListChunks(
            pb.ListChunksRequest(run_id=run_id, task_id=run.tasks[0].task_id)
        )
    ).chunks
    names = sorted(a.name for c in chunks for a in c.artifacts)
    assert names == ["chunk-0.png", "chunk-1.png", "chunk-2.png"]
    for chunk in chunks:
        (artifact,) = chunk.artifacts
        assert artifact.chunk_id == chunk.chunk_id
        got = await mesh.stub.GetArtifact(pb.GetArtifactRequest(artifact_id=artifact.artifact_id))
        assert got.content.startswith(PNG)
    for phone in two_phones.phones:
        assert not_leased(await two_phones.device(phone))
