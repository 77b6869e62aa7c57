"""A Stepline service as its own process: ready only when its dependencies are,
graceful on SIGTERM, and a clear exit on bad configuration."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stepline.common.client import check_health
from stepline.common.embedded import free_port, wait_until
from stepline.common.jetstream import Streams
from stepline.common.testing import Credentials


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPLINE_")}
    env.update({f"STEPLINE_{k}": v for k, v in values.items()})
    return env


def test_executor_serves_health_and_drains_on_sigterm(
    nats_url: str, streams: Streams, credentials: Credentials, tmp_path: Path
) -> None:
    port = free_port()
    env = _env(
        LISTEN=f"127.0.0.1:{port}",
        AUTH_FILE=str(credentials.auth_file),
        NATS_URL=nats_url,
        STREAM_PREFIX=streams.prefix,
        LEDGER_ADDR="127.0.0.1:1",
        DEVICE_BROKER_ADDR="127.0.0.1:1",
        APPROVALS_ADDR="127.0.0.1:1",
    )
    log_path = tmp_path / "executor.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stepline.executor"], env=env, stdout=log, stderr=log
        )
    try:
        wait_until(
            lambda: asyncio.run(check_health(f"127.0.0.1:{port}", timeout_s=1)),
            what="executor",
            timeout_s=60,
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "stop requested, draining" in text
    assert "executor stopped" in text


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({}, "STEPLINE_DATABASE_URL is required"),
        ({"DATABASE_URL": "mysql://x"}, "must be a postgresql:// URL"),
        (
            {"DATABASE_URL": "postgresql://x/y", "NATS_URL": "nats://x:1", "LISTEN": "bad"},
            "STEPLINE_LISTEN must be host:port",
        ),
    ],
)
def test_bad_configuration_exits_with_a_pointed_message(
    variables: dict[str, str], message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stepline.ledger"],
        env=_env(**variables),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr
