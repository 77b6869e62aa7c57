"""The ``android.*`` verbs: drive the step's leased device through adb.

Each verb needs the device of its step (``VerbContext.device``, a
:class:`~stepline.executor.devices.DeviceLease`): a step gets one by declaring
``device`` or by lying in another step's device span. Every adb call runs in a
thread with the executor's adb timeout (``STEPLINE_EXECUTOR_ADB_TIMEOUT_S``);
an adb transport error fails the step and marks the device faulty, so the
broker checks it before leasing it again.

Shell commands are built from the args with POSIX quoting, so an argument is
never interpreted by the device's shell.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import posixpath
import re
import shlex
import struct
from collections.abc import Mapping
from typing import Any

# as a module: stepline.executor.devices imports this package (a cycle)
import stepline.executor.devices as devices
from stepline.api.common.v1 import common_pb2
from stepline.executor.verbs.arguments import Args, invalid, shown
from stepline.executor.verbs.base import VerbContext, VerbError

F = common_pb2.FailureReason
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: largest file android.push sends or android.pull returns in a step's output
MAX_FILE_BYTES = 1024 * 1024
#: where android.install stages an APK it builds
STAGING_DIR = "/data/local/tmp"
_PACKAGE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)+$")
_ACTIVITY = re.compile(r"^\.?[A-Za-z][A-Za-z0-9_$]*(\.[A-Za-z][A-Za-z0-9_$]*)*$")
_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_KEY_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
#: key names android.key accepts without the KEYCODE_ prefix, with their codes
KEYCODES = {
    "HOME": 3,
    "BACK": 4,
    "CALL": 5,
    "ENDCALL": 6,
    "DPAD_UP": 19,
    "DPAD_DOWN": 20,
    "DPAD_LEFT": 21,
    "DPAD_RIGHT": 22,
    "VOLUME_UP": 24,
    "VOLUME_DOWN": 25,
    "POWER": 26,
    "CAMERA": 27,
    "TAB": 61,
    "SPACE": 62,
    "ENTER": 66,
    "DEL": 67,
    "MENU": 82,
    "SEARCH": 84,
    "ESCAPE": 111,
    "APP_SWITCH": 187,
    "WAKEUP": 224,
}


def device_of(ctx: VerbContext, verb: str) -> devices.DeviceLease:
    """The step's device, or a VerbError saying how to get one."""
    lease = ctx.device
    if lease is None:
        raise VerbError(
            f"{verb} needs a device, but step {ctx.step_id!r} has none: declare `device` on "
            "the step, or put it in a device span (`span_until_step_id` of an earlier step)",
            reason=F.FAILURE_REASON_INVALID_INPUT,
        )
    if not isinstance(lease, devices.DeviceLease):
        raise VerbError(f"{verb}: the step's device is not a leased device")
    return lease


def command(*words: object) -> str:
    return " ".join(shlex.quote(str(word)) for word in words)


async def run_shell(lease: devices.DeviceLease, script: str) -> tuple[int, str, str]:
    """``(exit_code, stdout, stderr)`` of a shell command on the device."""
    timeout = lease.adb_timeout_s

    def go() -> tuple[int, str, str]:
        result = lease.adb().shell2(script, timeout=timeout, v2=True)
        return int(result.returncode), str(result.stdout), str(result.stderr)

    return await lease.call(go)


async def checked(lease: devices.DeviceLease, verb: str, *words: object) -> str:
    """Run a command; a non-zero exit (or an error line) fails the step."""
    script = command(*words)
    code, stdout, stderr = await run_shell(lease, script)
    said = (stderr or stdout).strip()
    if code != 0 or said.startswith("Error") or "Exception" in said:
        raise VerbError(
            f"{verb}: `{script}` failed on {lease.serial} (exit {code}): {said[:500]}",
            details={"exit_code": code, "stdout": stdout[-2000:], "stderr": stderr[-2000:]},
        )
    return stdout


