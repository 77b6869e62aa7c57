"""``python -m stepline.phone``: a phone process the adb server can connect to."""

from __future__ import annotations

import signal
import subprocess
import sys

import adbutils

from stepline.phone.__main__ import main
from stepline.phone.testing import connect_phone


def test_phone_process_serves_adb_until_sigterm(adb_client: adbutils.AdbClient) -> None:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "stepline.phone", "--port", "0"),
            *("--model", "Pixel 6", "--serial-name", "proc-phone"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on 127.0.0.1:"), line
        address = line.removeprefix("listening on ")
        connect_phone(adb_client, address)
        device = adb_client.device(address)
        assert device.prop.model == "Pixel 6"
        assert device.getprop("ro.serialno") == "proc-phone"
        adb_client.disconnect(address)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_main_rejects_a_bad_port() -> None:
    assert main(["--port", "70000"]) == 2
