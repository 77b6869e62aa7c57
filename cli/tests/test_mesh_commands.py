"""``stepline devices``, ``approvals``, ``runs wait`` and ``runs artifact`` against
a real mesh: ``stepline up`` processes with two simulated phones (started once
for this module), the device broker, the approvals service, the ledger and an
executor, reached the way a person reaches them (state directory, ``--as``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from stepline.cli import mesh
from stepline.common.testing import eventually

from .conftest import Cli, json_of, started_mesh

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WAIT_S = 60.0
POLL_S = 0.1
SETTINGS = {
    "STEPLINE_SCHEDULER_RECONCILE_INTERVAL_S": "0.5",
    "STEPLINE_SCHEDULER_WATCH_POLL_S": "0.5",
    "STEPLINE_APPROVALS_SWEEP_INTERVAL_S": "0.5",
    "STEPLINE_APPROVALS_OUTBOX_POLL_S": "0.2",
    "STEPLINE_BROKER_SCAN_INTERVAL_S": "0.5",
    "STEPLINE_EXECUTOR_DEVICE_TTL_S": "5",
}
SCREENSHOT = """
name: cli-screenshot
allowed_verbs: [android.*]
steps:
  - id: shot
    device: {pool: default}
    atomic:
      verb: android.screenshot
      args: {name: screen.png}
"""


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[mesh.MeshState]:
    with started_mesh(tmp_path_factory, phones=2, env=SETTINGS) as started:
        yield started


def field(text: str, label: str) -> str:
    """The value of the ``label:  value`` line of ``text``."""
    for line in text.splitlines():
        if line.startswith(label + ":"):
            return line.removeprefix(label + ":").strip()
    raise AssertionError(f"no {label!r} line in:\n{text}")


async def device_states(cli: Cli) -> dict[str, str]:
    listed = await json_of(cli, "devices", "list")
    return {d["serial"]: d.get("state", "") for d in listed.get("devices", [])}


async def all_available(cli: Cli, state: mesh.MeshState) -> None:
    async def check() -> bool:
        states = await device_states(cli)
        return all(states.get(p) == "DEVICE_STATE_AVAILABLE" for p in state.phones)

    await eventually(check, what="both phones AVAILABLE", timeout_s=WAIT_S, poll_s=POLL_S)


# --- devices -----------------------------------------------------------------------


async def test_devices_list_and_show_the_mesh_phones(cli: Cli, state: mesh.MeshState) -> None:
    await all_available(cli, state)
    assert sorted(await device_states(cli)) == sorted(state.phones)
    code, out, _ = await cli("devices", "list", "--as", "approver")  # any principal may read
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["SERIAL", "STATE", "MODEL"]
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(state.phones)
    assert all(line.split()[1] == "AVAILABLE" for line in lines[1:])

    code, out, _ = await cli("devices", "show", state.phones[0])
    assert code == 0
    assert (field(out, "device"), field(out, "state")) == (state.phones[0], "AVAILABLE")
    assert field(out, "model").startswith("Pixel 7")
    assert "health:  healthy, checked " in out and "CHECK" in out

    code, out, _ = await cli("devices", "list", "--state", "quarantined")
    assert (code, out) == (0, "no devices\n")
    code, _, err = await cli("devices", "show", "127.0.0.1:1")
    assert code == 2 and err.startswith("error: NOT_FOUND: ")


async def test_an_operator_quarantines_and_releases_a_device(
    cli: Cli, state: mesh.MeshState
) -> None:
    await all_available(cli, state)
    serial = state.phones[1]
    code, _, err = await cli(
        "devices", "quarantine", serial, "--reason", "screen cracked", "--as", "approver"
    )
    assert code == 2 and err.startswith("error: PERMISSION_DENIED: ")
    assert (await device_states(cli))[serial] == "DEVICE_STATE_AVAILABLE"

    code, out, err = await cli(
        "devices", "quarantine", serial, "--reason", "screen cracked",
        "--evidence", "ticket=OPS-17", "--evidence", "photos=2", "--as", "operator",
    )  # fmt: skip
    assert (code, out) == (0, f"device {serial} QUARANTINED\n"), err
    shown = (await json_of(cli, "devices", "show", serial))["device"]
    assert shown["state"] == "DEVICE_STATE_QUARANTINED"
    assert shown["quarantine"]["reason"] == "screen cracked"
    assert shown["quarantine"]["evidence"] == {"ticket": "OPS-17", "photos": 2}
    assert shown["quarantine"]["actor"]["id"] == "operator"
    code, out, _ = await cli("devices", "show", serial)
    assert "quarantine:\n  reason:  screen cracked\n  by:      operator" in out
    assert '    ticket: "OPS-17"' in out
    code, out, _ = await cli("devices", "list", "--state", "quarantined")
    assert [line.split()[0] for line in out.splitlines()[1:]] == [serial]

    code, out, err = await cli(
        "devices", "release", serial, "--reason", "screen replaced", "--as", "operator"
    )
    assert code == 0, err
    assert out.split()[:2] == ["device", serial]
    await all_available(cli, state)


async def test_a_device_is_bound_to_an_account_and_unbound(cli: Cli, state: mesh.MeshState) -> None:
    serial = state.phones[0]
    code, out, err = await cli("devices", "bind", serial, "acme", "--as", "operator")
    assert code == 0, err
    assert out.endswith(", bound to account acme\n")
    listed = await json_of(cli, "devices", "list", "--account", "acme")
    assert [d["serial"] for d in listed["devices"]] == [serial]
    code, _, err = await cli("devices", "unbind", serial, "globex", "--as", "operator")
    assert code == 2 and err.startswith("error: FAILED_PRECONDITION: ")
    code, out, err = await cli("devices", "unbind", serial, "acme", "--as", "operator")
    assert code == 0 and "bound to" not in out, err
    assert await json_of(cli, "devices", "list", "--account", "acme") == {}


# --- approvals ---------------------------------------------------------------------


async def _suspended_approval_run(cli: Cli, amount: int) -> tuple[str, str]:
    """Start examples/approval.yaml as the operator; wait until it is suspended;
    return the run id and its approval request's id."""
    code, _, err = await cli("workflows", "apply", str(EXAMPLES / "approval.yaml"))
    assert code == 0, err
    code, out, err = await cli(
        "run", "approval", "--input", f"amount={amount}", "--as", "operator", "--quiet"
    )
    assert code == 0, err
    run_id = out.strip()
    assert len(out.splitlines()) == 1 and run_id
    code, out, err = await cli(
        "runs", "wait", run_id, "--until", "suspended", "--max-wait", str(WAIT_S)
    )
    assert code == 0, out + err
    assert out.startswith(f"run {run_id} SUSPENDED\n  step ask waits for approval ")
    listed = await json_of(cli, "approvals", "list", "--run", run_id)
    (approval,) = listed["approvals"]
    assert approval["state"] == "APPROVAL_STATE_PENDING"
    assert f"approval {approval['approvalId']}: " in out
    return run_id, approval["approvalId"]


async def test_an_approval_gate_passes_once_the_approver_approves(cli: Cli) -> None:
    run_id, approval_id = await _suspended_approval_run(cli, 120)
    code, out, _ = await cli("approvals", "show", approval_id)
    assert code == 0
    assert (field(out, "state"), field(out, "votes"), field(out, "initiator")) == (
        "PENDING",
        "0/1",
        "operator",
    )
    assert field(out, "policy").startswith(
        "1 approval from role approver; initiator may not approve; expires after 1h00m"
    )
    assert "context:\n  inputs.amount: 120" in out
    assert out.endswith("no decisions yet\n")
    mine = await json_of(cli, "approvals", "list", "--actionable", "--as", "approver")
    assert approval_id in [a["approvalId"] for a in mine["approvals"]]
    theirs = await json_of(cli, "approvals", "list", "--actionable", "--as", "operator")
    assert approval_id not in [a["approvalId"] for a in theirs.get("approvals", [])]

    # The operator started the run and lacks the role: refused, nothing recorded.
    code, _, err = await cli("approvals", "approve", approval_id, "--as", "operator")
    assert code == 2 and err.startswith("error: PERMISSION_DENIED: ")
    code, out, err = await cli(
        "approvals", "approve", "--run", run_id, "--as", "approver", "--reason", "amount checked"
    )
    assert (code, out) == (0, f"approval {approval_id} APPROVED (1/1 approvals), run {run_id}\n")
    code, out, err = await cli("runs", "wait", run_id, "--max-wait", str(WAIT_S))
    assert code == 0 and out.startswith(f"run {run_id} SUCCEEDED"), out + err

    code, out, _ = await cli("approvals", "show", approval_id)
    decision = out.splitlines()[-1].split()
    assert decision[2:] == ["approver", "APPROVED", "grpc", "amount", "checked"]
    code, out, _ = await cli("runs", "show", run_id)
    assert any(
        line.startswith("ask ") and line.endswith(f"approval {approval_id}")
        for line in out.splitlines()
    ), out
    code, _, err = await cli("approvals", "approve", "--run", run_id, "--as", "approver")
    assert code == 2 and err == f"error: run {run_id} has no pending approval request\n"


