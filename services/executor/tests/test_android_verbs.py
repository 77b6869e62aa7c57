"""The android.* verbs against simulated phones through the real adb server.

The lease here is built by hand (no broker: leasing is tested in
test_devices.py); every command goes through adbutils, the adb server and the
phone's adb protocol, and the phone's model shows what happened.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import pytest

from stepline.api.common.v1 import common_pb2
from stepline.api.device_broker.v1 import device_broker_pb2 as dpb
from stepline.executor.devices import DeviceBroker, DeviceLease
from stepline.executor.verbs import VerbContext, VerbError, VerbRegistry
from stepline.executor.verbs.android import keycode, png_size
from stepline.phone import app
from stepline.phone.apk import build_apk
from stepline.phone.server import PhoneServer
from stepline.phone.testing import PhoneFactory

F = common_pb2.FailureReason


@pytest.fixture
async def phone(phones: PhoneFactory) -> PhoneServer:
    return phones(1)[0]


@pytest.fixture
async def lease(phone: PhoneServer, adb_server: tuple[str, int]) -> AsyncIterator[DeviceLease]:
    host, port = adb_server
    # Never called: the lease is made by hand, so there is nothing to renew or release.
    async with grpc.aio.insecure_channel("127.0.0.1:9") as channel:
        broker = DeviceBroker(channel, executor_id="test", adb_timeout_s=5.0)
        record = dpb.Lease(lease_id="lease-1", serial=phone.address, token=1)
        record.expire_time.GetCurrentTime()
        device = dpb.Device(serial=phone.address, adb_server=f"{host}:{port}")
        yield DeviceLease(broker, record, device)


def context(lease: DeviceLease | None, **changes: Any) -> VerbContext:
    values: dict[str, Any] = {
        "run_id": "run-1",
        "task_id": "run-1/step",
        "step_id": "step",
        "attempt_number": 1,
        "workflow_name": "wf",
        "inputs": {},
        "outputs": {},
        "device": lease,
    }
    values.update(changes)
    return VerbContext(**values)


REGISTRY = VerbRegistry.default(plugins=[])


async def call(name: str, args: Mapping[str, Any], lease: DeviceLease | None) -> dict[str, Any]:
    verb = REGISTRY.resolve(name, allowed=["android.*"])
    return dict(await verb(context(lease), args))


async def test_taps_and_text_drive_the_app(phone: PhoneServer, lease: DeviceLease) -> None:
    model = phone.model
    await call("android.launch", {"package": "com.stepline.social"}, lease)
    assert model.foreground_package == "com.stepline.social"
    x, y = app.USERNAME_FIELD
    assert await call("android.tap", {"x": x, "y": y}, lease) == {"x": x, "y": y}
    await call("android.text", {"text": "ada lovelace"}, lease)
    x, y = app.PASSWORD_FIELD
    await call("android.tap", {"x": float(x), "y": y}, lease)  # Struct numbers are floats
    await call("android.text", {"text": "s3cret; rm -rf /sdcard"}, lease)
    with model.lock:
        assert model.app.fields["username"] == "ada lovelace"
        assert model.app.fields["password"] == "s3cret; rm -rf /sdcard"
    x, y = app.LOGIN_BUTTON
    await call("android.tap", {"x": x, "y": y}, lease)
    with model.lock:
        assert model.app.screen == "feed"
        assert "ada lovelace" in model.accounts
    await call("android.key", {"key": "back"}, lease)
    with model.lock:
        assert model.foreground_package != "com.stepline.social" or model.app.screen != "feed"
        kinds = [event.kind for event in model.input_log]
    assert kinds == ["tap", "text", "tap", "text", "tap", "keyevent"]
    assert lease.fault == ""


async def test_launch_with_activity_and_swipe(phone: PhoneServer, lease: DeviceLease) -> None:
    out = await call(
        "android.launch", {"package": "com.stepline.social", "activity": ".MainActivity"}, lease
    )
    assert out == {"package": "com.stepline.social", "activity": ".MainActivity"}
    await call("android.swipe", {"x1": 500, "y1": 1800, "x2": 500, "y2": 600}, lease)
    with phone.model.lock:
        swipe = phone.model.input_log[-1]
    assert (swipe.kind, swipe.args) == ("swipe", (500, 1800, 500, 600, 300))
    with pytest.raises(VerbError) as missing:
        await call("android.launch", {"package": "com.example.absent"}, lease)
    assert "com.example.absent" in missing.value.message


async def test_shell_exit_codes(lease: DeviceLease) -> None:
    out = await call("android.shell", {"command": "echo hello; echo oops >&2"}, lease)
    assert out == {"stdout": "hello\n", "stderr": "oops\n", "exit_code": 0}
    with pytest.raises(VerbError) as failed:
        await call("android.shell", {"command": "echo partial; exit 3"}, lease)
    assert failed.value.reason == F.FAILURE_REASON_VERB_ERROR
    assert "exited 3" in failed.value.message
    assert failed.value.details["exit_code"] == 3
    assert failed.value.details["stdout"] == "partial\n"
    unchecked = await call("android.shell", {"command": "nosuchtool", "check": False}, lease)
    assert unchecked["exit_code"] == 127
    assert "not found" in unchecked["stderr"]
    assert lease.fault == ""


async def test_push_and_pull_text_and_binary(phone: PhoneServer, lease: DeviceLease) -> None:
    pushed = await call(
        "android.push", {"path": "/sdcard/stepline/note.txt", "content": "héllo\n"}, lease
    )
    assert pushed["size"] == len("héllo\n".encode())
    with phone.model.lock:
        assert phone.model.files["/sdcard/stepline/note.txt"] == "héllo\n".encode()
    pulled = await call("android.pull", {"path": "/sdcard/stepline/note.txt"}, lease)
    assert pulled["content"] == "héllo\n"
    assert pulled["size"] == pushed["size"] and pulled["sha256"] == pushed["sha256"]
    blob = bytes(range(256))
    encoded = base64.b64encode(blob).decode()
    await call("android.push", {"path": "/sdcard/blob.bin", "content_base64": encoded}, lease)
    pulled = await call("android.pull", {"path": "/sdcard/blob.bin"}, lease)
    assert pulled["content_base64"] == encoded and "content" not in pulled
    with pytest.raises(VerbError) as missing:
        await call("android.pull", {"path": "/sdcard/nothing.txt"}, lease)
    assert "no such file" in missing.value.message
    assert lease.fault == ""  # a missing file is not a device fault


async def test_install_builds_or_takes_an_apk(phone: PhoneServer, lease: DeviceLease) -> None:
    out = await call("android.install", {"package": "com.example.notes", "version": "2.1"}, lease)
    assert out["package"] == "com.example.notes"
    with phone.model.lock:
        assert phone.model.packages["com.example.notes"].version == "2.1"
    apk = base64.b64encode(build_apk("com.example.maps", "7")).decode()
    await call("android.push", {"path": "/data/local/tmp/maps.apk", "content_base64": apk}, lease)
    await call("android.install", {"apk_path": "/data/local/tmp/maps.apk"}, lease)
    with phone.model.lock:
        assert phone.model.packages["com.example.maps"].version == "7"
    await call("android.push", {"path": "/data/local/tmp/bad.apk", "content": "no"}, lease)
    with pytest.raises(VerbError) as refused:
        await call("android.install", {"apk_path": "/data/local/tmp/bad.apk"}, lease)
    assert "bad.apk" in refused.value.message


async def test_screenshot_needs_an_artifact_store(lease: DeviceLease) -> None:
    # Run by the executor a step gets its store; a bare context has none.
    with pytest.raises(VerbError) as refused:
        await call("android.screenshot", {}, lease)
    assert "artifacts" in refused.value.message


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("android.tap", {"x": -1, "y": 3}, "args.x must be >= 0"),
        ("android.tap", {"x": 1.5, "y": 3}, "args.x must be an integer"),
        ("android.tap", {"x": 1}, "args.y is required"),
        ("android.text", {"text": ""}, "args.text must not be empty"),
        ("android.key", {"key": "no such key!"}, "is not a key name"),
        ("android.launch", {"package": "notapackage"}, "args.package must be a package name"),
        ("android.launch", {"package": "a.b", "activity": "x y"}, "args.activity must be"),
        ("android.push", {"path": "relative.txt", "content": "x"}, "absolute path"),
        (
            "android.push",
            {"path": "/sdcard/a", "content": "x", "content_base64": "eA=="},
            "exactly one",
        ),
        ("android.push", {"path": "/sdcard/a", "content_base64": "%%%"}, "not valid base64"),
        ("android.screenshot", {"name": "../x.png"}, "args.name must be"),
        ("android.shell", {"command": "true", "bogus": 1}, "unknown args bogus"),
    ],
)
async def test_bad_args_are_invalid_input(
    lease: DeviceLease, name: str, args: dict[str, Any], expected: str
) -> None:
    with pytest.raises(VerbError) as refused:
        await call(name, args, lease)
    assert refused.value.reason == F.FAILURE_REASON_INVALID_INPUT
    assert expected in refused.value.message


async def test_verbs_without_a_device_say_how_to_get_one() -> None:
    for name in REGISTRY.names():
        if not name.startswith("android."):
            continue
        with pytest.raises(VerbError) as refused:
            verb = REGISTRY.resolve(name, allowed=[name])
            await verb(context(None), _minimal_args(name))
        assert refused.value.reason == F.FAILURE_REASON_INVALID_INPUT
        assert "needs a device" in refused.value.message and "device" in refused.value.message


def _minimal_args(name: str) -> dict[str, Any]:
    args: dict[str, dict[str, Any]] = {
        "android.shell": {"command": "true"},
        "android.launch": {"package": "a.b"},
        "android.tap": {"x": 1, "y": 1},
        "android.swipe": {"x1": 1, "y1": 1, "x2": 2, "y2": 2},
        "android.text": {"text": "x"},
        "android.key": {"key": "HOME"},
        "android.screenshot": {},
        "android.push": {"path": "/sdcard/x", "content": "x"},
        "android.pull": {"path": "/sdcard/x"},
        "android.install": {"package": "a.b", "version": "1"},
    }
    return args[name]


async def test_a_dropped_device_is_a_fault(phone: PhoneServer, lease: DeviceLease) -> None:
    await call("android.shell", {"command": "simctl fault set drop"}, lease)
    with pytest.raises(VerbError) as failed:
        await call("android.tap", {"x": 1, "y": 1}, lease)
    assert phone.address in failed.value.message
    assert lease.fault
    assert not lease.usable


async def test_a_hanging_device_times_out_as_a_fault(
    phone: PhoneServer, lease: DeviceLease
) -> None:
    await call("android.shell", {"command": "simctl fault set hang"}, lease)
    lease.adb_timeout_s = 0.5
    with pytest.raises(VerbError) as failed:
        await call("android.tap", {"x": 1, "y": 1}, lease)
    assert f"device {phone.address} stopped answering" in failed.value.message
    assert lease.fault and not lease.usable
    with phone.model.lock:
        phone.model.faults.clear()


def test_keycodes_and_png_sizes() -> None:
    assert keycode("home") == "3" and keycode("KEYCODE_BACK") == "4" and keycode(66.0) == "66"
    assert keycode("media_play") == "KEYCODE_MEDIA_PLAY" and keycode("24") == "24"
    header = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (1080).to_bytes(4, "big")
    assert png_size(header + (2400).to_bytes(4, "big") + b"\x08\x06\x00\x00\x00" + b"crc.") == (
        1080,
        2400,
    )
    with pytest.raises(ValueError):
        png_size(b"GIF89a" + b"\x00" * 40)
