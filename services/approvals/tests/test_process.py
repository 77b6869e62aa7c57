"""The service as its own process: configured from STEPLINE_* variables, serving
gRPC health and the webhook endpoint (port 0, logged), graceful on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from stepline.common.client import check_health
from stepline.common.embedded import free_port, wait_until
from stepline.common.jetstream import Streams


def test_serves_health_and_the_webhook_endpoint_and_stops_on_sigterm(
    database_url: str,
    nats_url: str,
    streams: Streams,
    auth_file: Path,
    secrets_file: Path,
    tmp_path: Path,
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPLINE_")}
    env.update(
        STEPLINE_LISTEN=f"127.0.0.1:{port}",
        STEPLINE_AUTH_FILE=str(auth_file),
        STEPLINE_DATABASE_URL=database_url,
        STEPLINE_NATS_URL=nats_url,
        STEPLINE_STREAM_PREFIX=streams.prefix,
        STEPLINE_LEDGER_ADDR="127.0.0.1:1",
        STEPLINE_APPROVALS_SECRETS_FILE=str(secrets_file),
        STEPLINE_APPROVALS_WEBHOOK_LISTEN="127.0.0.1:0",
    )
    log_path = tmp_path / "approvals.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stepline.approvals"], env=env, stdout=log, stderr=log
        )
    try:
        wait_until(
            lambda: asyncio.run(check_health(f"127.0.0.1:{port}", timeout_s=1)),
            what="approvals",
            timeout_s=60,
        )
        found = re.search(r"webhook endpoint listening on 127\.0\.0\.1:(\d+)", log_path.read_text())
        assert found, log_path.read_text()
        health = httpx.get(f"http://127.0.0.1:{found.group(1)}/healthz", timeout=5)
        assert health.json() == {"status": "ok"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "approvals stopped" in text
    assert "hook-secret-value" not in text and "inbound-secret-value" not in text
