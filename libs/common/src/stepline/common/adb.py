"""Talking to adb servers through adbutils, safely.

adbutils starts a new adb server on the default port (5037) whenever it cannot
connect to the one it was given. Stepline never wants that: an adb server it did
not start would run unmanaged. So every connection is preceded by a plain TCP
probe, and an adb server that is not there is reported, not started.

adbutils is blocking: call these from a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import socket

import adbutils

from stepline.common.errors import Unavailable


def _reachable(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def client(host: str, port: int, *, timeout_s: float = 5.0) -> adbutils.AdbClient:
    """An adbutils client for a running adb server; Unavailable if none answers."""
    if not _reachable(host, port, timeout_s):
        raise Unavailable(f"no adb server at {host}:{port}")
    return adbutils.AdbClient(host=host, port=port, socket_timeout=timeout_s)


def server_version(host: str, port: int, *, timeout_s: float = 5.0) -> int:
    """The adb server's protocol version; Unavailable if it does not answer."""
    try:
        version: int = client(host, port, timeout_s=timeout_s).server_version()
    except (adbutils.AdbError, OSError) as exc:
        raise Unavailable(f"adb server {host}:{port} does not answer: {exc}") from exc
    return version