def _coordinate(parsed: Args, name: str) -> int:
    return parsed.integer(name, minimum=0)


async def shell(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
    """Runs ``args.command`` in the device's shell: ``{stdout, stderr, exit_code}``.
    A non-zero exit fails the step unless ``args.check`` is false."""
    parsed = Args("android.shell", args, known=("command", "check"))
    script = parsed.text("command")
    check = parsed.boolean("check", True)
    if not script.strip():
        raise invalid("android.shell", "args.command must not be empty")
    lease = device_of(ctx, "android.shell")
    code, stdout, stderr = await run_shell(lease, script)
    output = {"stdout": stdout, "stderr": stderr, "exit_code": code}
    if code != 0 and check:
        said = (stderr or stdout).strip()[:500]
        raise VerbError(
            f"android.shell: `{script}` exited {code} on {lease.serial}"
            + (f": {said}" if said else "")
            + " (set args.check to false to accept a non-zero exit)",
            details=output,
        )
    return output


async def launch(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
    """Starts ``args.package`` (its launcher activity, or ``args.activity``)."""
    parsed = Args("android.launch", args, known=("package", "activity"))
    package = _package(parsed, "android.launch")
    activity = parsed.text("activity", "")
    if activity and not _ACTIVITY.match(activity):
        raise invalid(
            "android.launch",
            f"args.activity must be a class name such as .MainActivity, got {shown(activity)}",
        )
    lease = device_of(ctx, "android.launch")
    if activity:
        await checked(lease, "android.launch", "am", "start", "-n", f"{package}/{activity}")
    else:
        await checked(
            lease,
            "android.launch",
            "monkey",
            "-p",
            package,
            "-c",
            "android.intent.category.LAUNCHER",
            "1",
        )
    return {"package": package, "activity": activity}


async def tap(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
    """Taps the screen at (``args.x``, ``args.y``) pixels."""
    parsed = Args("android.tap", args, known=("x", "y"))
    x, y = _coordinate(parsed, "x"), _coordinate(parsed, "y")
    lease = device_of(ctx, "android.tap")
    await checked(lease, "android.tap", "input", "tap", x, y)
    return {"x": x, "y": y}


async def swipe(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
    """Swipes from (x1, y1) to (x2, y2) in ``args.duration_ms`` (default 300)."""
    parsed = Args("android.swipe", args, known=("x1", "y1", "x2", "y2", "duration_ms"))
    points = [_coordinate(parsed, name) for name in ("x1", "y1", "x2", "y2")]
    duration_ms = parsed.integer("duration_ms", 300, minimum=0)
    lease = device_of(ctx, "android.swipe")
    await checked(lease, "android.swipe", "input", "swipe", *points, duration_ms)
    return dict(zip(("x1", "y1", "x2", "y2"), points, strict=True)) | {"duration_ms": duration_ms}


def _input_text(text: str) -> str:
    """``input text`` takes one word: spaces are written ``%s``, as a phone's
    ``input`` tool reads them (so a literal ``%s`` in the text types a space)."""
    return text.replace(" ", "%s")


async def text(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
    """Types ``args.text`` into the focused field."""
    parsed = Args("android.text", args, known=("text",))
    value = parsed.text("text")
    if not value:
        raise invalid("android.text", "args.text must not be empty")
    if any(ch in value for ch in "\n\r\t"):
        raise invalid(
            "android.text",
            "args.text must be one line without tabs (send android.key ENTER or TAB between)",
        )
    lease = device_of(ctx, "android.text")
    await checked(lease, "android.text", "input", "text", _input_text(value))
    return {"length": len(value)}


def keycode(value: Any) -> str:
    """``args.key`` as ``input keyevent`` takes it: a code, or KEYCODE_<NAME>."""
    if isinstance(value, bool):
        raise invalid("android.key", f"args.key must be a key name or code, got {shown(value)}")
    if isinstance(value, int | float):
        if not float(value).is_integer() or value < 0:
            raise invalid("android.key", f"args.key must be a key code >= 0, got {shown(value)}")
        return str(int(value))
    if not isinstance(value, str) or not value.strip():
        raise invalid("android.key", f"args.key must be a key name or code, got {shown(value)}")
    name = value.strip().upper()
    if name.isdigit():
        return name
    name = name.removeprefix("KEYCODE_")
    if name in KEYCODES:
        return str(KEYCODES[name])
    if not _KEY_NAME.match(name):
        raise invalid(
            "android.key",
            f"args.key {shown(value)} is not a key name (e.g. HOME, BACK, ENTER, "
            "KEYCODE_MEDIA_PLAY) or code",
        )
    return f"KEYCODE_{name}"


async def key(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
    """Presses a key: ``args.key`` is a name (HOME, back, KEYCODE_ENTER) or a code."""
    parsed = Args("android.key", args, known=("key",))
    code = keycode(parsed.raw("key") if parsed.present("key") else parsed.text("key"))
    lease = device_of(ctx, "android.key")
    await checked(lease, "android.key", "input", "keyevent", code)
    return {"key": code}


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG; ValueError if ``data`` is not one."""
    if not data.startswith(PNG_SIGNATURE) or len(data) < 33 or data[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    width, height = struct.unpack(">II", data[16:24])
    if not width or not height:
        raise ValueError("a PNG image without pixels")
    return int(width), int(height)


def artifacts_of(ctx: VerbContext, verb: str) -> devices.Artifacts:
    store = ctx.extras.get(devices.ARTIFACTS)
    if not isinstance(store, devices.Artifacts):
        raise VerbError(
            f"{verb}: this step cannot store artifacts here", reason=F.FAILURE_REASON_INTERNAL
        )
    return store


async def screenshot(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
    """Takes a screenshot (``screencap -p``) and stores it as an artifact of the
    attempt named ``args.name`` (default ``<step id>.png``)."""
    parsed = Args("android.screenshot", args, known=("name",))
    name = parsed.text("name", f"{ctx.step_id}.png")
    if not _ARTIFACT_NAME.match(name):
        raise invalid(
            "android.screenshot",
            f"args.name must be 1-100 letters, digits, '.', '-' or '_', got {shown(name)}",
        )
    lease = device_of(ctx, "android.screenshot")
    store = artifacts_of(ctx, "android.screenshot")
    timeout = lease.adb_timeout_s

    def capture() -> tuple[int, bytes, bytes]:
        result = lease.adb().shell2("screencap -p", timeout=timeout, encoding=None, v2=True)
        return int(result.returncode), bytes(result.stdout), bytes(result.stderr)

    code, data, err = await lease.call(capture)
    try:
        width, height = png_size(data)
    except ValueError as exc:
        said = err.decode(errors="replace").strip()[:300]
        raise VerbError(
            f"android.screenshot: screencap on {lease.serial} gave no image ({exc}; exit {code}"
            + (f": {said}" if said else "")
            + ")"
        ) from None
    artifact = await store.put(name, "image/png", data)
    return {
        "artifact_id": artifact.artifact_id,
        "name": name,
        "sha256": artifact.sha256 or hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "width": width,
        "height": height,
    }


def _device_path(parsed: Args, verb: str) -> str:
    path = parsed.text("path")
    if not path.startswith("/") or "\0" in path:
        raise invalid(verb, f"args.path must be an absolute path on the device, got {shown(path)}")
    return posixpath.normpath(path)


async def push(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
    """Writes ``args.content`` (text) or ``args.content_base64`` to ``args.path``."""
    parsed = Args("android.push", args, known=("path", "content", "content_base64", "mode"))
    path = _device_path(parsed, "android.push")
    if parsed.present("content") == parsed.present("content_base64"):
        raise invalid("android.push", "give exactly one of args.content and args.content_base64")
    if parsed.present("content"):
        data = parsed.text("content").encode()
    else:
        try:
            data = base64.b64decode(parsed.text("content_base64"), validate=True)
        except (binascii.Error, ValueError):
            raise invalid("android.push", "args.content_base64 is not valid base64") from None
    if len(data) > MAX_FILE_BYTES:
        raise invalid(
            "android.push", f"the content is {len(data)} bytes; at most {MAX_FILE_BYTES} allowed"
        )
    mode = parsed.integer("mode", 0o644, minimum=0)
    lease = device_of(ctx, "android.push")

    def send() -> int:
        device = lease.adb()
        if device.sync.stat(path).mode & 0o040000:
            raise VerbError(f"android.push: {path} is a directory on {lease.serial}")
        return int(device.sync.push(data, path, mode=mode, check=True))

    size = await lease.call(send)
    return {"path": path, "size": size, "sha256": hashlib.sha256(data).hexdigest()}


async def pull(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
    """Reads ``args.path``: ``{content}`` for UTF-8 text, else ``{content_base64}``,
    with ``size`` and ``sha256``."""
    parsed = Args("android.pull", args, known=("path",))
    path = _device_path(parsed, "android.pull")
    lease = device_of(ctx, "android.pull")

    def receive() -> bytes:
        device = lease.adb()
        info = device.sync.stat(path)
        if not info.mode & 0o100000:
            what = "a directory" if info.mode & 0o040000 else "no such file"
            raise VerbError(f"android.pull: {path} on {lease.serial}: {what}")
        if info.size > MAX_FILE_BYTES:
            raise VerbError(
                f"android.pull: {path} is {info.size} bytes; a step output holds at most "
                f"{MAX_FILE_BYTES}"
            )
        return bytes(device.sync.read_bytes(path))

    data = await lease.call(receive)
    result: dict[str, Any] = {"path": path, "size": len(data)}
    result["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        result["content"] = data.decode("utf-8")
    except UnicodeDecodeError:
        result["content_base64"] = base64.b64encode(data).decode()
    return result


def _package(parsed: Args, verb: str) -> str:
    package = parsed.text("package")
    if not _PACKAGE.match(package):
        raise invalid(
            verb,
            f"args.package must be a package name such as com.example.app, got {shown(package)}",
        )
    return package


async def install(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
    """Installs an APK: ``args.apk_path`` already on the device (e.g. pushed), or
    ``args.package`` at ``args.version`` built for the simulated phone."""
    parsed = Args("android.install", args, known=("apk_path", "package", "version"))
    lease = device_of(ctx, "android.install")
    if parsed.present("apk_path"):
        if parsed.present("package") or parsed.present("version"):
            raise invalid("android.install", "give args.apk_path, or args.package and args.version")
        apk_path = _device_path(
            Args("android.install", {"path": parsed.text("apk_path")}, known=("path",)),
            "android.install",
        )
        package = ""
        version = ""
    else:
        package = _package(parsed, "android.install")
        version = parsed.text("version")
        apk = _build_apk(package, version)
        apk_path = f"{STAGING_DIR}/stepline-{package}-{ctx.attempt_number}.apk"

        def stage() -> None:
            lease.adb().sync.push(apk, apk_path, mode=0o644, check=True)

        await lease.call(stage)
    out = await checked(lease, "android.install", "pm", "install", "-r", "-t", apk_path)
    if "Success" not in out:
        raise VerbError(
            f"android.install: pm install {apk_path} on {lease.serial}: {out.strip()[:500]}"
        )
    return {"apk_path": apk_path, "package": package, "version": version}


def _build_apk(package: str, version: str) -> bytes:
    try:
        from stepline.phone.apk import build_apk
    except ImportError:
        raise VerbError(
            "android.install: building an APK for args.package needs the stepline-phone "
            "package (simulated phones); give args.apk_path of an APK on the device instead",
            reason=F.FAILURE_REASON_INVALID_INPUT,
        ) from None
    return bytes(build_apk(package, version))
