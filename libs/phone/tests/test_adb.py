"""The simulated phone driven through the real adb server, by adbutils and the adb CLI."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
from pathlib import Path

import adbutils
import pytest
from PIL import Image

from stepline.common import embedded
from stepline.phone import app
from stepline.phone.apk import build_apk
from stepline.phone.model import LAUNCHER_PACKAGE, SOCIAL_ACTIVITY, SOCIAL_PACKAGE
from stepline.phone.server import PhoneServer
from stepline.phone.testing import PhoneFactory, device_state, wait_for

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _device(client: adbutils.AdbClient, phone: PhoneServer) -> adbutils.AdbDevice:
    return client.device(phone.address)


def test_listed_as_device_with_the_banner_properties(
    phones: PhoneFactory, adb_client: adbutils.AdbClient
) -> None:
    phone = phones(1, model="Pixel 8", product="sim_product", device="sim_device")[0]
    [info] = [d for d in adb_client.list(extended=True) if d.serial == phone.address]
    assert info.state == "device"
    assert info.tags["model"] == "Pixel_8"  # the adb server writes spaces as underscores
    assert info.tags["product"] == "sim_product"
    assert info.tags["device"] == "sim_device"
    features = _device(adb_client, phone).get_features().split(",")
    assert {"shell_v2", "stat_v2", "ls_v2", "sendrecv_v2"} <= set(features)


def test_two_phones_are_separate(phones: PhoneFactory, adb_client: adbutils.AdbClient) -> None:
    first, second = phones(2, serial_name="pair")
    assert (first.model.serial_name, second.model.serial_name) == ("pair-0", "pair-1")
    _device(adb_client, first).shell("touch /sdcard/only-on-first")
    assert first.model.is_file("/sdcard/only-on-first")
    assert not second.model.is_file("/sdcard/only-on-first")
    assert _device(adb_client, second).getprop("ro.serialno") == "pair-1"


def test_shell_output_and_exit_status(phones: PhoneFactory, adb_client: adbutils.AdbClient) -> None:
    d = _device(adb_client, phones(1)[0])
    v2 = d.shell2("echo out; echo err >&2; exit 3", v2=True)
    assert (v2.returncode, v2.stdout, v2.stderr) == (3, "out\n", "err\n")
    v1 = d.shell2("echo hello && false")  # v1: adbutils reads the status through `echo $?`
    assert (v1.returncode, v1.output) == (1, "hello\n")
    missing = d.shell2("frobnicate now", v2=True)
    assert missing.returncode == 127
    assert missing.stderr == "/system/bin/sh: frobnicate: not found\n"
    assert d.shell(["echo", "a b;c"]) == "a b;c"
    assert d.shell("echo one > /sdcard/f.txt; echo two >> /sdcard/f.txt; cat /sdcard/f.txt") == (
        "one\ntwo"
    )


def test_getprop(phones: PhoneFactory, adb_client: adbutils.AdbClient) -> None:
    phone = phones(1, model="Pixel 9", serial_name="sim-42")[0]
    d = _device(adb_client, phone)
    assert d.prop.model == "Pixel 9"
    assert d.prop.name == "stepline_sim"
    assert d.getprop("ro.serialno") == "sim-42"
    assert d.getprop("sys.boot_completed") == "1"
    assert "[ro.product.model]: [Pixel 9]" in d.shell("getprop")


def test_install_list_and_uninstall(
    phones: PhoneFactory, adb_client: adbutils.AdbClient, tmp_path: Path
) -> None:
    phone = phones(1)[0]
    d = _device(adb_client, phone)
    apk = tmp_path / "notes.apk"
    apk.write_bytes(build_apk("com.example.notes", "2.1"))
    assert "com.example.notes" not in d.list_packages()

    d.install(str(apk), silent=True)

    assert "com.example.notes" in d.list_packages(["-3"])
    assert phone.model.packages["com.example.notes"].version == "2.1"
    assert phone.model.list_dir("/data/local/tmp") == []  # pushed there, removed after install
    d.app_start("com.example.notes")
    assert d.app_current().package == "com.example.notes"

    d.uninstall("com.example.notes")
    assert "com.example.notes" not in d.list_packages()
    assert phone.model.foreground_package == LAUNCHER_PACKAGE

    bogus = tmp_path / "bogus.apk"
    bogus.write_bytes(b"PK not really an apk")
    with pytest.raises(adbutils.AdbInstallError, match="INSTALL_PARSE_FAILED_NOT_APK"):
        d.install(str(bogus), silent=True)


def test_social_app_login_compose_and_clear(
    phones: PhoneFactory, adb_client: adbutils.AdbClient
) -> None:
    phone = phones(1)[0]
    d = _device(adb_client, phone)
    d.app_start(SOCIAL_PACKAGE, SOCIAL_ACTIVITY)
    assert d.app_current().package == SOCIAL_PACKAGE
    assert phone.model.app.screen == "login"

    d.click(*app.USERNAME_FIELD)
    d.send_keys("ada")
    d.click(*app.PASSWORD_FIELD)
    d.send_keys("s3cret pass")
    d.click(*app.LOGIN_BUTTON)

    assert phone.model.accounts == {"ada"}
    assert phone.model.app.screen == "feed"

    d.click(*app.COMPOSE_BUTTON)
    d.send_keys("hello from the sim")
    d.keyevent("KEYCODE_DEL")
    d.click(*app.POST_BUTTON)
    assert [(p.author, p.text) for p in phone.model.app.posts] == [("ada", "hello from the si")]
    d.swipe(540, 1800, 540, 900, 0.1)

    kinds = [event.kind for event in phone.model.input_log]
    assert kinds == ["tap", "text", "tap", "text", "tap", "tap", "text", "keyevent", "tap", "swipe"]
    assert phone.model.input_log[1].args == ("ada",)
    assert phone.model.input_log[-1].args == (540, 1800, 540, 900, 100)

    d.keyevent(app.KEYCODE_HOME)
    assert d.app_current().package == LAUNCHER_PACKAGE
    d.click(*app.SOCIAL_ICON)  # back to the app, still signed in
    assert phone.model.app.screen == "feed"

    assert d.shell("pm clear com.stepline.social") == "Success"
    assert phone.model.accounts == set()
    assert phone.model.foreground_package == LAUNCHER_PACKAGE
    d.app_start(SOCIAL_PACKAGE)  # monkey
    assert phone.model.app.screen == "login"


def test_login_needs_username_and_password(
    phones: PhoneFactory, adb_client: adbutils.AdbClient
) -> None:
    phone = phones(1)[0]
    d = _device(adb_client, phone)
    d.app_start(SOCIAL_PACKAGE, SOCIAL_ACTIVITY)
    d.click(*app.USERNAME_FIELD)
    d.send_keys("bob")
    hierarchy = d.dump_hierarchy()  # uiautomator dump: the screen's tap targets with bounds
    assert 'resource-id="com.stepline.social:id/username" text="bob"' in hierarchy
    assert 'bounds="[240,1160][840,1280]"' in hierarchy  # the login button
    d.keyevent(app.KEYCODE_ENTER)  # moves to the password field
    d.keyevent(app.KEYCODE_ENTER)  # submits with an empty password
    assert phone.model.accounts == set()
    assert phone.model.app.message == "Enter a username and a password"
    d.send_keys("pw")
    d.keyevent(app.KEYCODE_ENTER)
    assert phone.model.accounts == {"bob"}


def test_screencap_is_a_png_of_the_current_screen(
    phones: PhoneFactory, adb_client: adbutils.AdbClient
) -> None:
    d = _device(adb_client, phones(1)[0])
    raw = d.shell(["screencap", "-p"], encoding=None)
    assert raw.startswith(PNG_SIGNATURE)
    home = Image.open(io.BytesIO(raw))
    assert home.format == "PNG"
    assert home.size == (1080, 2400)

    d.app_start(SOCIAL_PACKAGE, SOCIAL_ACTIVITY)
    login = d.screenshot()
    assert login.size == (1080, 2400)
    assert login.tobytes() != home.convert("RGB").tobytes()

    d.click(*app.USERNAME_FIELD)
    d.send_keys("ada")
    typed = d.screenshot()
    assert typed.tobytes() != login.tobytes()
    # the username field's area changed, the title above it did not
    box = (140, 740, 940, 860)
    assert typed.crop(box).tobytes() != login.crop(box).tobytes()
    title = (0, 380, 1080, 520)
    assert typed.crop(title).tobytes() == login.crop(title).tobytes()


def test_sync_push_pull_stat_list(
    phones: PhoneFactory, adb_client: adbutils.AdbClient, tmp_path: Path
) -> None:
    phone = phones(1)[0]
    d = _device(adb_client, phone)
    data = os.urandom(200 * 1024 + 17)  # several 64 KiB sync chunks

    assert d.sync.push(data, "/sdcard/stepline/run-1/blob.bin") == len(data)

    info = d.sync.stat("/sdcard/stepline/run-1/blob.bin")
    assert info.size == len(data)
    assert stat.S_ISREG(info.mode)
    assert stat.S_ISDIR(d.sync.stat("/sdcard/stepline").mode)
    assert d.sync.stat("/sdcard/missing").mtime is None
    names = [entry.path for entry in d.sync.list("/sdcard/stepline/run-1")]
    assert names == [".", "..", "blob.bin"]
    local = tmp_path / "blob.bin"
    assert d.sync.pull("/sdcard/stepline/run-1/blob.bin", local) == len(data)
    assert local.read_bytes() == data
    assert phone.model.files["/sdcard/stepline/run-1/blob.bin"] == data

    with pytest.raises(adbutils.AdbError, match="No such file"):
        d.sync.read_bytes("/sdcard/nothing-here")
    with pytest.raises(adbutils.AdbError):
        d.sync.push(b"x", "/system/bin/evil")


def _adb_cli(
    adb_server: tuple[str, int], serial: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [embedded.adb_binary(), "-H", adb_server[0], "-P", str(adb_server[1]), "-s", serial, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_adb_cli_push_pull_use_the_v2_sync_requests(
    phones: PhoneFactory, adb_server: tuple[str, int], tmp_path: Path
) -> None:
    phone = phones(1)[0]
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(300 * 1024))

    pushed = _adb_cli(adb_server, phone.address, "push", str(source), "/sdcard/cli/source.bin")
    assert pushed.returncode == 0, pushed.stderr
    assert phone.model.files["/sdcard/cli/source.bin"] == source.read_bytes()

    target = tmp_path / "target.bin"
    pulled = _adb_cli(adb_server, phone.address, "pull", "/sdcard/cli/source.bin", str(target))
    assert pulled.returncode == 0, pulled.stderr
    assert target.read_bytes() == source.read_bytes()

    shell = _adb_cli(adb_server, phone.address, "shell", "ls /sdcard/cli; exit 5")
    assert (shell.returncode, shell.stdout) == (5, "source.bin\n")


def test_fault_drop_takes_the_phone_offline_until_cleared(
    phones: PhoneFactory, adb_client: adbutils.AdbClient
) -> None:
    phone = phones(1)[0]
    d = _device(adb_client, phone)

    phone.set_fault("drop")

    wait_for(lambda: device_state(adb_client, phone.address) != "device", what="phone offline")
    with pytest.raises(adbutils.AdbError):
        d.shell("echo hi", timeout=5)

    phone.clear_fault("drop")
    adb_client.connect(phone.address, timeout=10)
    wait_for(lambda: device_state(adb_client, phone.address) == "device", what="phone back")
    assert d.shell("echo back") == "back"


def test_fault_drop_set_from_the_shell(
    phones: PhoneFactory, adb_client: adbutils.AdbClient
) -> None:
    phone = phones(1)[0]
    d = _device(adb_client, phone)
    assert d.shell2("simctl fault set drop", v2=True).returncode == 0  # answered, then cut off
    assert "drop" in phone.model.faults
    wait_for(lambda: device_state(adb_client, phone.address) != "device", what="phone offline")


def test_fault_hang_accepts_but_never_answers(
    phones: PhoneFactory, adb_client: adbutils.AdbClient
) -> None:
    phone = phones(1)[0]
    d = _device(adb_client, phone)
    assert d.shell("simctl fault set hang") == ""

    with pytest.raises(adbutils.AdbTimeout):
        d.shell("echo hi", timeout=0.5)
    with pytest.raises(adbutils.AdbTimeout):
        d.shell2("getprop sys.boot_completed", timeout=0.5, v2=True)
    assert json.loads(d.shell("simctl state"))["faults"] == ["hang"]  # simctl still answers

    assert d.shell("simctl fault clear hang") == ""
    assert d.shell("echo hi", timeout=5) == "hi"


def test_fault_no_boot(phones: PhoneFactory, adb_client: adbutils.AdbClient) -> None:
    phone = phones(1)[0]
    d = _device(adb_client, phone)
    d.shell("simctl fault set no_boot")
    assert d.getprop("sys.boot_completed") == "0"
    result = d.shell2("pm list packages", v2=True)
    assert result.returncode != 0
    assert "Can't find service: package" in result.stderr
    d.shell("simctl fault clear all")
    assert d.getprop("sys.boot_completed") == "1"


def test_fault_low_battery(phones: PhoneFactory, adb_client: adbutils.AdbClient) -> None:
    phone = phones(1, battery_level=90)[0]
    d = _device(adb_client, phone)
    assert d.battery().level == 90
    phone.set_fault("low_battery")
    assert d.battery().level == 5
    assert json.loads(d.shell("simctl state"))["battery_level"] == 5


def test_fault_storage_full(phones: PhoneFactory, adb_client: adbutils.AdbClient) -> None:
    phone = phones(1)[0]
    d = _device(adb_client, phone)
    d.shell("simctl fault set storage_full")
    assert d.shell("df /data").splitlines()[1].split()[3] == "0"
    with pytest.raises(adbutils.AdbError):  # adbutils reports only "FAIL"
        d.sync.push(b"data", "/sdcard/x.bin")
    assert not phone.model.is_file("/sdcard/x.bin")


def test_fault_cleanup_fail(
    phones: PhoneFactory, adb_client: adbutils.AdbClient, tmp_path: Path
) -> None:
    phone = phones(1)[0]
    d = _device(adb_client, phone)
    apk = tmp_path / "a.apk"
    apk.write_bytes(build_apk("com.example.stuck"))
    d.install(str(apk), silent=True)
    d.sync.push(b"session", "/sdcard/stepline/s.txt")

    d.shell("simctl fault set cleanup_fail")
    assert "Failure" in d.uninstall("com.example.stuck")
    removed = d.shell2("rm -rf /sdcard/stepline", v2=True)
    assert removed.returncode == 1
    assert "Device or resource busy" in removed.stderr
    assert "com.example.stuck" in phone.model.packages
    assert phone.model.is_file("/sdcard/stepline/s.txt")

    d.shell("simctl fault clear cleanup_fail")
    assert d.uninstall("com.example.stuck") == "Success"
    assert d.shell2("rm -rf /sdcard/stepline", v2=True).returncode == 0


def test_simctl_rejects_unknown_faults(
    phones: PhoneFactory, adb_client: adbutils.AdbClient
) -> None:
    d = _device(adb_client, phones(1)[0])
    result = d.shell2("simctl fault set meteor", v2=True)
    assert result.returncode == 2
    assert "unknown fault 'meteor'" in result.stderr


def test_a_stopped_phone_restarts_on_its_port_and_keeps_its_state(
    phones: PhoneFactory, adb_client: adbutils.AdbClient
) -> None:
    phone = phones(1)[0]
    d = _device(adb_client, phone)
    d.sync.push(b"kept", "/sdcard/kept.txt")
    phone.stop()
    wait_for(lambda: device_state(adb_client, phone.address) != "device", what="phone offline")

    phone.start()

    adb_client.connect(phone.address, timeout=10)
    wait_for(lambda: device_state(adb_client, phone.address) == "device", what="phone back")
    assert d.sync.read_bytes("/sdcard/kept.txt") == b"kept"