async def test_a_rejection_fails_the_run(cli: Cli) -> None:
    run_id, approval_id = await _suspended_approval_run(cli, 9000)
    code, out, err = await cli(
        "approvals", "reject", approval_id, "--as", "approver", "--reason", "too much"
    )
    assert (code, out) == (0, f"approval {approval_id} REJECTED (0/1 approvals), run {run_id}\n")
    code, out, err = await cli("runs", "wait", run_id, "--max-wait", str(WAIT_S))
    assert code == 1 and out.startswith(f"run {run_id} FAILED"), out + err
    assert "REJECTED" in out


async def test_runs_wait_gives_up_after_max_wait(cli: Cli) -> None:
    run_id, _ = await _suspended_approval_run(cli, 1)
    code, _, err = await cli("runs", "wait", run_id, "--max-wait", "0.5")
    assert code == 1
    assert err == f"error: run {run_id} is still SUSPENDED after 0.5s (waited for terminal)\n"
    code, _, err = await cli("runs", "cancel", run_id, "--reason", "test over")
    assert code == 0, err
    code, out, _ = await cli("runs", "wait", run_id, "--until", "suspended", "--max-wait", "30")
    assert code == 1 and out.startswith(f"run {run_id} CANCELLED")


# --- artifacts ---------------------------------------------------------------------


async def test_a_screenshot_is_listed_and_saved(cli: Cli, tmp_path: Path) -> None:
    source = tmp_path / "screenshot.yaml"
    source.write_text(SCREENSHOT, encoding="utf-8")
    code, _, err = await cli("workflows", "apply", str(source))
    assert code == 0, err
    code, out, err = await cli("run", "cli-screenshot", "--wait", "--quiet")
    assert (code, err) == (0, ""), out
    run_id = out.strip()
    shown = await json_of(cli, "runs", "show", run_id)
    (artifact,) = shown["run"]["tasks"][0]["artifacts"]
    assert artifact["name"] == "screen.png" and artifact["contentType"] == "image/png"
    code, out, _ = await cli("runs", "show", run_id)
    assert artifact["artifactId"] in out and "screen.png" in out

    target = tmp_path / "screen.png"
    code, out, err = await cli("runs", "artifact", artifact["artifactId"], "-o", str(target))
    assert code == 0, err
    content = target.read_bytes()
    assert content.startswith(b"\x89PNG\r\n\x1a\n")
    assert hashlib.sha256(content).hexdigest() == artifact["sha256"]
    assert len(content) == int(artifact["sizeBytes"])
    assert out.startswith("wrote screen.png (image/png, ") and out.endswith(f" to {target}\n")
    # The ledger serves artifacts to admins and services only.
    code, _, err = await cli(
        "runs", "artifact", artifact["artifactId"], "-o", str(target), "--as", "operator"
    )
    assert code == 2 and err.startswith("error: PERMISSION_DENIED: ")
    code, _, err = await cli("runs", "artifact", run_id + "/shot:9:none.png", "-o", str(target))
    assert code == 2 and err.startswith("error: NOT_FOUND: ")
