"""pytest fixtures for tests against the real adb server and simulated phones (a plugin).

* ``adb_server`` (session): ``(host, port)`` of the adb server shipped by adbutils,
  started in a temporary home for the session (or the one named by
  ``STEPLINE_TEST_ADB_SERVER=host:port``).
* ``adb_client``: an adbutils client of that server (never starts a server itself).
* ``phones``: a factory ``phones(n=1, **model_kw) -> list[PhoneServer]`` that starts
  ``n`` simulated phones, ``adb connect``s each and waits until the adb server lists
  it as ``device``; at teardown it disconnects and stops them. ``model_kw`` are
  ``PhoneModel`` fields (``serial_name`` gets ``-<i>`` appended when ``n > 1``).
  A phone's adb serial is its ``address``.

Enable with ``pytest_plugins = ["stepline.phone.testing"]`` in a conftest.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import adbutils
import pytest

from stepline.common import adb, embedded
from stepline.common.config import parse_address
from stepline.phone.model import PhoneModel
from stepline.phone.server import PhoneServer


class PhoneFactory(Protocol):
    def __call__(self, n: int = 1, **model_kw: Any) -> list[PhoneServer]: ...


def wait_for(check: Callable[[], bool], *, what: str, timeout_s: float = 10.0) -> None:
    """Poll ``check`` until it is true; AssertionError naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.02)


def device_state(client: adbutils.AdbClient, serial: str) -> str | None:
    """The adb server's state for ``serial`` (``device``, ``offline``, ...) or None."""
    for info in client.list():
        if info.serial == serial:
            state: str = info.state
            return state
    return None


def connect_phone(client: adbutils.AdbClient, address: str, *, timeout_s: float = 15.0) -> None:
    """``adb connect address`` and wait until the adb server lists it as ``device``."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = client.connect(address, timeout=timeout_s)
        if "connected to" in reply:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"adb connect {address} failed: {reply}")
        time.sleep(0.1)
    wait_for(
        lambda: device_state(client, address) == "device",
        what=f"{address} to be listed as device",
        timeout_s=max(1.0, deadline - time.monotonic()),
    )


@pytest.fixture(scope="session")
def adb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """``(host, port)`` of the session's adb server."""
    given = os.environ.get("STEPLINE_TEST_ADB_SERVER")
    if given:
        yield parse_address(given, name="STEPLINE_TEST_ADB_SERVER")
        return
    root = tmp_path_factory.mktemp("adb")
    port = embedded.free_port()
    record = embedded.start_adb(root / "home", port=port, log_path=root / "adb.log")
    try:
        yield ("127.0.0.1", port)
    finally:
        embedded.stop(record)


@pytest.fixture
def adb_client(adb_server: tuple[str, int]) -> adbutils.AdbClient:
    host, port = adb_server
    return adb.client(host, port, timeout_s=30.0)


@pytest.fixture
def phones(adb_server: tuple[str, int]) -> Iterator[PhoneFactory]:
    """Start simulated phones connected to ``adb_server``; stopped after the test."""
    client = adb.client(*adb_server, timeout_s=30.0)
    started: list[PhoneServer] = []

    def factory(n: int = 1, **model_kw: Any) -> list[PhoneServer]:
        batch: list[PhoneServer] = []
        for index in range(n):
            kw = dict(model_kw)
            if n > 1 and "serial_name" in kw:
                kw["serial_name"] = f"{kw['serial_name']}-{index}"
            phone = PhoneServer(PhoneModel(**kw)).start()
            started.append(phone)
            connect_phone(client, phone.address)
            batch.append(phone)
        return batch

    try:
        yield factory
    finally:
        for phone in started:
            with contextlib.suppress(adbutils.AdbError, OSError):
                client.disconnect(phone.address)
            phone.stop()
