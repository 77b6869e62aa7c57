"""``stepline schedules ...`` against a real mesh: ``stepline up`` processes
(PostgreSQL, nats-server, the scheduler, the ledger, ...; started once for
this module), reached the way a person reaches them (state directory, ``--as``).

Each test registers a workflow of its own, so that ``schedules list
--workflow`` shows only that test's schedules. The schedules fire once a
year at most, so none fires while a test looks at it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stepline.cli import mesh, schedules

from .conftest import Cli, json_of, started_mesh

#: 01:30 UTC on 1 July: 09:30 in Shanghai (UTC+8, no summer time)
CRON = "30 9 1 7 *"
SHANGHAI = "Asia/Shanghai"
DEFINITION = """
name: {name}
description: Greets someone (a schedule's workflow).
input_schema:
  fields:
    - {{name: name, type: INPUT_TYPE_STRING, default: world}}
    - {{name: count, type: INPUT_TYPE_INT, default: 1}}
allowed_verbs: [core.*]
steps:
  - id: greet
    atomic: {{verb: core.echo, args: {{message: "Hello, {{{{ inputs.name }}}}!"}}}}
"""
MISSING = "00000000-0000-0000-0000-000000000000"


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[mesh.MeshState]:
    with started_mesh(tmp_path_factory, phones=0) as started:
        yield started


@pytest.fixture
async def workflow(cli: Cli, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A workflow registered for this test only (version 1); its name."""
    name = "sched-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    source = tmp_path / f"{name}.yaml"
    source.write_text(DEFINITION.format(name=name), encoding="utf-8")
    code, out, err = await cli("workflows", "apply", str(source))
    assert (code, out) == (0, f"workflow {name} version 1 created\n"), err
    return name


async def listed(cli: Cli, workflow: str) -> list[dict[str, Any]]:
    """``schedules list --workflow W --json``: the schedules, as proto JSON."""
    document = await json_of(cli, "schedules", "list", "--workflow", workflow)
    found: list[dict[str, Any]] = document.get("schedules", [])
    return found


async def create(cli: Cli, workflow: str, *extra: str) -> str:
    """Create a schedule of ``workflow`` (``--quiet``); its id."""
    code, out, err = await cli("schedules", "create", workflow, "--cron", CRON, *extra, "-q")
    assert code == 0, err
    schedule_id = out.strip()
    assert len(out.splitlines()) == 1 and schedule_id
    return schedule_id


def field(text: str, label: str) -> str:
    """The value of the ``label:  value`` line of ``text``."""
    for line in text.splitlines():
        if line.startswith(label + ":"):
            return line.removeprefix(label + ":").strip()
    raise AssertionError(f"no {label!r} line in:\n{text}")


def rows(table: str) -> list[list[str]]:
    """A table's lines split into cells (cells are two or more spaces apart)."""
    return [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()]


NEXT_FIRE = re.compile(r"\d{4}-07-01 01:30:00Z")


# --- create, list, show -----------------------------------------------------------


async def test_a_schedule_is_created_listed_and_shown(cli: Cli, workflow: str) -> None:
    code, out, err = await cli(
        "schedules", "create", workflow, "--cron", CRON, "--timezone", SHANGHAI,
        "--input", "name=Ada", "--input", "count=3", "--label", "team=ops",
        "--version", "1", "--description", "summer greeting", "--as", "operator",
    )  # fmt: skip
    assert code == 0, err
    match = re.fullmatch(
        rf'schedule (\S+) ACTIVE: {workflow} \(1\) at "{re.escape(CRON)}" {SHANGHAI}, '
        rf"next ({NEXT_FIRE.pattern}) \(in \S+\)\n",
        out,
    )
    assert match, out
    schedule_id, next_fire = match.groups()

    code, out, err = await cli("schedules", "list", "--workflow", workflow)
    assert code == 0, err
    header, *body = rows(out)
    assert header == [
        "SCHEDULE", "WORKFLOW", "VERSION", "CRON", "TIMEZONE", "STATE", "NEXT", "LAST RUN",
    ]  # fmt: skip
    assert body == [[schedule_id, workflow, "1", CRON, SHANGHAI, "ACTIVE", next_fire, "-"]]
    # Every schedule, of every workflow, without --workflow.
    code, out, _ = await cli("schedules", "list")
    assert code == 0 and schedule_id in [row[0] for row in rows(out)[1:]]

    (shown,) = await listed(cli, workflow)
    assert shown["scheduleId"] == schedule_id
    assert (shown["workflowName"], shown["workflowVersion"]) == (workflow, "1")
    assert (shown["cronExpression"], shown["timezone"]) == (CRON, SHANGHAI)
    assert shown["state"] == "SCHEDULE_STATE_ACTIVE"
    assert shown["inputs"] == {"name": "Ada", "count": 3}
    assert shown["labels"] == {"team": "ops"}
    assert shown["overlapPolicy"] == "OVERLAP_POLICY_SKIP"
    assert shown["createdBy"]["id"] == "operator"
    assert shown["nextFireTime"].startswith(next_fire.replace(" ", "T").removesuffix("Z"))
    assert await json_of(cli, "schedules", "show", schedule_id) == {"schedule": shown}

    code, out, err = await cli("schedules", "show", schedule_id)
    assert code == 0, err
    assert field(out, "schedule") == schedule_id
    assert field(out, "workflow") == f"{workflow} (v1)"
    assert (field(out, "cron"), field(out, "timezone")) == (CRON, SHANGHAI)
    assert (field(out, "state"), field(out, "overlap")) == ("ACTIVE", "skip")
    assert (field(out, "description"), field(out, "labels")) == ("summer greeting", "team=ops")
    assert field(out, "created").endswith(" by operator")
    assert field(out, "next fire").startswith(next_fire + " (in ")
    assert field(out, "last fire") == "never"
    assert out.endswith('\n\ninputs:\n  count: 3\n  name: "Ada"\n')


async def test_defaults_paused_creation_and_idempotency(cli: Cli, workflow: str) -> None:
    code, out, err = await cli(
        "schedules", "create", workflow, "--cron", CRON, "--paused", "--idempotency-key", workflow
    )
    assert code == 0, err
    schedule_id = out.split()[1]
    assert out == f'schedule {schedule_id} PAUSED: {workflow} (latest) at "{CRON}" UTC\n'
    code, out, err = await cli(
        "schedules", "create", workflow, "--cron", CRON, "--paused", "--idempotency-key", workflow
    )
    assert code == 0 and out.split()[1] == schedule_id, err
    # The same key for a different schedule is refused.
    code, _, err = await cli(
        "schedules", "create", workflow, "--cron", "0 0 1 1 *", "--idempotency-key", workflow
    )
    assert code == 2 and err.startswith("error: ABORTED: "), err

    (shown,) = await listed(cli, workflow)
    assert shown["state"] == "SCHEDULE_STATE_PAUSED"
    assert "nextFireTime" not in shown and "workflowVersion" not in shown
    assert shown["inputs"] == {"name": "world", "count": 1}  # the workflow's defaults
    code, out, _ = await cli("schedules", "show", schedule_id)
    assert (field(out, "workflow"), field(out, "timezone")) == (
        f"{workflow} (latest at each firing)",
        "UTC",
    )
    assert field(out, "next fire") == "none while paused"
    assert out.endswith('\n\ninputs:\n  count: 1\n  name: "world"\n')
    assert rows((await cli("schedules", "list", "--workflow", workflow))[1])[1][5:7] == [
        "PAUSED",
        "-",
    ]


async def test_list_reads_every_page(
    cli: Cli, workflow: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = [await create(cli, workflow, "--input", f"count={i}") for i in range(5)]
    monkeypatch.setattr(schedules, "PAGE_SIZE", 2)
    assert [s["scheduleId"] for s in await listed(cli, workflow)] == created
    code, out, _ = await cli("schedules", "list", "--workflow", workflow)
    assert code == 0 and [row[0] for row in rows(out)[1:]] == created
    code, out, _ = await cli("schedules", "list", "--workflow", workflow + "-none")
    assert (code, out) == (0, "no schedules\n")
    assert await json_of(cli, "schedules", "list", "--workflow", workflow + "-none") == {}


# --- pause, resume, delete --------------------------------------------------------


async def test_a_schedule_is_paused_resumed_and_deleted(cli: Cli, workflow: str) -> None:
    schedule_id = await create(cli, workflow, "--timezone", SHANGHAI)

    # An approver may neither read the schedule nor steer it.
    assert [s["scheduleId"] for s in await listed(cli, workflow)] == [schedule_id]
    assert await json_of(cli, "schedules", "list", "--workflow", workflow, "--as", "approver") == {}
    code, _, err = await cli("schedules", "show", schedule_id, "--as", "approver")
    assert code == 2 and err.startswith("error: PERMISSION_DENIED: "), err
    code, _, err = await cli("schedules", "pause", schedule_id, "--as", "approver")
    assert code == 2 and err.startswith("error: PERMISSION_DENIED: "), err

    code, out, err = await cli(
        "schedules", "pause", schedule_id, "--reason", "holiday", "--as", "operator"
    )
    assert (code, out) == (
        0,
        f'schedule {schedule_id} PAUSED: {workflow} (latest) at "{CRON}" {SHANGHAI}\n',
    ), err
    (shown,) = await listed(cli, workflow)
    assert shown["state"] == "SCHEDULE_STATE_PAUSED" and "nextFireTime" not in shown
    code, out, _ = await cli("schedules", "show", schedule_id)
    assert (field(out, "state"), field(out, "next fire")) == ("PAUSED", "none while paused")
    # Pausing a paused schedule changes nothing.
    paused = await json_of(cli, "schedules", "pause", schedule_id)
    assert paused == {"schedule": shown}

    code, out, err = await cli("schedules", "resume", schedule_id, "--as", "operator")
    assert code == 0, err
    assert re.fullmatch(
        rf'schedule {schedule_id} ACTIVE: {workflow} \(latest\) at "{re.escape(CRON)}" '
        rf"{SHANGHAI}, next {NEXT_FIRE.pattern} \(in \S+\)\n",
        out,
    ), out
    (shown,) = await listed(cli, workflow)
    assert shown["state"] == "SCHEDULE_STATE_ACTIVE" and "nextFireTime" in shown

    code, _, err = await cli("schedules", "delete", schedule_id, "--as", "approver")
    assert code == 2 and err.startswith("error: PERMISSION_DENIED: "), err
    code, out, err = await cli("schedules", "delete", schedule_id, "--as", "operator")
    assert (code, out) == (
        0,
        f"schedule {schedule_id} deleted ({workflow}; the runs it started are kept)\n",
    ), err
    assert await listed(cli, workflow) == []
    code, out, _ = await cli("schedules", "list", "--workflow", workflow)
    assert (code, out) == (0, "no schedules\n")
    gone = f"error: NOT_FOUND: schedule {schedule_id!r} does not exist\n"
    assert await cli("schedules", "show", schedule_id) == (2, "", gone)
    assert await cli("schedules", "delete", schedule_id) == (2, "", gone)

    other = await create(cli, workflow)
    assert await json_of(cli, "schedules", "delete", other) == {}
    assert await listed(cli, workflow) == []


# --- errors -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["show", "pause", "resume", "delete"])
async def test_an_unknown_schedule_is_not_found(cli: Cli, command: str) -> None:
    code, out, err = await cli("schedules", command, MISSING)
    assert (code, out) == (2, "")
    assert err == f"error: NOT_FOUND: schedule {MISSING!r} does not exist\n"


async def test_bad_schedules_are_refused_and_create_nothing(cli: Cli, workflow: str) -> None:
    code, out, err = await cli("schedules", "create", workflow, "--cron", "every day")
    assert (code, out) == (2, "")
    assert err == (
        "error: INVALID_ARGUMENT: schedule.cron_expression 'every day' must be a five-field "
        "cron expression (minute hour day-of-month month day-of-week)\n"
    )
    code, _, err = await cli("schedules", "create", workflow, "--cron", "61 * * * *")
    assert code == 2 and err.startswith("error: INVALID_ARGUMENT: schedule.cron_expression "), err
    code, _, err = await cli(
        "schedules", "create", workflow, "--cron", CRON, "--timezone", "Mars/Olympus"
    )
    assert code == 2 and err == (
        "error: INVALID_ARGUMENT: schedule.timezone 'Mars/Olympus' is not an IANA time zone "
        "(e.g. Asia/Shanghai)\n"
    )
    code, _, err = await cli("schedules", "create", workflow, "--cron", CRON, "--input", "count=x")
    assert code == 2 and err.startswith("error: INVALID_ARGUMENT: "), err
    assert "count" in err
    code, _, err = await cli("schedules", "create", workflow, "--cron", CRON, "--input", "name")
    assert (code, err) == (2, "error: --input 'name': expected KEY=VALUE\n")
    code, _, err = await cli("schedules", "create", workflow, "--cron", CRON, "--version", "9")
    assert code == 2 and err.startswith("error: NOT_FOUND: "), err
    code, _, err = await cli("schedules", "create", workflow + "-none", "--cron", CRON)
    assert code == 2 and err.startswith("error: NOT_FOUND: "), err
    code, _, err = await cli("schedules", "create", workflow, "--cron", CRON, "--as", "approver")
    assert code == 2 and err.startswith("error: PERMISSION_DENIED: "), err
    assert await listed(cli, workflow) == []
    # argparse refuses a missing --cron before anything is sent.
    code, _, _ = await cli("schedules", "create", workflow)
    assert code == 2
    assert await listed(cli, workflow) == []
