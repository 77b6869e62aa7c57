"""The phone's shell and commands without adb in between (PhoneServer.shell)."""

from __future__ import annotations

import json

import pytest

from stepline.phone.apk import ApkError, build_apk, read_apk
from stepline.phone.commands import COMMANDS
from stepline.phone.model import PhoneModel
from stepline.phone.protocol import A_OPEN, Message
from stepline.phone.shell import Shell, parse, tokenize


def run(script: str, model: PhoneModel | None = None) -> tuple[int, str, str]:
    result = Shell(model or PhoneModel(), COMMANDS).run(script)
    return result.status, result.stdout.decode(), result.stderr.decode()


def test_message_header_round_trip() -> None:
    encoded = Message(A_OPEN, 7, 0, b"shell:ls\0").encode()
    assert len(encoded) == 24 + 9
    assert encoded[:4] == b"OPEN"
    assert int.from_bytes(encoded[20:24], "little") == A_OPEN ^ 0xFFFFFFFF


def test_quoting_variables_and_status() -> None:
    assert run("echo 'a  b' \"c $?\" d\\ e") == (0, "a  b c 0 d e\n", "")
    assert run("false; echo X4EXIT:$?") == (0, "X4EXIT:1\n", "")
    assert run("false && echo no || echo yes") == (0, "yes\n", "")
    assert run("NAME=ada; echo hi $NAME ${NAME}x") == (0, "hi ada adax\n", "")
    assert run("echo $EXTERNAL_STORAGE")[1] == "/sdcard\n"
    assert run("exit 7; echo never") == (7, "", "")


def test_pipes_redirections_and_globs() -> None:
    model = PhoneModel()
    assert run("echo one > /sdcard/a.txt; echo two >> /sdcard/a.txt", model)[0] == 0
    assert model.files["/sdcard/a.txt"] == b"one\ntwo\n"
    assert run("cat /sdcard/a.txt | grep tw", model) == (0, "two\n", "")
    assert run("cat /nope 2>/dev/null; echo $?", model) == (0, "1\n", "")
    assert run("cat /nope 2>&1", model)[1] == "cat: /nope: No such file or directory\n"
    assert (
        run("touch /sdcard/b.txt; ls /sdcard/*.txt", model)[1] == "/sdcard/a.txt\n/sdcard/b.txt\n"
    )
    assert run("echo x > /system/x", model)[2].endswith("Permission denied\n")


def test_syntax_errors_are_reported() -> None:
    status, _, err = run("echo 'unterminated")
    assert status == 2
    assert "unterminated" in err
    assert run("&& echo")[0] == 2
    assert [type(t).__name__ for t in tokenize("a 2>&1 | b")] == [
        "Word",
        "Op",
        "Word",
        "Op",
        "Word",
    ]
    assert len(parse("a; b && c | d")) == 3


def test_files_dirs_and_rm() -> None:
    model = PhoneModel()
    assert run("mkdir /sdcard/a/b", model)[0] == 1
    assert run("mkdir -p /sdcard/a/b && touch /sdcard/a/b/f && ls /sdcard/a/b", model)[1] == "f\n"
    assert run("rm /sdcard/a", model)[2] == "rm: /sdcard/a: Is a directory\n"
    assert run("rm -r /sdcard/a && ls /sdcard/a", model)[0] == 1
    assert "/sdcard/a/b" not in model.dirs
    assert run("rm -f /sdcard/missing", model)[0] == 0
    assert run("rm -rf /sdcard", model)[0] == 1


def test_packages_and_apk_format() -> None:
    model = PhoneModel()
    model.write_file("/data/local/tmp/x.apk", build_apk("com.example.x", "3"))
    assert run("pm install /data/local/tmp/x.apk", model)[1].endswith("Success\n")
    assert run("pm install /data/local/tmp/x.apk", model)[0] == 1  # no -r: already exists
    assert run("pm install -r /data/local/tmp/x.apk", model)[0] == 0
    assert "package:com.example.x\n" in run("pm list packages -3", model)[1]
    assert run("pm list packages -s", model)[1].count("com.example") == 0
    assert run("pm uninstall com.example.x", model) == (0, "Success\n", "")
    assert run("pm uninstall com.example.x", model)[0] == 1
    assert read_apk(build_apk("com.a.b")).package == "com.a.b"
    with pytest.raises(ApkError):
        read_apk(b"not a zip")
    with pytest.raises(ValueError):
        build_apk("no-dots")


def test_input_keyevent_names_and_errors() -> None:
    model = PhoneModel()
    assert run("input keyevent KEYCODE_HOME BACK 66", model)[0] == 0
    assert [e.args for e in model.input_log] == [(3,), (4,), (66,)]
    assert run("input keyevent KEYCODE_WHAT", model)[0] == 1
    assert run("input tap 1", model)[0] == 1
    assert run("input text hello%sworld", model)[0] == 0
    assert model.input_log[-1].args == ("hello world",)


def test_simctl_state_is_the_model_as_json() -> None:
    model = PhoneModel(serial_name="s1")
    state = json.loads(run("simctl state", model)[1])
    assert state == json.loads(json.dumps(model.to_json()))
    assert state["serial_name"] == "s1"
    assert "com.stepline.social" in state["packages"]
