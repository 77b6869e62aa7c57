"""``stepline up`` / ``status`` / ``down`` as a person runs them: real processes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import asyncpg
import grpc
import psutil
import pytest

from stepline.api.common.v1 import workflow_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from stepline.cli import mesh
from stepline.common.auth import Authenticator, Principal
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings
from stepline.common.embedded import ProcessRecord, group_alive, record_dsn
from stepline.common.jetstream import Streams, connect

EXPECTED = {"postgres", "nats", "adb", "phone-1", "phone-2", *mesh.SERVICES}


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


async def _create_run(endpoint: str, token: str) -> str:
    request = ledger_pb2.CreateRunRequest(request_id="mesh-test")
    request.definition.name = "mesh"
    request.definition.version = 1
    request.initiator.id = "admin"
    request.tasks.add(step_id="a", step_path="a", kind=workflow_pb2.STEP_KIND_ATOMIC)
    async with open_channel(endpoint, settings=ClientSettings(), token=token) as channel:
        response = await ledger_pb2_grpc.LedgerServiceStub(channel).CreateRun(request)
    return response.run.run_id


async def _first_event_of(nats_url: str, run_id: str) -> events_pb2.Event:
    """The first message on STEPLINE_EVENTS for ``run_id`` (waits up to 30 s)."""
    nc = await connect(nats_url, name="mesh-test")
    try:
        sub = await nc.jetstream().subscribe(
            Streams().subject("events", "*", run_id), ordered_consumer=True
        )
        message = await sub.next_msg(timeout=30)
        return events_pb2.Event.FromString(message.data)
    finally:
        await nc.close()


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
        # Two phones (the default) listen where the state says; the approvals
        # webhook has its own port, shown by `status`.
        assert len(state.phones) == 2 and all(_accepts(p) for p in state.phones)
        webhook = state.approvals_webhook
        assert webhook.startswith("http://127.0.0.1:") and webhook.endswith("/v1/decisions")
        assert f"approvals webhook: {webhook}" in stepline(state_dir, "status").stdout
        # Private files: every principal's token, and the webhook signing secrets.
        assert set(state.tokens) == {"admin", "operator", "approver"}
        for name in (mesh.CREDENTIALS_FILE, mesh.SECRETS_FILE, "service.token"):
            assert (state_dir / name).stat().st_mode & 0o777 == 0o600, name
        secrets = json.loads(state.secrets_file.read_text(encoding="utf-8"))["secrets"]
        assert set(secrets) == {"inbound", "demo"}
        # Every service authenticates: a wrong token is refused, the admin's accepted.
        ledger = state.endpoint("ledger")
        assert asyncio.run(_ledger_answers_with_auth(ledger, "nope")) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert asyncio.run(_ledger_answers_with_auth(ledger, state.admin_token)) != (
            grpc.StatusCode.UNAUTHENTICATED
        )
        postgres = next(c for c in state.components if c.name == "postgres")
        asyncio.run(_write_marker(record_dsn(postgres, mesh.DATABASE)))
        # A run recorded by the ledger reaches STEPLINE_EVENTS through its outbox relay.
        run_id = asyncio.run(_create_run(ledger, state.admin_token))
        event = asyncio.run(_first_event_of(state.endpoint("nats"), run_id))
        assert event.run_id == run_id and event.record.sequence == 1

        again = stepline(state_dir, "up")  # idempotent: reports, starts nothing new
        assert again.returncode == 0 and "already running" in again.stdout
    finally:
        stopped = stepline(state_dir, "down")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "was killed" not in stopped.stdout  # every component stopped gracefully
    for record in state.components:
        assert not group_alive(record), f"{record.name} (pid {record.pid}) survived down"
    assert _processes_under(state_dir) == []
    assert stepline(state_dir, "status").returncode == 1

    # A restart keeps the data written before, the tokens, the secrets and
    # (their ports being free) the phones' addresses, so device serials stay.
    restarted = stepline(state_dir, "up", "--phones", "1")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    try:
        second = mesh.MeshState.load(state_dir)
        assert second is not None
        postgres = next(c for c in second.components if c.name == "postgres")
        assert asyncio.run(_read_marker(record_dsn(postgres, mesh.DATABASE))) == ["kept"]
        assert second.tokens == state.tokens
        assert json.loads(second.secrets_file.read_text(encoding="utf-8"))["secrets"] == secrets
        assert second.phones == state.phones[:1]
        assert second.approvals_webhook == webhook
    finally:
        assert stepline(state_dir, "down").returncode == 0
    assert _processes_under(state_dir) == []


def _accepts(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def test_credentials_of_an_older_mesh_gain_the_new_principals(tmp_path: Path) -> None:
    old = {"admin_token": "admin-secret", "service_token": "service-secret"}
    (tmp_path / mesh.CREDENTIALS_FILE).write_text(json.dumps(old), encoding="utf-8")
    tokens, auth_file, token_file = mesh._credentials(tmp_path)
    assert tokens["admin"] == "admin-secret" and token_file.read_text() == "service-secret"
    assert set(tokens) == {"admin", "operator", "approver"}
    assert len({tokens["operator"], tokens["approver"], "admin-secret"}) == 3
    document = json.loads((tmp_path / mesh.CREDENTIALS_FILE).read_text(encoding="utf-8"))
    assert document["admin_token"] == "admin-secret"  # the field older clients read
    assert mesh.read_tokens(tmp_path / mesh.CREDENTIALS_FILE) == tokens
    principals = Authenticator.from_file(auth_file)
    assert principals.authenticate([("authorization", f"Bearer {tokens['approver']}")]) == (
        Principal("approver", frozenset({"approver"}))
    )
    assert mesh._credentials(tmp_path)[0] == tokens  # written once


def test_down_without_a_mesh_says_so(tmp_path: Path) -> None:
    result = stepline(tmp_path, "down")
    assert result.returncode == 0
    assert "nothing to stop" in result.stdout


def test_process_records_round_trip() -> None:
    record = ProcessRecord(name="x", pid=1, create_time=2.0, log="l", endpoint="e", port=3)
    assert ProcessRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
