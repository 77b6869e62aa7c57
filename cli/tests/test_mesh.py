"""``stepline up`` / ``status`` / ``down`` as a person runs them: real processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import grpc
import psutil
import pytest

from stepline.api.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from stepline.cli import mesh
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings
from stepline.common.embedded import ProcessRecord, group_alive, postgres_dsn

EXPECTED = {"postgres", "nats", "adb", *mesh.SERVICES}


def stepline(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stepline.cli", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={k: v for k, v in os.environ.items() if not k.startswith("STEPLINE_")},
    )


def _processes_under(state_dir: Path) -> list[psutil.Process]:
    """Every live process whose command line or working files name ``state_dir``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(str(state_dir) in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


async def _ledger_answers_with_auth(endpoint: str, token: str) -> grpc.StatusCode:
    async with open_channel(endpoint, settings=ClientSettings(), token=token) as channel:
        try:
            await ledger_pb2_grpc.LedgerServiceStub(channel).GetRun(
                ledger_pb2.GetRunRequest(run_id="none")
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def _write_marker(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS public.marker (note text)")
        await conn.execute("INSERT INTO public.marker VALUES ('kept')")
    finally:
        await conn.close()


async def _read_marker(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r["note"] for r in await conn.fetch("SELECT note FROM public.marker")]
    finally:
        await conn.close()


@pytest.mark.timeout(400)
def test_up_status_down_leaves_nothing_behind(tmp_path: Path) -> None:
    state_dir = tmp_path / "mesh"
    started = stepline(state_dir, "up")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        status = stepline(state_dir, "status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        health = json.loads(status.stdout)
        assert {h["name"] for h in health} == EXPECTED
        assert all(h["healthy"] for h in health), health

        state = mesh.MeshState.load(state_dir)
        assert state is not None
        # Every service authenticates: a wrong token is refused, the admin's accepted.
        ledger = state.endpoint("ledger")
        assert asyncio.run(_ledger_answers_with_auth(ledger, "nope")) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert asyncio.run(_ledger_answers_with_auth(ledger, state.admin_token)) != (
            grpc.StatusCode.UNAUTHENTICATED
        )
        postgres = next(c for c in state.components if c.name == "postgres")
        asyncio.run(_write_marker(postgres_dsn(postgres.port, mesh.DATABASE)))

        again = stepline(state_dir, "up")  # idempotent: reports, starts nothing new
        assert again.returncode == 0 and "already running" in again.stdout
    finally:
        stopped = stepline(state_dir, "down")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for record in state.components:
        assert not group_alive(record), f"{record.name} (pid {record.pid}) survived down"
    assert _processes_under(state_dir) == []
    assert stepline(state_dir, "status").returncode == 1

    # A restart keeps the data written before.
    restarted = stepline(state_dir, "up")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    try:
        state = mesh.MeshState.load(state_dir)
        assert state is not None
        postgres = next(c for c in state.components if c.name == "postgres")
        assert asyncio.run(_read_marker(postgres_dsn(postgres.port, mesh.DATABASE))) == ["kept"]
    finally:
        assert stepline(state_dir, "down").returncode == 0
    assert _processes_under(state_dir) == []


def test_down_without_a_mesh_says_so(tmp_path: Path) -> None:
    result = stepline(tmp_path, "down")
    assert result.returncode == 0
    assert "nothing to stop" in result.stdout


def test_process_records_round_trip() -> None:
    record = ProcessRecord(name="x", pid=1, create_time=2.0, log="l", endpoint="e", port=3)
    assert ProcessRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
