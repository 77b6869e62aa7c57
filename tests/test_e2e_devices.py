"""Devices end to end through the real mesh (`stepline up` processes: the
scheduler, the ledger, the device broker, two executors, the adb server and two
simulated phones as processes; the ``mesh_state`` fixture of tests/conftest.py).

examples/social-post.yaml logs in to the phone's social app and posts over a
device span: the run succeeds, the post is in the phone's state (read with
``simctl state`` through the adb server, as an operator would), both
screenshots are PNG artifacts of their steps, and the phone is released and
cleaned afterwards. An executor killed while it holds a phone loses the lease
to the broker's TTL, and the other executor finishes the run on a phone it
leases again. That test kills an executor (and starts it again), so it is the
last of the module.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import psutil
from google.protobuf import struct_pb2

from stepline.api.common.v1 import common_pb2
from stepline.api.device_broker.v1 import device_broker_pb2 as dpb
from stepline.api.device_broker.v1 import device_broker_pb2_grpc
from stepline.api.ledger.v1 import ledger_pb2
from stepline.api.scheduler.v1 import scheduler_service_pb2 as spb
from stepline.api.scheduler.v1 import workflow_service_pb2 as wpb
from stepline.common import adb

from .conftest import WAIT_S, Connect, MeshApi, executor_record, outputs, restart_executor, task

R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState
F = common_pb2.FailureReason
D = common_pb2.DeviceState
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "social-post.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


@dataclass
class Api(MeshApi):
    broker: device_broker_pb2_grpc.DeviceBrokerServiceAsyncStub

    wait_s: ClassVar[float] = 2 * WAIT_S  # leases expire and phones are cleaned

    @classmethod
    def stubs(cls, channel: Connect) -> dict[str, Any]:
        return {"broker": device_broker_pb2_grpc.DeviceBrokerServiceStub(channel("device-broker"))}

    async def ready(self) -> None:
        await self.eventually(self.all_available, what="every phone to be available")

    async def register(self, text: str) -> None:
        await self.workflows.RegisterWorkflow(
            wpb.RegisterWorkflowRequest(
                request_id=str(uuid.uuid4()),
                source_text=wpb.WorkflowSource(format=wpb.SOURCE_FORMAT_YAML, text=text),
            )
        )

    async def start(self, name: str, inputs: dict[str, Any]) -> str:
        values = struct_pb2.Struct()
        values.update(inputs)
        response = await self.runs.StartRun(
            spb.StartRunRequest(request_id=str(uuid.uuid4()), workflow_name=name, inputs=values)
        )
        return response.run.run_id

    async def device(self, serial: str) -> dpb.Device:
        return (await self.broker.GetDevice(dpb.GetDeviceRequest(serial=serial))).device

    async def all_available(self) -> bool:
        devices = [await self.device(serial) for serial in self.state.phones]
        return all(d.state == D.DEVICE_STATE_AVAILABLE for d in devices)

    async def phone_state(self, serial: str) -> dict[str, Any]:
        """``simctl state`` of a phone, through the mesh's adb server."""
        port = self.state.record("adb").port

        def read() -> str:
            device = adb.client("127.0.0.1", port, timeout_s=10.0).device(serial)
            return str(device.shell("simctl state", timeout=10.0))

        return dict(json.loads(await asyncio.to_thread(read)))


async def test_social_post_example_posts_from_a_leased_phone(api: Api) -> None:
    await api.register(EXAMPLE.read_text(encoding="utf-8"))
    message = f"hello from stepline {uuid.uuid4().hex[:8]}"
    inputs = {"account": "ada", "password": "secret", "message": message}
    run = await api.finished(await api.start("social-post", inputs))
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure

    # The post is in exactly one phone's model: the span kept one phone.
    states = {serial: await api.phone_state(serial) for serial in api.state.phones}
    posted = {
        serial: [p for p in state["app"]["posts"] if p["text"] == message]
        for serial, state in states.items()
    }
    holders = [serial for serial, posts in posted.items() if posts]
    assert len(holders) == 1, posted
    assert [p["author"] for p in posted[holders[0]]] == ["ada"]

    # Both screenshots are PNG artifacts of their steps.
    for step_id, name in (("shot-logged-in", "logged-in.png"), ("shot-posted", "posted.png")):
        shot = task(run, step_id)
        assert [a.name for a in shot.artifacts] == [name]
        output = outputs(shot.output)
        got = await api.ledger.GetArtifact(
            ledger_pb2.GetArtifactRequest(artifact_id=output["artifact_id"])
        )
        assert got.content.startswith(PNG)
        assert got.artifact.content_type == "image/png"
        assert hashlib.sha256(got.content).hexdigest() == output["sha256"]
        assert (output["width"], output["height"]) == (1080, 2400)
    assert outputs(task(run, "type-password").output) == {"length": len("secret")}

    # Released, then cleaned by the broker (the app is signed out again).
    for serial in api.state.phones:
        assert (await api.device(serial)).state != D.DEVICE_STATE_LEASED
    await api.eventually(api.all_available, what="every phone to be available")
    assert "ada" not in (await api.phone_state(holders[0]))["accounts"]


SPAN = """
name: device-hold
description: Taps, holds the phone a while, taps again.
allowed_verbs: [android.tap, core.sleep]
steps:
  - id: first
    device: {pool: default, span_until_step_id: last}
    atomic: {verb: android.tap, args: {x: 11, y: 11}}
  - id: hold
    idempotent: true
    atomic: {verb: core.sleep, args: {seconds: 4}}
  - id: last
    atomic: {verb: android.tap, args: {x: 22, y: 22}}
"""


# --- losing the executor that holds a phone (last: it kills one) ------------------


async def test_a_killed_executor_loses_its_phone_to_the_lease_ttl(api: Api) -> None:
    await api.register(SPAN)
    run_id = await api.start("device-hold", {})

    async def holding() -> tuple[str, dpb.Device] | None:
        run = await api.get(run_id)
        attempts = task(run, "hold").attempts
        if not attempts or attempts[-1].state != T.TASK_RUN_STATE_RUNNING:
            return None
        for serial in api.state.phones:
            device = await api.device(serial)
            if device.state == D.DEVICE_STATE_LEASED and device.lease.holder.run_id == run_id:
                return attempts[-1].executor_id, device
        return None

    executor_id, leased = await api.eventually(holding, what="the run to hold a phone")
    record = executor_record(api.state, executor_id)
    env = psutil.Process(record.pid).environ()
    os.kill(record.pid, signal.SIGKILL)
    try:

        async def reclaimed() -> bool:
            device = await api.device(leased.serial)
            return bool(device.lease.lease_id != leased.lease.lease_id)

        await api.eventually(reclaimed, what="the broker to reclaim the dead executor's lease")
        run = await api.finished(run_id)
    finally:
        await restart_executor(api.state, record, env)
    assert run.state == R.WORKFLOW_RUN_STATE_SUCCEEDED, run.failure
    hold = task(run, "hold")
    assert hold.attempts[0].failure.reason == F.FAILURE_REASON_EXECUTOR_LOST
    assert hold.attempts[-1].executor_id != executor_id
    assert hold.attempts[-1].state == T.TASK_RUN_STATE_SUCCEEDED
    for serial in api.state.phones:
        assert (await api.device(serial)).state != D.DEVICE_STATE_LEASED
